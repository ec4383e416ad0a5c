"""Converted Llama/GPT-2 over a packed paged batch vs transformers: full prefill, chunked mixes, greedy, bf16."""

import random

import pytest
import torch
from tiny_models import PagedDriver, make_tiny_gpt2, make_tiny_llama, to_engine_model

from llmapi.layers.attention import AttentionMetadata
from llmapi.models import get_model_class

VARIANTS = {
    "llama-gqa-untied": (make_tiny_llama, {}),
    "llama-tied-mha-bias": (make_tiny_llama, dict(tie_word_embeddings=True, num_key_value_heads=4,
                                                  attention_bias=True, mlp_bias=True)),
    "llama-llama3-rope": (make_tiny_llama, dict(rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 32})),
    "llama-linear-rope": (make_tiny_llama, dict(rope_parameters={"rope_type": "linear", "rope_theta": 1e4,
                                                                 "factor": 2.0})),
    "llama-head-dim-32-mqa": (make_tiny_llama, dict(head_dim=32, num_key_value_heads=1)),
    "gpt2-tied": (make_tiny_gpt2, {}),
    "gpt2-untied-gelu-n-inner": (make_tiny_gpt2, dict(tie_word_embeddings=False, activation_function="gelu",
                                                      n_inner=96)),
}


def prompts(vocab, lengths=(23, 9, 1, 40, 5), seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths]


def hf_logits(hf, ids):
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float()  # [L, V]


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request):
    factory, overrides = VARIANTS[request.param]
    hf = factory(**overrides)
    model, cfg = to_engine_model(hf)
    return hf, model, cfg


def test_packed_prefill_matches_transformers(pair):
    hf, model, cfg = pair
    batch = prompts(cfg["vocab_size"])
    out = PagedDriver(model, cfg).step(dict(enumerate(batch)))
    for r, ids in enumerate(batch):
        torch.testing.assert_close(out[r], hf_logits(hf, ids), atol=1e-4, rtol=0)


def chunk_plan(length, rng):
    """A prefill chunk, then more chunks, then single-token steps: the sizes fed to one request over time."""
    sizes, left = [], length
    while left > 4:
        sizes.append(rng.randint(1, min(9, left - 4)))
        left -= sizes[-1]
    return sizes + [1] * left


def test_chunked_mixed_batches_match_transformers(pair):
    hf, model, cfg = pair
    batch = prompts(cfg["vocab_size"], lengths=(23, 9, 3, 40, 14), seed=1)
    rng = random.Random(0)
    plans = [chunk_plan(len(ids), rng) for ids in batch]
    driver = PagedDriver(model, cfg, seed=3)
    fed = [0] * len(batch)
    got = [[] for _ in batch]
    step = 0
    while any(plans):
        # Requests join one step apart, so prefill chunks and decodes share the packed batch.
        chunks = {}
        for r, plan in enumerate(plans):
            if plan and r <= step:
                n = plan.pop(0)
                chunks[r] = batch[r][fed[r]:fed[r] + n]
                fed[r] += n
        for r, logits in driver.step(chunks).items():
            got[r].append(logits)
        step += 1
    for r, ids in enumerate(batch):
        torch.testing.assert_close(torch.cat(got[r]), hf_logits(hf, ids), atol=1e-4, rtol=0)
    # Each request's blocks are not one contiguous run.
    assert any(b - a != 1 for table in driver.blocks.values() for a, b in zip(table, table[1:]))


def greedy(model, cfg, batch, steps):
    """Greedy continuation of every prompt, all requests decoding in one packed batch."""
    driver = PagedDriver(model, cfg)
    last = driver.step(dict(enumerate(batch)))
    out = [[] for _ in batch]
    for _ in range(steps):
        for r, logits in last.items():
            out[r].append(int(logits[-1].argmax()))
        last = driver.step({r: [toks[-1]] for r, toks in enumerate(out)})
    return out


def test_greedy_matches_transformers_generate(pair):
    hf, model, cfg = pair
    batch = prompts(cfg["vocab_size"], lengths=(7, 18, 2))
    ours = greedy(model, cfg, batch, steps=12)
    for r, ids in enumerate(batch):
        with torch.no_grad():
            theirs = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                                 pad_token_id=0)[0, len(ids):].tolist()
        assert ours[r][:len(theirs)] == theirs and len(theirs) == 12


def test_no_cache_forward_equals_full_prefill(pair):
    hf, model, cfg = pair
    batch = prompts(cfg["vocab_size"], lengths=(6, 11))
    lens = [len(p) for p in batch]
    attn = AttentionMetadata.build(lens, lens, [[0, 0, 0]] * 2, 4)
    with torch.no_grad():
        logits = model.compute_logits(model(torch.tensor(sum(batch, [])), torch.tensor(
            [i for n in lens for i in range(n)]), attn, None))
    torch.testing.assert_close(logits[:6], hf_logits(hf, batch[0]), atol=1e-4, rtol=0)
    torch.testing.assert_close(logits[6:], hf_logits(hf, batch[1]), atol=1e-4, rtol=0)


@pytest.mark.parametrize("factory", [make_tiny_llama, make_tiny_gpt2])
def test_bfloat16_stays_close(factory, tmp_path):
    factory(tmp_path)
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    model, cfg = to_engine_model(hf, dtype=torch.bfloat16)
    assert model.transformer.layers[0].attention.qkv.weight.dtype == torch.bfloat16
    batch = prompts(cfg["vocab_size"], lengths=(30, 8))
    out = PagedDriver(model, cfg, dtype=torch.bfloat16).step(dict(enumerate(batch)))
    for r, ids in enumerate(batch):
        theirs = hf_logits(hf, ids)
        assert out[r].dtype == torch.float32
        assert (out[r] - theirs).abs().max() < 0.03 * theirs.abs().max()
        assert (out[r].argmax(-1) == theirs.argmax(-1)).float().mean() > 0.9


@pytest.mark.parametrize("factory", [make_tiny_llama, make_tiny_gpt2])
def test_dummy_weights_load_and_run(factory):
    cfg = to_engine_model(factory())[1]
    cls = get_model_class(cfg["architecture"])
    weights = cls.dummy_weights(cfg, torch.bfloat16, seed=1)
    assert all(w.dtype == torch.bfloat16 for w in weights.values())
    assert torch.equal(weights["transformer.ln_f.weight"], torch.ones(cfg["hidden_size"], dtype=torch.bfloat16))
    again = cls.dummy_weights(cfg, torch.bfloat16, seed=1)
    assert all(torch.equal(weights[k], again[k]) for k in weights)  # seeded
    model = cls(cfg, "cpu", torch.bfloat16)
    model.load_weights(weights)
    out = PagedDriver(model, cfg, dtype=torch.bfloat16).step({0: [3, 4, 5], 1: [7]})
    assert out[0].shape == (3, cfg["vocab_size"]) and torch.isfinite(out[0]).all()


@pytest.mark.gpu
@pytest.mark.parametrize("factory", [make_tiny_llama, make_tiny_gpt2])
def test_cuda_chunked_matches_transformers(factory):
    hf = factory()
    model, cfg = to_engine_model(hf, device="cuda")
    batch = prompts(cfg["vocab_size"], lengths=(20, 6))
    driver = PagedDriver(model, cfg, device="cuda")
    first = driver.step({0: batch[0][:13], 1: batch[1]})
    rest = driver.step({0: batch[0][13:]})
    # GPU float32 kernels sum in another order than the CPU reference: a slightly looser bound.
    torch.testing.assert_close(torch.cat([first[0], rest[0]]), hf_logits(hf, batch[0]), atol=1e-3, rtol=0)
    torch.testing.assert_close(first[1], hf_logits(hf, batch[1]), atol=1e-3, rtol=0)
