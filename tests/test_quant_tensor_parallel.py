"""Quantized models split by tensor parallelism: every mode's TP=2 (and TP=4) logits equal its TP=1 logits, run
in one process (TP ranks as threads, see test_distributed_sharding); a split that would cut a quantization group
is refused by name; and LLM over 2 MPI ranks gives the same greedy tokens as one rank."""

import pytest
import torch
from test_distributed_sharding import _attn, _caches, _inputs, _sharded_logits
from tiny_models import make_tiny_gpt2, make_tiny_llama, to_engine_model

from llmapi import LLM, QuantConfig, SamplingParams
from llmapi.distributed.mapping import Mapping
from llmapi.distributed.sharding import build_rank_model, shard_weights
from llmapi.errors import UnsupportedModelError
from llmapi.quantization.apply import quantize_engine_weights
from llmapi.quantization.calibration import ActivationStats
from llmapi.quantization.config import resolve_quant
from llmapi.quantization.apply import quantized_linears


def _stats(cfg, weights, seed=0):
    """Made-up calibration statistics (ranges, mean |x|, positive definite H) for every quantized linear: the
    activation scales, AWQ's and SmoothQuant's per-input-channel factors all differ from channel to channel."""
    g = torch.Generator().manual_seed(seed)
    stats = ActivationStats(num_tokens=1)
    for linear in quantized_linears(cfg):
        k = weights[linear + ".weight"].shape[1]
        stats.input_amax[linear] = torch.rand(k, generator=g) * 3 + 0.5
        stats.input_abs_mean[linear] = stats.input_amax[linear] / 4
        a = torch.randn(k, k, generator=g)
        stats.input_hessian[linear] = a @ a.T / k + 0.1 * torch.eye(k)
    return stats


# Per-token activation scales are taken over each rank's own input features in a row-parallel linear, as in
# other engines: those modes (tolerance None) round differently from one rank, and are checked to stay as close
# to the float model as one rank is.
MODES = {  # name -> (QuantConfig, tolerance on the logits against one rank)
    "int8 per channel": (QuantConfig("W8A16"), 1e-4),
    "int4 per channel": (QuantConfig("W4A16"), 1e-4),
    "int4 group 64": (QuantConfig("W4A16", group_size=64), 1e-4),
    "awq group 64": (QuantConfig("W4A16_AWQ", group_size=64), 1e-4),
    "fp8": (QuantConfig("FP8"), 1e-4),
    "smoothquant per tensor": (QuantConfig("W8A8_SQ_PER_TENSOR_PLUGIN"), 1e-4),
    "fp8 per token": (QuantConfig("FP8_PER_CHANNEL_PER_TOKEN"), None),
    "smoothquant per token": (QuantConfig("W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN"), None),
}


def _last_logits(model, cfg, ids, positions, lengths):
    """Logits of each request's last token through `model`, one rank."""
    attn, num_blocks = _attn(lengths)
    with torch.no_grad():
        h = model(ids, positions, attn, _caches(cfg, Mapping(), num_blocks, cfg["num_key_value_heads"]))
        return model.compute_logits(h[attn.query_start_loc[1:].long() - 1])


def _quantized_one_rank(hf_model, quant, lengths):
    """(float engine model, engine config with the quantization section, quantized full weights, inputs,
    the quantized model's one-rank logits)."""
    model, cfg = to_engine_model(hf_model)
    float_weights = model.state_dict()
    weights = quantize_engine_weights(cfg, float_weights, quant, _stats(cfg, float_weights))
    cfg = dict(cfg, quantization=quant.to_dict())
    ids, positions = _inputs(cfg["vocab_size"], lengths)
    one = build_rank_model(cfg, Mapping(), "cpu", torch.float32)
    one.load_weights(shard_weights(one, weights))
    return model, cfg, weights, (ids, positions), _last_logits(one, cfg, ids, positions, lengths)


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("mode", list(MODES))
def test_quantized_shards_equal_one_rank(mode, tp):
    quant, tol = MODES[mode]
    # 256 hidden and 512 intermediate features: at TP=4 a rank still holds whole groups of 64 of each row-parallel
    # linear's inputs (dense: 256 / 4, proj: 512 / 4).
    hf = make_tiny_llama(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2)
    lengths = [5, 1, 12]
    model, cfg, weights, (ids, positions), want = _quantized_one_rank(hf, quant, lengths)
    float_logits = _last_logits(model, cfg, ids, positions, lengths)
    got = _sharded_logits(cfg, weights, tp, 1, ids, positions, lengths)
    error_one = (want - float_logits).norm()
    assert error_one > 1e-2 * float_logits.norm()  # not vacuous: the quantized model is not the float model
    if tol is not None:
        torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    else:  # measured 0.88-1.03 of one rank's error at TP=2; a scale cut from the wrong rows gives far more
        assert (got - float_logits).norm() < 1.25 * error_one


@pytest.mark.parametrize("mode", ["int8 per channel", "fp8", "smoothquant per tensor"])
def test_quantized_gpt2_shards_equal_one_rank(mode):
    # GPT-2's linears have biases: a column-parallel one cuts its bias, a row-parallel one adds it once after the sum.
    quant, tol = MODES[mode]
    lengths = [4, 9]
    model, cfg, weights, (ids, positions), want = _quantized_one_rank(make_tiny_gpt2(), quant, lengths)
    assert any(name.endswith("mlp.proj.bias") for name in weights)
    torch.testing.assert_close(_sharded_logits(cfg, weights, 2, 1, ids, positions, lengths), want, atol=tol,
                               rtol=tol)


def test_row_parallel_split_must_keep_whole_groups():
    # 64 hidden features: at TP=2 a rank holds 32 of the attention output projection's inputs, half a group of 64.
    _, cfg = to_engine_model(make_tiny_llama())
    cfg = dict(cfg, quantization=QuantConfig("W4A16", group_size=64).to_dict())
    build_rank_model(cfg, Mapping(), "meta", torch.float32)  # one rank: fine
    with pytest.raises(UnsupportedModelError, match="input features 0..32 of a row-parallel linear.*groups of 64"):
        build_rank_model(cfg, Mapping(2, 1, 0), "meta", torch.float32)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A tiny Llama of its own (the session's tiny_llama_dir engines are counted by other tests' cache checks)."""
    from tiny_tokenizer import save_tiny_tokenizer

    path = tmp_path_factory.mktemp("tiny-llama-tp-quant")
    model = make_tiny_llama(path, intermediate_size=192)
    save_tiny_tokenizer(path, vocab_size=model.config.vocab_size)
    return path


@pytest.mark.parametrize("quant", ["int8_weight_only", "fp8", "int8_kv_cache"])
def test_two_ranks_greedy_equal_one_rank(quant, llama_dir):
    prompts = [[5, 9, 14, 3, 27], [40, 2], list(range(3, 40))]
    params = SamplingParams(max_tokens=12, temperature=0)

    def greedy(**kwargs):
        with LLM(str(llama_dir), quant=quant, **kwargs) as llm:
            section = llm.engine_info.config["quantization"]
            assert section["quant_algo"] == resolve_quant(quant).quant_algo
            assert section["kv_cache_quant_algo"] == resolve_quant(quant).kv_cache_quant_algo
            return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]

    want = greedy()
    assert greedy(tensor_parallel_size=2) == want
