"""Greedy outputs of two runs of one float32 model that compute it in different shapes (speculative verify steps
against one-token steps, other batches): equal token for token, but for near ties, which float32 reordering can
break either way."""


def assert_equal_but_near_ties(got, want, prompts, model_dir, gap: float = 1e-4, most: int = 1) -> None:
    """`got` and `want` (token ids per prompt) are equal, except that up to `most` requests may part at a near tie:
    at the first token where they differ, transformers' forward of the model over the prompt and the tokens both
    runs share puts both runs' tokens within `gap` of its top logit. What follows a parting is not compared (each
    run goes on from its own token). A wrong token (a bug) is far from the top logit and fails; so does a parting
    that is not a different token (one output a prefix of the other)."""
    import torch
    from transformers import AutoModelForCausalLM

    assert len(got) == len(want)
    parted = [i for i, (g, w) in enumerate(zip(got, want)) if list(g) != list(w)]
    assert len(parted) <= most, f"requests {parted} differ"
    if not parted:
        return
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for i in parted:
        g, w = list(got[i]), list(want[i])
        j = next((k for k, (a, b) in enumerate(zip(g, w)) if a != b), None)
        assert j is not None, f"request {i}: {g} and {w} differ in length only"
        with torch.inference_mode():
            logits = hf(torch.tensor([list(prompts[i]) + w[:j]])).logits[0, -1]
        top = float(logits.max())
        behind = (top - float(logits[g[j]]), top - float(logits[w[j]]))
        assert max(behind) < gap, f"request {i}, token {j}: {g[j]} against {w[j]}, {behind} behind the top logit"
