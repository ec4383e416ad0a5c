"""Type stubs of llmapi._core, the C++ core: requests, paged-KV block manager, scheduler, executor."""

from typing import Any, Dict, List, Optional, Protocol, Sequence, Tuple

import numpy as np
import numpy.typing as npt

class ExecutorConfig:
    """Limits and policies of one executor; invalid values raise ValueError naming the field."""

    max_batch_size: int  # most requests running at once (so at most this many per step)
    max_num_tokens: int  # token budget of one step
    max_seq_len: int  # prompt + generated tokens of one request; reaching it finishes "length"
    tokens_per_block: int
    num_blocks: int  # KV cache size in blocks
    enable_prefix_caching: bool
    enable_chunked_prefill: bool  # when off, max_num_tokens must be >= max_seq_len
    max_inflight_batches: int  # batches submitted to the runner and not yet collected
    # Schedule step N+1 while step N runs (one rank): two steps in flight, plain requests run one
    # token ahead on placeholder inputs (Batch.prev_rows) that the runner fills on the device.
    # Needs max_inflight_batches = 1.
    async_scheduling: bool
    # Token ids of requests (prompt, EOS, stop, bad words, logit bias) must be below it, else
    # RequestError at enqueue; a sampled token at or above it fails its request alone. 0: unchecked.
    vocab_size: int
    # The model's sliding window (attention sees the last this many positions): KV blocks wholly
    # before a request's window are handed back as it moves on. 0: none.
    sliding_window: int
    # Speculative decoding: 0 none, 1 n-gram drafts (proposed by the scheduler), 2 a draft model, 3 an
    # EAGLE head (the runner proposes their drafts); a decode step carries up to max_draft_len drafts.
    speculative_mode: int
    max_draft_len: int
    max_matching_ngram_size: int  # n-gram: the longest suffix looked for earlier in a request's tokens
    # Encoder-decoder requests: the longest encoder input accepted (RequestError beyond it); 0: no limit besides
    # max_num_tokens - 1 (the encoder runs unchunked in one step beside at least one decoder token).
    max_encoder_input_len: int
    # Admission (TensorRT-LLM's CapacitySchedulerPolicy): 0 max utilization (a request is admitted when its next
    # step's blocks fit; running requests short of a block preempt the latest admitted), 1 guaranteed no evict (the
    # free blocks must also cover its blocks to completion and what the running requests still need to reach theirs).
    capacity_scheduler_policy: int
    def __init__(self, max_batch_size: int, max_num_tokens: int, max_seq_len: int,
                 tokens_per_block: int, num_blocks: int, enable_prefix_caching: bool = True,
                 enable_chunked_prefill: bool = True, max_inflight_batches: int = 1,
                 async_scheduling: bool = False, vocab_size: int = 0, sliding_window: int = 0,
                 speculative_mode: int = 0, max_draft_len: int = 0, max_matching_ngram_size: int = 0,
                 max_encoder_input_len: int = 0, capacity_scheduler_policy: int = 0) -> None: ...

def propose_ngram(tokens: Sequence[int], max_ngram_size: int, max_draft_len: int) -> List[int]:
    """The tokens after the most recent earlier occurrence of the longest suffix of `tokens` (max_ngram_size
    tokens down to 1), at most max_draft_len of them; [] without a match."""

class Request:
    """One request (invalid settings raise llmapi.errors.RequestError). Scheduler.request()
    returns snapshots of the same class with the scheduling state filled in.

    num_sequences > 1 forks the request when it first samples: into num_sequences samples, or
    (beam_search) beams of which num_returned hypotheses come back. early_stopping: 0 heuristic
    (transformers' False), 1 (True), 2 ("never"). logprobs / prompt_logprobs: -1 none, else the
    top-k width. token_history: the runner keeps the request's token ids (a logits processor).
    adapter_slot: the runner's LoRA slot (-1 none); cache_salt: seeds the prefix-cache hash chain (0 none);
    prompt_table_size: ids past vocab_size the prompt may hold (its prompt table's rows).
    encoder_token_ids: an encoder-decoder request's encoder input (empty: decoder-only; prompt_token_ids is the
    decoder prompt); with it, cache_salt becomes a nonzero hash of (the given cache_salt, these ids), so decoder
    blocks of different sources never share the prefix cache. no_repeat_ngram_size: 0 off, n > 0 masks every
    token that would repeat an n-gram of the request's tokens (transformers'). forced_eos_token_id: -1 off, else
    the only id the last allowed token (output index max_tokens - 1) may be (Batch.forced_token_ids).
    forced_bos_token_id: -1 off, else the only id the token after a one-token prompt (an encoder-decoder model's
    decoder start) may be; where both apply, the forced EOS wins (transformers' order)."""

    def __init__(self, request_id: int, prompt_token_ids: Sequence[int], max_tokens: int,
                 min_tokens: int = 0, eos_token_ids: Sequence[int] = ...,
                 stop_token_ids: Sequence[int] = ..., ignore_eos: bool = False,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 seed: int = 0, min_p: float = 0.0, repetition_penalty: float = 1.0,
                 presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                 bad_words: Sequence[Sequence[int]] = ..., logit_bias: Dict[int, float] = ...,
                 num_sequences: int = 1, beam_search: bool = False, length_penalty: float = 1.0,
                 early_stopping: int = 0, num_returned: int = 1, logprobs: int = -1,
                 prompt_logprobs: int = -1, context_logits: bool = False,
                 generation_logits: bool = False, token_history: bool = False, adapter_slot: int = -1,
                 cache_salt: int = 0, prompt_table_size: int = 0, encoder_token_ids: Sequence[int] = ...,
                 no_repeat_ngram_size: int = 0, forced_eos_token_id: int = -1,
                 forced_bos_token_id: int = -1) -> None: ...
    # These settings, another prompt (and encoder input: its salt is mixed anew from cache_salt).
    def with_prompt(self, request_id: int, prompt_token_ids: Sequence[int], max_tokens: int,
                    min_tokens: int, seed: int, adapter_slot: int = -1, cache_salt: int = 0,
                    prompt_table_size: int = 0, *, encoder_token_ids: Sequence[int] = ...) -> "Request": ...
    @property
    def user_id(self) -> int: ...  # the enqueued id; request_id differs for forked sequences
    @property
    def seq_index(self) -> int: ...
    @property
    def slot(self) -> int: ...  # the runner's state row, -1 for none
    @property
    def num_sequences(self) -> int: ...
    @property
    def beam_search(self) -> bool: ...
    @property
    def requested_logprobs(self) -> int: ...  # the constructor's `logprobs`: -1 none, k >= 0 the top k
    # The constructor's other settings, as it took them (a Request can be rebuilt from its fields).
    @property
    def min_p(self) -> float: ...
    @property
    def repetition_penalty(self) -> float: ...
    @property
    def presence_penalty(self) -> float: ...
    @property
    def frequency_penalty(self) -> float: ...
    @property
    def bad_words(self) -> List[List[int]]: ...
    @property
    def logit_bias(self) -> Dict[int, float]: ...
    @property
    def length_penalty(self) -> float: ...
    @property
    def early_stopping(self) -> int: ...
    @property
    def num_returned(self) -> int: ...
    @property
    def prompt_logprobs(self) -> int: ...
    @property
    def context_logits(self) -> bool: ...
    @property
    def generation_logits(self) -> bool: ...
    @property
    def token_history(self) -> bool: ...
    @property
    def adapter_slot(self) -> int: ...
    @property
    def cache_salt(self) -> int: ...  # with encoder ids: the hash mixed from the given salt and them
    @property
    def no_repeat_ngram_size(self) -> int: ...
    @property
    def forced_eos_token_id(self) -> int: ...
    @property
    def forced_bos_token_id(self) -> int: ...
    @property
    def encoder_token_ids(self) -> List[int]: ...
    @property
    def cross_block_ids(self) -> List[int]: ...  # cross-attention KV blocks (empty until its encoder step)
    @property
    def prompt_table_size(self) -> int: ...
    @property
    def request_id(self) -> int: ...
    @property
    def prompt_token_ids(self) -> List[int]: ...
    @property
    def output_token_ids(self) -> List[int]: ...
    @property
    def num_tokens(self) -> int: ...
    @property
    def max_tokens(self) -> int: ...
    @property
    def min_tokens(self) -> int: ...
    @property
    def eos_token_ids(self) -> List[int]: ...
    @property
    def stop_token_ids(self) -> List[int]: ...
    @property
    def ignore_eos(self) -> bool: ...
    @property
    def temperature(self) -> float: ...
    @property
    def top_k(self) -> int: ...
    @property
    def top_p(self) -> float: ...
    @property
    def seed(self) -> int: ...
    @property
    def status(self) -> str: ...  # "waiting" | "running" | "finished"
    @property
    def num_computed_tokens(self) -> int: ...
    @property
    def block_ids(self) -> List[int]: ...
    @property
    def num_cached_tokens(self) -> int: ...  # prefix-cache hit at the first admission
    @property
    def num_preemptions(self) -> int: ...
    @property
    def num_draft_computed(self) -> int: ...  # draft model / EAGLE: positions whose drafter KV is valid
    @property
    def num_draft_tokens(self) -> int: ...  # speculative decoding: drafts verified so far ...
    @property
    def num_accepted_draft_tokens(self) -> int: ...  # ... and accepted

class Response:
    """Tokens generated since the sequence's previous response, and its finish state."""

    @property
    def request_id(self) -> int: ...
    @property
    def seq_index(self) -> int: ...  # which of the request's sequences (n / best_of / beam hypotheses)
    @property
    def token_ids(self) -> List[int]: ...
    @property
    def finished(self) -> bool: ...  # this sequence
    @property
    def request_finished(self) -> bool: ...  # every sequence of the request
    @property
    def num_top_logprobs(self) -> int: ...  # k, or -1 when the request asked for no logprobs
    @property
    def logprobs(self) -> List[float]: ...  # per token in token_ids
    @property
    def ranks(self) -> List[int]: ...
    @property
    def top_ids(self) -> List[int]: ...  # [tokens * k]
    @property
    def top_logprobs(self) -> List[float]: ...
    @property
    def cumulative_logprob(self) -> float: ...
    @property
    def finish_reason(self) -> str: ...  # "" | "stop" | "length" | "abort" | "error"
    @property
    def stop_reason(self) -> int: ...  # the stop / eos token id, -1 if none
    @property
    def error(self) -> str: ...
    @property
    def num_prompt_tokens(self) -> int: ...
    @property
    def num_cached_tokens(self) -> int: ...
    @property
    def num_draft_tokens(self) -> int: ...  # the request's drafts verified so far ...
    @property
    def num_accepted_draft_tokens(self) -> int: ...  # ... and accepted

class Batch:
    """One step's inputs (R requests, T tokens); every array is a read-only view."""

    num_tokens: int
    num_requests: int
    tokens_per_block: int
    @property
    def request_ids(self) -> npt.NDArray[np.uint64]: ...  # [R]
    @property
    def input_ids(self) -> npt.NDArray[np.int32]: ...  # [T]; -1 where prev_rows >= 0
    @property
    def prev_rows(self) -> npt.NDArray[np.int32]: ...  # [T] -1: input_ids[t] is known; j >= 0: the
    # token sampled for row j of the batch submitted (successfully) just before this one (async scheduling)
    @property
    def positions(self) -> npt.NDArray[np.int32]: ...  # [T]
    @property
    def query_lens(self) -> npt.NDArray[np.int32]: ...  # [R]
    @property
    def context_lens(self) -> npt.NDArray[np.int32]: ...  # [R] KV tokens after this step
    @property
    def block_tables(self) -> npt.NDArray[np.int32]: ...  # [R, max_blocks] padded with 0; -1: released
    @property
    def slot_mapping(self) -> npt.NDArray[np.int64]: ...  # [T]
    @property
    def do_sample(self) -> npt.NDArray[np.int8]: ...  # [R]
    @property
    def temperature(self) -> npt.NDArray[np.float32]: ...  # [R]
    @property
    def top_k(self) -> npt.NDArray[np.int32]: ...  # [R]
    @property
    def top_p(self) -> npt.NDArray[np.float32]: ...  # [R]
    @property
    def seeds(self) -> npt.NDArray[np.int64]: ...  # [R]
    @property
    def output_index(self) -> npt.NDArray[np.int32]: ...  # [R]
    @property
    def suppress_offsets(self) -> npt.NDArray[np.int32]: ...  # [R+1]
    @property
    def suppress_ids(self) -> npt.NDArray[np.int32]: ...  # [S] min_tokens stops, bad words, no-repeat n-grams
    @property
    def seq_index(self) -> npt.NDArray[np.int32]: ...  # [R] keys a sequence's sampling noise
    @property
    def block_copies(self) -> npt.NDArray[np.int32]: ...  # [C, 2] (source, destination) to copy first
    @property
    def num_candidates(self) -> npt.NDArray[np.int32]: ...  # [R] 1, n (a forking row), beam top-K
    @property
    def beam(self) -> npt.NDArray[np.int8]: ...  # [R]
    @property
    def min_p(self) -> npt.NDArray[np.float32]: ...  # [R]
    @property
    def repetition_penalty(self) -> npt.NDArray[np.float32]: ...  # [R]
    @property
    def presence_penalty(self) -> npt.NDArray[np.float32]: ...  # [R]
    @property
    def frequency_penalty(self) -> npt.NDArray[np.float32]: ...  # [R]
    @property
    def bias_offsets(self) -> npt.NDArray[np.int32]: ...  # [R+1]
    @property
    def bias_ids(self) -> npt.NDArray[np.int32]: ...  # [Bn]
    @property
    def bias_values(self) -> npt.NDArray[np.float32]: ...  # [Bn]
    @property
    def logprobs(self) -> npt.NDArray[np.int32]: ...  # [R] -1 or the top-k width
    @property
    def prompt_logprobs(self) -> npt.NDArray[np.int32]: ...  # [R] -1 or k, on steps with prompt tokens
    @property
    def context_logits(self) -> npt.NDArray[np.int8]: ...  # [R]
    @property
    def generation_logits(self) -> npt.NDArray[np.int8]: ...  # [R]
    @property
    def prompt_lens(self) -> npt.NDArray[np.int32]: ...  # [R]
    @property
    def next_token_ids(self) -> npt.NDArray[np.int32]: ...  # [R] token after this step's last, or -1
    @property
    def adapter_slots(self) -> npt.NDArray[np.int32]: ...  # [R] the request's LoRA slot, -1 for none
    @property
    def slots(self) -> npt.NDArray[np.int32]: ...  # [R] the runner's state row, -1 for none
    @property
    def slot_copy_from(self) -> npt.NDArray[np.int32]: ...  # [R] copy this row first (a fork), -1
    @property
    def slot_reset(self) -> npt.NDArray[np.int8]: ...  # [R] a new slot: clear it first
    @property
    def state_start(self) -> npt.NDArray[np.int32]: ...  # [R] position of the first appended token
    @property
    def state_offsets(self) -> npt.NDArray[np.int32]: ...  # [R+1]
    @property
    def state_ids(self) -> npt.NDArray[np.int32]: ...  # [H] tokens appended to the state rows
    # Speculative decoding: row r's query ends in num_draft_tokens[r] drafts (n-gram ids, or -1 for the
    # runner's drafter); the drafter's KV is valid before draft_start[r] (-1: no drafting) and
    # draft_input_ids[draft_offsets[r]:draft_offsets[r+1]] are the tokens from there to the last known one.
    @property
    def num_draft_tokens(self) -> npt.NDArray[np.int32]: ...  # [R]
    @property
    def draft_start(self) -> npt.NDArray[np.int32]: ...  # [R]
    @property
    def draft_offsets(self) -> npt.NDArray[np.int32]: ...  # [R+1]
    @property
    def draft_input_ids(self) -> npt.NDArray[np.int32]: ...  # [D]
    # Encoder-decoder (E = sum of encoder_lens): rows that run their encoder this step (their first, or first
    # after a preemption) give its tokens back to back in row order (positions 0..len-1), and the slots of their
    # cross-attention K/V in their cross blocks; every row of an encoder-decoder request reads cross_lens[r] keys
    # through its cross block table.
    max_cross_blocks: int  # cross_block_tables row length (0: no encoder-decoder row)
    @property
    def encoder_input_ids(self) -> npt.NDArray[np.int32]: ...  # [E]
    @property
    def encoder_lens(self) -> npt.NDArray[np.int32]: ...  # [R] encoder tokens run this step, else 0
    @property
    def cross_slot_mapping(self) -> npt.NDArray[np.int64]: ...  # [E] block * tokens_per_block + offset
    @property
    def cross_lens(self) -> npt.NDArray[np.int32]: ...  # [R] the encoder length (0: decoder-only row)
    @property
    def cross_block_tables(self) -> npt.NDArray[np.int32]: ...  # [R, max_cross_blocks] padded with 0
    @property
    def forced_token_ids(self) -> npt.NDArray[np.int32]: ...  # [R] -1, or the only id the row may sample
    # (forced EOS on the last allowed token, forced BOS after a one-token prompt)

class BlockManager:
    """Paged KV blocks with reference counts and a chained-hash prefix cache (see block_manager.h
    for the allocation and eviction order)."""

    ROOT_HASH: int
    RELEASED: int  # -1: a block-table entry handed back (before the sliding window), never read
    def __init__(self, num_blocks: int, tokens_per_block: int,
                 enable_prefix_caching: bool = True) -> None: ...
    @staticmethod
    def hash_block_tokens(parent_hash: Optional[int], tokens: Sequence[int]) -> int: ...
    @staticmethod
    def root_hash(cache_salt: int) -> int: ...  # the first block's parent: ROOT_HASH, or a salted root
    def lookup(self, tokens: Sequence[int], root: int = ...) -> List[int]: ...
    def fork(self, block_ids: Sequence[int]) -> List[int]: ...  # reference counts + 1
    def allocate_for_write(self, block_ids: Sequence[int], write_from: int,
                           num_tokens: int) -> Optional[Tuple[List[int], List[int]]]: ...  # (table, copies)
    def allocate(self, block_ids: Sequence[int], num_tokens: int,
                 cached_prefix: Sequence[int] = ...) -> Optional[List[int]]: ...
    def free(self, block_ids: Sequence[int]) -> None: ...
    # Hands back the first `count` entries' blocks (reference count - 1); returns the table with them RELEASED.
    def release_leading(self, block_ids: Sequence[int], count: int) -> List[int]: ...
    def cache_full_blocks(self, block_ids: Sequence[int], tokens: Sequence[int],
                          num_computed_tokens: int, root: int = ...) -> None: ...
    # Keeps the blocks of the first num_tokens positions, releases the rest (last first); returns the table.
    def truncate(self, block_ids: Sequence[int], num_tokens: int) -> List[int]: ...
    def ref_count(self, block_id: int) -> int: ...
    def block_hash(self, block_id: int) -> Optional[int]: ...
    def free_queue(self) -> List[int]: ...  # eviction order, head first
    @property
    def num_blocks(self) -> int: ...
    @property
    def tokens_per_block(self) -> int: ...
    @property
    def num_free_blocks(self) -> int: ...
    @property
    def num_used_blocks(self) -> int: ...
    @property
    def num_cached_blocks(self) -> int: ...

class ScheduledRequest:
    @property
    def request_id(self) -> int: ...
    @property
    def num_computed_tokens(self) -> int: ...  # before this step
    @property
    def num_new_tokens(self) -> int: ...
    @property
    def num_encoder_tokens(self) -> int: ...  # > 0: this step runs the request's encoder (counted in the budget)
    @property
    def do_sample(self) -> bool: ...
    @property
    def input_row(self) -> int: ...  # >= 0: runs ahead on the token that row of the step in flight samples
    @property
    def num_draft_tokens(self) -> int: ...  # drafts after the last known token (speculative decoding)
    @property
    def draft_start(self) -> int: ...  # the drafter's first position to compute, -1: no drafter

class SchedulerOutput:
    @property
    def scheduled(self) -> List[ScheduledRequest]: ...
    @property
    def preempted(self) -> List[int]: ...
    @property
    def num_tokens(self) -> int: ...
    @property
    def num_scheduled_tokens(self) -> Dict[int, int]: ...
    @property
    def block_copies(self) -> List[int]: ...  # flat (source, destination) pairs

def encode_responses(responses: List[Response]) -> bytes: ...  # for another process
def decode_responses(data: bytes) -> List[Response]: ...  # ValueError for bytes that are not encoded responses

class Scheduler:
    """The executor's scheduler, standalone (no runner, no thread) for tests and tools."""

    def __init__(self, config: ExecutorConfig) -> None: ...
    @staticmethod
    def check_request(config: ExecutorConfig, request: Request) -> None: ...  # Executor.enqueue's rules
    def add(self, request: Request) -> None: ...
    def schedule(self) -> SchedulerOutput: ...
    def update(self, output: SchedulerOutput, result: Any) -> List[Response]: ...  # see Runner.collect
    def fail(self, output: SchedulerOutput, error: str) -> List[Response]: ...
    def abort(self, request_id: int, seq_index: int = -1) -> List[Response]: ...
    def finish_all(self, finish_reason: str, error: str = "") -> List[Response]: ...
    def make_batch(self, output: SchedulerOutput) -> Batch: ...
    def request(self, request_id: int) -> Request: ...
    @property
    def waiting_ids(self) -> List[int]: ...
    @property
    def running_ids(self) -> List[int]: ...
    @property
    def has_unfinished(self) -> bool: ...
    @property
    def block_manager(self) -> BlockManager: ...
    def stats(self) -> Dict[str, int]: ...

class Runner(Protocol):
    def submit(self, batch: Batch) -> Any: ...
    # int [R] (one token per row), or an object with tokens [R, K] and optional scores, logprobs,
    # ranks [R, K], top_ids, top_logprobs [R, L] and errors {row: message} (rows whose request
    # failed alone: it finishes "error", the step's other rows are settled) (llmapi.runtime.decode.StepOutput).
    def collect(self, handle: Any) -> Any: ...

class Executor:
    """Owns the loop thread; see executor.h for the threading and failure model."""

    def __init__(self, config: ExecutorConfig, runner: Runner) -> None: ...
    def enqueue(self, request: Request) -> int: ...
    def enqueue_many(self, requests: List[Request]) -> List[int]: ...
    def abort(self, request_id: int, seq_index: int = -1) -> None: ...
    def await_responses(self, timeout_s: Optional[float] = None) -> List[Response]: ...
    def stats(self) -> Dict[str, int]: ...
    def shutdown(self) -> None: ...
