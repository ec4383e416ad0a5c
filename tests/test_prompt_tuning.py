"""Prompt tuning: a table of two tasks from a NeMo prompt-tuning checkpoint written by the test (model_config.yaml's
task_templates, model_weights.ckpt's prompt_table entry, as TensorRT-LLM's converter reads it), or from a tensor
file; prompt ids >= vocab_size read the request's task; greedy tokens equal transformers fed the same embeddings
as inputs_embeds; prefix caching keyed by table and task; typed errors."""

import tarfile

import numpy as np
import pytest
import torch
import yaml
from lora_adapters import make_peft_adapter

from llmapi import LLM, AdapterError, LoRARequest, PromptAdapterRequest, RequestError, SamplingParams

MAX_TOKENS = 10
TASKS = {"sentiment": 4, "summary": 6}  # task name -> virtual tokens (the shorter is padded with zero rows)


def write_prompt_nemo(path, hidden: int, seed: int) -> dict:
    """A NeMo prompt-tuning .nemo (a tar of "."): model_config.yaml with task_templates, and model_weights.ckpt
    holding {"prompt_table": {"prompt_table.<taskname>.prompt_embeddings.weight": [tokens, hidden]}}. Returns the
    tables by task."""
    g = torch.Generator().manual_seed(seed)
    tables = {name: torch.randn(n, hidden, generator=g) for name, n in TASKS.items()}
    staging = path.parent / (path.name + ".staging")
    staging.mkdir()
    cfg = {"virtual_prompt_style": "prompt-tuning", "hidden_size": hidden,
           "task_templates": [{"taskname": name, "prompt_template": "<|VIRTUAL_PROMPT_0|> {text}",
                               "total_virtual_tokens": n, "virtual_token_splits": [n]}
                              for name, n in TASKS.items()]}
    (staging / "model_config.yaml").write_text(yaml.safe_dump(cfg))
    torch.save({"prompt_table": {f"prompt_table.{name}.prompt_embeddings.weight": t for name, t in tables.items()}},
               staging / "model_weights.ckpt")
    with tarfile.open(path, "w:") as tar:
        tar.add(staging, arcname=".")
    return tables


def reference(model_dir, tables, task: str, ids, vocab: int, adapter=None):
    """transformers' greedy generate from inputs_embeds: a virtual id v >= vocab is row v - vocab of the task's
    table, every other id its embedding; with `adapter`, through PEFT."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    embed = model.get_input_embeddings()
    with torch.inference_mode():
        rows = [tables[task][t - vocab] if t >= vocab else embed(torch.tensor(t)) for t in ids]
        emb = torch.stack(rows)[None]
        out = model.generate(inputs_embeds=emb, attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=MAX_TOKENS, do_sample=False, pad_token_id=0)
    return out[0].tolist()


def _generate(llm, prompt, table, **kwargs):
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, **kwargs)
    return llm.generate(prompt, params, use_tqdm=False, prompt_adapter_request=table)


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def setup(request, tiny_llama_dir, tiny_gpt2_dir, tmp_path_factory):
    model_dir = {"llama": tiny_llama_dir, "gpt2": tiny_gpt2_dir}[request.param]
    vocab = {"llama": 320, "gpt2": 288}[request.param]
    root = tmp_path_factory.mktemp(f"prompt-{request.param}")
    path = root / "p_tuning.nemo"
    tables = write_prompt_nemo(path, 64, seed=5)
    with LLM(str(model_dir), enable_prompt_adapter=True, max_prompt_adapters=2,
             max_prompt_adapter_token=16, tokens_per_block=4) as llm:
        yield model_dir, vocab, path, tables, llm, root


def _request(path, task: int, table_id: int = 1):
    return PromptAdapterRequest("tasks", table_id, str(path), task_id=task)


def test_two_tasks_equal_transformers_inputs_embeds(setup):
    model_dir, vocab, path, tables, llm, _ = setup
    names = list(TASKS)
    real = [5, 9, 17, 33, 4, 100, 7]
    cases = [  # (task, prompt ids): virtual tokens in front, in the middle, and not given (prepended)
        (0, [vocab + i for i in range(TASKS[names[0]])] + real),
        (1, real[:3] + [vocab + i for i in range(TASKS[names[1]])] + real[3:]),
        (1, real),
    ]
    outs = llm.generate([ids for _, ids in cases], SamplingParams(max_tokens=MAX_TOKENS, temperature=0),
                        use_tqdm=False, prompt_adapter_request=[_request(path, task) for task, _ in cases])
    for (task, ids), out in zip(cases, outs):
        full = ids if max(ids) >= vocab else [vocab + i for i in range(TASKS[names[task]])] + ids
        assert out.prompt_token_ids == full
        assert out.outputs[0].token_ids == reference(model_dir, tables, names[task], full, vocab)
    # the table changes the tokens (a request run without it would not pass)
    base = llm.generate(real, SamplingParams(max_tokens=MAX_TOKENS, temperature=0), use_tqdm=False)
    assert any(o.outputs[0].token_ids != base.outputs[0].token_ids for o in outs)


def test_tensor_file_table_equals_nemo_table(setup):
    model_dir, vocab, path, tables, llm, root = setup
    padded = torch.zeros(2, 6, 64)
    for i, t in enumerate(tables.values()):
        padded[i, :t.shape[0]] = t
    np.save(root / "table.npy", padded.numpy())
    ids = [vocab, vocab + 1, vocab + 2, 11, 12, 13]
    a = _generate(llm, ids, _request(path, 1)).outputs[0].token_ids
    b = _generate(llm, ids, PromptAdapterRequest("npy", 2, str(root / "table.npy"), task_id=1)).outputs[0].token_ids
    assert a == b == reference(model_dir, tables, "summary", ids, vocab)


def test_prefix_cache_is_keyed_by_table_and_task(setup):
    model_dir, vocab, path, tables, llm, root = setup
    # Four full blocks of 4: the first holds real tokens only (its ids are the same for every table and task), the
    # second the virtual ones.
    ids = [60, 61, 62, 63, vocab, vocab + 1, vocab + 2, vocab + 3] + list(range(64, 72))
    hits = []
    for task, table_id in ((0, 1), (1, 1), (0, 7), (0, 1)):  # table 7: the same file under another id
        before = llm.get_stats()["num_prefix_hit_tokens"]
        _generate(llm, ids, _request(path, task, table_id))
        hits.append(llm.get_stats()["num_prefix_hit_tokens"] - before)
    # another task or another table finds none of the first request's blocks; the same one finds them all
    assert hits[1] == 0 and hits[2] == 0 and hits[3] == 12


def test_errors(setup, tiny_llama_dir, tmp_path):
    model_dir, vocab, path, tables, llm, root = setup
    with pytest.raises(AdapterError, match="beyond the prompt table"):
        _generate(llm, [vocab + 6, 5], _request(path, 1))
    with pytest.raises(RequestError, match=r"prompt token ids must be ints in \[0, "):
        _generate(llm, [vocab, 5], None)  # without a table they stay refused
    with pytest.raises(AdapterError, match="task_id=2 is invalid"):
        _generate(llm, [5], _request(path, 2))
    with pytest.raises(AdapterError, match="repetition_penalty"):
        _generate(llm, [vocab, 5], _request(path, 0), repetition_penalty=1.2)
    np.save(tmp_path / "wide.npy", np.zeros((2, 4, 96), dtype=np.float32))
    with pytest.raises(AdapterError, match="hidden size is 64"):
        _generate(llm, [5], PromptAdapterRequest("wide", 3, str(tmp_path / "wide.npy")))
    (tmp_path / "junk.nemo").write_bytes(b"junk")
    with pytest.raises(AdapterError, match="not a NeMo prompt-tuning checkpoint"):
        _generate(llm, [5], PromptAdapterRequest("junk", 4, str(tmp_path / "junk.nemo")))
    with pytest.raises(AdapterError, match="does not exist"):
        _generate(llm, [5], PromptAdapterRequest("gone", 5, str(tmp_path / "gone.nemo")))
    with LLM(str(tiny_llama_dir)) as plain:
        with pytest.raises(AdapterError, match="enable_prompt_adapter=True"):
            _generate(plain, [5], _request(path, 0))


def test_prompt_table_with_a_lora_adapter(tiny_llama_dir, tmp_path):
    """One request with both: the adapter runs over the table's embeddings (transformers + PEFT from
    inputs_embeds)."""
    tables = write_prompt_nemo(tmp_path / "p.nemo", 64, seed=6)
    adapter = make_peft_adapter(tiny_llama_dir, tmp_path / "lora", 8, ["q_proj", "v_proj", "up_proj"], seed=4)
    ids = [320, 321, 322, 323, 8, 9, 10]
    with LLM(str(tiny_llama_dir), enable_prompt_adapter=True, enable_lora=True, max_lora_rank=8) as llm:
        out = llm.generate(ids, SamplingParams(max_tokens=MAX_TOKENS, temperature=0), use_tqdm=False,
                           lora_request=LoRARequest("l", 1, str(adapter)),
                           prompt_adapter_request=_request(tmp_path / "p.nemo", 0))
    assert out.outputs[0].token_ids == reference(tiny_llama_dir, tables, "sentiment", ids, 320, adapter=adapter)


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_prompt_table_on_two_ranks(tiny_llama_dir, tmp_path, tp, pp):
    """TP=2: the table beside the vocabulary-parallel embedding, whole on each rank; PP=2: on the first stage."""
    tables = write_prompt_nemo(tmp_path / "p.nemo", 64, seed=8)
    cases = [(0, [320, 321, 322, 323, 8, 9, 10]), (1, [40, 41])]
    with LLM(str(tiny_llama_dir), tp=tp, pp=pp, enable_prompt_adapter=True) as llm:
        outs = llm.generate([ids for _, ids in cases], SamplingParams(max_tokens=MAX_TOKENS, temperature=0),
                            use_tqdm=False, prompt_adapter_request=[_request(tmp_path / "p.nemo", t) for t, _ in cases])
    for (task, _), out in zip(cases, outs):
        assert out.outputs[0].token_ids == reference(tiny_llama_dir, tables, list(TASKS)[task], out.prompt_token_ids,
                                                     320)
