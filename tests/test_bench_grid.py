"""`llmapi bench --grid trtllm` on CPU: a tiny Llama through two rows of the grid (request counts, lengths, output
tokens, the most requests in flight against the scheduler's admission, the steady-state check and its warning,
the JSON, transformers on the 128/128 row only), TensorRT-LLM's figure and ratio for an H100, each row's runner
stats and sampled profile, the device names that pick a reference, and refused rows, scales and flags."""

import json
import math

import pytest

from llmapi.bench_grid import GRID_SOURCE, TRTLLM_GRID, reference_device, row_requests, select_rows
from llmapi.cli import main


@pytest.fixture(scope="module")
def long_llama_dir(tmp_path_factory):
    """The tiny Llama with room for the 2048/128 row (2,177 positions)."""
    from tiny_models import make_tiny_llama

    path = tmp_path_factory.mktemp("tiny-llama-4k")
    make_tiny_llama(path, max_position_embeddings=4096)
    return path


def test_grid_has_the_ten_rows_in_order():
    assert [r.name for r in TRTLLM_GRID] == ["128/128", "128/2048", "128/4096", "500/2000", "1000/1000", "1000/2000",
                                             "2048/128", "2048/2048", "5000/500", "20000/2000"]
    assert all(r.requests % 128 == 0 and r.h100 > 0 and r.h200 > 0 for r in TRTLLM_GRID)
    assert [r.name for r in select_rows("trtllm", " 2048/128,128/128")] == ["128/128", "2048/128"]  # the grid's order


def test_request_counts_follow_scale_and_max_batch_size():
    row = select_rows("trtllm", "1000/1000")[0]
    assert row_requests(row, 2048, 1.0) == 5120
    assert row_requests(row, 2048, 0.001) == 6  # ceil(5.12)
    assert row_requests(row, 100, 1.0) == 300  # 3x --max-batch-size: no more can be in flight
    assert row_requests(row, 2048, 1e-9) == 1
    # GUARANTEED_NO_EVICT: 3x the requests of 1000 + 1000 tokens (63 blocks of 32) the cache holds at once.
    assert row_requests(row, 2048, 1.0, 32309, 32) == 3 * 512  # an H100's cache at the bench's defaults
    assert row_requests(row, 2048, 1.0, 100_000, 32) == 3 * 1587
    assert row_requests(row, 2048, 1.0, 10**7, 32) == 5120  # never more than under MAX_UTILIZATION
    assert row_requests(row, 100, 0.5, 32309, 32) == 150
    assert row_requests(row, 2048, 1.0, 10, 32) == 3  # a request longer than the cache still runs, alone


@pytest.mark.parametrize("name,device", [
    ("NVIDIA H100 80GB HBM3", "H100"), ("NVIDIA H200", "H200"), ("NVIDIA H100 PCIe", None), ("NVIDIA H100 NVL", None),
    ("NVIDIA GH200 480GB", None), ("NVIDIA A100-SXM4-80GB", None), (None, None)])
def test_reference_device_from_the_device_name(name, device):
    assert reference_device(name) == device


def test_grid_two_rows_on_cpu_with_transformers(long_llama_dir, tmp_path, capsys, monkeypatch):
    # transformers' run itself is bench_hf's (test_bench_cli runs it); here a stand-in records what the grid asks
    # of it, since 128 eager decode steps of generate() take seconds on CPU.
    import llmapi.bench_hf as bench_hf

    calls = []

    def fake_run_hf(model_dir, load_format, dtype_name, device, workload, batch_size, compile=True):
        calls.append((workload.isl, workload.osl, workload.num_requests, dtype_name, batch_size, compile))
        return {"batch_size": batch_size, "output_tok_s": 100.0}

    monkeypatch.setattr(bench_hf, "run_hf", fake_run_hf)
    out = tmp_path / "grid.json"
    scale = 0.002
    rc = main(["bench", "--model", str(long_llama_dir), "--device", "cpu", "--grid", "trtllm",
               "--capacity-scheduler-policy", "max_utilization",
               "--grid-requests-scale", str(scale), "--grid-rows", "128/128,2048/128", "--compare", "hf",
               "--hf-no-compile", "--hf-batch-size", "4", "--json", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["grid"] == "trtllm" and result["source"] == GRID_SOURCE
    assert result["capacity_scheduler_policy"] == "max_utilization"
    assert result["reference_device"] is None and result["device"] == "cpu"
    assert result["max_seq_len"] == 2048 + 128 + 1  # the longest row's
    first, second = result["rows"]
    # Counts by hand: ceil(6144 * 0.002) = 13 and ceil(1536 * 0.002) = 4.
    for r, (isl, osl, requests) in zip((first, second), ((128, 128, 13), (2048, 128, 4))):
        assert (r["isl"], r["osl"], r["requests"]) == (isl, osl, requests)
        assert r["requests"] == math.ceil(scale * next(g.requests for g in TRTLLM_GRID if g.name == r["row"]))
        assert r["prompt_tokens"] == [isl, isl] and r["output_tokens_per_request"] == [osl, osl]
        assert r["output_tokens"] == requests * osl
        assert r["output_tok_s"] == pytest.approx(r["output_tokens"] / r["wall_s"])
        # The CPU cache (32,768 tokens) holds them all and one step's budget (8,192 tokens) admits them all at once.
        assert r["max_in_flight"] == requests
        assert r["steady_state"] is False  # fewer than 3x
        assert r["trtllm_output_tok_s"] is None and r["ratio"] is None
        assert r["preemptions"] == 0 and r["steps"] >= osl
    # transformers on 128/128 and 1000/1000 only: here the first row, with its lengths, in the LLM's dtype.
    assert calls == [(128, 128, 13, "float32", 4, False)]
    assert first["hf"]["batch_size"] == 4 and "hf" not in second
    assert first["speedup_vs_hf"] == pytest.approx(first["output_tok_s"] / 100.0)
    printed = capsys.readouterr().out
    table = printed[printed.index("ISL/OSL"):].splitlines()
    assert table[1].split()[:4] == ["128/128", "13", "13", f"{first['output_tok_s']:,.1f}"]
    assert table[2].split()[:4] == ["2048/128", "4", "4", f"{second['output_tok_s']:,.1f}"]
    assert table[1].split()[4:6] == ["-", "-"] and "not a steady state" in table[1] and "not a steady state" in table[2]
    assert "128/128: transformers bs=4" in printed


def test_grid_steady_row_against_the_h100_figure(long_llama_dir, tmp_path, capsys, monkeypatch):
    # --max-batch-size 2 caps the requests in flight: 3 x 2 = 6 requests make a steady state. The device name is
    # an H100's, so the table shows TensorRT-LLM's H100 figure and the ratio.
    import llmapi.bench_grid as grid

    import llmapi.bench as bench

    monkeypatch.setattr(grid, "device_name", lambda llm: "NVIDIA H100 80GB HBM3")
    drives, drive = [], bench._drive
    monkeypatch.setattr(bench, "_drive", lambda llm, prompts, params, *rest: drives.append(
        (len(prompts), params.max_tokens)) or drive(llm, prompts, params, *rest))
    out = tmp_path / "grid.json"
    rc = main(["bench", "--model", str(long_llama_dir), "--device", "cpu", "--grid", "trtllm", "--grid-rows",
               "128/128", "--max-batch-size", "2", "--dtype", "bfloat16", "--warmup", "2", "--json", str(out)])
    assert rc == 0
    # The warm-up requests stop after WARMUP_OUTPUT_TOKENS; the timed ones run the row's 128.
    assert drives == [(2, grid.WARMUP_OUTPUT_TOKENS), (6, 128)] and grid.WARMUP_OUTPUT_TOKENS < 128
    result = json.loads(out.read_text())
    assert result["reference_device"] == "H100" and result["max_seq_len"] == 257
    assert result["dtype"] == "bfloat16" and result["quant"] is None and result["fp8_like_reference"] is False
    (r,) = result["rows"]
    assert r["requests"] == 6 and r["output_tokens"] == 6 * 128
    assert r["max_in_flight"] == 2 and r["steady_state"] is True
    assert r["trtllm_output_tok_s"] == 28312 and r["ratio"] == pytest.approx(r["output_tok_s"] / 28312)
    printed = capsys.readouterr().out
    row_line = printed[printed.index("ISL/OSL"):].splitlines()[1]
    assert "TensorRT-LLM H100" in printed and row_line.split()[4:6] == ["28,312", f"{r['ratio']:.2f}x"]
    assert "warning" not in row_line
    assert "note: TensorRT-LLM's figures are for FP8 weights and KV cache" in printed  # this run is bf16


def test_grid_runs_guaranteed_no_evict_by_default(long_llama_dir, tmp_path):
    # TensorRT-LLM's default policy: the count is 3x the 2048/128 requests the cache holds to completion (its
    # blocks over 68 blocks of 32 tokens), and no more than that many are ever in flight, none preempted.
    out = tmp_path / "grid.json"
    rc = main(["bench", "--model", str(long_llama_dir), "--device", "cpu", "--grid", "trtllm", "--grid-rows",
               "2048/128", "--grid-requests-scale", "0.5", "--json", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["capacity_scheduler_policy"] == "guaranteed_no_evict"
    assert result["kv_cache_free_gpu_memory_fraction"] == 0.95
    held = result["kv_blocks"] // math.ceil((2048 + 128) / 32)
    (r,) = result["rows"]
    assert 0 < held < 1536 // 3 and r["requests"] == math.ceil(0.5 * 3 * held)
    assert r["max_in_flight"] <= held and r["preemptions"] == 0
    assert r["output_tokens"] == r["requests"] * 128


def test_grid_profiles_sampled_windows_of_each_row(long_llama_dir, tmp_path, capsys):
    # --profile on the grid: windows of 4 steps, one starting every 16 of the row's steps, under torch.profiler
    # (CPU ops here), and the runner's stats of the row's timed requests alone (the warm-up's are not counted).
    out = tmp_path / "grid.json"
    rc = main(["bench", "--model", str(long_llama_dir), "--device", "cpu", "--grid", "trtllm", "--grid-rows",
               "128/128", "--grid-requests-scale", "0.01", "--warmup", "1", "--profile", "--profile-steps", "4",
               "--profile-every", "16", "--json", str(out)])
    assert rc == 0
    (r,) = json.loads(out.read_text())["rows"]
    # ceil(0.01 x 3 x 113): the CPU cache's 1,024 blocks hold 113 requests of 257 positions (9 blocks) to the end.
    assert r["requests"] == 4 and r["profiled"] is True
    # Every step of the row went through the in-process runner: one prompt of 128 tokens (sampling the first
    # output token) and 127 decode tokens a request.
    st = r["runner_steps"]
    assert st["steps"] == r["steps"] >= 128 and st["tokens"] == 4 * (128 + 127)
    p = r["profile"]
    assert (p["steps"], p["every"]) == (4, 16)
    # One window per 16 steps at most, each covering its 4 steps at least (the last may be cut by the row's end).
    assert 1 <= p["windows"] <= math.ceil(r["steps"] / 16)
    assert 4 * (p["windows"] - 1) <= p["steps_profiled"] <= r["steps"]
    assert 0 < p["kernel_ms"] and 0 < p["span_ms"] and sum(k["ms"] for k in p["top"]) <= p["kernel_ms"] + 1e-6
    assert any(k["name"] in ("aten::mm", "aten::addmm") for k in p["top"])  # the linears
    printed = capsys.readouterr().out
    assert f"profile: 4 of every 16 steps ({p['steps_profiled']:,} steps in {p['windows']} windows): CPU ops" in printed
    assert f"host: {st['steps']:,} steps (0 from CUDA graphs)" in printed
    assert "note: every row ran under --profile (4 of every 16 steps profiled)" in printed


@pytest.mark.parametrize("grid,given,fraction", [(None, None, 0.9), ("trtllm", None, 0.95), ("trtllm", 0.8, 0.8),
                                                   (None, 0.97, 0.97)])
def test_kv_cache_fraction_defaults_to_trtllm_benchmarks_on_the_grid(grid, given, fraction):
    # The grid's cache takes TensorRT-LLM's benchmark share (0.95), the rest LLM's default (0.9); a given one wins.
    from types import SimpleNamespace

    from llmapi.bench import kv_cache_fraction

    assert kv_cache_fraction(SimpleNamespace(grid=grid, kv_cache_free_gpu_memory_fraction=given)) == fraction


@pytest.mark.parametrize("quant,kv,like", [
    ("fp8", "fp8", True), ("fp8_per_token", "fp8", True), ("fp8", "auto", False), (None, "fp8", False),
    ("int4_weight_only", "fp8", False), (None, "auto", False)])
def test_fp8_like_reference(quant, kv, like):
    from types import SimpleNamespace

    from llmapi.bench_grid import fp8_like_reference

    assert fp8_like_reference(SimpleNamespace(quant=quant, kv_cache_dtype=kv)) is like


@pytest.mark.parametrize("flags,message", [
    (["--grid-rows", "128/129"], "--grid-rows: '128/129' is not a row of the trtllm grid (its rows: 128/128, "),
    (["--grid-rows", "128/128,foo,,"], "'foo', '', '' are not rows of the trtllm grid"),
    (["--grid-rows", "128/128,128/128"], "--grid-rows names 128/128 more than once"),
    (["--grid-requests-scale", "0"], "--grid-requests-scale=0.0 is invalid: must be a finite number > 0"),
    (["--grid-requests-scale", "-0.5"], "--grid-requests-scale=-0.5 is invalid"),
    (["--grid-requests-scale", "nan"], "--grid-requests-scale=nan is invalid"),
    (["--grid-requests-scale", "inf"], "--grid-requests-scale=inf is invalid"),
    (["--isl", "64"], "drop --isl"),
    (["--osl", "64", "--num-requests", "8"], "drop --osl, --num-requests"),
    (["--concurrency", "4"], "drop --concurrency"),
    (["--ngram"], "drop --speculative-model / --eagle-model / --ngram"),
    (["--num-loras", "2"], "drop --num-loras"),
    (["--warmup", "-1"], "--warmup=-1 is invalid"),
    (["--profile", "--profile-steps", "0"], "--profile-steps=0 with --profile-every=128 is invalid"),
    (["--profile", "--profile-steps", "20", "--profile-every", "16"], "--profile-steps=20 with --profile-every=16"),
    (["--profile-every", "16"], "--profile-every needs --grid trtllm --profile"),
    (["--profile", "--tp", "2"], "--grid --profile records the kernels of this process's rank: it needs one rank"),
])
def test_grid_refuses_bad_rows_scales_and_flags(long_llama_dir, capsys, flags, message):
    assert main(["bench", "--model", str(long_llama_dir), "--device", "cpu", "--grid", "trtllm", *flags]) == 2
    assert message in capsys.readouterr().err


def test_grid_options_need_grid(long_llama_dir, capsys):
    assert main(["bench", "--model", str(long_llama_dir), "--device", "cpu", "--grid-rows", "128/128"]) == 2
    assert "--grid-rows needs --grid trtllm" in capsys.readouterr().err
    assert main(["bench", "--model", str(long_llama_dir), "--device", "cpu", "--profile", "--profile-steps", "8",
                 "--profile-every", "64"]) == 2
    assert "--profile-steps and --profile-every need --grid trtllm --profile" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: not a grid, not a number
        main(["bench", "--model", str(long_llama_dir), "--grid", "vllm"])
    with pytest.raises(SystemExit):
        main(["bench", "--model", str(long_llama_dir), "--grid", "trtllm", "--grid-requests-scale", "half"])
    err = capsys.readouterr().err
    assert "invalid choice: 'vllm'" in err and "invalid float value: 'half'" in err


def test_rows_and_warmups_draw_their_own_prompts():
    # 128/128 and 128/2048 share a prompt length: with one seed they would share prompts and cached prefix blocks.
    from llmapi.bench_grid import row_workload

    short, long_ = select_rows("trtllm", "128/128,128/2048")
    timed = row_workload(short, 4, 0, False).prompts(1000)
    assert timed == row_workload(short, 4, 0, False).prompts(1000)  # reproducible
    others = [row_workload(long_, 4, 0, False).prompts(1000), row_workload(short, 4, 0, True).prompts(1000),
              row_workload(short, 4, 1, False).prompts(1000)]
    assert all({tuple(p) for p in timed}.isdisjoint(tuple(p) for p in other) for other in others)


def test_decode_floor_counts_the_cache_dtype():
    # The bytes a decode step must read: weights once (the embedding per row), K and V of every cached token in
    # the cache's dtype (2 bytes bf16, 1 byte fp8): by hand, from the tiny Llama's shapes.
    import torch
    from tiny_models import make_tiny_llama, to_engine_model

    from llmapi.bench import decode_floor_s
    from llmapi.quantization.config import QuantConfig

    model, cfg = to_engine_model(make_tiny_llama(), torch.bfloat16)
    embed = model.transformer.vocab_embedding.weight
    weights = sum(p.numel() * 2 for p in model.parameters()) - embed.numel() * 2 + 8 * embed.shape[1] * 2
    per_token = 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * cfg["head_dim"]
    assert decode_floor_s(model, cfg, 8, 100.0, 1.0) == weights + 8 * 100 * per_token * 2
    fp8 = {**cfg, "quantization": QuantConfig(None, kv_cache_quant_algo="FP8").to_dict()}
    assert decode_floor_s(model, fp8, 8, 100.0, 1.0) == weights + 8 * 100 * per_token


def test_use_fp8_context_fmha_flag_reaches_the_kv_cache_config():
    import argparse

    from llmapi import bench
    from llmapi.config import KvCacheConfig

    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    on = bench.offline_llm_kwargs(p.parse_args(["--kv-cache-dtype", "fp8", "--use-fp8-context-fmha"]), 64)
    assert KvCacheConfig.coerce(on["kv_cache_config"]).use_fp8_context_fmha is True
    off = bench.offline_llm_kwargs(p.parse_args(["--grid", "trtllm"]), 64)
    assert KvCacheConfig.coerce(off["kv_cache_config"]).use_fp8_context_fmha is False


def test_transformers_at_its_best_batch_size(long_llama_dir, tmp_path, capsys, monkeypatch):
    # --hf-batch-size 2,4,8: transformers runs at each (a stand-in here: 8 does not fit), the fastest is compared.
    import torch

    import llmapi.bench_hf as bench_hf

    calls = []

    def fake_run_hf(model_dir, load_format, dtype_name, device, workload, batch_size, compile=True):
        calls.append(batch_size)
        if batch_size == 8:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return {"batch_size": batch_size, "output_tok_s": {2: 50.0, 4: 120.0}[batch_size]}

    monkeypatch.setattr(bench_hf, "run_hf", fake_run_hf)
    out = tmp_path / "grid.json"
    assert main(["bench", "--model", str(long_llama_dir), "--device", "cpu", "--grid", "trtllm", "--grid-rows",
                 "128/128", "--grid-requests-scale", "0.002", "--compare", "hf", "--hf-no-compile",
                 "--hf-batch-size", "2,4,8", "--json", str(out)]) == 0
    (r,) = json.loads(out.read_text())["rows"]
    assert calls == [2, 4, 8]
    assert r["hf"]["batch_size"] == 4 and r["hf"]["output_tok_s"] == 120.0
    assert r["hf"]["runs"][:2] == [{"batch_size": 2, "output_tok_s": 50.0}, {"batch_size": 4, "output_tok_s": 120.0}]
    assert r["hf"]["runs"][2]["batch_size"] == 8 and r["hf"]["runs"][2]["error"].startswith("out of memory")
    assert r["speedup_vs_hf"] == pytest.approx(r["output_tok_s"] / 120.0)
    assert "128/128: transformers bs=4 (the best of bs 2, 4, 8)" in capsys.readouterr().out


@pytest.mark.parametrize("bad", ["0", "a,b", "4,,8", "-2"])
def test_hf_batch_size_refuses_what_is_not_a_batch_size(bad, capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--model", "x", f"--hf-batch-size={bad}"])
    assert "is not a batch size or a comma-separated list of them" in capsys.readouterr().err
