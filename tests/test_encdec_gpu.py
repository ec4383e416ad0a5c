"""On a GPU, encoder-decoder models through the Triton kernels (varlen encoder attention with T5's bias, paged
decoder attention, cross-attention over cross blocks) and decode CUDA graphs against transformers: fp32 token-exact,
bf16 within the top-5 rule of the Llama engine's check."""

import pytest
import torch

import encdec_models as em

pytestmark = pytest.mark.gpu

NEW_TOKENS = 24


def _models():
    # T5 does not scale its attention scores: narrower weights than the CPU tests' keep a 4-layer model's float32
    # logits within 1e-4 of float64 (at std 0.5 float32's own rounding moves them by 0.1, and transformers' bf16
    # leaves fp32's top 5 on its own). The bf16 check's T5 is narrower still ("t5-bf16", below).
    return {"t5": _peaked(em.t5("t5", layers=4, std=0.2), 16), "t5v1.1": em.t5("t5v1.1", layers=4, std=0.15),
            "t5-bf16": _peaked(em.t5("t5", layers=4, std=0.1), 16), "bart": em.bart(encoder_layers=3, decoder_layers=2)}


def _peaked(hf, factor: float):
    """The model with its logits `factor` times larger (the decoder's final norm feeds only the head). The
    original T5's tied head scales its input by d_model^-0.5: at std 0.2 and d_model 64 its logits spread by
    0.2 over 96 tokens, an almost uniform distribution whose order among near-equal tokens is rounding noise.
    Spreading them does not help at std 0.2: bf16's rounding through four layers of unscaled attention moves the
    logits by 1.7x their spread there (transformers' own bf16 leaves fp32's token outside its top 5 at 2 of the
    192 steps, x1 to x16 alike). At std 0.1 and x16 ("t5-bf16") the logits spread by 1.6, transformers' bf16
    moves them by at most 0.09 and fp32's top token leads its 6th by at least 0.4 at every step: a bf16 path as
    precise as transformers' keeps the top-5 rule with a margin, one that is not fails it."""
    with torch.no_grad():
        hf.decoder.final_layer_norm.weight.mul_(factor)
    return hf


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    out = {}
    for name, hf in _models().items():
        path = tmp_path_factory.mktemp(name.replace(".", "_"))
        hf.save_pretrained(path)
        out[name] = (path, hf)
    return out


def _requests(hf):
    g = torch.Generator().manual_seed(5)
    vocab = hf.config.vocab_size
    lengths = (3, 17, 64, 120, 33, 1, 90, 8)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def _ours(path, dtype, requests, logprobs=None):
    from llmapi import LLM, SamplingParams

    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True, logprobs=logprobs)
    with LLM(str(path), dtype=dtype, device="cuda", skip_tokenizer_init=True, tokens_per_block=16) as llm:
        outs = llm.generate(requests, params, use_tqdm=False)  # one batch: encoders, then graph decodes
        assert llm._runner.stats.graph_steps > 0  # with logprobs too: decode() runs on the graphs' logits
    return outs


def _hf(hf, dtype, requests):
    model = hf.to(device="cuda", dtype=dtype)
    start = hf.config.decoder_start_token_id
    result = []
    with torch.inference_mode():
        for enc in requests:
            ids = torch.tensor([enc], device="cuda")
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                 min_new_tokens=NEW_TOKENS, do_sample=False, num_beams=1, eos_token_id=None,
                                 decoder_start_token_id=start)
            result.append(out[0, 1:].tolist())
    return result


@pytest.mark.parametrize("name", ["t5", "t5v1.1", "bart"])
def test_fp32_greedy_is_token_exact(saved, name):
    path, hf = saved[name]
    requests = _requests(hf)
    ours = [list(o.outputs[0].token_ids) for o in _ours(path, "float32", requests)]
    assert ours == _hf(hf, torch.float32, requests)


@pytest.mark.parametrize("name", ["t5-bf16", "bart"])
def test_bf16_agrees_with_fp32_by_top5_rule(saved, name):
    """Up to the first mismatch the tokens are equal; there our bf16 token is in fp32 transformers' top 5, and the
    fp32 token in our bf16 top 5 (the step's logprobs). A second run without logprobs (the greedy ids computed
    inside the graphs) must part from fp32 within its top 5 as well."""
    path, hf = saved[name]
    requests = _requests(hf)
    reference = _hf(hf, torch.float32, requests)
    eager = _ours(path, "bfloat16", requests, logprobs=5)
    graphed = _ours(path, "bfloat16", requests)
    model = hf.to(device="cuda", dtype=torch.float32)
    start = hf.config.decoder_start_token_id
    for enc, out, graph_out, want in zip(requests, eager, graphed, reference):
        for with_logprobs, got in ((True, out.outputs[0].token_ids), (False, graph_out.outputs[0].token_ids)):
            for i, (a, b) in enumerate(zip(got, want)):
                if a == b:
                    continue
                with torch.inference_mode():
                    logits = model(input_ids=torch.tensor([enc], device="cuda"),
                                   decoder_input_ids=torch.tensor([[start] + want[:i]], device="cuda"),
                                   use_cache=False).logits[0, -1]
                assert a in logits.topk(5).indices.tolist(), f"our token {a} at {i} is not in fp32's top 5"
                if with_logprobs:
                    assert b in out.outputs[0].logprobs[i], f"fp32's token {b} at {i} is not in our top 5"
                break
