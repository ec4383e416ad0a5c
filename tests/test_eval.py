"""`llmapi eval`: the engine's perplexity equals exp(mean NLL) from transformers' logits, the windows score
every token once, summarize's ROUGE equals rouge-score on the texts it produced for real aclsum papers,
--check-accuracy gates on the threshold, and bad arguments are refused with errors that name them."""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from llmapi import LLM
from llmapi.cli import main
from llmapi.errors import UnsupportedModelError
from llmapi.evaluate import (default_text_path, engine_perplexity, hf_perplexity, load_hf_reference, plan_windows,
                             rouge_scores)


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    with LLM(str(tiny_llama_dir)) as llm:
        yield llm


@pytest.fixture(scope="module")
def hf(tiny_llama_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()


def _ids(n, vocab=320, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n,), generator=g).tolist()


def _last_logprob(hf, context_and_token):
    """log p(last token | the tokens before it), from one transformers forward."""
    with torch.inference_mode():
        logits = hf(torch.tensor([context_and_token])).logits[0, -2].float()  # [V]
    return float(logits.log_softmax(-1)[context_and_token[-1]])


@pytest.mark.parametrize("n,window,stride", [(2, 2, 1), (5, 8, 3), (8, 8, 4), (100, 16, 15), (100, 16, 1),
                                             (101, 32, 12), (64, 32, 16)])
def test_windows_score_every_token_once(n, window, stride):
    windows = plan_windows(n, window, stride)
    scored = [p for w in windows for p in range(w.score_from, w.end)]
    assert scored == list(range(1, n))  # each token but the first, once, in order
    for w in windows:
        assert 0 <= w.begin < w.score_from < w.end <= n and w.end - w.begin <= window
        # Every scored token sees the window_len - stride tokens before it (or all of them near the start).
        assert w.score_from - w.begin >= min(w.score_from, window - stride)
        assert w.end - w.score_from <= max(stride, window - 1)


@pytest.mark.parametrize("args,field", [((1, 8, 4), "num_tokens"), ((10, 1, 1), "max_seq_len"),
                                        ((10, 8, 0), "stride"), ((10, 8, 8), "stride"), ((10, 8, 2.0), "stride")])
def test_windows_reject_bad_arguments(args, field):
    with pytest.raises(ValueError, match=field):
        plan_windows(*args)


def test_one_window_perplexity_equals_transformers(llm, hf):
    ids = _ids(120)
    with torch.inference_mode():
        logprobs = hf(torch.tensor([ids])).logits[0].float().log_softmax(-1)  # [n, V]
    want = logprobs[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0].double()  # [n - 1]
    got = engine_perplexity(llm, ids, max_seq_len=200, stride=100)
    assert got.num_windows == 1 and got.num_tokens == len(ids) - 1
    torch.testing.assert_close(torch.from_numpy(got.token_logprobs), want, rtol=1e-5, atol=1e-5)
    assert got.perplexity == pytest.approx(math.exp(-float(want.mean())), rel=1e-5)


def test_windowed_perplexity_equals_transformers_token_by_token(llm, hf):
    ids = _ids(90, seed=1)
    got = engine_perplexity(llm, ids, max_seq_len=24, stride=10)
    ref = hf_perplexity(hf, ids, max_seq_len=24, stride=10)
    assert got.num_windows == ref.num_windows == 8 and got.num_tokens == ref.num_tokens == 89
    # Independently: token p's log-prob from its own forward over the context its window gives it.
    want = [_last_logprob(hf, ids[w.begin:p + 1]) for w in plan_windows(90, 24, 10) for p in range(w.score_from, w.end)]
    for result in (got, ref):
        torch.testing.assert_close(torch.from_numpy(result.token_logprobs), torch.tensor(want, dtype=torch.float64),
                                   rtol=1e-5, atol=1e-5)
    assert got.perplexity == pytest.approx(math.exp(-sum(want) / len(want)), rel=1e-5)
    # The windows matter: the whole text in one pass gives the late tokens more context, and other values.
    whole = engine_perplexity(llm, ids, max_seq_len=100, stride=50)
    assert abs(whole.token_logprobs[30:] - got.token_logprobs[30:]).max() > 1e-3


def test_perplexity_of_a_quantized_engine_is_close_to_float(tiny_llama_dir, llm, tmp_path):
    ids = _ids(100, seed=2)
    ref = engine_perplexity(llm, ids, max_seq_len=64, stride=32)
    # Its own engine cache: other test files expect to build this quantized engine themselves.
    with LLM(str(tiny_llama_dir), quant="int8_weight_only", cache_dir=str(tmp_path)) as q:
        got = engine_perplexity(q, ids, max_seq_len=64, stride=32)
    assert got.perplexity != ref.perplexity and got.perplexity == pytest.approx(ref.perplexity, rel=0.05)


def _run(capsys, *argv):
    code = main(["eval", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_perplexity_of_a_text_file_against_transformers(tiny_llama_dir, hf, tmp_path, capsys):
    from tiny_tokenizer import SENTENCES, make_tiny_tokenizer

    path = tmp_path / "text.txt"
    path.write_text("\n".join(SENTENCES * 6) + "\n")
    code, out, _ = _run(capsys, "perplexity", "--model", str(tiny_llama_dir), "--text", str(path),
                        "--max-seq-len", "48", "--stride", "20", "--compare", "hf", "--json")
    assert code == 0
    result = json.loads(out)
    ids = make_tiny_tokenizer(320).encode(path.read_text())
    assert result["num_text_tokens"] == len(ids) and result["engine"]["num_scored_tokens"] == len(ids) - 1
    want = [_last_logprob(hf, ids[w.begin:p + 1]) for w in plan_windows(len(ids), 48, 20)
            for p in range(w.score_from, w.end)]
    ppl = math.exp(-sum(want) / len(want))
    assert result["engine"]["perplexity"] == pytest.approx(ppl, rel=1e-5)
    assert result["transformers"]["perplexity"] == pytest.approx(ppl, rel=1e-5)


def test_cli_perplexity_defaults_to_lee_cor(tiny_llama_dir, capsys):
    path = default_text_path()
    assert path.name == "lee.cor" and (path.parent / "lee_background.cor").is_file()
    code, out, _ = _run(capsys, "perplexity", "--model", str(tiny_llama_dir), "--max-seq-len", "255",
                        "--stride", "200")
    assert code == 0 and str(path) in out and "perplexity" in out


def _aclsum_test_references(n):
    """The first n test papers' aspect summaries, read straight from the aclsum wheel's jsonl."""
    folder = Path(importlib.util.find_spec("aclsum").submodule_search_locations[0]) / "dataset"
    rows = [json.loads(line) for line in (folder / "test.jsonl").read_text().splitlines()[:n]]
    return ["\n".join(r["summary"][a] for a in ("challenge", "approach", "outcome")) for r in rows]


def test_cli_summarize_rouge_equals_rouge_score(tiny_llama_dir, capsys):
    from rouge_score import rouge_scorer

    code, out, _ = _run(capsys, "summarize", "--model", str(tiny_llama_dir), "--max-samples", "2",
                        "--max-tokens", "40", "--max-input-len", "100", "--compare", "hf", "--json")
    assert code == 0
    result = json.loads(out)
    assert result["num_samples"] == 2
    references = _aclsum_test_references(2)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    for side in ("engine", "transformers"):
        texts = result[side]["texts"]
        assert len(texts) == 2 and all(texts)
        for t in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
            want = 100 * sum(scorer.score(r, p)[t].fmeasure for r, p in zip(references, texts)) / 2
            assert result[side][t] == pytest.approx(want, abs=1e-9)
    assert result["engine"]["rouge1"] > 0  # the tiny model's words overlap the references a little
    assert result["engine"]["texts"] == result["transformers"]["texts"]  # fp32 greedy: the same tokens
    assert result["engine"]["num_output_tokens"] == result["transformers"]["num_output_tokens"]


def test_rouge_scores_by_hand():
    # rouge1: 2 of 3 unigrams shared both ways -> F = 2/3; rouge2: "the cat" of 2 bigrams -> 1/2.
    scores = rouge_scores(["the cat sat"], ["the cat ran"])
    assert scores["rouge1"] == pytest.approx(200 / 3) and scores["rouge2"] == pytest.approx(50)
    assert rouge_scores(["a b", "c d"], ["a b", "x y"])["rouge1"] == pytest.approx(50)
    with pytest.raises(ValueError, match="as many predictions"):
        rouge_scores(["a"], [])


def test_cli_check_accuracy_gates_on_the_threshold(tiny_llama_dir, capsys):
    args = ["summarize", "--model", str(tiny_llama_dir), "--max-samples", "1", "--max-tokens", "8",
            "--max-input-len", "50", "--check-accuracy"]
    code, _, err = _run(capsys, *args, "--rouge1-threshold", "101")
    assert code == 1 and "accuracy check failed" in err
    code, _, err = _run(capsys, *args, "--rouge1-threshold", "0")
    assert code == 0 and "accuracy check passed" in err


@pytest.mark.parametrize("argv", [["perplexity", "--compare", "vllm"], ["summarize", "--max-samples", "0"],
                                  ["perplexity", "--stride", "x"], ["summarize", "--max-tokens", "-1"],
                                  ["bleu"]])
def test_cli_rejects_bad_arguments_in_argparse(tiny_llama_dir, argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(["eval", *argv[:1], "--model", str(tiny_llama_dir), *argv[1:]])
    assert e.value.code == 2


@pytest.mark.parametrize("extra,message", [
    (["perplexity", "--max-seq-len", "16", "--stride", "16"], "stride=16 is invalid"),
    (["perplexity", "--max-seq-len", "256"], "max_seq_len=256 is invalid"),
    (["perplexity", "--text", "no-such-file.txt"], "does not exist"),
    (["perplexity", "--text", "latin1.txt"], "is not valid utf-8"),
    (["perplexity", "--quant", "int3"], "quant='int3' is unknown"),
    (["summarize", "--rouge1-threshold", "20"], "only used with --check-accuracy"),
    (["summarize", "--max-tokens", "250", "--max-samples", "1"], "lower max_input_len or max_tokens"),
])
def test_cli_reports_bad_values_by_name(tiny_llama_dir, tmp_path, extra, message, capsys):
    text = tmp_path / "t.txt"
    text.write_text("hello my name is tiny\n")
    (tmp_path / "latin1.txt").write_bytes("a tiny \u00a3 model\n".encode("latin-1"))
    extra = [str(tmp_path / e) if e == "latin1.txt" else e for e in extra]
    if "--text" not in extra and extra[0] == "perplexity":
        extra = [*extra, "--text", str(text)]
    code, _, err = _run(capsys, extra[0], "--model", str(tiny_llama_dir), *extra[1:])
    assert code == 2 and message in err


def test_compare_hf_refuses_a_saved_engine(llm, tmp_path):
    llm.save(str(tmp_path / "engine"))
    with pytest.raises(UnsupportedModelError, match="saved engine directory"):
        load_hf_reference(str(tmp_path / "engine"), "float32", torch.device("cpu"))
