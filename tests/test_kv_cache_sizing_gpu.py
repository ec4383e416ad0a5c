"""On a GPU the KV cache leaves the largest step its peak: near a fraction of 1 no step runs out of memory."""

import pytest

pytestmark = pytest.mark.gpu

FRACTION = 0.997
ROWS = 2048  # max_batch_size: one step draws 2,048 rows of a 32K vocabulary with top-k and top-p
VOCAB = 32000


@pytest.fixture(scope="module", params=["llama", "t5"])
def wide_vocab_model(request, tmp_path_factory):
    """(the longest prompt the test sends, the model's directory): a decoder-only model (2,048 positions: prompts of
    2,045 leave its 3 output tokens room) and an encoder-decoder one (encoder inputs of up to 1,024 tokens)."""
    path = tmp_path_factory.mktemp(f"wide-vocab-{request.param}")
    if request.param == "llama":
        from tiny_models import make_tiny_llama

        make_tiny_llama(path, vocab_size=VOCAB, hidden_size=256, intermediate_size=1024, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, std=0.08)
    else:
        import transformers

        config = transformers.T5Config(vocab_size=VOCAB, d_model=256, d_kv=64, d_ff=1024, num_layers=2,
                                       num_decoder_layers=2, num_heads=4, feed_forward_proj="relu", dropout_rate=0.0,
                                       decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
        transformers.T5ForConditionalGeneration(config).save_pretrained(path)
    return (2045 if request.param == "llama" else 1020), path


def _run(model, fraction):
    """(the profile step's peak, the cache's bytes) and every request's tokens: 2,048 sampled rows in one step, then
    four prompts (encoder inputs for T5) of 2,045 tokens in one step (a decoder's 3 output tokens within its 2,048
    positions; T5's encoder inputs at most its 1,024: four of 1,020)."""
    from llmapi import LLM, SamplingParams
    from llmapi.config import KvCacheConfig

    long_len, path = model
    short = [[(7 * i + j) % (VOCAB - 2) + 2 for j in range(4)] for i in range(ROWS)]
    long = [[(13 * i + j) % (VOCAB - 2) + 2 for j in range(long_len)] for i in range(4)]
    params = [SamplingParams(max_tokens=3, temperature=1.0, top_p=0.9, top_k=100, seed=i, ignore_eos=True,
                             detokenize=False) for i in range(ROWS + 4)]
    with LLM(str(path), dtype="bfloat16", device="cuda", skip_tokenizer_init=True, max_num_tokens=8192,
             max_batch_size=ROWS, cuda_graph_batch_sizes=[1, 2, 4, 8],
             kv_cache_config=KvCacheConfig(free_gpu_memory_fraction=fraction, enable_block_reuse=False)) as llm:
        runner = llm._runner
        cache = sum(c.numel() * c.element_size() for c in runner.kv_caches)
        outs = llm.generate(short, params[:ROWS], use_tqdm=False) + \
            llm.generate(long, params[ROWS:], use_tqdm=False)
    finished = [(len(o.outputs[0].token_ids), o.outputs[0].finish_reason) for o in outs]
    assert finished == [(3, "length")] * (ROWS + 4), [f for f in finished if f != (3, "length")][:4]
    return (runner.step_peak_bytes, cache), [list(o.outputs[0].token_ids) for o in outs]


def test_near_a_fraction_of_one_the_largest_steps_still_run(wide_vocab_model):
    (peak, cache), tokens = _run(wide_vocab_model, FRACTION)
    # What the cache leaves free: (free - peak) * (1 - FRACTION) + peak. Sized by free memory alone (the rule
    # before the profile step) it would have left (1 - FRACTION) * free, less than the step's peak: these steps
    # would have run out of memory.
    free = peak + cache / FRACTION
    assert peak > (1 - FRACTION) * free, (peak, free)
    # The same seeded requests through a cache at the default fraction: the same tokens (a seeded request draws the
    # same tokens in any batch; the cache's size changes neither).
    (_, default_cache), reference = _run(wide_vocab_model, 0.9)
    assert default_cache < cache
    assert tokens == reference
