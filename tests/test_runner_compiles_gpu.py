"""Serving compiles no kernel anew when only the batch's shape changes (GPU: Triton compiles there)."""

import pytest

pytestmark = pytest.mark.gpu


def test_new_batch_shapes_compile_nothing(tiny_llama_dir):
    import triton

    from llmapi import LLM, SamplingParams

    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, detokenize=False)
    compiled = []

    def hook(*args, fn=None, **kwargs):
        compiled.append(fn.name)

    with LLM(str(tiny_llama_dir), dtype="bfloat16", device="cuda", skip_tokenizer_init=True,
             max_num_tokens=256) as llm:
        # Warm: prefill, mixed and decode steps of one shape class each.
        llm.generate([[5] * 9, [6] * 20, [7] * 3], params, use_tqdm=False)
        triton.knobs.runtime.jit_post_compile_hook = hook
        try:
            # Other request counts (1, 16, odd, > the token budget per step) and lengths: the views into
            # the packed inputs move, request counts cross multiples of 16.
            for count, length in ((1, 5), (16, 7), (33, 11), (5, 64), (70, 13)):
                prompts = [[(3 * i + j) % 300 + 1 for j in range(length + i % 3)] for i in range(count)]
                llm.generate(prompts, params, use_tqdm=False)
        finally:
            triton.knobs.runtime.jit_post_compile_hook = None
    assert compiled == []
