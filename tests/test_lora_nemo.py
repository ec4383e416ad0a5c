"""NeMo LoRA: a tiny GPT-Next .nemo (fused SwiGLU, GQA, LayerNorm1P, tied head) and two LoRA .nemo files written in
NeMo's layout (peft.lora_tuning's adapter_dim / alpha in model_config.yaml; ParallelLinearAdapter linear_in /
linear_out per layer: the fused attn_qkv adapter over NeMo's per-group query_key_value rows, and the dense, h-to-4h
and 4h-to-h adapters); per request, the greedy tokens equal the plain-torch NeMo forward on weights merged here
(W + alpha / r * linear_out @ linear_in in NeMo's own layout)."""

import tarfile

import pytest
import torch
import yaml
from test_family_nemo import VOCAB, NemoReference, nemo_config, random_nemo, write_nemo
from tiny_models import save_tiny_sentencepiece

from llmapi import LLM, AdapterError, LoRARequest, SamplingParams

MAX_TOKENS = 10
ADAPTER = "model.language_model.encoder.layers.{}.{}.{}.weight"
KINDS = {  # adapter -> (the NeMo weight it adapts, in features, out features) for the config below
    "self_attention.adapter_layer.lora_kqv_adapter": ("self_attention.query_key_value", 64, (4 + 2 * 2) * 16),
    "self_attention.adapter_layer.lora_dense_attention_adapter": ("self_attention.dense", 64, 64),
    "mlp.adapter_layer.lora_hto4h_adapter": ("mlp.dense_h_to_4h", 64, 2 * 192),
    "mlp.adapter_layer.lora_4htoh_adapter": ("mlp.dense_4h_to_h", 192, 64),
}


def write_lora_nemo(path, base_cfg: dict, rank: int, alpha, kinds, seed: int) -> dict:
    """A NeMo LoRA .nemo (model_config.yaml with peft.lora_tuning, model_weights.ckpt with the adapters); returns
    {(layer, adapter): (linear_in, linear_out)}."""
    g = torch.Generator().manual_seed(seed)
    tuning = {"adapter_dim": rank, "adapter_dropout": 0.0, "column_init_method": "xavier",
              "row_init_method": "zero", "target_modules": ["attention_qkv"]}
    if alpha is not None:
        tuning["alpha"] = alpha
    cfg = dict(base_cfg, peft={"peft_scheme": "lora", "restore_from_path": None, "lora_tuning": tuning})
    weights, pairs = {}, {}
    for layer in range(base_cfg["num_layers"]):
        for kind in kinds:
            _, k, n = KINDS[kind]
            a, b = 0.2 * torch.randn(rank, k, generator=g), 0.2 * torch.randn(n, rank, generator=g)
            weights[ADAPTER.format(layer, kind, "linear_in")] = a
            weights[ADAPTER.format(layer, kind, "linear_out")] = b
            pairs[(layer, kind)] = (a, b)
    staging = path.parent / (path.name + ".staging")
    staging.mkdir()
    (staging / "model_config.yaml").write_text(yaml.safe_dump(cfg))
    torch.save(weights, staging / "model_weights.ckpt")
    with tarfile.open(path, "w:") as tar:
        tar.add(staging, arcname=".")
    return pairs


def merged(shards: list[dict], pairs: dict, scale: float) -> list[dict]:
    """The base shard with each adapted weight W + scale * linear_out @ linear_in, in NeMo's layout."""
    out = {k: v.clone() for k, v in shards[0].items()}
    for (layer, kind), (a, b) in pairs.items():
        out[f"model.language_model.encoder.layers.{layer}.{KINDS[kind][0]}.weight"] += scale * b @ a
    return [out]


@pytest.fixture(scope="module")
def gpt_next(tmp_path_factory):
    root = tmp_path_factory.mktemp("nemo-lora")
    save_tiny_sentencepiece(root, vocab_size=VOCAB)
    cfg = nemo_config(1, activation="fast-swiglu", bias=False, num_query_groups=2,
                      share_embeddings_and_output_weights=True)
    shards = random_nemo(cfg, VOCAB, seed=3)
    base = write_nemo(root / "gpt_next.nemo", cfg, shards, root / "tokenizer.model")
    qkv = write_lora_nemo(root / "lora_qkv.nemo", cfg, 8, None, [list(KINDS)[0]], seed=1)  # alpha: the rank
    everything = write_lora_nemo(root / "lora_all.nemo", cfg, 16, 32, list(KINDS), seed=2)
    return root, cfg, shards, base, {"qkv": (qkv, 1.0), "all": (everything, 32 / 16)}


def test_nemo_lora_per_request_equals_merged_weights(gpt_next):
    root, cfg, shards, base, adapters = gpt_next
    ps = [[5, 9, 17, 33, 4, 100, 7], [3, 60, 61, 200], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20]]
    refs = {name: NemoReference(cfg, merged(shards, pairs, scale)).greedy(ps, MAX_TOKENS)
            for name, (pairs, scale) in adapters.items()}
    refs[None] = NemoReference(cfg, shards).greedy(ps, MAX_TOKENS)
    requests = {"qkv": LoRARequest("qkv", 1, str(root / "lora_qkv.nemo")),
                "all": LoRARequest("all", 2, str(root / "lora_all.nemo"), lora_ckpt_source="nemo"), None: None}
    batch = [(name, i) for i in range(len(ps)) for name in ("qkv", "all", None)]
    with LLM(str(base), enable_lora=True, max_loras=2, max_lora_rank=16) as llm:
        outs = llm.generate([ps[i] for _, i in batch], SamplingParams(max_tokens=MAX_TOKENS, temperature=0),
                            use_tqdm=False, lora_request=[requests[name] for name, _ in batch])
        got = [o.outputs[0].token_ids for o in outs]
        with pytest.raises(AdapterError, match="rank 16 \\(adapter_dim\\), above max_lora_rank=8"):
            from llmapi.lora.nemo import load_nemo_lora

            load_nemo_lora(str(root / "lora_all.nemo"), llm.engine_info.config, 8, torch.float32)
        junk = root / "junk.nemo"
        junk.write_bytes(b"not a tar")
        with pytest.raises(AdapterError, match="not a NeMo LoRA checkpoint"):
            llm.add_lora(LoRARequest("junk", 3, str(junk)))
    assert got == [refs[name][i] for name, i in batch]
    assert refs["qkv"] != refs[None] and refs["all"] != refs[None]
