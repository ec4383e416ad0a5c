"""One step's decoding on the device: logits processors and grammar masks, then sampling or beam candidates, then
logprobs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional

import numpy as np
import torch

from ..errors import LogitsProcessorError
from ..guided_decoding import GrammarGuide, apply_grammar_masks
from .logits_processing import apply_logit_bias_, apply_penalties_
from .request_state import RequestState
from .sampler import GREEDY_TEMPERATURE_EPS, sample, suppress_


@dataclass
class StepOutput:
    """The runner's answer for one batch (R rows, K candidates, L top logprobs); the C++ core reads
    these names. Row r's candidates are its sampled token (or n samples of a forking row, or a
    beam row's top K), best first; -1 pads."""

    tokens: np.ndarray  # [R, K] int32
    scores: Optional[np.ndarray] = None  # [R, K] float32: beam rows' processed logprobs
    logprobs: Optional[np.ndarray] = None  # [R, K] float32: raw logprob of each candidate
    ranks: Optional[np.ndarray] = None  # [R, K] int32
    top_ids: Optional[np.ndarray] = None  # [R, L] int32
    top_logprobs: Optional[np.ndarray] = None  # [R, L] float32
    errors: Optional[Dict[int, str]] = None  # row -> why its request failed alone ("Type: message")


def _t(array, device, dtype=None) -> torch.Tensor:
    return torch.tensor(np.asarray(array), device=device, dtype=dtype)


def _processor_output(out, row: torch.Tensor) -> Optional[str]:
    """Why a logits processor's return value cannot replace its row's logits [V], or None if it can."""
    if out is None:  # it wrote the row in place
        out = row
    elif not isinstance(out, torch.Tensor):
        return f"returned a {type(out).__name__}, not a tensor of {row.shape[0]} logits"
    elif out.numel() != row.numel():
        return f"returned logits of shape {list(out.shape)}; the row has shape {list(row.shape)}"
    elif not out.is_floating_point():
        return f"returned a {out.dtype} tensor, not float logits"
    if bool(torch.isnan(out).any()):
        return "returned NaN logits"
    return None


def _apply_processors(logits: torch.Tensor, batch, rows: np.ndarray, processors: Dict[int, Callable],
                      state: RequestState) -> Dict[int, str]:
    """Per-request Python callables (only rows that have one): processor(prompt_ids, output_ids, logits[V]).

    A processor that raises (SystemExit included) or returns something that is not a row of logits fails
    its own request only: returns {row: message} of those rows, whose logits are left as they were.
    """
    slots = np.asarray(batch.slots)
    prompt_lens = np.asarray(batch.prompt_lens)
    request_ids = np.asarray(batch.request_ids)
    errors: Dict[int, str] = {}
    for r in rows:
        rid = int(request_ids[r])
        fn = processors.get(rid)
        if isinstance(fn, GrammarGuide):  # guided decoding: the request's own processor runs before the mask
            fn = fn.processor
        if fn is None:  # the request finished on the Python side (a stop string) meanwhile, or has no processor
            continue
        history = state.histories.get(int(slots[r]), [])
        prompt, output = history[:prompt_lens[r]], history[prompt_lens[r]:]
        saved = logits[r].clone()  # a processor may write the row before it fails
        try:
            state.processor_request = rid  # the step watchdog names this request if the call never returns
            out = fn(prompt, output, logits[r])
            why = _processor_output(out, logits[r])
            if why is None and out is not None:
                logits[r] = out.reshape(logits[r].shape)
        except (Exception, SystemExit) as e:
            why = f"raised {type(e).__name__}: {e}"
        if why is not None:
            logits[r] = saved
            errors[int(r)] = f"{LogitsProcessorError.__name__}: the logits_processor of request {rid} {why}"
    return errors


def decode(logits: torch.Tensor, batch, state: RequestState, processors: Dict[int, Callable]) -> dict:
    """Process `logits` [R, V] float32 (one row per batch row, in place) and pick each row's candidates.

    Returns device tensors named as StepOutput's fields. Index sets come from the batch's host
    arrays, so nothing here waits for the device; a Python loop runs only over rows whose
    request has a Python logits processor or a grammar (guided decoding: a GrammarGuide in `processors`).
    """
    dev = logits.device
    num_rows, vocab = logits.shape
    do_sample = np.asarray(batch.do_sample) != 0
    num_candidates = np.asarray(batch.num_candidates)
    beam = (np.asarray(batch.beam) != 0) & do_sample
    want_logprobs = np.asarray(batch.logprobs)
    processor_rows = np.zeros(num_rows, dtype=bool)
    if processors:
        # list() copies the keys in one step: the LLM adds and removes entries from other threads.
        ids = np.array(list(processors), dtype=np.uint64)
        processor_rows = np.isin(np.asarray(batch.request_ids), ids) & (np.asarray(batch.slots) >= 0)
    state.update(batch, processor_rows)

    lp_rows = np.nonzero(want_logprobs >= 0)[0]
    raw_logprobs = logits[_t(lp_rows, dev, torch.long)].log_softmax(dim=-1) if len(lp_rows) else None  # [r, V]
    beam_rows = np.nonzero(beam)[0]
    beam_idx = _t(beam_rows, dev, torch.long)
    if len(beam_rows):
        # Beam search ranks by log-probabilities, and its processors act on those (as transformers').
        logits[beam_idx] = logits[beam_idx].log_softmax(dim=-1)

    errors: Dict[int, str] = {}
    if processor_rows.any():
        rows = np.nonzero(processor_rows & do_sample)[0]
        errors = _apply_processors(logits, batch, rows, processors, state)
        state.processor_request = None
        # Grammars (guided decoding) mask their rows after the request's own processor, in one batched pass.
        errors.update(apply_grammar_masks(logits, batch, rows[~np.isin(rows, list(errors))], processors,
                                          state.histories))
    apply_logit_bias_(logits, _t(batch.bias_offsets, dev), _t(batch.bias_ids, dev, torch.long),
                      _t(batch.bias_values, dev, torch.float32))
    suppress_(logits, _t(batch.suppress_offsets, dev), _t(batch.suppress_ids, dev, torch.long))
    forced = np.asarray(getattr(batch, "forced_token_ids", ()))
    forced_rows = np.nonzero(forced >= 0)[0]
    if len(forced_rows):  # the only token these rows may take (forced EOS), scored 0 as transformers' processors
        idx = _t(forced_rows, dev, torch.long)
        logits[idx] = float("-inf")
        logits[idx, _t(forced[forced_rows], dev, torch.long)] = 0.0
    rep, pres, freq = (np.asarray(batch.repetition_penalty), np.asarray(batch.presence_penalty),
                       np.asarray(batch.frequency_penalty))
    slots = np.asarray(batch.slots)
    pen_rows = np.nonzero(do_sample & (slots >= 0) & ((rep != 1) | (pres != 0) | (freq != 0)))[0]
    if len(pen_rows):
        idx = _t(pen_rows, dev, torch.long)
        counts, in_prompt = state.rows(slots[pen_rows])
        logits[idx] = apply_penalties_(logits[idx], counts, in_prompt, _t(rep[pen_rows], dev),
                                       _t(pres[pen_rows], dev), _t(freq[pen_rows], dev))

    width = int(num_candidates[do_sample].max()) if do_sample.any() else 1
    tokens = torch.full((num_rows, width), -1, dtype=torch.int64, device=dev)  # [R, K]
    scores = None
    if len(beam_rows):
        k = int(num_candidates[beam_rows].max())
        values, ids = logits[beam_idx].topk(k, dim=-1)  # [b, k] best first
        # Rows of narrower beams (another request's width) keep only their own K.
        narrower = _t(np.arange(k)[None, :] >= num_candidates[beam_rows][:, None], dev)
        tokens[beam_idx, :k] = ids.masked_fill(narrower, -1)
        scores = torch.zeros(num_rows, width, dtype=torch.float32, device=dev)
        scores[beam_idx, :k] = values

    sample_rows = np.nonzero(do_sample & ~beam)[0]
    if len(sample_rows):
        counts = num_candidates[sample_rows]
        expand = np.repeat(sample_rows, counts)  # [N]: a forking row once per sample
        column = np.arange(len(expand)) - np.repeat(np.cumsum(counts) - counts, counts)
        sample_index = np.where(num_candidates[expand] > 1, column, np.asarray(batch.seq_index)[expand])
        temperature = np.asarray(batch.temperature)[expand]
        top_k, top_p, min_p = (np.asarray(batch.top_k)[expand], np.asarray(batch.top_p)[expand],
                               np.asarray(batch.min_p)[expand])
        e = _t(expand, dev, torch.long)
        # Every row sampling once, in order (the common decode step): no gathered copy of the logits.
        rows_logits = logits if len(expand) == num_rows and num_rows == len(sample_rows) else logits[e]
        no_suppress = torch.zeros(len(expand) + 1, dtype=torch.int32, device=dev)
        sampled = sample(
            rows_logits, temperature=_t(temperature, dev, torch.float32), top_k=_t(top_k, dev, torch.int32),
            top_p=_t(top_p, dev, torch.float32), seeds=_t(np.asarray(batch.seeds)[expand], dev, torch.long),
            output_index=_t(np.asarray(batch.output_index)[expand], dev, torch.int32),
            suppress_offsets=no_suppress, suppress_ids=torch.zeros(0, dtype=torch.long, device=dev),
            sample_index=_t(sample_index, dev, torch.long),
            min_p=_t(min_p, dev, torch.float32) if (min_p > 0).any() else None,
            all_greedy=bool((temperature < GREEDY_TEMPERATURE_EPS).all()),
            any_top_k_top_p=bool(((top_k > 0) & (top_k < vocab)).any() or (top_p < 1).any()),
        )
        tokens[e, _t(column, dev, torch.long)] = sampled

    out = {"tokens": tokens.to(torch.int32), "scores": scores, "errors": errors or None}
    if raw_logprobs is not None:
        out.update(logprob_outputs(raw_logprobs, lp_rows, want_logprobs, tokens))
    return out


def logprob_outputs(raw_logprobs: torch.Tensor, lp_rows: np.ndarray, want_logprobs: np.ndarray,
                    tokens: torch.Tensor, top: Optional[int] = None) -> dict:
    """StepOutput's logprobs, ranks, top_ids and top_logprobs for the rows `lp_rows` that asked.

    raw_logprobs [r, V]: those rows' log_softmax of the unprocessed logits; tokens [R, K]: every row's
    candidates (-1 pads); want_logprobs [R]: each row's number of top logprobs (-1: none). `top` fixes
    the top width L (default: the most any row asked). Rows that did not ask get NaN, rank 0, id -1.
    """
    dev = raw_logprobs.device
    num_rows, width = tokens.shape
    vocab = raw_logprobs.shape[1]
    idx = _t(lp_rows, dev, torch.long)
    candidates = tokens[idx]  # [r, K]
    chosen = raw_logprobs.gather(1, candidates.clamp(min=0).long())  # [r, K]
    ranks = (raw_logprobs.unsqueeze(1) > chosen.unsqueeze(2)).sum(dim=-1) + 1  # [r, K]
    out = {"logprobs": torch.full((num_rows, width), float("nan"), device=dev).index_copy_(0, idx, chosen),
           "ranks": torch.zeros(num_rows, width, dtype=torch.int32, device=dev).index_copy_(
               0, idx, ranks.to(torch.int32))}
    top = int(want_logprobs[lp_rows].max()) if top is None else top
    if top > 0:
        values, ids = raw_logprobs.topk(min(top, vocab), dim=-1)  # [r, L]
        out["top_ids"] = torch.full((num_rows, values.shape[1]), -1, dtype=torch.int32,
                                    device=dev).index_copy_(0, idx, ids.to(torch.int32))
        out["top_logprobs"] = torch.zeros(num_rows, values.shape[1], device=dev).index_copy_(0, idx, values)
    return out
