"""CausalLM.align_head: a vocabulary that is not a multiple of 64 gets its head in padded rows (cuBLAS's fast
kernels want aligned shapes); the logits are those of the head itself."""

import pytest
import torch
from torch import nn

from llmapi.models.base import HEAD_ALIGNMENT


def _models():
    from encdec_models import bart, t5
    from tiny_models import make_tiny_gpt2, make_tiny_llama, to_engine_model

    return {"gpt2 (tied, 288)": to_engine_model(make_tiny_gpt2())[0],
            "llama (untied, 320)": to_engine_model(make_tiny_llama())[0],
            "llama (untied, 300)": to_engine_model(make_tiny_llama(vocab_size=300))[0],
            "bart (tied, bias, 96)": to_engine_model(bart())[0],
            "t5 (tied, 96)": to_engine_model(t5())[0]}


@pytest.mark.parametrize("name", ["gpt2 (tied, 288)", "llama (untied, 320)", "llama (untied, 300)",
                                  "bart (tied, bias, 96)", "t5 (tied, 96)"])
def test_aligned_head_gives_the_heads_logits(name):
    model = _models()[name]
    vocab = model.config["vocab_size"]
    hidden = torch.randn(5, model.config["hidden_size"], generator=torch.Generator().manual_seed(0))
    before = model.compute_logits(hidden)
    padded = model.align_head()
    assert padded == (vocab % HEAD_ALIGNMENT != 0)
    if padded:
        rows = model._aligned_head.shape[0]
        assert rows % HEAD_ALIGNMENT == 0 and vocab < rows < vocab + HEAD_ALIGNMENT
        assert not model._aligned_head[vocab:].any()  # zeros past the vocabulary
        assert not any("aligned" in k for k in (*dict(model.named_buffers()), *model.state_dict()))
    after = model.compute_logits(hidden)
    assert after.shape == (5, vocab) and after.is_contiguous()
    torch.testing.assert_close(after, before, rtol=1e-6, atol=1e-6)
    low = model.compute_logits(hidden.to(torch.float32), float32=False)
    assert low.shape == (5, vocab) and low.is_contiguous()


def test_a_head_that_is_not_a_plain_linear_stays():
    from tiny_models import make_tiny_gpt2, to_engine_model

    model = to_engine_model(make_tiny_gpt2(tie_word_embeddings=False))[0]
    model.lm_head = nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=True)  # a biased head
    assert model.align_head() is False and model._aligned_head is None

    class Wrapped(nn.Module):  # e.g. a vocab-parallel head
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)

    model.lm_head = Wrapped(nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=False))
    assert model.align_head() is False and model._aligned_head is None


def test_llm_runs_the_aligned_head(tiny_gpt2_dir):
    # The runner aligns a one-rank model's head as it loads (gpt2's 288 rows -> 320); greedy tokens as
    # transformers' on the same weights.
    from transformers import GPT2LMHeadModel

    from llmapi import LLM, SamplingParams

    prompts = [[5, 9, 11, 3], [40, 41]]
    with LLM(str(tiny_gpt2_dir), skip_tokenizer_init=True) as llm:
        assert llm._runner.model._aligned_head.shape[0] == 320
        outs = llm.generate(prompts, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True),
                            use_tqdm=False)
    hf = GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir).eval()
    for prompt, out in zip(prompts, outs):
        ids = torch.tensor([prompt])
        want = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, min_new_tokens=8,
                           do_sample=False, eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        assert list(out.outputs[0].token_ids) == want
