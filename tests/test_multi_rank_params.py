"""What crosses between ranks for the decoding step, without starting any: every SamplingParams setting passes
check_multi_rank, a logits processor only if it pickles by reference; the step's batch (with processors) and
the sampling rank's answer (StepOutput, errors, logits records) survive their flat encodings."""

import functools
import pickle
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from llmapi import SamplingParams
from llmapi.core_request import check_multi_rank, pickled_processor
from llmapi.distributed.comm import _BATCH_FIELDS, decode_batch, encode_batch
from llmapi.distributed.step_reply import merge_outputs, pack_reply, unpack_reply
from llmapi.runtime.decode import StepOutput
from llmapi.runtime.logits_records import GenerationRow, PromptChunk
from mr_processors import FavourRecent, ban_even_tokens


@pytest.mark.parametrize("kwargs", [
    {"n": 2, "seed": 1}, {"best_of": 3}, {"use_beam_search": True, "best_of": 2}, {"prompt_logprobs": 0},
    {"return_context_logits": True}, {"return_generation_logits": True}, {"presence_penalty": 0.5},
    {"frequency_penalty": 0.5}, {"repetition_penalty": 1.2}, {"min_p": 0.1}, {"bad": "x"}, {"bad_token_ids": [3]},
    {"logit_bias": {3: 1.0}}, {"logits_processor": ban_even_tokens},
    {"logits_processor": [FavourRecent(1.0), functools.partial(ban_even_tokens)]},
    {"max_tokens": 8, "temperature": 0.7, "top_k": 5, "top_p": 0.9, "seed": 3, "stop": "x", "logprobs": 3},
])
def test_every_setting_passes(kwargs):
    check_multi_rank(SamplingParams(**kwargs))


def _local_processor():
    def processor(output_ids, logits):
        return logits
    return processor


def _main_processor(output_ids, logits):
    return logits


_main_processor.__module__ = "__main__"  # as a function of the user's script


@pytest.mark.parametrize("processor, named", [
    (lambda ids, logits: logits, "<lambda>"), (_local_processor(), "<locals>"), (_main_processor, "__main__"),
    (functools.partial(_local_processor()), "<locals>"), ([ban_even_tokens, lambda ids, logits: logits], "<lambda>"),
])
def test_processor_not_importable_by_name_is_refused(processor, named):
    with pytest.raises(ValueError, match=rf"SamplingParams logits_processor: with tensor_parallel_size \* "
                                         rf"pipeline_parallel_size > 1 .*must be importable there.*{named}"):
        check_multi_rank(SamplingParams(logits_processor=processor))


def test_processor_pickles_by_reference():
    chain = SamplingParams(logits_processor=[FavourRecent(2.0), ban_even_tokens]).combined_logits_processor()
    loaded = pickle.loads(pickled_processor(chain))
    logits = torch.zeros(8)
    assert loaded([1, 3], [5], logits.clone()).tolist() == chain([1, 3], [5], logits.clone()).tolist()


def _batch(rng, r=3, t=7, b=2):
    fields = {}
    for name, dtype, kind in _BATCH_FIELDS:
        n = {"T": t, "R": r, "RB": r * b, "R+1": r + 1, "S": 2, "C2": 4, "N": 3, "H": 5, "D": 4, "E": 6,
             "RX": r * 3}[kind]
        fields[name] = rng.integers(0, 50, n).astype(dtype)
    fields["block_tables"] = fields["block_tables"].reshape(r, b)
    fields["cross_block_tables"] = fields["cross_block_tables"].reshape(r, 3)
    fields["block_copies"] = fields["block_copies"].reshape(2, 2)
    return SimpleNamespace(num_requests=r, num_tokens=t, **fields)


def test_batch_with_processors_round_trips():
    batch = _batch(np.random.default_rng(0))
    decoded = decode_batch(encode_batch(batch, {7: b"abc", 2 ** 63 + 1: b"0123456789"}, [4, 5]))
    for name, _, _ in _BATCH_FIELDS:
        assert np.array_equal(getattr(decoded, name), getattr(batch, name)), name
    assert decoded.processors_added == {7: b"abc", 2 ** 63 + 1: b"0123456789"}
    assert decoded.processors_dropped == [4, 5]


def test_step_reply_round_trips_and_micro_batches_merge():
    out = {"tokens": torch.tensor([[3, 4], [5, -1]], dtype=torch.int32), "scores": None,
           "logprobs": torch.tensor([[-1.0, -2.0], [float("nan")] * 2]), "ranks": torch.tensor([[1, 2], [0, 0]],
                                                                                              dtype=torch.int32),
           "top_ids": torch.tensor([[3, 9, 1], [-1, -1, -1]], dtype=torch.int32), "top_logprobs": torch.rand(2, 3),
           "errors": {1: "LogitsProcessorError: the logits_processor of request 9 raised"}}
    chunk = PromptChunk(9, 4, 3, torch.rand(3, 6), torch.rand(2), torch.tensor([1, 2], dtype=torch.int32),
                        torch.tensor([[1], [2]], dtype=torch.int32), torch.rand(2, 1))
    row = GenerationRow(2 ** 63 + 5, 6, range(0, 2), torch.rand(6))
    got, prompt, generation = unpack_reply(pack_reply(out, [chunk, PromptChunk(3, 0, 1, torch.rand(1, 6))], [row]))
    assert got.tokens.tolist() == out["tokens"].tolist() and got.scores is None
    assert np.allclose(got.top_logprobs, out["top_logprobs"].numpy()) and got.errors == out["errors"]
    assert (prompt[0].request_id, prompt[0].first, prompt[0].num_positions) == (9, 4, 3)
    assert torch.equal(prompt[0].logits, chunk.logits) and torch.equal(prompt[0].top_ids, chunk.top_ids)
    assert prompt[1].token_logprobs is None and prompt[1].logits.shape == (1, 6)
    assert (generation[0].request_id, generation[0].index, list(generation[0].seqs)) == (2 ** 63 + 5, 6, [0, 1])
    assert torch.equal(generation[0].logits, row.logits)

    plain = StepOutput(tokens=np.array([[8], [9]], dtype=np.int32), errors={0: "E: x"})
    merged = merge_outputs([plain, got])
    assert merged.tokens.tolist() == [[8, -1], [9, -1], [3, 4], [5, -1]]
    assert np.isnan(merged.logprobs[:2]).all() and merged.ranks[:2].tolist() == [[0, 0], [0, 0]]
    assert merged.top_ids[:2].tolist() == [[-1] * 3] * 2 and merged.top_ids[2].tolist() == [3, 9, 1]
    assert merged.scores is None and merged.errors == {0: "E: x", 3: out["errors"][1]}
