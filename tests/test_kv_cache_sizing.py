"""The KV cache's size on a GPU: its fraction of what is free once the largest step has run (the profile step)."""

import numpy as np
import pytest
import torch

from llmapi.config import KvCacheConfig
from llmapi.errors import LLMAPIError
from llmapi.runtime.kv_cache import num_kv_blocks
from llmapi.runtime.model_runner import profile_query_lens

ENGINE = {"num_key_value_heads": 8, "head_dim": 128}  # Llama-3.1-8B's KV: 64 KiB a token over 32 layers in fp8


@pytest.mark.parametrize("tokens,rows,max_len", [(8192, 2048, 131072), (8192, 2048, 256), (8192, 1, 2048),
                                                 (100, 2048, 256), (8192, 4, 256), (5, 3, 2), (8192, 64, 128)])
def test_profile_step_is_the_largest_step_the_scheduler_forms(tokens, rows, max_len):
    q = profile_query_lens(tokens, rows, max_len)
    assert len(q) == min(rows, tokens)  # every request row the step may have ...
    assert q.sum() == min(tokens, len(q) * max_len)  # ... and every token, as many as those rows can hold
    assert q.max() <= max_len and q.min() >= 1
    ones = int((q == 1).sum())
    prompts = q[q > 1]
    assert (q[:len(q) - len(prompts)] == 1).all()  # single tokens first, as the scheduler puts decodes
    assert len(prompts) == 0 or prompts.max() - prompts.min() <= 1
    if len(prompts) > 1:  # the fewest prompts: one fewer, with a decode more, could not hold the tokens
        assert ones + 1 + (len(prompts) - 1) * max_len < q.sum()


def test_profile_step_lengths_by_hand():
    # 8,192 tokens over 2,048 rows with 256 positions: 24 prompts hold 2,024 + 24 * 256 = 8,168 < 8,192, so 25
    # prompts take the 6,169 tokens that 2,023 single tokens leave: 19 of 247 and 6 of 246.
    q = profile_query_lens(8192, 2048, 256)
    assert int((q == 1).sum()) == 2023
    assert sorted(np.unique(q[q > 1], return_counts=True)[1].tolist()) == [6, 19]
    assert set(q[q > 1].tolist()) == {246, 247}


def _blocks(monkeypatch, free, peak, fraction, tokens_per_block=32):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 80 << 30))
    return num_kv_blocks(ENGINE, KvCacheConfig(free_gpu_memory_fraction=fraction), torch.device("cuda"),
                         torch.float8_e4m3fn, tokens_per_block, num_layers=32, step_peak_bytes=peak)


def test_cache_takes_its_fraction_of_what_the_step_leaves(monkeypatch):
    free, peak = 70 << 30, 3 << 30
    per_block = 2 * 32 * 8 * 128 * 32  # K and V, 32 layers, 8 heads of 128, fp8, 32 tokens
    for fraction in (0.9, 0.95, 1.0):
        blocks = _blocks(monkeypatch, free, peak, fraction)
        assert blocks == int((free - peak) * fraction) // per_block
        assert free - blocks * per_block >= peak  # the step's peak stays free, whatever the fraction
    assert _blocks(monkeypatch, free, 0, 0.9) == int(free * 0.9) // per_block  # no profile: as before


def test_a_step_larger_than_free_memory_is_a_clear_error(monkeypatch):
    with pytest.raises(LLMAPIError, match="lower max_num_tokens or max_batch_size"):
        _blocks(monkeypatch, 2 << 30, 3 << 30, 0.9)


def test_profile_step_runs_through_the_model_and_the_sampler(tiny_llama_dir):
    # The profile step's synthetic batch (decode rows, prompts to the model's last position, a top-p draw of every
    # row) runs through the runner's own staging, forward, logits and sampler: on a CPU it measures nothing (0)
    # and the runner generates as before once its cache is back.
    from transformers import AutoModelForCausalLM

    from llmapi import LLM, SamplingParams

    prompt = [5, 17, 42, 9, 100, 3]
    with LLM(str(tiny_llama_dir), dtype="float32", device="cpu", skip_tokenizer_init=True,
             max_num_tokens=600, max_batch_size=16) as llm:
        runner = llm._runner
        cache = runner.kv_caches
        calls, heads = [], []
        forward, compute_logits = runner.forward, runner.model.compute_logits
        runner.forward = lambda inputs, hidden=None: calls.append(
            (int(inputs.input_ids.shape[0]), int(inputs.last_rows.shape[0]), int(inputs.positions.max()))) or \
            forward(inputs, hidden)
        runner.model.compute_logits = lambda hidden, **kw: heads.append(int(hidden.shape[0])) or \
            compute_logits(hidden, **kw)
        try:
            assert runner._profile_step(600, 16) == 0
            assert runner._profile_step(600, 16, max_seq_len=100) == 0
            runner._verify_logits = True  # speculative decoding: a verify step takes every token's logits
            assert runner._profile_step(600, 16) == 0
        finally:
            runner.forward, runner.model.compute_logits = forward, compute_logits
            runner.kv_caches, runner._verify_logits = cache, False
        # 600 tokens over 16 rows, 256 positions: 13 decode rows and three prompts of 196, 196 and 195 tokens; with
        # prompts of at most 100 tokens (LLM(max_seq_len=100)): 10 decode rows and six prompts of 98 or 99.
        assert calls == [(600, 16, 195), (600, 16, 98), (600, 16, 195)]
        assert heads == [16, 16, 600]  # each row's logits, then every token's
        out = llm.generate([prompt], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True,
                                                    detokenize=False), use_tqdm=False)[0].outputs[0].token_ids
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, torch_dtype=torch.float32)
    ref = hf.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)[0, len(prompt):].tolist()
    assert list(out) == ref


def test_a_profile_step_out_of_memory_is_a_clear_error(tiny_llama_dir):
    # Where the largest step does not fit beside the weights, LLM() fails with a typed error that names the limits
    # to lower, not with the allocator's message from inside a layer.
    from llmapi import LLM

    with LLM(str(tiny_llama_dir), dtype="float32", device="cpu", skip_tokenizer_init=True) as llm:
        runner = llm._runner
        cache, forward = runner.kv_caches, runner.forward

        def out_of_memory(inputs, hidden=None):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

        runner.forward = out_of_memory
        try:
            with pytest.raises(LLMAPIError, match=r"the largest step \(300 tokens over 4 requests.*lower "
                                                  r"max_num_tokens or max_batch_size") as raised:
                runner._profile_step(300, 4)
        finally:
            runner.forward, runner.kv_caches = forward, cache
        assert isinstance(raised.value.__cause__, torch.OutOfMemoryError)


@pytest.mark.parametrize("variant", ["bart", "t5"])
def test_encoder_decoder_profile_step_runs_encoders_and_first_tokens(tmp_path, variant):
    # An encoder-decoder step's largest form: encoder inputs of at most max_encoder_input_len tokens (BART's 128
    # positions; T5 takes max_num_tokens - 1 here), each with its first decoder token, beside single decoding rows;
    # it runs through the real encoder, cross-attention and sampler, and the model translates as before after it.
    import encdec_models as em

    from llmapi import LLM, SamplingParams

    hf = em.bart() if variant == "bart" else em.t5("t5")
    hf.save_pretrained(tmp_path)
    source = [5, 17, 42, 9, 60, 3, 2] if variant == "bart" else [5, 17, 42, 9, 60, 3, 1]
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, detokenize=False)
    with LLM(str(tmp_path), dtype="float32", device="cpu", skip_tokenizer_init=True, max_num_tokens=600,
             max_batch_size=16, max_encoder_input_len=None if variant == "bart" else 200) as llm:
        runner = llm._runner
        before = llm.generate([source], params, use_tqdm=False)[0].outputs[0].token_ids
        cache, forward = runner.kv_caches, runner.forward
        seen = []
        runner.forward = lambda inputs, hidden=None: seen.append(
            (int(inputs.input_ids.shape[0]), inputs.attn.cross.num_encoder_tokens,
             int(inputs.attn.cross.encoder_start_loc.diff().max()))) or forward(inputs, hidden)
        try:
            # As the LLM sizes its cache: with its max_encoder_input_len (BART: the model's 128).
            assert runner._profile_step(600, 16, max_encoder_input_len=llm._encdec_input_len()) == 0
        finally:
            runner.forward, runner.kv_caches = forward, cache
        after = llm.generate([source], params, use_tqdm=False)[0].outputs[0].token_ids
    # 16 decoder tokens; the encoder inputs take what is left of the 600, at most max_encoder_input_len each (BART's
    # 128: four starting rows hold at most 12 + 4 * 129 = 528 tokens, so five, 117, 117, 117, 117 and 116 encoder
    # tokens beside 11 decoding rows; T5 at LLM(max_encoder_input_len=200): three, 195, 195 and 194, beside 13).
    assert seen == [(16, 584, 117) if variant == "bart" else (16, 584, 195)]
    assert after == before


def test_decode_graphs_out_of_memory_is_a_clear_error(tiny_llama_dir, monkeypatch):
    # What the fraction leaves holds the decode graphs: where they do not fit, the error names the settings to lower.
    import llmapi.runtime.cuda_graph as cuda_graph
    from llmapi import LLM, SamplingParams

    monkeypatch.setenv(cuda_graph.GRAPHS_ON_CPU_ENV, "1")
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True, detokenize=False)
    with LLM(str(tiny_llama_dir), dtype="float32", device="cpu", skip_tokenizer_init=True, max_batch_size=16) as llm:
        runner = llm._runner
        assert runner.graphs is not None
        want = llm.generate([[5, 6, 7]], params, use_tqdm=False)[0].outputs[0].token_ids

        def out_of_memory(*args, **kwargs):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 512.00 MiB")

        monkeypatch.setattr(cuda_graph, "DecodeGraphs", out_of_memory)
        with pytest.raises(LLMAPIError, match=r"decode CUDA graphs \(up to 16 rows\) do not fit .* lower "
                                              r"kv_cache_config.free_gpu_memory_fraction") as raised:
            runner.capture_graphs(16)
        assert isinstance(raised.value.__cause__, torch.OutOfMemoryError)
        assert runner.graphs is None  # no half-captured graphs: decode steps run eagerly, with the same tokens
        assert llm.generate([[5, 6, 7]], params, use_tqdm=False)[0].outputs[0].token_ids == want
