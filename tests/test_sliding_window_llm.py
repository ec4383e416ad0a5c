"""Mistral-style sliding-window checkpoints through LLM: greedy tokens equal transformers' (a mixed batch, forced
chunked prefill, prefix reuse, preemption, beam search, forked samples), a 1,000-token generation holds one
window's KV blocks at every step in a cache far smaller than the request, a quantized KV cache with a window scores
its tokens as one prefill does, and every Triton kernel (interpreted) with the released blocks poisoned gives
transformers' logits."""

import math

import kernel_cases  # noqa: F401 (without a GPU: TRITON_INTERPRET=1 before any kernel is defined)
import numpy as np
import pytest
import torch
from test_kv_cache_quant import _teacher_forced_logprob, recorded_calibration  # noqa: F401 (a fixture)
from test_llm_parity import MAX_TOKENS, MIXED, _generate, _prompts, _reference

from llmapi import LLM, KvCacheConfig, SamplingParams

WINDOW = 16  # smaller than most prompts below (up to 60 tokens) and than prompt + MAX_TOKENS


def make_tiny_mistral(path=None, seed: int = 0, **overrides):
    """A tiny transformers MistralForCausalLM (GQA, sliding window) in float32, saved to `path` if given."""
    from tiny_models import _spread_weights
    from transformers import MistralConfig, MistralForCausalLM

    fields = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0, sliding_window=WINDOW)
    fields.update(overrides)
    torch.manual_seed(seed)
    model = MistralForCausalLM(MistralConfig(**fields)).eval()
    _spread_weights(model, seed, std=0.15, embed_std=1.0)
    if path is not None:
        model.save_pretrained(path)
    return model


def _model_dir(tmp_path_factory, name, **overrides):
    from tiny_tokenizer import save_tiny_tokenizer

    path = tmp_path_factory.mktemp(name)
    make_tiny_mistral(path, **overrides)
    save_tiny_tokenizer(path, vocab_size=320)
    return path


@pytest.fixture(scope="module")
def mistral_dir(tmp_path_factory):
    return _model_dir(tmp_path_factory, "tiny-mistral")


@pytest.fixture(scope="module")
def reference(mistral_dir):
    """transformers' greedy tokens, memoized by prompt."""
    memo = {}

    def tokens(prompts, max_tokens=MAX_TOKENS):
        missing = [p for p in prompts if (tuple(p), max_tokens) not in memo]
        for p, out in zip(missing, _reference(mistral_dir, missing, max_tokens)):
            memo[tuple(p), max_tokens] = out
        return [memo[tuple(p), max_tokens] for p in prompts]

    return tokens


class BlockWatch:
    """Wraps the LLM's runner: at every submitted step, the KV blocks each row holds (block-table entries >= 0;
    handed-back ones are -1) and the executor's used blocks."""

    def __init__(self, llm):
        self.llm, self.held, self.released, self.used = llm, [], 0, []
        runner = llm._runner
        submit = runner.submit

        def watched(batch):
            tables = np.asarray(batch.block_tables)  # [R, W]; rows shorter than W are padded with 0
            widths = [math.ceil(c / batch.tokens_per_block) for c in np.asarray(batch.context_lens)]
            for row, width in zip(tables, widths):
                self.held.append(int((row[:width] >= 0).sum()))
                self.released += int((row[:width] < 0).sum())
            self.used.append(llm._executor.stats()["num_used_blocks"])
            return submit(batch)

        runner.submit = watched


def test_config_carries_the_window_and_the_model_applies_it(mistral_dir):
    with LLM(str(mistral_dir), tokens_per_block=4) as llm:
        assert llm.engine_info.config["sliding_window"] == WINDOW
        attn = llm._runner.model.transformer.layers[0].attention.attn
        assert attn.sliding_window == WINDOW


def test_greedy_parity_mixed_batch_hands_back_blocks(mistral_dir, reference):
    prompts = _prompts(320, MIXED, seed=1)
    with LLM(str(mistral_dir), tokens_per_block=4) as llm:
        watch = BlockWatch(llm)
        got = _generate(llm, prompts)
        assert llm.get_stats()["num_used_blocks"] == 0
    assert got == reference(prompts)
    assert watch.released > 0  # blocks before the window were handed back (and their ids reused meanwhile)


def test_greedy_parity_with_chunked_prefill(mistral_dir, reference):
    prompts = _prompts(320, MIXED, seed=5)
    with LLM(str(mistral_dir), max_num_tokens=16, tokens_per_block=4) as llm:
        watch = BlockWatch(llm)
        got = _generate(llm, prompts)
        assert llm.get_stats()["num_steps"] > sum(MIXED) // 16  # prompts really were split
    assert got == reference(prompts)
    assert watch.released > 0


def test_greedy_parity_with_prefix_reuse(mistral_dir, reference):
    shared = _prompts(320, [40], seed=2)[0]  # longer than the window: its first blocks are handed back
    first = _prompts(320, [3, 11, 20, 1], seed=3, prefix=shared)
    second = _prompts(320, [7, 2, 30, 15], seed=4, prefix=shared)
    with LLM(str(mistral_dir), tokens_per_block=8) as llm:
        got = _generate(llm, first)
        hits_before = llm.get_stats()["num_prefix_hit_tokens"]
        got += _generate(llm, second)
        hits = llm.get_stats()["num_prefix_hit_tokens"] - hits_before
    assert hits >= 4 * 40  # the 40-token prefix's 5 full blocks, still cached after they were handed back
    assert got == reference(first + second)


def test_greedy_parity_with_preemption(mistral_dir, reference):
    prompts = _prompts(320, [20] * 8, seed=6)
    # 8 blocks of 4 tokens, prompts admitted in chunks of 8 tokens: several start, then each needs up to 5 blocks
    # (its window and the block written), so not all can stay.
    kv = KvCacheConfig(max_tokens=32, enable_block_reuse=False)
    with LLM(str(mistral_dir), tokens_per_block=4, max_num_tokens=8, kv_cache_config=kv) as llm:
        got = _generate(llm, prompts)
        assert llm.get_stats()["num_preemptions"] > 0
    assert got == reference(prompts)


def test_greedy_parity_across_pipeline_stages(mistral_dir, reference):
    # Two ranks, two steps in flight (one per stage): blocks go back only once no step in flight reads them.
    prompts = _prompts(320, MIXED, seed=1)
    with LLM(str(mistral_dir), pipeline_parallel_size=2, tokens_per_block=4) as llm:
        got = _generate(llm, prompts)
        assert llm.get_stats()["num_used_blocks"] == 0
    assert got == reference(prompts)


def test_beam_search_and_samples_match_transformers_over_released_blocks(mistral_dir):
    from test_beam_search import MAX_TOKENS as BEAM_TOKENS
    from test_beam_search import _hf_beams
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(mistral_dir, dtype=torch.float32).eval()
    prompts = _prompts(320, [13, 22], seed=10)  # partly filled blocks: the beams copy them before writing
    params = SamplingParams(max_tokens=BEAM_TOKENS, use_beam_search=True, best_of=3, n=3)
    with LLM(str(mistral_dir), tokens_per_block=4) as llm:
        watch = BlockWatch(llm)
        outs = llm.generate(prompts, params, use_tqdm=False)
        for p, out in zip(prompts, outs):
            want, _ = _hf_beams(hf, p, 3, 3)
            assert [o.token_ids for o in out.outputs] == want
        # Greedy samples forked from one prompt (n=2 at temperature 0) each equal transformers' greedy tokens.
        forked = llm.generate(prompts[:1], SamplingParams(max_tokens=MAX_TOKENS, temperature=0, n=2),
                              use_tqdm=False)[0]
        assert llm.get_stats()["num_used_blocks"] == 0
    assert watch.released > 0
    assert [o.token_ids for o in forked.outputs] == _reference(mistral_dir, prompts[:1]) * 2


def test_long_generation_holds_one_window_of_blocks(tmp_path_factory):
    # Window 64, blocks of 16, a cache of 10 blocks (160 tokens), 1,000 generated tokens: without handing
    # blocks back the request would need 64 blocks.
    window, block, new_tokens = 64, 16, 1000
    path = _model_dir(tmp_path_factory, "tiny-mistral-long", sliding_window=window, num_hidden_layers=1,
                      max_position_embeddings=2048)
    prompt = _prompts(320, [23], seed=8)[0]
    bound = math.ceil(window / block) + 2
    kv = KvCacheConfig(max_tokens=10 * block)
    with LLM(str(path), tokens_per_block=block, kv_cache_config=kv) as llm:
        assert llm.num_kv_blocks == 10
        watch = BlockWatch(llm)
        params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
        updates = 0
        for out in llm.generate_async(prompt, params, streaming=True):
            updates += 1
            assert llm.get_stats()["num_used_blocks"] <= bound
        got = out.outputs[0].token_ids
        assert llm.get_stats()["num_used_blocks"] == 0 and llm.get_stats()["num_preemptions"] == 0
    assert len(got) == new_tokens and updates > 1
    assert len(watch.held) >= new_tokens  # one row per step: every step was seen
    assert max(watch.held) <= bound and max(watch.used) <= bound
    assert watch.released > 0
    # The tokens are transformers' greedy ones (without an end token); the first 200 are compared, by when 14
    # blocks were written in the 10-block cache: handed-back ids were reused while the window slid on.
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    with torch.inference_mode():
        ids = torch.tensor([prompt])
        want = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=200, do_sample=False,
                           pad_token_id=0)[0, len(prompt):].tolist()
    assert got[:200] == want


@pytest.mark.parametrize("quant", ["int8_kv_cache", "fp8_kv_cache"])
def test_window_over_a_quantized_kv_cache(mistral_dir, recorded_calibration, quant):  # noqa: F811
    prompt = _prompts(320, [21], seed=9)[0]
    greedy = SamplingParams(max_tokens=24, temperature=0, logprobs=0, ignore_eos=True)
    with LLM(str(mistral_dir), quant=quant, tokens_per_block=4) as llm:
        watch = BlockWatch(llm)
        out = llm.generate([prompt], greedy, use_tqdm=False)[0].outputs[0]
        engine = llm.engine_info.path
    assert watch.released > 0 and llm.engine_info.config["sliding_window"] == WINDOW
    # Decoded step by step over released blocks, each token scores what one prefill of the whole sequence
    # through the same quantized cache (the windowed mask, no block handed back) gives it.
    assert out.cumulative_logprob == pytest.approx(_teacher_forced_logprob(engine, prompt, out.token_ids), abs=2e-3)


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the kernels run compiled")
def test_tiny_mistral_through_kernels_with_released_blocks_poisoned(monkeypatch):
    pytest.importorskip("triton")
    from tiny_models import PagedDriver, to_engine_model

    import llmapi.layers.dispatch as dispatch

    monkeypatch.setattr(dispatch, "TRITON_ON_CPU", True)
    window, block = 6, 4
    hf = make_tiny_mistral(sliding_window=window, num_hidden_layers=2)
    model, cfg = to_engine_model(hf)
    assert cfg["sliding_window"] == window
    driver = PagedDriver(model, cfg, tokens_per_block=block)
    a = [5, 9, 11, 3, 8, 21, 7, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51]
    with torch.no_grad():
        ref = hf(torch.tensor([a])).logits[0]  # [L, V]

    def release(computed):
        """Blocks wholly before the next query's window: -1 in the table, their KV set to NaN."""
        table = driver.blocks[0]
        for i in range(max(0, computed - window + 1) // block):
            if table[i] >= 0:
                for cache in driver.kv_caches:
                    cache[:, table[i]] = float("nan")
                table[i] = -1

    # A packed chunk longer than the window, a second chunk after blocks were released, then decodes.
    got = [driver.step({0: a[:10]})[0]]
    release(10)
    got.append(driver.step({0: a[10:15]})[0])
    for i in range(15, len(a)):
        release(i)
        got.append(driver.step({0: [a[i]]})[0])
    assert -1 in driver.blocks[0]
    torch.testing.assert_close(torch.cat(got), ref, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------ GPU: compiled kernels, graphs
@pytest.mark.gpu
def test_gpu_greedy_parity_with_released_blocks(mistral_dir, reference):
    # fp32 (IEEE dots): the Triton kernels and the decode CUDA graphs give transformers' tokens.
    prompts = _prompts(320, MIXED, seed=1)
    with LLM(str(mistral_dir), device="cuda", dtype="float32", tokens_per_block=4) as llm:
        watch = BlockWatch(llm)
        got = _generate(llm, prompts)
        assert llm.get_stats()["num_used_blocks"] == 0
    assert watch.released > 0
    assert got == reference(prompts)


@pytest.mark.gpu
def test_gpu_real_shaped_mistral_is_token_exact(tmp_path_factory):
    # SmolLM2-135M's head shapes (GQA 9/3, head_dim 64) with a window of 96, prompts up to 3x the window.
    from transformers import AutoModelForCausalLM

    path = _model_dir(tmp_path_factory, "real-shaped-mistral", vocab_size=320, hidden_size=576,
                      intermediate_size=1536, num_hidden_layers=8, num_attention_heads=9, num_key_value_heads=3,
                      max_position_embeddings=4096, sliding_window=96)
    prompts = _prompts(320, [5, 17, 300, 200, 96, 97, 1], seed=12)
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    with LLM(str(path), device="cuda", dtype="float32", tokens_per_block=16) as llm:
        watch = BlockWatch(llm)
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert watch.released > 0
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).cuda().eval()
    with torch.inference_mode():
        for prompt, ours in zip(prompts, got):
            ids = torch.tensor([prompt], device="cuda")
            want = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=40, min_new_tokens=40,
                               do_sample=False, eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
            assert ours == want
