"""The EAGLE head: loading EAGLE-1's checkpoint layout, and its draft logits and chained drafts against a plain-torch
forward written here from the published definition (SafeAILab/EAGLE, model/cnets1.py: fc over the token embedding
concatenated with the target's hidden state, Llama decoder layers whose first has no input norm, no final norm, the
target's LM head), over a paged KV cache with scattered blocks."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from llmapi.errors import UnsupportedModelError

TOKENS_PER_BLOCK = 4


# ---------------------------------------------------------------- the reference (plain torch, from cnets1.py)
def _rms(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def eagle_reference(state, cfg, hidden, token_ids, embed):
    """cnets1.Model.forward for one sequence without a cache: hidden [T, H] (the target's states, or the head's
    own), token_ids [T] (the token after each), positions 0..T-1. Returns the head's output [T, H]."""
    H, heads, kv_heads = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads
    hd, eps, T = H // heads, cfg.rms_norm_eps, hidden.shape[0]
    x = F.linear(torch.cat((embed[token_ids], hidden), dim=-1), state["fc.weight"], state.get("fc.bias"))
    theta = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta") or getattr(cfg, "rope_theta", 10000.0)
    inv_freq = 1.0 / (theta ** (torch.arange(0, hd, 2).float() / hd))
    freqs = torch.outer(torch.arange(T).float(), inv_freq)
    cos, sin = torch.cat((freqs, freqs), -1).cos(), torch.cat((freqs, freqs), -1).sin()  # [T, hd]
    mask = torch.full((T, T), float("-inf")).triu(1)
    layers = sorted({int(k.split(".")[1]) for k in state if k.startswith("layers.")})
    for i in layers:
        p = lambda name: state[f"layers.{i}.{name}"]  # noqa: E731
        residual = x
        h = x if i == 0 else _rms(x, p("input_layernorm.weight"), eps)
        q = F.linear(h, p("self_attn.q_proj.weight")).view(T, heads, hd).transpose(0, 1)
        k = F.linear(h, p("self_attn.k_proj.weight")).view(T, kv_heads, hd).transpose(0, 1)
        v = F.linear(h, p("self_attn.v_proj.weight")).view(T, kv_heads, hd).transpose(0, 1)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        k, v = k.repeat_interleave(heads // kv_heads, 0), v.repeat_interleave(heads // kv_heads, 0)
        att = (q @ k.transpose(1, 2) / math.sqrt(hd) + mask).softmax(-1) @ v  # [heads, T, hd]
        x = residual + F.linear(att.transpose(0, 1).reshape(T, H), p("self_attn.o_proj.weight"))
        h = _rms(x, p("post_attention_layernorm.weight"), eps)
        x = x + F.linear(F.silu(F.linear(h, p("mlp.gate_proj.weight"))) * F.linear(h, p("mlp.up_proj.weight")),
                         p("mlp.down_proj.weight"))
    return x


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def target(tmp_path_factory):
    from tiny_models import make_tiny_llama

    path = tmp_path_factory.mktemp("eagle-target")
    return path, make_tiny_llama(path, seed=21)


def _engine_config(path):
    from llmapi.engine import build_engine

    return build_engine(str(path), device_type="cpu").config


def _target_states(hf, ids):
    """The target's last hidden states (after its final norm) and its LM head, for one sequence."""
    with torch.inference_mode():
        out = hf.model(torch.tensor([ids]))
    return out.last_hidden_state[0], hf.lm_head.weight


def _scattered_table(num_tokens, seed=0):
    blocks = -(-num_tokens // TOKENS_PER_BLOCK) + 2
    return torch.randperm(32, generator=torch.Generator().manual_seed(seed))[:blocks].to(torch.int32)


@pytest.mark.parametrize("layers,fc_bias,embed_tokens", [(1, True, False), (2, False, True)])
def test_head_output_equals_the_published_definition(target, tmp_path, layers, fc_bias, embed_tokens):
    from llmapi.speculative.drafter import paged_metadata
    from llmapi.speculative.eagle import load_eagle_head
    from tiny_models import make_tiny_eagle_head

    path, hf = target
    state = make_tiny_eagle_head(tmp_path, hf.config, seed=5, num_layers=layers, fc_bias=fc_bias,
                                 embed_tokens=embed_tokens)
    head = load_eagle_head(tmp_path, _engine_config(path), "cpu", torch.float32)
    ids = [5, 9, 17, 33, 4, 100, 7, 250, 11, 12, 13]
    hidden, lm_head = _target_states(hf, ids)
    embed = state["embed_tokens.weight"] if embed_tokens else hf.model.embed_tokens.weight
    # Pairs (h_i, x_{i+1}) at positions i = 0..T-2.
    want = eagle_reference(state, hf.config, hidden[:-1], torch.tensor(ids[1:]), embed)
    table = _scattered_table(len(ids))
    caches = [torch.zeros(2, 32, TOKENS_PER_BLOCK, hf.config.num_key_value_heads,
                          hf.config.hidden_size // hf.config.num_attention_heads) for _ in range(layers)]
    # In two chunks, the second reading the first's KV from the paged cache.
    got = []
    for start, stop in ((0, 6), (6, len(ids) - 1)):
        attn, pos = paged_metadata(table.unsqueeze(0), np.array([start]), np.array([stop - start]), TOKENS_PER_BLOCK)
        embeds = (head.embed_tokens.weight if embed_tokens else embed)[torch.tensor(ids[start + 1:stop + 1])]
        with torch.inference_mode():
            got.append(head(hidden[start:stop], embeds, pos, attn, caches))
    got = torch.cat(got)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got @ lm_head.T, want @ lm_head.T, rtol=1e-4, atol=1e-4)  # the draft logits


def _fake_batch(ids, draft_start, num_draft):
    """A one-row Batch of the fields the drafter reads (greedy)."""
    last = len(ids) - 1
    return SimpleNamespace(
        draft_offsets=np.array([0, len(ids) - draft_start], np.int32), draft_start=np.array([draft_start], np.int32),
        draft_input_ids=np.array(ids[draft_start:], np.int32), temperature=np.zeros(1, np.float32),
        top_k=np.zeros(1, np.int32), top_p=np.ones(1, np.float32), min_p=np.zeros(1, np.float32),
        seeds=np.zeros(1, np.int64), seq_index=np.zeros(1, np.int32), output_index=np.array([last], np.int32),
        bias_offsets=np.zeros(2, np.int32), bias_ids=np.zeros(0, np.int32), bias_values=np.zeros(0, np.float32),
        suppress_offsets=np.zeros(2, np.int32), suppress_ids=np.zeros(0, np.int32), num_draft_tokens=np.array(
            [num_draft], np.int32))


@pytest.mark.parametrize("draft_start", [8, 0])
def test_the_drafter_chain_equals_the_reference_chain(target, tmp_path, draft_start):
    """The target's prompt step (its hidden states kept per slot, the head run over its pairs: after_forward), then
    EagleDrafter.propose: the head catches up on the pairs from draft_start (the prompt's last pair, whose next token
    came after that step; or every pair, from the hidden-state cache), drafts the first token, then feeds its own
    output with each draft; the reference recomputes the whole chain without a cache at every step."""
    from llmapi.engine import build_engine, load_rank_weights
    from llmapi.models import get_model_class
    from llmapi.speculative.drafter import EagleDrafter, paged_metadata
    from llmapi.speculative.eagle import load_eagle_head
    from llmapi.speculative.rejection import RowSettings
    from tiny_models import make_tiny_eagle_head

    path, hf = target
    info = build_engine(str(path), device_type="cpu")
    model = get_model_class(info.config["architecture"])(info.config, "cpu", torch.float32)
    model.load_weights(load_rank_weights(info.path, 0))
    state = make_tiny_eagle_head(tmp_path, hf.config, seed=6, num_layers=2)
    drafter = EagleDrafter(load_eagle_head(tmp_path, info.config, "cpu", torch.float32), model.eval(), "cpu",
                           torch.float32, TOKENS_PER_BLOCK)
    drafter.allocate(32)
    ids = [5, 9, 17, 33, 4, 100, 7, 250, 11, 12]  # a 9-token prompt, then the token its step sampled
    hidden, lm_head = _target_states(hf, ids)
    table = _scattered_table(len(ids) + 4, seed=1)
    attn, pos = paged_metadata(table.unsqueeze(0), np.array([0]), np.array([9]), TOKENS_PER_BLOCK)
    prompt_step = SimpleNamespace(input_ids=torch.tensor(ids[:9], dtype=torch.int32), positions=pos, attn=attn)
    drafter.after_forward(prompt_step, hidden[:9])  # the target's prompt step
    k = 4
    batch = _fake_batch(ids, draft_start=draft_start, num_draft=k)
    inputs = SimpleNamespace(attn=SimpleNamespace(block_tables=table.unsqueeze(0)))
    settings = RowSettings.from_batch(batch, np.array([0]), "cpu")
    drafts, probs = drafter.propose(batch, inputs, settings, np.array([k]))
    assert probs is None  # greedy
    # The reference chain: pairs (h_i, x_{i+1}) for i < T-1, then (f, d_j) with the head's own output f.
    feats, toks, want = hidden[:-1], list(ids[1:]), []
    embed = hf.model.embed_tokens.weight
    for _ in range(k):
        out = eagle_reference(state, hf.config, feats, torch.tensor(toks), embed)
        draft = int((out[-1] @ lm_head.T).argmax())
        want.append(draft)
        feats, toks = torch.cat([feats, out[-1:]]), toks + [draft]
    assert drafts[0].tolist() == want


def test_the_loader_names_what_does_not_fit(target, tmp_path):
    import json

    from llmapi.speculative.eagle import load_eagle_head
    from tiny_models import make_tiny_eagle_head

    path, hf = target
    cfg = _engine_config(path)
    state = make_tiny_eagle_head(tmp_path, hf.config)
    del state["layers.0.mlp.up_proj.weight"]
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(UnsupportedModelError, match="layers.0.mlp.up_proj.weight"):
        load_eagle_head(tmp_path, cfg, "cpu", torch.float32)
    state = make_tiny_eagle_head(tmp_path, hf.config)
    state["layers.0.input_layernorm.weight"] = torch.ones(hf.config.hidden_size)  # EAGLE-1's first layer has none
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(UnsupportedModelError, match="layers.0.input_layernorm.weight"):
        load_eagle_head(tmp_path, cfg, "cpu", torch.float32)
    make_tiny_eagle_head(tmp_path, hf.config)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(config, hidden_size=32)))
    with pytest.raises(UnsupportedModelError, match="hidden_size"):
        load_eagle_head(tmp_path, cfg, "cpu", torch.float32)
    (tmp_path / "config.json").write_text(json.dumps(dict(config, draft_vocab_size=100)))
    with pytest.raises(UnsupportedModelError, match="EAGLE-3"):
        load_eagle_head(tmp_path, cfg, "cpu", torch.float32)
