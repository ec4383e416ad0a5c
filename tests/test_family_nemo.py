"""NeMo GPT models (.nemo files) and the Nemotron family.

- transformers' NemotronForCausalLM (LayerNorm1P, squared ReLU, partial rotary): greedy parity through LLM with
  chunked prefill and prefix reuse, TP=2 / PP=2 against one rank, every quantization mode;
- the same tiny Nemotron written as .nemo files in NeMo's layout (model_config.yaml + model_weights.ckpt, and
  mp_rank_00 / mp_rank_01 tensor-parallel shards) with a locally trained SentencePiece tokenizer.model: transformers'
  greedy tokens;
- variants transformers lacks (fused and separate SwiGLU, biases, RMSNorm, GQA, learned positions with gelu, rotary
  position interpolation) against a plain-torch forward of NeMo's Megatron GPT written below from NeMo's model
  definition, run on the shards rank by rank as Megatron's tensor-parallel layers compute;
- model_config.yaml options and archive layouts that are not converted get typed errors naming them.

The .nemo writer below lays tensors out as NeMo's Megatron GPT model (nemo/collections/nlp/modules/common/megatron:
attention.py, mlp.py, language_model.py) stores them; nothing in it comes from llmapi's reader.
"""

import io
import math
import tarfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from family_parity import check_multi_rank, check_parity, mixed_prompts
from tiny_models import (QUANT_MODE_BOUNDS, check_quant_mode, make_tiny_nemotron, save_tiny_sentencepiece,
                         write_word_calibration)
from tiny_tokenizer import save_tiny_tokenizer

from llmapi import LLM, SamplingParams
from llmapi.errors import ModelNotFoundError, UnsupportedModelError
from llmapi.hub import resolve_source

VOCAB = 320  # the tokenizer's pieces; prompts are drawn below it
EOS = 2
TOKENIZER_NAME = "3f0e5b9a1c2d4e6f_tokenizer.model"  # NeMo saves artifacts under hashed names


# --- writing .nemo files in NeMo's layout ---


def nemo_config(tp: int, **overrides) -> dict:
    """model_config.yaml of a tiny Megatron GPT (NeMo's key names and defaults of megatron_gpt_config.yaml)."""
    cfg = dict(
        mcore_gpt=False, precision=32, megatron_amp_O2=False, tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=1, encoder_seq_length=256, max_position_embeddings=256, num_layers=3,
        hidden_size=64, ffn_hidden_size=192, num_attention_heads=4, num_query_groups=None, kv_channels=None,
        init_method_std=0.02, hidden_dropout=0.0, attention_dropout=0.0, ffn_dropout=0.0, layernorm_epsilon=1e-5,
        make_vocab_size_divisible_by=32, pre_process=True, post_process=True, persist_layer_norm=True, bias=False,
        activation="squared-relu", headscale=False, transformer_block_type="pre_ln", openai_gelu=False,
        normalize_attention_scores=True, position_embedding_type="rope", rotary_percentage=0.5, rotary_base=10000,
        share_embeddings_and_output_weights=False, normalization="layernorm1p", bias_activation_fusion=False,
        bias_dropout_add_fusion=False, masked_softmax_fusion=True, apply_query_key_layer_scaling=True,
        tokenizer=dict(library="sentencepiece", type=None, model=f"nemo:{TOKENIZER_NAME}", vocab_file=None,
                       merge_file=None, delimiter=None, sentencepiece_legacy=False),
        target="nemo.collections.nlp.models.language_modeling.megatron_gpt_model.MegatronGPTModel",
    )
    cfg.update(overrides)
    return cfg


def write_nemo(path: Path, cfg: dict, shards: list[dict], tokenizer_model: Path | None, gzip: bool = False,
               staging: Path | None = None) -> Path:
    """A .nemo archive as NeMo's save_to writes it (tar of a folder added as "."): model_config.yaml, the weights
    (model_weights.ckpt, or mp_rank_NN/model_weights.ckpt per tensor-parallel rank) and the tokenizer artifact."""
    staging = Path(staging or path.parent / (path.name + ".staging"))
    staging.mkdir(parents=True)
    (staging / "model_config.yaml").write_text(yaml.safe_dump(cfg))
    if len(shards) == 1:
        torch.save(shards[0], staging / "model_weights.ckpt")
    else:
        for rank, shard in enumerate(shards):
            (staging / f"mp_rank_{rank:02d}").mkdir()
            torch.save(shard, staging / f"mp_rank_{rank:02d}" / "model_weights.ckpt")
    if tokenizer_model is not None:
        (staging / TOKENIZER_NAME).write_bytes(Path(tokenizer_model).read_bytes())
    with tarfile.open(path, "w:gz" if gzip else "w:") as tar:
        tar.add(staging, arcname=".")
    return path


def _split(t: torch.Tensor, tp: int, dim: int) -> list[torch.Tensor]:
    return [c.clone() for c in t.chunk(tp, dim=dim)]


def _inv_freq(cfg: dict) -> torch.Tensor:
    head_dim = cfg["kv_channels"] or cfg["hidden_size"] // cfg["num_attention_heads"]
    dim = int(head_dim * cfg["rotary_percentage"]) if cfg["rotary_percentage"] < 1 else head_dim
    return 1.0 / (cfg["rotary_base"] ** (torch.arange(0, dim, 2).float() / dim))


def nemotron_to_nemo(hf_model, tp: int) -> tuple[dict, list[dict]]:
    """(model_config.yaml, shards) of a transformers Nemotron in NeMo's layout: query_key_value rows per query group
    (its query heads, its key head, its value head), column-parallel linears split on rows, row-parallel on columns,
    the embedding and output layer on the vocabulary; LayerNorm1P weights stored as w - 1 in both."""
    c = hf_model.config
    heads, groups, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    cfg = nemo_config(tp, num_query_groups=groups, ffn_hidden_size=c.intermediate_size,
                      rotary_percentage=c.rope_parameters["partial_rotary_factor"],
                      rotary_base=c.rope_parameters["rope_theta"], layernorm_epsilon=c.norm_eps)
    sd = hf_model.state_dict()
    shards = [{} for _ in range(tp)]

    def put(name, pieces):
        for shard, piece in zip(shards, pieces):
            shard["model.language_model." + name] = piece

    put("embedding.word_embeddings.weight", _split(sd["model.embed_tokens.weight"], tp, 0))
    put("rotary_pos_emb.inv_freq", [_inv_freq(cfg)] * tp)  # NeMo's RotaryEmbedding buffer, saved with the model
    for i in range(c.num_hidden_layers):
        hf, nm = f"model.layers.{i}.", f"encoder.layers.{i}."
        q = sd[hf + "self_attn.q_proj.weight"].view(groups, heads // groups, hd, -1)
        k = sd[hf + "self_attn.k_proj.weight"].view(groups, 1, hd, -1)
        v = sd[hf + "self_attn.v_proj.weight"].view(groups, 1, hd, -1)
        qkv = torch.cat([q, k, v], dim=1).reshape(-1, c.hidden_size)  # [ng * (np/ng + 2) * hn, H]
        put(nm + "self_attention.query_key_value.weight", _split(qkv, tp, 0))
        put(nm + "self_attention.dense.weight", _split(sd[hf + "self_attn.o_proj.weight"], tp, 1))
        put(nm + "mlp.dense_h_to_4h.weight", _split(sd[hf + "mlp.up_proj.weight"], tp, 0))
        put(nm + "mlp.dense_4h_to_h.weight", _split(sd[hf + "mlp.down_proj.weight"], tp, 1))
        for norm in ("input_layernorm", "post_attention_layernorm"):
            for kind in ("weight", "bias"):
                put(f"{nm}{norm}.{kind}", [sd[f"{hf}{norm}.{kind}"].clone()] * tp)
    for kind in ("weight", "bias"):
        put(f"encoder.final_layernorm.{kind}", [sd[f"model.norm.{kind}"].clone()] * tp)
    put("output_layer.weight", _split(sd["lm_head.weight"], tp, 0))
    return cfg, shards


def random_nemo(cfg: dict, vocab: int, seed: int) -> list[dict]:
    """Random-weight shards of a Megatron GPT model_config.yaml, each rank's pieces drawn in NeMo's layout (a fused
    GLU's dense_h_to_4h holds the rank's gate rows, then its up rows; row-parallel biases whole on every rank)."""
    tp, hidden, heads = cfg["tensor_model_parallel_size"], cfg["hidden_size"], cfg["num_attention_heads"]
    groups, ffn = cfg["num_query_groups"] or heads, cfg["ffn_hidden_size"]
    hd = cfg["kv_channels"] or hidden // heads
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, std=0.15, mean=0.0):
        return mean + std * torch.randn(shape, generator=g)

    norm_kinds = ("weight",) if cfg["normalization"] == "rmsnorm" else ("weight", "bias")
    norm_mean = 0.0 if cfg["normalization"] == "layernorm1p" else 1.0

    def norm(name, into):
        for kind in norm_kinds:
            into[f"{name}.{kind}"] = randn(hidden, std=0.1, mean=norm_mean) if kind == "weight" else randn(
                hidden, std=0.05)

    replicated = {}
    for i in range(cfg["num_layers"]):
        norm(f"encoder.layers.{i}.input_layernorm", replicated)
        norm(f"encoder.layers.{i}.post_attention_layernorm", replicated)
        if cfg["bias"]:
            replicated[f"encoder.layers.{i}.self_attention.dense.bias"] = randn(hidden, std=0.05)
            replicated[f"encoder.layers.{i}.mlp.dense_4h_to_h.bias"] = randn(hidden, std=0.05)
    norm("encoder.final_layernorm", replicated)
    if cfg["position_embedding_type"] == "learned_absolute":
        replicated["embedding.position_embeddings.weight"] = randn(cfg["max_position_embeddings"], hidden, std=0.5)
    else:
        replicated["rotary_pos_emb.inv_freq"] = _inv_freq(cfg)
    fused = cfg["activation"].startswith("fast-")
    separate_glu = cfg["activation"] in ("swiglu", "geglu", "reglu")
    shards = []
    for _ in range(tp):
        s = {"embedding.word_embeddings.weight": randn(vocab // tp, hidden, std=1.0)}
        if not cfg["share_embeddings_and_output_weights"]:
            s["output_layer.weight"] = randn(vocab // tp, hidden, std=0.3)
        for i in range(cfg["num_layers"]):
            layer = f"encoder.layers.{i}."
            qkv_rows = groups // tp * (heads // groups + 2) * hd
            s[layer + "self_attention.query_key_value.weight"] = randn(qkv_rows, hidden)
            s[layer + "self_attention.dense.weight"] = randn(hidden, heads * hd // tp)
            s[layer + "mlp.dense_h_to_4h.weight"] = randn((2 if fused else 1) * ffn // tp, hidden)
            if separate_glu:
                s[layer + "mlp.dense_h_to_4h_2.weight"] = randn(ffn // tp, hidden)
            s[layer + "mlp.dense_4h_to_h.weight"] = randn(hidden, ffn // tp)
            if cfg["bias"]:
                s[layer + "self_attention.query_key_value.bias"] = randn(qkv_rows, std=0.05)
                s[layer + "mlp.dense_h_to_4h.bias"] = randn((2 if fused else 1) * ffn // tp, std=0.05)
                if separate_glu:
                    s[layer + "mlp.dense_h_to_4h_2.bias"] = randn(ffn // tp, std=0.05)
        s.update(replicated)
        shards.append({"model.language_model." + k: v.clone() for k, v in s.items()})
    return shards


# --- NeMo's Megatron GPT forward, rank by rank ---


def _nemo_gelu(x):  # fused_bias_gelu.py: the tanh approximation
    return x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x)))


_NEMO_ACT = {"squared-relu": lambda x: F.relu(x) ** 2, "swiglu": F.silu, "fast-swiglu": F.silu, "gelu": _nemo_gelu}


class NemoReference:
    """NeMo's Megatron GPT (language_model.py, transformer.py, attention.py, mlp.py, pre_ln) over tensor-parallel
    shards: each rank embeds its vocabulary rows (zeros elsewhere, all-reduced), splits its query_key_value output
    into its query groups [q heads..., k, v], attends over its heads, and its dense / dense_4h_to_h give partial sums
    all-reduced before the (replicated) bias; the output layer's logits are gathered over the vocabulary. Greedy
    decoding by full recompute, stopping at EOS."""

    def __init__(self, cfg: dict, shards: list[dict]):
        self.cfg = cfg
        self.shards = [{k.removeprefix("model.language_model."): v.float() for k, v in s.items()} for s in shards]
        self.tp = len(shards)

    def _norm(self, x, name):
        s, cfg = self.shards[0], self.cfg
        eps = cfg["layernorm_epsilon"]
        if cfg["normalization"] == "rmsnorm":  # MixedFusedRMSNorm
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * s[name + ".weight"]
        weight = s[name + ".weight"] + (1.0 if cfg["normalization"] == "layernorm1p" else 0.0)  # LayerNorm1P
        return F.layer_norm(x, (x.shape[-1],), weight, s[name + ".bias"], eps)

    def _rotary(self, t, positions):  # t: [T, n, hn]; rotary_position_embedding.py
        cfg = self.cfg
        inv_freq = _inv_freq(cfg)
        pos = positions.float()
        if cfg.get("seq_len_interpolation_factor"):
            pos = pos / cfg["seq_len_interpolation_factor"]
        freqs = torch.outer(pos, inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)[:, None, :]  # [T, 1, rot_dim]
        rot = emb.shape[-1]
        t_rot, t_pass = t[..., :rot], t[..., rot:]
        x1, x2 = t_rot.chunk(2, dim=-1)
        rotated = torch.cat([-x2, x1], dim=-1)  # _rotate_half
        return torch.cat([t_rot * emb.cos() + rotated * emb.sin(), t_pass], dim=-1)

    def logits(self, ids: list[int]) -> torch.Tensor:  # [T, V]
        cfg, tp = self.cfg, self.tp
        heads, hidden = cfg["num_attention_heads"], cfg["hidden_size"]
        groups = cfg["num_query_groups"] or heads
        hd = cfg["kv_channels"] or hidden // heads
        per_group, local_groups = heads // groups, groups // tp
        act = _NEMO_ACT[cfg["activation"]]
        ids_t = torch.tensor(ids)
        positions = torch.arange(len(ids))
        x = 0
        for rank, s in enumerate(self.shards):  # VocabParallelEmbedding
            table = s["embedding.word_embeddings.weight"]
            start = rank * table.shape[0]
            local = ids_t - start
            inside = (local >= 0) & (local < table.shape[0])
            x = x + table[local.clamp(0, table.shape[0] - 1)] * inside[:, None]
        if cfg["position_embedding_type"] == "learned_absolute":
            x = x + self.shards[0]["embedding.position_embeddings.weight"][positions]
        n = len(ids)
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        for i in range(cfg["num_layers"]):
            layer = f"encoder.layers.{i}."
            h = self._norm(x, layer + "input_layernorm")
            out = 0
            for s in self.shards:
                mixed = h @ s[layer + "self_attention.query_key_value.weight"].T
                if cfg["bias"]:
                    mixed = mixed + s[layer + "self_attention.query_key_value.bias"]
                mixed = mixed.view(n, local_groups, per_group + 2, hd)  # [sq, ng, np/ng + 2, hn]
                q = mixed[:, :, :per_group].reshape(n, local_groups * per_group, hd)
                k, v = mixed[:, :, per_group], mixed[:, :, per_group + 1]  # [sq, ng, hn]
                if cfg["position_embedding_type"] == "rope":
                    q, k = self._rotary(q, positions), self._rotary(k, positions)
                k = k.repeat_interleave(per_group, dim=1)
                v = v.repeat_interleave(per_group, dim=1)
                scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(hd)
                probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
                ctx = torch.einsum("hqk,khd->qhd", probs, v).reshape(n, -1)
                out = out + ctx @ s[layer + "self_attention.dense.weight"].T  # RowParallelLinear: all-reduce
            if cfg["bias"]:
                out = out + self.shards[0][layer + "self_attention.dense.bias"]
            x = x + out
            h = self._norm(x, layer + "post_attention_layernorm")
            out = 0
            for s in self.shards:
                inter = h @ s[layer + "mlp.dense_h_to_4h.weight"].T
                if cfg["bias"]:
                    inter = inter + s[layer + "mlp.dense_h_to_4h.bias"]
                if cfg["activation"].startswith("fast-"):
                    a, b = inter.chunk(2, dim=-1)
                    inter = act(a) * b
                elif cfg["activation"] == "swiglu":
                    second = h @ s[layer + "mlp.dense_h_to_4h_2.weight"].T
                    if cfg["bias"]:
                        second = second + s[layer + "mlp.dense_h_to_4h_2.bias"]
                    inter = act(inter) * second
                else:
                    inter = act(inter)
                out = out + inter @ s[layer + "mlp.dense_4h_to_h.weight"].T
            if cfg["bias"]:
                out = out + self.shards[0][layer + "mlp.dense_4h_to_h.bias"]
            x = x + out
        x = self._norm(x, "encoder.final_layernorm")
        name = ("embedding.word_embeddings.weight" if cfg["share_embeddings_and_output_weights"]
                else "output_layer.weight")
        return torch.cat([x @ s[name].T for s in self.shards], dim=-1)  # gathered over the vocabulary

    def greedy(self, prompts, max_tokens: int) -> list[list[int]]:
        outs = []
        with torch.no_grad():
            for p in prompts:
                ids, new = list(p), []
                for _ in range(max_tokens):
                    token = int(self.logits(ids)[-1].argmax())
                    new.append(token)
                    ids.append(token)
                    if token == EOS:
                        break
                outs.append(new)
        return outs


# --- fixtures ---


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("spm")
    save_tiny_sentencepiece(path, vocab_size=VOCAB)
    return path / "tokenizer.model"


@pytest.fixture(scope="module")
def nemotron_dir(tmp_path_factory):
    """A tiny random-weight transformers Nemotron with a word-level tokenizer."""
    path = tmp_path_factory.mktemp("tiny-nemotron")
    make_tiny_nemotron(path)
    save_tiny_tokenizer(path, vocab_size=VOCAB)
    return path


@pytest.fixture(scope="module")
def nemotron_nemo(nemotron_dir, spm_model, tmp_path_factory):
    """The tiny Nemotron as .nemo files: {1: model_weights.ckpt, 2: mp_rank_00 / mp_rank_01}."""
    from transformers import NemotronForCausalLM

    hf = NemotronForCausalLM.from_pretrained(str(nemotron_dir), dtype=torch.float32)
    out = {}
    for tp in (1, 2):
        cfg, shards = nemotron_to_nemo(hf, tp)
        out[tp] = write_nemo(tmp_path_factory.mktemp(f"nemotron-tp{tp}") / f"nemotron_tp{tp}.nemo", cfg, shards,
                             spm_model)
    return out


VARIANTS = {
    # GPT-Next-like: fused SwiGLU without biases, LayerNorm1P, half the head rotated, GQA, tied head, two ranks.
    "swiglu-gqa-tp2": dict(tp=2, activation="fast-swiglu", bias=False, num_query_groups=2,
                           share_embeddings_and_output_weights=True, vocab=384),
    # Separate SwiGLU inputs with biases everywhere, RMSNorm, whole-head rotary with position interpolation, untied
    # head, one rank, a gzip archive.
    "swiglu-bias-rmsnorm": dict(tp=1, activation="swiglu", bias=True, normalization="rmsnorm", rotary_percentage=1.0,
                                rotary_base=500, seq_len_interpolation_factor=2.0, vocab=352, gzip=True),
    # The original Megatron GPT: learned positions, biased gelu MLP (fused bias: tanh gelu), LayerNorm, tied, 2 ranks.
    "gpt-learned-gelu-tp2": dict(tp=2, activation="gelu", bias=True, normalization="layernorm",
                                 position_embedding_type="learned_absolute", bias_activation_fusion=True,
                                 share_embeddings_and_output_weights=True, ffn_hidden_size=256, vocab=384),
}


@pytest.fixture(scope="module")
def variant_nemo(spm_model, tmp_path_factory):
    """name -> (.nemo path, NemoReference) of the VARIANTS, random weights drawn in NeMo's layout."""
    out = {}
    for seed, (name, spec) in enumerate(VARIANTS.items()):
        spec = dict(spec)
        tp, vocab, gzip = spec.pop("tp"), spec.pop("vocab"), spec.pop("gzip", False)
        cfg = nemo_config(tp, **spec)
        shards = random_nemo(cfg, vocab, seed=10 + seed)
        path = write_nemo(tmp_path_factory.mktemp(name) / f"{name}.nemo", cfg, shards, spm_model, gzip=gzip)
        out[name] = (path, NemoReference(cfg, shards))
    return out


# --- the Nemotron family against transformers ---


def test_nemotron_greedy_parity(nemotron_dir):
    stats = check_parity(nemotron_dir, vocab=VOCAB)
    assert max(stats["chunks"]) >= 3


def test_nemotron_tp2_and_pp2_equal_one_rank(nemotron_dir):
    check_multi_rank(nemotron_dir, vocab=VOCAB)


@pytest.mark.parametrize("mode", list(QUANT_MODE_BOUNDS))
def test_nemotron_quant_modes(nemotron_dir, mode, tmp_path_factory):
    calibration = write_word_calibration(tmp_path_factory.mktemp("calibration"), VOCAB)
    rel = check_quant_mode(nemotron_dir, mode, calibration)
    assert rel < QUANT_MODE_BOUNDS[mode], (mode, rel)


# --- .nemo files ---


def test_reference_equals_transformers_nemotron(nemotron_dir):
    """The plain-torch NeMo forward, on the two-shard layout of the tiny Nemotron, gives transformers' logits: the
    reference and the writer agree with transformers where it has the architecture."""
    from transformers import NemotronForCausalLM

    hf = NemotronForCausalLM.from_pretrained(str(nemotron_dir), dtype=torch.float32)
    ids = mixed_prompts(VOCAB)[5]
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0]
    for tp in (1, 2):
        ref = NemoReference(*nemotron_to_nemo(hf, tp))
        torch.testing.assert_close(ref.logits(ids), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("tp", [1, 2])
def test_nemo_of_nemotron_equals_transformers(nemotron_nemo, nemotron_dir, tp):
    check_parity(nemotron_nemo[tp], vocab=VOCAB, ref_dir=nemotron_dir)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_nemo_variant_equals_nemo_reference(variant_nemo, name):
    path, reference = variant_nemo[name]
    check_parity(path, vocab=VOCAB, reference=reference.greedy)


def test_engine_config_follows_model_config(variant_nemo, nemotron_nemo):
    from llmapi.engine import build_engine

    cfg = build_engine(str(variant_nemo["swiglu-gqa-tp2"][0]), device_type="cpu").config
    assert (cfg["vocab_size"], cfg["num_key_value_heads"], cfg["head_dim"], cfg["rotary_dim"]) == (384, 2, 16, 8)
    assert cfg["gated_mlp"] and cfg["hidden_act"] == "silu" and cfg["tie_word_embeddings"]
    assert not cfg["attention_bias"] and not cfg["mlp_bias"] and cfg["norm_type"] == "layernorm"
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (1, [EOS])
    cfg = build_engine(str(variant_nemo["swiglu-bias-rmsnorm"][0]), device_type="cpu").config
    assert cfg["norm_type"] == "rmsnorm" and cfg["rotary_dim"] == 16 and cfg["rotary_base"] == 500
    assert cfg["rotary_scaling"] == {"rope_type": "linear", "factor": 2.0} and not cfg["tie_word_embeddings"]
    cfg = build_engine(str(variant_nemo["gpt-learned-gelu-tp2"][0]), device_type="cpu").config
    assert cfg["position_embedding_type"] == "learned_absolute" and cfg["hidden_act"] == "gelu_pytorch_tanh"
    cfg = build_engine(str(nemotron_nemo[1]), device_type="cpu").config
    assert (cfg["hidden_act"], cfg["gated_mlp"], cfg["rotary_dim"], cfg["vocab_size"]) == ("relu2", False, 8, VOCAB)


def test_text_prompts_tokenize_as_sentencepiece(nemotron_nemo, spm_model):
    """The engine's tokenizer, built from the archive's tokenizer.model, encodes as SentencePiece (no BOS added, as
    NeMo's generation) and decodes as SentencePiece does."""
    import sentencepiece as spm

    from llmapi.tokenizer import load_tokenizer

    sp = spm.SentencePieceProcessor(model_file=str(spm_model))
    text = "the quick brown fox jumps over   the lazy dog 12345, once upon a time"
    with LLM(str(nemotron_nemo[1]), dtype="float32") as llm:
        out = llm.generate([text], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True), use_tqdm=False)[0]
        tokenizer = load_tokenizer(llm.engine_info.path)
    assert list(out.prompt_token_ids) == sp.encode(text)
    assert len(out.outputs[0].token_ids) == 8
    for t in (text, " leading space and\nnew line", "ünïcödé bytes 漢字"):
        ids = sp.encode(t)
        assert tokenizer.encode(t) == ids and tokenizer.decode(ids) == sp.decode(ids)


def test_hub_resolves_nemo_files(nemotron_nemo, tmp_path):
    source = resolve_source(str(nemotron_nemo[2]))
    assert source.kind == "nemo" and source.path == nemotron_nemo[2]
    assert resolve_source(str(nemotron_nemo[2].parent)).kind == "nemo"  # a folder with one .nemo (a hub repo)
    copy = tmp_path / "copy.nemo"
    copy.write_bytes(nemotron_nemo[1].read_bytes())
    (tmp_path / "other.nemo").write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match="2 .nemo files"):
        resolve_source(str(tmp_path))
    before = resolve_source(str(copy)).identity
    assert resolve_source(str(copy)).identity == before
    copy.write_bytes(nemotron_nemo[2].read_bytes())  # new content: a new engine cache key
    assert resolve_source(str(copy)).identity != before


# --- what is not converted ---


@pytest.mark.parametrize("option,value", [
    ("mcore_gpt", True),
    ("activation", "reglu"),
    ("activation", "fast-geglu"),
    ("normalization", "low_precision_layernorm"),
    ("position_embedding_type", "alibi"),
    ("transformer_block_type", "post_ln"),
    ("megatron_legacy", True),
    ("pipeline_model_parallel_size", 2),
    ("num_moe_experts", 8),
    ("headscale", True),
])
def test_unsupported_option_is_named(nemotron_dir, spm_model, tmp_path, option, value):
    from transformers import NemotronForCausalLM

    cfg, shards = nemotron_to_nemo(NemotronForCausalLM.from_pretrained(str(nemotron_dir), dtype=torch.float32), 1)
    path = write_nemo(tmp_path / "bad.nemo", {**cfg, option: value}, shards, spm_model)
    with pytest.raises(UnsupportedModelError, match=rf"{option}={value!r} is not supported"):
        LLM(str(path), dtype="float32")


def _nemotron_layout(nemotron_dir, tp):
    from transformers import NemotronForCausalLM

    return nemotron_to_nemo(NemotronForCausalLM.from_pretrained(str(nemotron_dir), dtype=torch.float32), tp)


def test_broken_archives_get_typed_errors(nemotron_dir, spm_model, tmp_path):
    cfg, shards = _nemotron_layout(nemotron_dir, 2)
    cases = {
        # model_config.yaml says one rank, the archive holds two
        "tp": (dict(cfg, tensor_model_parallel_size=1), shards, "tensor_model_parallel_size 1"),
        # a tensor NeMo's model does not have
        "unknown": (cfg, [dict(shards[0], **{"model.language_model.encoder.layers.0.adapter.weight":
                                             torch.zeros(2)}), shards[1]], "adapter.weight"),
        # a missing layer norm
        "missing": (cfg, [{k: v for k, v in s.items() if "final_layernorm.bias" not in k} for s in shards],
                    "final_layernorm.bias"),
        # query groups the shards do not hold
        "shape": (dict(cfg, num_query_groups=4), shards, "query_key_value"),
    }
    for name, (c, s, match) in cases.items():
        path = write_nemo(tmp_path / f"{name}.nemo", c, s, spm_model)
        with pytest.raises(UnsupportedModelError, match=match):
            LLM(str(path), dtype="float32")
    # Layouts of the archive this reader does not take, each named.
    config_yaml = yaml.safe_dump(cfg).encode()
    shard_bytes = io.BytesIO()
    torch.save(shards[0], shard_bytes)
    layouts = {
        "gap": ({"mp_rank_00/model_weights.ckpt": shard_bytes.getvalue(),
                 "mp_rank_02/model_weights.ckpt": shard_bytes.getvalue()}, "mp_rank_01"),
        "pipeline": ({"tp_rank_00_pp_rank_000/model_weights.ckpt": shard_bytes.getvalue()}, "pipeline-parallel"),
        "distributed": ({"model_weights/common.pt": b"0" * 16}, "distributed checkpoint"),
        "both": ({"model_weights.ckpt": shard_bytes.getvalue(), "mp_rank_00/model_weights.ckpt":
                  shard_bytes.getvalue()}, "both"),
    }
    for name, (files, match) in layouts.items():
        path = tmp_path / f"{name}.nemo"
        with tarfile.open(path, "w") as tar:
            for member, data in {"model_config.yaml": config_yaml, **files}.items():
                info = tarfile.TarInfo("./" + member)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        with pytest.raises(UnsupportedModelError, match=match):
            LLM(str(path), dtype="float32")
    (tmp_path / "junk.nemo").write_bytes(b"not a tar archive at all" * 100)
    with pytest.raises(UnsupportedModelError, match="not a .nemo file"):
        LLM(str(tmp_path / "junk.nemo"))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("./model_weights.ckpt")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"abcd"))
    (tmp_path / "noconfig.nemo").write_bytes(buf.getvalue())
    with pytest.raises(UnsupportedModelError, match="no model_config.yaml"):
        LLM(str(tmp_path / "noconfig.nemo"))
