"""On a GPU, greedy output through the Triton kernels and CUDA graphs vs transformers on the same weights."""

import pytest
import torch

pytestmark = pytest.mark.gpu

PROMPT_LENS = (5, 17, 64, 200, 33, 1)
NEW_TOKENS = 24


def _real_shaped_llama(path):
    """SmolLM2-135M's shapes (GQA 9/3, head_dim 64, tied head) with widened random weights."""
    from tiny_models import _spread_weights
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                         rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = LlamaForCausalLM(config).eval()
    _spread_weights(model, 0, std=0.05, embed_std=1.0)
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("real-shaped-llama")
    _real_shaped_llama(path)
    return path


def _prompts():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, 49152, (n,), generator=g).tolist() for n in PROMPT_LENS]


def _ours(model_dir, dtype):
    from llmapi import LLM, SamplingParams

    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True, detokenize=False)
    with LLM(str(model_dir), dtype=dtype, device="cuda", skip_tokenizer_init=True) as llm:
        outs = llm.generate(_prompts(), params, use_tqdm=False)  # one batch: mixed prefill and graph decodes
    return [o.outputs[0].token_ids for o in outs]


def _hf(model_dir, dtype):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=dtype).cuda().eval()
    result = []
    for prompt in _prompts():
        ids = torch.tensor([prompt], device="cuda")
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                             min_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0)
        result.append(out[0, len(prompt):].tolist())
    return model, result


def _top5(model, tokens):
    with torch.no_grad():
        logits = model(torch.tensor([tokens], device="cuda")).logits[0, -1]
    return set(logits.topk(5).indices.tolist())


def test_fp32_greedy_is_token_exact(model_dir):
    _, theirs = _hf(model_dir, torch.float32)
    assert _ours(model_dir, "float32") == theirs


def test_bf16_greedy_agrees_by_top5_rule(model_dir):
    # vLLM's check: up to the first mismatch tokens are equal; at it, each side's token is in the other's top 5.
    from tiny_models import to_engine_model
    from transformers import LlamaForCausalLM

    hf_model, theirs = _hf(model_dir, torch.bfloat16)
    ours = _ours(model_dir, "bfloat16")
    engine_model, engine_config = to_engine_model(LlamaForCausalLM.from_pretrained(model_dir), torch.bfloat16, "cuda")
    mismatches = 0
    for prompt, a, b in zip(_prompts(), ours, theirs):
        assert len(a) == len(b) == NEW_TOKENS
        for i, (x, y) in enumerate(zip(a, b)):
            if x == y:
                continue
            mismatches += 1
            prefix = prompt + a[:i]
            assert x in _top5(hf_model, prefix), f"our token {x} at {i} is not in transformers' top 5"
            assert y in _top5_ours(engine_model, engine_config, prefix), \
                f"transformers' token {y} at {i} is not in our top 5"
            break
    print(f"{mismatches} of {len(PROMPT_LENS)} sequences diverged (each within the top-5 rule)")


def _top5_ours(model, engine_config, tokens):
    """Our model's top 5 after `tokens`, run as one prefill over a paged cache (the Triton kernels)."""
    from tiny_models import PagedDriver

    driver = PagedDriver(model, engine_config, num_blocks=64, tokens_per_block=32, dtype=torch.bfloat16,
                         device="cuda")
    logits = driver.step({0: tokens})[0][-1]
    return set(logits.topk(5).indices.tolist())
