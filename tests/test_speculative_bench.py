"""`llmapi bench` with speculative decoding: the Llama-3.2-1B known config (a draft for the Llama-3.1-8B one), the
--speculative-model / --ngram / --eagle-model flags, and a tiny end-to-end run reporting acceptance."""

import json

from llmapi.bench import resolve_bench_model
from llmapi.cli import main
from llmapi.models.llama import config_from_hf


def test_llama_3_2_1b_known_config_is_a_draft_for_llama_3_1_8b():
    import torch

    def config(name):
        return config_from_hf(json.loads(open(f"{resolve_bench_model(name)}/config.json").read()), torch.bfloat16)

    small, big = config("llama-3.2-1b"), config("llama-3.1-8b")
    assert (small["hidden_size"], small["num_hidden_layers"], small["num_attention_heads"],
            small["num_key_value_heads"], small["head_dim"], small["intermediate_size"]) == (2048, 16, 32, 8, 64, 8192)
    assert small["tie_word_embeddings"] and small["rotary_scaling"]["factor"] == 32.0
    assert small["vocab_size"] == big["vocab_size"] == 128256  # one tokenizer: it can draft for the 8B


def _bench(tiny_llama_dir, tmp_path, *flags):
    out = tmp_path / "bench.json"
    rc = main(["bench", "--model", str(tiny_llama_dir), "--device", "cpu", "--isl", "8", "--osl", "12",
               "--num-requests", "4", "--json", str(out), *flags])
    assert rc == 0
    return json.loads(out.read_text())


def test_bench_with_a_draft_model_reports_acceptance(tiny_llama_dir, tmp_path, capsys):
    result = _bench(tiny_llama_dir, tmp_path, "--speculative-model", str(tiny_llama_dir), "--max-draft-len", "3")
    assert result["speculative_config"] == {"decoding_type": "DraftTarget", "speculative_model": str(tiny_llama_dir),
                                            "max_draft_len": 3}
    ours = result["llmapi"]
    assert ours["output_tokens"] == 48
    sp = ours["speculative"]
    # The target drafting for itself: its drafts are its own greedy tokens (ties within rounding aside).
    assert sp["draft_tokens"] > 0 and sp["acceptance_rate"] > 0.9
    assert sp["output_tokens_per_step"] > 1.5
    assert "drafts accepted" in capsys.readouterr().out


def test_bench_with_ngram_drafts(tiny_llama_dir, tmp_path):
    result = _bench(tiny_llama_dir, tmp_path, "--ngram", "--max-draft-len", "2", "--max-matching-ngram-size", "2")
    assert result["speculative_config"] == {"decoding_type": "NGram", "max_draft_len": 2,
                                            "max_matching_ngram_size": 2}
    assert result["llmapi"]["output_tokens"] == 48 and "speculative" in result["llmapi"]


def test_bench_refuses_two_kinds_of_drafts(tiny_llama_dir, capsys):
    rc = main(["bench", "--model", str(tiny_llama_dir), "--device", "cpu", "--speculative-model", str(tiny_llama_dir),
               "--ngram"])
    assert rc == 2 and "--speculative-model and --ngram are exclusive" in capsys.readouterr().err
