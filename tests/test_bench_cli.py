"""`llmapi bench`: known config names, workload checks, and a tiny end-to-end run (with the transformers baseline) on CPU."""

import json

import pytest

from llmapi import QuantConfig
from llmapi.bench import Workload, bench_quant, known_config_names, resolve_bench_model
from llmapi.cli import main
from llmapi.models.llama import config_from_hf


def test_known_config_resolves_to_a_convertible_directory():
    assert "llama-3.1-8b" in known_config_names()
    path = resolve_bench_model("llama-3.1-8b")
    hf = json.loads(open(f"{path}/config.json").read())
    cfg = config_from_hf(hf, __import__("torch").bfloat16)
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
            cfg["head_dim"], cfg["intermediate_size"], cfg["vocab_size"]) == (4096, 32, 32, 8, 128, 14336, 128256)
    assert cfg["rotary_scaling"]["rope_type"] == "llama3"
    assert resolve_bench_model("llama-3.1-8b") == path  # stable: the engine cache keys on the directory
    assert resolve_bench_model("some/hub-id") == "some/hub-id"


@pytest.mark.parametrize("field,value", [("isl", 0), ("osl", -1), ("num_requests", 0), ("concurrency", -2)])
def test_workload_rejects_bad_sizes(field, value):
    kwargs = dict(isl=4, osl=4, num_requests=2, concurrency=0)
    kwargs[field] = value
    with pytest.raises(ValueError, match=field):
        Workload(**kwargs)


def test_kv_cache_dtype_joins_the_quant_mode():
    assert bench_quant("fp8", "auto") == "fp8" and bench_quant(None, "auto") is None
    assert bench_quant("fp8", "fp8") == QuantConfig("FP8", kv_cache_quant_algo="FP8")
    assert bench_quant(None, "int8") == QuantConfig(quant_algo=None, kv_cache_quant_algo="INT8")
    assert bench_quant("int4_awq", "fp8") == QuantConfig("W4A16_AWQ", group_size=128, kv_cache_quant_algo="FP8")
    assert bench_quant("fp8_kv_cache", "int8") == QuantConfig(quant_algo=None, kv_cache_quant_algo="INT8")


def test_workload_prompts_have_fixed_length():
    prompts = Workload(isl=7, osl=3, num_requests=5).prompts(vocab_size=50)
    assert len(prompts) == 5 and {len(p) for p in prompts} == {7}
    assert all(0 <= t < 50 for p in prompts for t in p)


def test_bench_runs_tiny_model_with_hf_baseline(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = main(["bench", "--model", str(tiny_llama_dir), "--device", "cpu", "--isl", "6", "--osl", "5",
               "--num-requests", "6", "--concurrency", "2", "--compare", "hf", "--hf-no-compile",
               "--json", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    ours = result["llmapi"]
    # ignore_eos: every request gives exactly osl tokens.
    assert ours["requests"] == 6 and ours["output_tokens"] == 30
    assert 0 < ours["ttft_ms_p50"] <= ours["ttft_ms_p99"] <= 1e3 * ours["wall_s"]
    assert 0 < ours["tpot_ms_p50"] <= ours["tpot_ms_p99"]
    assert ours["output_tok_s"] == pytest.approx(30 / ours["wall_s"])
    hf = result["hf"]
    assert hf["batch_size"] == 2 and hf["output_tok_s"] > 0
    assert result["speedup_vs_hf"] == pytest.approx(ours["output_tok_s"] / hf["output_tok_s"])
    printed = capsys.readouterr().out
    assert "output tok/s" in printed and "llmapi / transformers" in printed


def test_bench_runs_two_ranks_quantized(tiny_llama_dir, tmp_path):
    # Several ranks: the runners live in the MPI job, so the report has no runner statistics or weight bytes.
    out = tmp_path / "bench.json"
    rc = main(["bench", "--model", str(tiny_llama_dir), "--device", "cpu", "--isl", "6", "--osl", "4",
               "--num-requests", "4", "--concurrency", "2", "--tp", "2", "--quant", "int8_weight_only",
               "--json", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["tensor_parallel_size"] == 2 and result["quant"] == "int8_weight_only"
    assert result["llmapi"]["output_tokens"] == 16 and "runner_steps" not in result
