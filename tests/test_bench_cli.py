"""`llmapi bench` on CPU: known config names, workload checks, a tiny end-to-end run (with the transformers
baseline); random LoRA adapters (against PEFT's reading of them) and the run against the base model; JSON-guided
requests on real-text prompts against unguided ones; the code-rewrite workload with n-gram drafts against plain
decoding; DraftTargetDecodingConfig(accept_all_drafts=True) against transformers token by token; refused flags."""

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


def test_known_config_llama_3_3_70b_has_the_published_shape():
    """Llama-3.3-70B's shape (multi-GPU runs: tensor parallelism 2 to 8): 70,553,706,496 parameters, counted here
    from the published layout (untied embedding and head, 80 layers of GQA attention and a SwiGLU MLP)."""
    assert "llama-3.3-70b" in known_config_names()
    hf = json.loads(open(f"{resolve_bench_model('llama-3.3-70b')}/config.json").read())
    cfg = config_from_hf(hf, __import__("torch").bfloat16)
    h, inter, layers, heads, kv, hd, vocab = (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"],
                                              cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"],
                                              cfg["vocab_size"])
    assert (h, inter, layers, heads, kv, hd, vocab) == (8192, 28672, 80, 64, 8, 128, 128256)
    per_layer = h * heads * hd * 2 + h * kv * hd * 2 + 3 * h * inter + 2 * h
    assert 2 * vocab * h + layers * per_layer + h == 70_553_706_496
    assert cfg["rotary_scaling"]["rope_type"] == "llama3" and not cfg.get("tie_word_embeddings")


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


def test_bench_profile_lists_where_the_time_went(tiny_llama_dir, tmp_path, capsys):
    """--profile: the timed run's ops (CPU ops here, device kernels on a GPU) by summed time, busiest first; the
    model's matmuls are among them."""
    out = tmp_path / "bench.json"
    assert main(["bench", "--model", str(tiny_llama_dir), "--device", "cpu", "--isl", "6", "--osl", "5",
                 "--num-requests", "4", "--profile", "--json", str(out)]) == 0
    profile = json.loads(out.read_text())["profile"]
    times = [row["ms"] for row in profile["top"]]
    assert profile["device"] is False and times == sorted(times, reverse=True) and len(times) == 15
    assert 0 < times[0] and sum(times) <= profile["kernel_ms"] + 1e-6
    assert any(row["name"] in ("aten::mm", "aten::addmm", "aten::linear") for row in profile["top"])
    assert all(row["calls"] > 0 for row in profile["top"])
    assert "profile: CPU ops" in capsys.readouterr().out


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


# ---------------------------------------------------------------- --num-loras


def _hf_config(model_dir):
    import torch

    from llmapi.models import hf_architecture

    hf = json.loads(open(f"{model_dir}/config.json").read())
    return dict(config_from_hf(hf, torch.float32), hf_architecture=hf_architecture(hf))


def test_random_adapters_fit_the_model_and_load_in_peft(tiny_llama_dir, tmp_path):
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from llmapi.bench_lora import resolve_targets, write_random_adapters

    cfg = _hf_config(tiny_llama_dir)
    targets = resolve_targets(cfg, "all")
    assert targets == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    paths = write_random_adapters(cfg, tmp_path, 2, 4, targets, seed=1)
    assert [p.name for p in paths] == ["adapter0", "adapter1"]
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    linears = {n: m for n, m in base.named_modules() if n.rsplit(".", 1)[-1] in targets}
    tensors = load_file(str(paths[0] / "adapter_model.safetensors"))
    assert len(tensors) == 2 * len(linears) == 2 * 7 * base.config.num_hidden_layers
    for name, module in linears.items():  # transformers' own linears give the shapes
        a, b = tensors[f"base_model.model.{name}.lora_A.weight"], tensors[f"base_model.model.{name}.lora_B.weight"]
        assert a.shape == (4, module.in_features) and b.shape == (module.out_features, 4)
        assert a.dtype == b.dtype == torch.bfloat16 and bool((a != 0).all()) and bool((b != 0).all())
    config = json.loads((paths[0] / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["peft_type"] == "LORA" and sorted(config["target_modules"]) == targets
    ids = torch.tensor([[5, 9, 17, 33]])
    with torch.inference_mode():
        plain = base(ids).logits
        first = PeftModel.from_pretrained(base, str(paths[0])).eval()(ids).logits  # PEFT reads the directory
    assert not torch.allclose(first, plain, atol=1e-3)  # a nonzero delta
    assert not torch.equal(load_file(str(paths[1] / "adapter_model.safetensors"))[next(iter(tensors))],
                           tensors[next(iter(tensors))])  # each adapter its own draw


def test_lora_targets_subset_and_unknown(tiny_llama_dir, tmp_path):
    from safetensors.torch import load_file

    from llmapi.bench_lora import resolve_targets, write_random_adapters

    cfg = _hf_config(tiny_llama_dir)
    assert resolve_targets(cfg, "q_proj, v_proj") == ["q_proj", "v_proj"]
    (path,) = write_random_adapters(cfg, tmp_path, 1, 8, ["q_proj", "v_proj"])
    leaves = {k.split(".")[-3] for k in load_file(str(path / "adapter_model.safetensors"))}
    assert leaves == {"q_proj", "v_proj"}
    with pytest.raises(ValueError, match="no linear c_attn"):
        resolve_targets(cfg, "q_proj,c_attn")


def test_llama_8b_shape_adapter_is_written_whole(tmp_path):
    # Llama-3.1-8B shapes, rank 16 over all linears: the file holds every pair (about a second to write).
    import torch
    from safetensors import safe_open

    from llmapi.bench_lora import resolve_targets, write_random_adapters

    cfg = _hf_config(resolve_bench_model("llama-3.1-8b"))
    (path,) = write_random_adapters(cfg, tmp_path, 1, 16, resolve_targets(cfg, "all"))
    h, f, kv = 4096, 14336, 8 * 128
    per_layer = 16 * (h + h) + 16 * (h + kv) * 2 + 16 * (h + h) + 16 * (h + f) * 2 + 16 * (f + h)  # q, k/v, o, g/u, d
    with safe_open(str(path / "adapter_model.safetensors"), "pt") as st:
        assert len(st.keys()) == 32 * 7 * 2
        assert st.get_slice("base_model.model.model.layers.31.mlp.down_proj.lora_A.weight").get_shape() == [16, f]
    assert (path / "adapter_model.safetensors").stat().st_size >= 32 * per_layer * torch.bfloat16.itemsize


def test_lora_requests_round_robin_and_bs1(tmp_path):
    from llmapi.bench_lora import lora_requests

    paths = [tmp_path / "a", tmp_path / "b", tmp_path / "c"]
    spread = lora_requests(paths, 7, concurrency=0)
    assert [r.lora_int_id for r in spread] == [1, 2, 3, 1, 2, 3, 1]
    assert [r.lora_path for r in spread[:3]] == [str(p) for p in paths]
    assert {r.lora_int_id for r in lora_requests(paths, 4, concurrency=1)} == {1}  # bs 1: the first adapter only


def test_bench_lora_against_base(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = main(["bench", "--model", str(tiny_llama_dir), "--device", "cpu", "--isl", "6", "--osl", "5",
               "--num-requests", "6", "--concurrency", "3", "--warmup", "2", "--num-loras", "3", "--lora-rank", "8",
               "--lora-compare-base", "--json", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    lora = result["lora"]
    assert lora["num_loras"] == 3 and lora["rank"] == 8 and len(lora["targets"]) == 7
    ours, base = result["llmapi"], result["base"]
    assert ours["output_tokens"] == base["output_tokens"] == 30  # ignore_eos: osl each
    assert result["lora_vs_base"] == pytest.approx(ours["output_tok_s"] / base["output_tok_s"])
    # The adapters change the greedy tokens (random A and B over every linear of a tiny model).
    assert result["token_match"]["requests_compared"] == 6 and result["token_match"]["requests_equal"] < 6
    assert "LoRA / base output tok/s" in capsys.readouterr().out


# ---------------------------------------------------------------- --guided-json


@pytest.fixture(scope="module")
def guided_dir(tmp_path_factory):
    """The tiny Llama over a byte-level BPE tokenizer (every text has a tokenization), with room for 1,024
    positions: the JSON prompts take a few hundred of its tokens."""
    from guided_tiny import VOCAB_SIZE, make_byte_level_tokenizer
    from tiny_models import make_tiny_llama

    path = tmp_path_factory.mktemp("tiny-guided")
    make_tiny_llama(path, vocab_size=VOCAB_SIZE, max_position_embeddings=1024)
    make_byte_level_tokenizer().save_pretrained(str(path))
    return path


def test_json_prompts_have_the_length_and_ask_for_the_fields(guided_dir):
    from transformers import AutoTokenizer

    from llmapi.bench_guided import BUILTIN_SCHEMA, PREAMBLE, json_prompts

    tok = AutoTokenizer.from_pretrained(guided_dir)
    prompts = json_prompts(tok, BUILTIN_SCHEMA, 300, 6, seed=3)
    assert all(298 <= len(p) <= 300 for p in prompts) and sum(len(p) == 300 for p in prompts) >= 5
    text = tok.decode(prompts[0])
    assert text.startswith(PREAMBLE[:40])
    assert text.endswith("as a JSON object with the fields name, age, email, city, plan, interests, vip.")
    assert "@example.com" in text and len({tuple(p) for p in prompts}) == 6  # a different customer each
    with pytest.raises(ValueError, match="--isl=40 is too short"):
        json_prompts(tok, BUILTIN_SCHEMA, 40, 1, seed=0)


def test_guided_output_checks_by_hand():
    from llmapi.bench_guided import check_outputs

    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    counts = check_outputs(['{"n": 3}', '{"n": "x"}', '{"n": ', "[1, 2]", "plain text"], schema)
    assert counts == {"json_parsed": 3, "schema_valid": 1}


def test_guided_schema_file_errors(tmp_path):
    from llmapi.bench_guided import BUILTIN_SCHEMA, load_schema

    assert load_schema("builtin") is BUILTIN_SCHEMA
    with pytest.raises(ValueError, match="no such file"):
        load_schema(str(tmp_path / "missing.json"))
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="holds a list, not a JSON schema object"):
        load_schema(str(tmp_path / "list.json"))


def test_bench_guided_json_against_unguided(guided_dir, tmp_path, capsys):
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"type": "boolean"}))  # short: every request ends by the grammar
    out = tmp_path / "bench.json"
    rc = main(["bench", "--model", str(guided_dir), "--device", "cpu", "--isl", "300", "--osl", "12",
               "--num-requests", "4", "--warmup", "1", "--guided-json", str(schema), "--guided-compare-unguided",
               "--json", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    g = result["guided"]
    assert g == {"schema": str(schema), "requests": 4, "finished_stop": 4, "finished_length": 0, "json_parsed": 4,
                 "schema_valid": 4}
    assert result["prompt_tokens"]["max"] == 300
    # Unguided, the same prompts run to max_tokens or EOS (no ignore_eos): at most 12 tokens each.
    assert 0 < result["unguided"]["output_tokens"] <= 48
    assert result["guided_vs_unguided"] == pytest.approx(result["llmapi"]["output_tok_s"]
                                                         / result["unguided"]["output_tok_s"])
    printed = capsys.readouterr().out
    assert "4 of 4 outputs parse as JSON" in printed and "guided / unguided output tok/s" in printed


def test_bench_guided_json_on_a_config_with_dummy_weights_and_a_tokenizer(guided_dir, tmp_path, capsys):
    # As a known config is run: config.json alone, dummy weights, and the tokenizer from elsewhere (--tokenizer).
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    (config_only / "config.json").write_text((guided_dir / "config.json").read_text())
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"enum": ["yes", "no"]}))
    flags = ["bench", "--model", str(config_only), "--load-format", "dummy", "--device", "cpu", "--isl", "300",
             "--osl", "8", "--num-requests", "2", "--guided-json", str(schema)]
    out = tmp_path / "bench.json"
    assert main([*flags, "--tokenizer", str(guided_dir), "--json", str(out)]) == 0
    g = json.loads(out.read_text())["guided"]
    assert g["finished_stop"] == g["json_parsed"] == g["schema_valid"] == 2
    capsys.readouterr()
    assert main(flags) == 2
    assert "--guided-json needs a tokenizer, and none loads from the model: pass --tokenizer" in capsys.readouterr().err


# ---------------------------------------------------------------- --workload code-rewrite, --speculative-compare-plain


def test_code_rewrite_prompts_carry_the_snippets(guided_dir):
    from transformers import AutoTokenizer

    from llmapi.bench_spec import SNIPPETS, code_rewrite_prompts

    tok = AutoTokenizer.from_pretrained(guided_dir)
    prompts = code_rewrite_prompts(tok, len(SNIPPETS) + 1, 2000)
    for prompt, (language, code, old, new) in zip(prompts, SNIPPETS + SNIPPETS[:1]):
        text = tok.decode(prompt)
        assert code in text and f"`{old}` renamed to `{new}`" in text and old in code
    assert prompts[-1] == prompts[0]  # they cycle
    with pytest.raises(ValueError, match="--workload code-rewrite"):
        code_rewrite_prompts(tok, 1, 50)


def test_bench_ngram_code_rewrite_equals_plain_decoding(guided_dir, tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = main(["bench", "--model", str(guided_dir), "--device", "cpu", "--workload", "code-rewrite", "--isl", "700",
               "--osl", "24", "--num-requests", "3", "--concurrency", "1", "--warmup", "1", "--ngram",
               "--max-draft-len", "4", "--max-matching-ngram-size", "3", "--speculative-compare-plain",
               "--json", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    sp = result["llmapi"]["speculative"]
    assert sp["draft_tokens"] > 0 and 0 <= sp["acceptance_rate"] <= 1
    assert result["token_match"]["requests_compared"] == 3 and result["token_match"]["requests_equal"] == 3
    assert result["llmapi"]["output_tokens"] == result["plain"]["output_tokens"]
    assert result["speedup_vs_plain"] == pytest.approx(result["llmapi"]["output_tok_s"]
                                                       / result["plain"]["output_tok_s"])
    assert "3 of 3 requests' tokens equal plain decoding's" in capsys.readouterr().out


# ---------------------------------------------------------------- --accept-all-drafts


@pytest.fixture(scope="module")
def draft_dir(tmp_path_factory):
    """A 1-layer, hidden-32 Llama with the tiny Llama's vocabulary and its own random weights."""
    from tiny_models import make_tiny_draft_llama

    path = tmp_path_factory.mktemp("tiny-draft")
    make_tiny_draft_llama(path)
    return path


def _greedy_next(model, ids):
    import torch

    with torch.inference_mode():
        return int(model(torch.tensor([ids])).logits[0, -1].argmax())


@pytest.mark.parametrize("k", [2, 3])
def test_accept_all_drafts_keeps_every_draft(tiny_llama_dir, draft_dir, k):
    import torch
    from transformers import AutoModelForCausalLM

    from llmapi import LLM, DraftTargetDecodingConfig, SamplingParams

    steps_after_prefill = 3
    osl = 1 + steps_after_prefill * (k + 1)
    prompt = [5, 17, 42, 99, 7, 63]
    config = DraftTargetDecodingConfig(speculative_model=str(draft_dir), max_draft_len=k, accept_all_drafts=True)
    with LLM(str(tiny_llama_dir), device="cpu", speculative_config=config) as llm:
        out = llm.generate(prompt, SamplingParams(max_tokens=osl, temperature=0, ignore_eos=True), use_tqdm=False)
        stats = llm.get_stats()
    tokens = out.outputs[0].token_ids
    assert len(tokens) == osl
    # Every draft accepted, k + 1 tokens a verify step: one prefill step, then (osl - 1) / (k + 1) steps.
    assert stats["num_draft_tokens"] == stats["num_accepted_draft_tokens"] == k * steps_after_prefill
    assert stats["num_steps"] == 1 + steps_after_prefill
    # Token by token (transformers): the prefill's token and each step's last are the target's greedy tokens, the
    # others the draft model's, each given everything before it.
    target = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    draft = AutoModelForCausalLM.from_pretrained(draft_dir, dtype=torch.float32).eval()
    for i, token in enumerate(tokens):
        model = target if i % (k + 1) == 0 else draft
        assert token == _greedy_next(model, prompt + tokens[:i]), i
    plain = [_greedy_next(target, prompt)]
    for _ in range(osl - 1):
        plain.append(_greedy_next(target, prompt + plain))
    assert tokens != plain  # the draft's tokens, not the target's


def test_bench_accept_all_drafts_against_plain(tiny_llama_dir, draft_dir, tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = main(["bench", "--model", str(tiny_llama_dir), "--device", "cpu", "--isl", "8", "--osl", "13",
               "--num-requests", "4", "--concurrency", "2", "--speculative-model", str(draft_dir), "--max-draft-len",
               "3", "--accept-all-drafts", "--speculative-compare-plain", "--json", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["speculative_config"]["accept_all_drafts"] is True
    sp = result["llmapi"]["speculative"]
    assert sp["acceptance_rate"] == 1.0 and sp["draft_tokens"] == 4 * 3 * 3  # 3 verify steps of 3 drafts each
    assert result["runner_steps"]["steps"] < result["plain"]["runner_steps"]["steps"]
    assert result["llmapi"]["output_tokens"] == result["plain"]["output_tokens"] == 52
    assert "every draft accepted unchecked" in capsys.readouterr().out


def test_accept_all_drafts_is_refused_where_it_cannot_run(tiny_llama_dir, capsys):
    from types import SimpleNamespace

    from llmapi import DraftTargetDecodingConfig, SamplingParams
    from llmapi.serve.cli import add_arguments as serve_arguments
    from llmapi.speculative.setup import prepare

    with pytest.raises(ValueError, match="accept_all_drafts='yes' is invalid"):
        DraftTargetDecodingConfig(speculative_model="m", accept_all_drafts="yes")
    assert DraftTargetDecodingConfig(speculative_model="m").accept_all_drafts is False  # off by default
    config = DraftTargetDecodingConfig(speculative_model="m", accept_all_drafts=True)
    args = SimpleNamespace(speculative_config=config, tensor_parallel_size=2, pipeline_parallel_size=1)
    with pytest.raises(ValueError, match="accept_all_drafts=True.*= 2: the benchmark switch runs on one rank"):
        prepare(args, {}, None, None, 64)
    with pytest.raises(ValueError, match="accept_all_drafts"):
        SamplingParams(accept_all_drafts=True)  # a setting of the LLM, not of a request
    import argparse

    parser = argparse.ArgumentParser()
    serve_arguments(parser)
    with pytest.raises(SystemExit):  # the server takes no such flag
        parser.parse_args(["model", "--accept-all-drafts"])
    assert main(["bench", "--model", str(tiny_llama_dir), "--device", "cpu", "--accept-all-drafts"]) == 2
    assert "--accept-all-drafts needs --speculative-model" in capsys.readouterr().err


# ---------------------------------------------------------------- flags that do not go together


@pytest.mark.parametrize("flags,message", [
    (["--guided-compare-unguided"], "--guided-compare-unguided needs --guided-json"),
    (["--lora-compare-base"], "--lora-compare-base needs --num-loras"),
    (["--num-loras", "-1"], "--num-loras=-1 is invalid"),
    (["--num-loras", "2", "--lora-rank", "0"], "--lora-rank=0 is invalid"),
    (["--num-loras", "2", "--lora-compare-base", "--compare", "hf"], "one comparison a run"),
    (["--num-loras", "2", "--compare", "hf"], "--compare hf runs the random-token workload"),
    (["--guided-json", "builtin", "--workload", "code-rewrite"], "are exclusive"),
    (["--speculative-compare-plain"], "--speculative-compare-plain needs --speculative-model"),
    (["--ngram", "--speculative-compare-plain", "--num-loras", "2"], "compare one thing a run"),
    (["--backend", "openai", "--base-url", "http://x", "--model", "m", "--num-loras", "1"], "run offline only"),
    (["--client-processes", "2"], "--client-processes needs --backend openai"),
    (["--profile", "--engine-process"], "--profile records the kernels of this process, and --engine-process"),
    (["--backend", "openai", "--base-url", "http://x", "--model", "m", "--client-processes", "0"],
     "--client-processes=0 is invalid: must be >= 1"),
])
def test_bench_refuses_flags_that_do_not_go_together(tiny_llama_dir, capsys, flags, message):
    model = [] if "--backend" in flags else ["--model", str(tiny_llama_dir)]
    assert main(["bench", *model, "--device", "cpu", *flags]) == 2
    assert message in capsys.readouterr().err


def test_smollm2_names_the_bundled_gguf(smollm2_gguf):
    assert resolve_bench_model("smollm2") == str(smollm2_gguf)


# ---------------------------------------------------------------- the bundled SmolLM2 (real weights)


@pytest.mark.slow
def test_bench_guided_json_on_smollm2(tmp_path):
    out = tmp_path / "bench.json"
    rc = main(["bench", "--model", "smollm2", "--device", "cpu", "--isl", "128", "--osl", "128", "--num-requests",
               "2", "--concurrency", "2", "--guided-json", "builtin", "--json", str(out)])
    assert rc == 0
    g = json.loads(out.read_text())["guided"]
    # What ends at the grammar's end is a JSON record valid against the schema.
    assert g["finished_stop"] >= 1 and g["schema_valid"] >= g["finished_stop"]


@pytest.mark.slow
def test_bench_ngram_on_smollm2_equals_plain_and_accepts(tmp_path):
    out = tmp_path / "bench.json"
    rc = main(["bench", "--model", "smollm2", "--device", "cpu", "--workload", "code-rewrite", "--osl", "96",
               "--num-requests", "2", "--concurrency", "1", "--ngram", "--max-draft-len", "4",
               "--max-matching-ngram-size", "3", "--speculative-compare-plain", "--json", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["token_match"]["requests_equal"] == 2
    # The answer copies the snippet from the prompt: prompt lookup finds most of it.
    assert result["llmapi"]["speculative"]["acceptance_rate"] > 0.3


def test_bench_compares_transformers_at_its_best_batch_size(tiny_llama_dir, tmp_path, capsys, monkeypatch):
    import llmapi.bench_hf as bench_hf

    def fake_run_hf(model_dir, load_format, dtype_name, device, workload, batch_size, compile=True):
        return {"batch_size": batch_size, "output_tok_s": 10.0 * batch_size, "ttft_ms_p50": 1.0,
                "tpot_ms_p50": 1.0, "wall_s": 1.0}

    monkeypatch.setattr(bench_hf, "run_hf", fake_run_hf)
    out = tmp_path / "bench.json"
    assert main(["bench", "--model", str(tiny_llama_dir), "--device", "cpu", "--isl", "6", "--osl", "5",
                 "--num-requests", "4", "--compare", "hf", "--hf-batch-size", "3,2", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["hf"]["batch_size"] == 3 and [r["batch_size"] for r in result["hf"]["runs"]] == [3, 2]
    assert result["speedup_vs_hf"] == pytest.approx(result["llmapi"]["output_tok_s"] / 30.0)
    assert "hf: bs=3 30.0 output tok/s, bs=2 20.0 output tok/s" in capsys.readouterr().out


def test_hf_warmup_stops_early_and_timed_run_gives_every_token(tiny_llama_dir):
    """bench_hf's generate: the warm-up stops after stop_after new tokens (a decoder-only and an encoder-decoder
    model, static cache), the timed run gives all of them: each call asserts the length transformers returned."""
    import encdec_models as em
    import torch
    from transformers import AutoModelForCausalLM

    import llmapi.bench_hf as bench_hf

    llama = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    for model in (llama, em.t5("t5").eval()):
        ids = torch.randint(3, 60, (2, 5))
        with torch.inference_mode():
            assert bench_hf._timed_generate(model, ids, 7, compile=False, stop_after=2) > 0
            assert bench_hf._timed_generate(model, ids, 7, compile=False) > 0


def test_a_failing_client_process_is_reported():
    # Nothing listens on the port: each client process fails to connect, and the bench says so instead of waiting.
    from serve_process import free_port

    from llmapi.bench import Workload, run_openai_workload

    with pytest.raises(RuntimeError, match="a client process failed: ConnectError"):
        run_openai_workload(f"http://127.0.0.1:{free_port()}", "m", None, Workload(4, 2, 4, 0), 320, processes=2)
