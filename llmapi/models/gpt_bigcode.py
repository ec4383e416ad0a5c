"""GPTBigCode family (SantaCoder, StarCoder, StarCoderBase, WizardCoder: learned positions, LayerNorm, biased
linears, multi-query or multi-head attention): the Hugging Face conversion to the general decoder, and the reader of
the original bigcode/santacoder layout (remote code `GPT2LMHeadCustomModel`) into the Hugging Face shape."""

import re
from collections.abc import Iterator, Mapping

import torch

from llmapi.errors import UnsupportedModelError
from llmapi.layers.activation import get_activation
from llmapi.models.base import HFTensors, dtype_name, require_positive, token_id_list
from llmapi.models.gpt2 import gpt2_shape

HF_ARCHITECTURES = ("GPTBigCodeForCausalLM", "GPT2LMHeadCustomModel")
ENGINE_ARCHITECTURE = "GPTForCausalLM"
MODEL_TYPES = {"gpt_bigcode": "GPTBigCodeForCausalLM"}

SANTACODER_ARCHITECTURE = "GPT2LMHeadCustomModel"
_SANTACODER_HEAD_TYPES = {"multiquery": True, "multihead": False}  # attention_head_type -> multi_query


def is_santacoder_layout(hf_config: dict) -> bool:
    """Whether a config.json is the original SantaCoder remote-code layout (GPT-2 names, separate q / kv linears)."""
    return SANTACODER_ARCHITECTURE in (hf_config.get("architectures") or []) or "attention_head_type" in hf_config


def santacoder_config_to_hf(hf_config: dict) -> dict:
    """The GPTBigCode config.json dict of a SantaCoder remote-code config (configuration_gpt2_mq.GPT2CustomConfig):
    the same GPT-2 field names, `attention_head_type` "multiquery" / "multihead" becoming `multi_query`."""
    head_type = hf_config.get("attention_head_type", "multihead")
    if head_type not in _SANTACODER_HEAD_TYPES:
        raise UnsupportedModelError(f"SantaCoder attention_head_type {head_type!r} is not supported "
                                    f"(supported: {', '.join(_SANTACODER_HEAD_TYPES)})")
    out = {k: v for k, v in hf_config.items() if k not in ("attention_head_type", "auto_map")}
    out.update(architectures=["GPTBigCodeForCausalLM"], model_type="gpt_bigcode",
               multi_query=_SANTACODER_HEAD_TYPES[head_type],
               activation_function=hf_config.get("activation_function", "gelu_new"))  # GPT2CustomConfig's default
    return out


_SANTACODER_LINEAR = re.compile(
    r"(?P<layer>(?:transformer\.)?h\.\d+\.)(?P<module>attn\.(?:c_attn|q_attn|kv_attn|c_proj)|mlp\.c_fc|mlp\.c_proj)"
    r"\.(?P<kind>weight|bias)")


class _SantaCoderTensors(Mapping):
    """A SantaCoder remote-code state dict seen under GPTBigCode's names, each tensor made on access.

    SantaCoder's linears are GPT-2 Conv1D ([in, out] weights); GPTBigCode's are nn.Linear ([out, in]). Multi-query:
    attn.q_attn [H, H] and attn.kv_attn [H, 2 * head_dim] (key, then value) stack into c_attn's rows q, k, v, which
    is GPTBigCode's multi-query layout. Multi-head: attn.c_attn [H, 3H] (q, k, v blocks, as GPT-2) is regrouped
    per head (q, k, v of head 0, then of head 1, ...), GPTBigCode's multi-head layout. Names this layout does not
    define pass through unchanged, so the converter's strict read reports them.
    """

    def __init__(self, state_dict: Mapping[str, torch.Tensor], multi_query: bool, num_heads: int):
        self._sd, self._num_heads = state_dict, num_heads
        # GPTBigCode name -> (SantaCoder tensors joined along their last dim, from Conv1D (else as is), regroup)
        self._sources: dict[str, tuple[tuple[str, ...], bool, bool]] = {}
        names = set(state_dict.keys())
        for name in names:
            m = _SANTACODER_LINEAR.fullmatch(name)
            module = m and m.group("module")
            foreign = module == "attn.c_attn" if multi_query else module in ("attn.q_attn", "attn.kv_attn")
            if not m or foreign:
                self._sources[name] = ((name,), False, False)  # not a linear of this layout: kept for the strict read
                continue
            layer, kind = m.group("layer"), m.group("kind")
            q, kv = f"{layer}attn.q_attn.{kind}", f"{layer}attn.kv_attn.{kind}"
            if module in ("attn.q_attn", "attn.kv_attn"):
                if q not in names or kv not in names:
                    raise UnsupportedModelError(f"SantaCoder checkpoint has {name} without "
                                                f"{kv if name == q else q}: multi-query layers need both")
                # weights [H, H] and [H, 2hd] -> [H + 2hd, H]; biases [H] and [2hd] -> [H + 2hd]
                self._sources[f"{layer}attn.c_attn.{kind}"] = ((q, kv), True, False)
                continue
            self._sources[name] = ((name,), True, module == "attn.c_attn")

    def __getitem__(self, name: str) -> torch.Tensor:
        sources, conv1d, regroup = self._sources[name]
        parts = [self._sd[s] for s in sources]
        if len({p.shape[:-1] for p in parts}) > 1:
            raise UnsupportedModelError(f"SantaCoder tensors {', '.join(sources)} have shapes "
                                        f"{', '.join(str(tuple(p.shape)) for p in parts)}, which do not stack")
        t = torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]
        if not conv1d:
            return t
        if t.dim() == 2:
            t = t.t()  # Conv1D [in, out] -> nn.Linear [out, in]
        if regroup and t.shape[0] % (3 * self._num_heads) == 0:  # else the converter's shape check names it
            # rows [3H, ...] as q, k, v blocks -> q, k, v per head
            t = t.reshape(3, self._num_heads, -1, *t.shape[1:]).transpose(0, 1).reshape(t.shape)
        return t.contiguous()

    def __iter__(self) -> Iterator[str]:
        return iter(self._sources)

    def __len__(self) -> int:
        return len(self._sources)


def read_santacoder(hf_config: dict, state_dict: Mapping[str, torch.Tensor]) -> tuple[dict, Mapping]:
    """(GPTBigCode config dict, GPTBigCode-named state dict) of a SantaCoder remote-code checkpoint."""
    config = santacoder_config_to_hf(hf_config)
    heads = config.get("n_head", config.get("num_attention_heads"))
    require_positive({"n_head": heads}, "n_head")
    return config, _SantaCoderTensors(state_dict, config["multi_query"], heads)


def config_from_hf(hf_config: dict, dtype: torch.dtype) -> dict:
    """Engine config.json fields (all but mapping/quantization) from an HF GPTBigCode (or SantaCoder) config dict."""
    if is_santacoder_layout(hf_config):
        hf_config = santacoder_config_to_hf(hf_config)
    cfg = gpt2_shape(hf_config, "GPTBigCode")
    hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    multi_query = hf_config.get("multi_query", True)
    if not isinstance(multi_query, bool):
        raise UnsupportedModelError(f"config field 'multi_query' must be true or false, got {multi_query!r}")
    act = hf_config.get("activation_function", "gelu_pytorch_tanh")
    get_activation(act)  # unknown activations fail at conversion, not at load
    return {
        "architecture": ENGINE_ARCHITECTURE,
        "dtype": dtype_name(dtype),
        **cfg,
        "num_key_value_heads": 1 if multi_query else heads,
        "head_dim": hidden // heads,
        "hidden_act": act,
        "intermediate_size": hf_config.get("n_inner") or 4 * hidden,
        "norm_epsilon": float(hf_config.get("layer_norm_epsilon", 1e-5)),
        "position_embedding_type": "learned_absolute",
        "norm_type": "layernorm",
        "gated_mlp": False,
        "rotary_base": None,
        "rotary_scaling": None,
        "attention_bias": True,
        "mlp_bias": True,
        "tie_word_embeddings": bool(hf_config.get("tie_word_embeddings", True)),
        "bos_token_id": hf_config.get("bos_token_id"),
        "eos_token_id": token_id_list(hf_config.get("eos_token_id")),
    }


def _qkv_rows(t: torch.Tensor, heads: int, head_dim: int, multi_query: bool) -> torch.Tensor:
    """c_attn rows in the engine's order (q heads, k heads, v heads): multi-query c_attn already is (q [H], k [hd],
    v [hd]); multi-head c_attn interleaves per head (q, k, v of head 0, then head 1, ...)."""
    if multi_query:
        return t
    rest = t.shape[1:]  # [3H, H] weight or [3H] bias
    return t.reshape(heads, 3, head_dim, *rest).transpose(0, 1).reshape(t.shape).contiguous()


def fused_linears(cfg: dict) -> dict[str, tuple[list[tuple[str, int]], int]]:
    """Engine linear -> (the HF linears it holds: (name without "transformer.", out rows), in_features); c_attn's
    rows take the engine's order through order_rows."""
    hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
    qkv = (cfg["num_attention_heads"] + 2 * cfg["num_key_value_heads"]) * cfg["head_dim"]
    out = {}
    for i in range(cfg["num_hidden_layers"]):
        src, dst = f"h.{i}.", f"transformer.layers.{i}."
        out[dst + "attention.qkv"] = ([(src + "attn.c_attn", qkv)], hidden)
        out[dst + "attention.dense"] = ([(src + "attn.c_proj", hidden)], hidden)
        out[dst + "mlp.fc"] = ([(src + "mlp.c_fc", inter)], hidden)
        out[dst + "mlp.proj"] = ([(src + "mlp.c_proj", hidden)], inter)
    return out


def order_rows(cfg: dict, engine_linear: str, t: torch.Tensor) -> torch.Tensor:
    """The rows of an engine linear's tensor stacked from its HF linears, in the engine's order: a multi-head
    c_attn's per-head q, k, v rows regrouped as convert_hf regroups the weights."""
    if not engine_linear.endswith("attention.qkv"):
        return t
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    return _qkv_rows(t, heads, cfg["head_dim"], kv_heads == 1 and heads > 1)


def convert_hf(hf_config: dict, state_dict: Mapping[str, torch.Tensor], dtype: torch.dtype) -> tuple[dict, dict]:
    """HF GPTBigCode (or SantaCoder remote-code) checkpoint -> (engine config, engine weights)."""
    if is_santacoder_layout(hf_config):
        hf_config, state_dict = read_santacoder(hf_config, state_dict)
    cfg = config_from_hf(hf_config, dtype)
    hidden, inter, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    heads, kv_heads, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    multi_query = kv_heads == 1 and heads > 1
    qkv_out = (heads + 2 * kv_heads) * hd
    # bias: the causal-mask buffer older checkpoints saved (SantaCoder's per layer, with masked_bias).
    hf = HFTensors(state_dict, "transformer.", dtype, ignore=[r"^bias$", r"^h\.\d+\.attn\.(masked_)?bias$"])

    def linear(dst: str, src: str, in_features: int, out_features: int) -> None:
        w[dst + ".weight"] = hf.take(src + ".weight", (out_features, in_features))
        w[dst + ".bias"] = hf.take(src + ".bias", (out_features,))

    def layernorm(dst: str, src: str) -> None:
        w[dst + ".weight"] = hf.take(src + ".weight", (hidden,))
        w[dst + ".bias"] = hf.take(src + ".bias", (hidden,))

    w = {
        "transformer.vocab_embedding.weight": hf.take("wte.weight", (vocab, hidden)),
        "transformer.position_embedding.weight": hf.take("wpe.weight", (cfg["max_position_embeddings"], hidden)),
    }
    for i in range(cfg["num_hidden_layers"]):
        src, dst = f"h.{i}.", f"transformer.layers.{i}."
        layernorm(dst + "input_layernorm", src + "ln_1")
        linear(dst + "attention.qkv", src + "attn.c_attn", hidden, qkv_out)
        for kind in ("weight", "bias"):
            name = dst + "attention.qkv." + kind
            w[name] = _qkv_rows(w[name], heads, hd, multi_query)
        linear(dst + "attention.dense", src + "attn.c_proj", hidden, hidden)
        layernorm(dst + "post_layernorm", src + "ln_2")
        linear(dst + "mlp.fc", src + "mlp.c_fc", hidden, inter)
        linear(dst + "mlp.proj", src + "mlp.c_proj", inter, hidden)
    layernorm("transformer.ln_f", "ln_f")
    hf.take_head(w, cfg["tie_word_embeddings"], (vocab, hidden))
    hf.check_all_used()
    return cfg, w
