"""LoRA adapters per request on encoder-decoder models (tiny BART, mBART, T5 v1.1): PEFT adapters written by peft
(ranks 4 and 8, nonzero A and B) over the encoder's and the decoder's linears and the cross-attention's give the
greedy tokens of transformers + PEFT, alone, mixed in one batch with each other and the base model, through the
decode-graph path, with beams and under tensor parallelism 2; an adapter of the encoder alone or of the
cross-attention's K/V alone shows that encoder tokens run with their request's adapter; the same encoder and
decoder prompts under two adapters share no prefix-cache block; typed errors for adapters that do not fit."""

import random

import numpy as np
import pytest
import torch
import transformers

import encdec_models as em
from family_parity import one_thread
from llmapi import LLM, AdapterError, LoRARequest, SamplingParams

BLOCK = 4
MAX_TOKENS = 10
BART_ADAPTERS = {  # name -> (rank, PEFT target_modules, options)
    # q/v of every attention (the encoder's, the decoder's, the cross-attention's q and the v rows of its kv) and fc1
    "qv_fc1": (4, ["q_proj", "v_proj", "fc1"], {}),
    # the encoder alone: only the encoder's tokens carry it into the output
    "encoder": (8, r"model\.encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|fc1|fc2)", {"use_rslora": True}),
    # the cross-attention's K/V (computed from the encoder's output) and out_proj, and the decoder's fc2
    "cross": (8, r"model\.decoder\.layers\.\d+\.(encoder_attn\.(k|v|out)_proj|fc2)", {}),
}
OTHER_ADAPTERS = {  # family -> (rank, target_modules)
    "mbart": (8, ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]),
    "t5v1.1": (4, ["q", "k", "v", "o", "wi_0", "wi_1", "wo"]),  # gated: wi_0 / wi_1 stacked into gate_up
    "fsmt": (4, ["q_proj", "v_proj", "out_proj", "fc1", "fc2"]),
}
MODELS = {"bart": lambda: em.bart(), "mbart": lambda: em.bart(mbart=True, seed=1), "t5v1.1": lambda: em.t5("t5v1.1"),
          "fsmt": lambda: em.fsmt(seed=2)}


def make_adapter(model_dir, path, r: int, targets, seed: int, **options):
    """A PEFT LoRA adapter of the seq2seq model in `model_dir`, saved by peft; A and B random and nonzero."""
    from peft import LoraConfig, get_peft_model

    base = transformers.AutoModelForSeq2SeqLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False,
                                            **options))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    model.save_pretrained(path, save_embedding_layers=False)  # the adapter only, as a trained one is saved
    return str(path)


def reference(model_dir, adapter, requests, **kwargs):
    """transformers (+ PEFT)'s greedy continuation of each (encoder ids, decoder prompt), fp32, one at a time."""
    model = transformers.AutoModelForSeq2SeqLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    outs = []
    with torch.inference_mode():
        for enc, dec in requests:
            ids, dec_ids = torch.tensor([enc]), torch.tensor([dec])
            gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), decoder_input_ids=dec_ids,
                                 max_new_tokens=MAX_TOKENS, do_sample=False, **kwargs)
            outs.append(gen[0, len(dec):].tolist())
    return outs


def make_requests(start: int, count: int, seed: int):
    """(encoder ids, decoder prompt): encoder inputs of 3 to 30 tokens; decoder prompts of the start token and 0 to 9
    more (so that prefills of both kinds mix with decodes)."""
    rng = random.Random(seed)
    return [([rng.randrange(3, em.VOCAB) for _ in range(rng.randrange(3, 31))],
             [start] + [rng.randrange(3, em.VOCAB) for _ in range(rng.randrange(0, 10))]) for _ in range(count)]


def generate(llm, requests, lora_request=None, **params):
    params = SamplingParams(**{"max_tokens": MAX_TOKENS, "temperature": 0, **params})
    outs = llm.generate([{"encoder_prompt": e, "decoder_prompt": d} for e, d in requests], params, use_tqdm=False,
                        lora_request=lora_request)
    return [list(o.outputs[0].token_ids) for o in outs]


def _llm(path, **kwargs):
    return LLM(str(path), dtype="float32", device="cpu", skip_tokenizer_init=True, tokens_per_block=BLOCK, **kwargs)


@pytest.fixture(scope="module")
def bart(tmp_path_factory):
    """(model dir, requests, {name: (LoRARequest, reference tokens)}, base tokens)."""
    root = tmp_path_factory.mktemp("lora-bart")
    em.bart().save_pretrained(root / "model")
    requests = make_requests(2, 4, seed=3)
    adapters = {}
    for i, (name, (r, targets, options)) in enumerate(BART_ADAPTERS.items()):
        path = make_adapter(root / "model", root / name, r, targets, seed=10 + i, **options)
        adapters[name] = (LoRARequest(name, i + 1, path), reference(root / "model", path, requests))
    return root / "model", requests, adapters, reference(root / "model", None, requests)


@pytest.fixture(scope="module")
def bart_llm(bart):
    with one_thread(), _llm(bart[0], enable_lora=True, max_loras=3, max_lora_rank=8, max_num_tokens=40) as llm:
        yield llm


def test_each_adapter_equals_transformers_peft(bart, bart_llm):
    _, requests, adapters, base = bart
    for name, (request, want) in adapters.items():
        assert generate(bart_llm, requests, request) == want, name
        assert want != base, f"adapter {name} changed no token: the test would not see it missing"
    assert generate(bart_llm, requests) == base
    assert generate(bart_llm, requests, LoRARequest("base", -1)) == base


def test_mixed_batch_gives_each_request_its_own_tokens(bart, bart_llm):
    """Every request under every adapter and the base, interleaved in one batch; a 40-token step budget staggers the
    encoder starts, so steps mix rows starting their encoders (under several adapters) with decoding rows."""
    _, requests, adapters, base = bart
    batch, loras, want = [], [], []
    for i, req in enumerate(requests):
        for name in list(adapters) + [None]:
            batch.append(req)
            loras.append(None if name is None else adapters[name][0])
            want.append(base[i] if name is None else adapters[name][1][i])
    steps = bart_llm.get_stats()["num_steps"]
    assert generate(bart_llm, batch, loras) == want
    assert bart_llm.get_stats()["num_steps"] - steps < len(batch) * MAX_TOKENS // 2  # they ran together


def test_waiting_for_a_slot_and_preemption(bart):
    """max_loras=1 (the lora_dir's adapters, ids 1, 2, 3): requests of the other adapters wait outside the executor
    and are enqueued, encoder ids and all, when a slot frees; a cache of 24 blocks preempts requests, whose encoders
    run again under their adapters."""
    from llmapi import LoraConfig

    model_dir, requests, adapters, base = bart
    names = list(adapters)
    config = LoraConfig(lora_dir=[adapters[n][0].lora_path for n in names], max_loras=1, max_lora_rank=8,
                        max_cpu_loras=3)
    with one_thread(), _llm(model_dir, lora_config=config, kv_cache_config={"max_tokens": 24 * BLOCK}) as llm:
        loras = [LoRARequest(n, i + 1, adapters[n][0].lora_path) for i, n in enumerate(names)]
        got = generate(llm, requests * 4, [r for r in loras for _ in requests] + [None] * len(requests))
        stats, manager = llm.get_stats(), llm._res.adapters
        params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)
        outs = [llm.generate_async({"encoder_prompt": e, "decoder_prompt": d}, params, lora_request=loras[1])
                for e, d in requests]
        assert [list(o.result().outputs[0].token_ids) for o in outs] == adapters[names[1]][1]
        assert llm.get_stats()["num_free_blocks"] == llm.num_kv_blocks
    assert got == [t for n in names for t in adapters[n][1]] + base
    assert manager.counts["waited"] >= 2 * len(requests) and manager.num_waiting() == 0
    assert stats["num_preemptions"] > 0, "the small cache should have forced preemptions"


def test_beam_search_with_an_adapter(bart, bart_llm):
    model_dir, requests, adapters, _ = bart
    request, _ = adapters["qv_fc1"]
    want = reference(model_dir, request.lora_path, requests[:2], num_beams=2, early_stopping=False,
                     length_penalty=1.0)
    got = generate(bart_llm, requests[:2], request, use_beam_search=True, best_of=2, n=1)
    assert got == want


def test_decode_graph_path_with_adapters(bart, monkeypatch):
    """Decode steps through the decode-graph path (its CPU stand-in: the rows' adapter slots and cross blocks static
    inputs) give each request its tokens; steps that start encoders run eagerly."""
    from llmapi.runtime.cuda_graph import GRAPHS_ON_CPU_ENV

    monkeypatch.setenv(GRAPHS_ON_CPU_ENV, "1")
    model_dir, requests, adapters, base = bart
    names = ["qv_fc1", "cross"]
    with one_thread(), _llm(model_dir, enable_lora=True, max_loras=2, max_lora_rank=8, max_batch_size=8) as llm:
        got = generate(llm, requests * 3, [adapters[n][0] for n in names for _ in requests] + [None] * len(requests))
        stats = llm._runner.stats
        assert 0 < stats.graph_steps < stats.steps
    assert got == [t for n in names for t in adapters[n][1]] + base


@pytest.mark.parametrize("family", list(OTHER_ADAPTERS))
def test_mbart_t5_and_fsmt_adapters_equal_transformers_peft(family, tmp_path):
    em_model = MODELS[family]()
    em_model.save_pretrained(tmp_path / "model")
    r, targets = OTHER_ADAPTERS[family]
    path = make_adapter(tmp_path / "model", tmp_path / "adapter", r, targets, seed=7)
    requests = make_requests(em_model.config.decoder_start_token_id, 3, seed=4)
    if family == "fsmt":  # transformers' FSMT prefills a multi-token decoder prompt without its causal mask
        requests = [(enc, dec[:1]) for enc, dec in requests]
    want, base = reference(tmp_path / "model", path, requests), reference(tmp_path / "model", None, requests)
    with one_thread(), _llm(tmp_path / "model", enable_lora=True, max_lora_rank=8) as llm:
        got = generate(llm, requests * 2, [LoRARequest("a", 1, path)] * len(requests) + [None] * len(requests))
    assert got == want + base
    assert want != base


@pytest.mark.gpu
def test_mixed_adapters_on_gpu_with_decode_graphs(bart):
    """The Triton shrink / expand kernels over encoder tokens (grouped by their requests' slots on the device) and
    decoder tokens, eagerly and inside the captured decode graphs: fp32 tokens of transformers + PEFT."""
    model_dir, requests, adapters, base = bart
    names = list(adapters)
    with LLM(str(model_dir), device="cuda", dtype="float32", skip_tokenizer_init=True, tokens_per_block=BLOCK,
             enable_lora=True, max_loras=3, max_lora_rank=8, max_num_tokens=40) as llm:
        got = generate(llm, requests * 4, [adapters[n][0] for n in names for _ in requests] + [None] * len(requests))
        assert llm._local.stats.graph_steps > 0
    assert got == [t for n in names for t in adapters[n][1]] + base


def test_tensor_parallel_two_ranks(bart):
    """Each rank holds its shard of every pair (the column-parallel qkv / cross kv by heads, the row-parallel
    dense / fc2 by input columns): a batch mixing two adapters and the base gives transformers + PEFT's tokens."""
    model_dir, requests, adapters, base = bart
    names = ["qv_fc1", "encoder"]
    with one_thread(), _llm(model_dir, tensor_parallel_size=2, enable_lora=True, max_loras=2, max_lora_rank=8,
                            max_num_tokens=40) as llm:
        got = generate(llm, requests * 3, [adapters[n][0] for n in names for _ in requests] + [None] * len(requests))
    assert got == [t for n in names for t in adapters[n][1]] + base


def test_prefix_cache_keeps_adapters_apart(bart):
    """One encoder input and one decoder prompt of three full blocks under two adapters and the base: the first
    round finds no block of the others (the adapter's salt and the encoder ids both seed the hash chain), the second
    finds each its own."""
    model_dir, _, adapters, _ = bart
    rng = random.Random(5)
    request = [([rng.randrange(3, em.VOCAB) for _ in range(9)], [2] + [rng.randrange(3, em.VOCAB)
                                                                       for _ in range(3 * BLOCK)])]
    names = ["qv_fc1", "cross", None]
    want = {n: reference(model_dir, None if n is None else adapters[n][0].lora_path, request) for n in names}
    hits = []
    with one_thread(), _llm(model_dir, enable_lora=True, max_loras=2, max_lora_rank=8,
                            kv_cache_config={"enable_block_reuse": True}) as llm:
        for name in names + names:
            before = llm.get_stats()["num_prefix_hit_tokens"]
            got = generate(llm, request, None if name is None else adapters[name][0])
            assert got == want[name], name
            hits.append(llm.get_stats()["num_prefix_hit_tokens"] - before)
    assert hits[:3] == [0, 0, 0]
    assert hits[3:] == [3 * BLOCK] * 3, hits
    assert len({tuple(w[0]) for w in want.values()}) == 3  # shared KV would show in the tokens


def _dequantized_bart(engine_dir, cfg) -> dict:
    """The int8 engine's linears dequantized, under BART's HF names (qkv and the cross kv split back)."""
    from safetensors.torch import load_file

    from llmapi._kernels.weight_only import dequantize_ref

    w = load_file(str(engine_dir / "rank0.safetensors"))
    out = {}
    for stack, count in (("encoder", cfg["encoder"]["num_layers"]), ("decoder", cfg["num_hidden_layers"])):
        for i in range(count):
            def deq(name):
                name = f"{stack}.layers.{i}.{name}"
                return dequantize_ref(w[name + ".weight"], w[name + ".weights_scaling_factor"], 8, None, torch.float32)
            p = f"model.{stack}.layers.{i}."
            for k, t in zip("qkv", deq("attention.qkv").chunk(3)):
                out[p + f"self_attn.{k}_proj.weight"] = t
            out[p + "self_attn.out_proj.weight"] = deq("attention.dense")
            if stack == "decoder":
                out[p + "encoder_attn.q_proj.weight"] = deq("cross_attention.q")
                out[p + "encoder_attn.k_proj.weight"], out[p + "encoder_attn.v_proj.weight"] = \
                    deq("cross_attention.kv").chunk(2)
                out[p + "encoder_attn.out_proj.weight"] = deq("cross_attention.dense")
            out[p + "fc1.weight"], out[p + "fc2.weight"] = deq("mlp.fc"), deq("mlp.proj")
    return out


def test_int8_weight_only_base_with_an_adapter(bart):
    """The adapter runs in float beside the int8 linears of both stacks: the decoder prompts' logits equal
    transformers + PEFT on the dequantized weights (float rounding apart)."""
    from peft import PeftModel

    model_dir, requests, adapters, _ = bart
    request = adapters["qv_fc1"][0]
    params = SamplingParams(max_tokens=1, temperature=0, return_context_logits=True)
    prompts = [{"encoder_prompt": e, "decoder_prompt": d} for e, d in requests]
    with one_thread(), _llm(model_dir, quant="int8_weight_only", enable_lora=True, max_lora_rank=8) as llm:
        got = torch.cat([o.context_logits for o in llm.generate(prompts, params, use_tqdm=False,
                                                                lora_request=request)])
        base = torch.cat([o.context_logits for o in llm.generate(prompts, params, use_tqdm=False)])
        weights = _dequantized_bart(llm.engine_info.path, llm.engine_info.config)
    hf = transformers.AutoModelForSeq2SeqLM.from_pretrained(model_dir, dtype=torch.float32)
    hf.load_state_dict(weights, strict=False)
    hf = PeftModel.from_pretrained(hf, request.lora_path).eval()
    with torch.inference_mode():
        want = torch.cat([hf(input_ids=torch.tensor([e]), decoder_input_ids=torch.tensor([d])).logits[0]
                          for e, d in requests])

    def rel(a, b):
        return float((a - b).norm() / b.norm())
    assert rel(got, want) < 1e-4
    assert rel(base, want) > 100 * rel(got, want)  # the adapter is in


def test_encoder_tokens_take_their_rows_adapter_slots():
    """A step of four rows: rows 1 and 3 start their encoders, rows 0 and 2 decode: the staged cross metadata gives
    each encoder token its own row's slot (np.repeat of the row slots by this step's encoder lengths), and the LoRA
    runtime's encoder pass reads those; without any adapter in the step there are none."""
    from types import SimpleNamespace

    from llmapi.layers.attention import AttentionMetadata
    from llmapi.lora.runtime import encoder_token_slots
    from llmapi.runtime.step_inputs import cross_metadata

    enc_lens = np.array([0, 5, 0, 3], dtype=np.int32)
    batch = SimpleNamespace(encoder_lens=enc_lens, encoder_input_ids=np.arange(8, dtype=np.int32),
                            cross_slot_mapping=np.arange(8, dtype=np.int64), cross_lens=np.array([6, 5, 2, 3]),
                            cross_block_tables=np.array([[7, 8], [11, 12], [3, 0], [9, 0]], dtype=np.int32),
                            adapter_slots=np.array([2, 0, -1, 1], dtype=np.int32))
    attn = AttentionMetadata.build([1, 1, 1, 1], [5, 6, 3, 4], [[0, 1]] * 4, BLOCK)
    attn.cross = cross_metadata(batch, torch.device("cpu"))
    assert encoder_token_slots(attn).tolist() == [0] * 5 + [1] * 3
    batch.adapter_slots = np.full(4, -1, dtype=np.int32)
    attn.cross = cross_metadata(batch, torch.device("cpu"))
    assert attn.cross.encoder_adapter_slots is None and encoder_token_slots(attn).tolist() == [-1] * 8


# ---------------------------------------------------------------------- errors


def test_adapters_that_do_not_fit(bart, bart_llm, tmp_path):
    model_dir = bart[0]
    head = make_adapter(model_dir, tmp_path / "head", 4, ["q_proj", "lm_head"], seed=1)
    with pytest.raises(AdapterError, match="BartForConditionalGeneration has no linear 'lm_head' that takes LoRA"):
        bart_llm.add_lora(LoRARequest("head", 20, head))
    em.bart(encoder_layers=3).save_pretrained(tmp_path / "deeper")
    deeper = make_adapter(tmp_path / "deeper", tmp_path / "deep", 4, ["fc1"], seed=1)
    with pytest.raises(AdapterError, match=r"a module the base model does not have \(it has 2 encoder and 2 decoder"):
        bart_llm.add_lora(LoRARequest("deep", 21, deeper))
    big = make_adapter(model_dir, tmp_path / "r16", 16, ["v_proj"], seed=1)
    with pytest.raises(AdapterError, match="rank 16, above max_lora_rank=8"):
        bart_llm.add_lora(LoRARequest("big", 22, big))
    nemo = tmp_path / "adapter.nemo"
    nemo.write_bytes(b"")
    with pytest.raises(AdapterError, match="NeMo LoRA checkpoints adapt decoder-only GPT models"):
        bart_llm.add_lora(LoRARequest("nemo", 23, str(nemo)))
    assert generate(bart_llm, bart[1][:1]) == bart[3][:1]  # the LLM still serves


def test_lora_request_without_enable_lora_and_prompt_tables(bart):
    model_dir, requests, adapters, _ = bart
    with _llm(model_dir) as llm:
        with pytest.raises(AdapterError, match="enable_lora=True"):
            generate(llm, requests[:1], adapters["cross"][0])
    with pytest.raises(AdapterError, match="prompt tables .* are not supported for encoder-decoder models"):
        _llm(model_dir, enable_prompt_adapter=True)
