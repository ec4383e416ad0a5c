"""Tiny seeded random-weight HF models, and a driver that runs our models over a paged KV cache like the runner."""

import torch

from llmapi.layers.attention import AttentionMetadata


def _spread_weights(model, seed: int, std: float, embed_std: float) -> None:
    """Re-draw weights wider than HF's init (std 0.02) so logits are far from uniform and argmax is stable."""
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or ".ln_" in name or name.startswith("transformer.ln_f"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=generator))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=generator))
            elif "embed" in name or "wte" in name or "wpe" in name:
                p.copy_(embed_std * torch.randn(p.shape, generator=generator))
            elif "lm_head" in name:
                p.copy_(2 * std * torch.randn(p.shape, generator=generator))
            else:
                p.copy_(std * torch.randn(p.shape, generator=generator))


def make_tiny_llama(path=None, seed: int = 0, std: float = 0.15, **overrides):
    """A tiny transformers LlamaForCausalLM (GQA, untied head by default) in float32; saved to `path` if given.

    `overrides` are LlamaConfig fields, e.g. tie_word_embeddings=True, rope_theta=..., rope_scaling={...}. `std`: the
    projections' weights (0.15 suits the default width 64; wider models that lossy paths are compared on by the
    top-5 rule want about 0.15 * sqrt(64 / hidden_size), or their attention logits grow with the width until a
    rounding flips which key wins).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    fields = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    fields.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**fields)).eval()
    _spread_weights(model, seed, std=std, embed_std=1.0)
    if path is not None:
        model.save_pretrained(path)
    return model


def make_tiny_gpt2(path=None, seed: int = 0, **overrides):
    """A tiny transformers GPT2LMHeadModel (tied head, gelu_new) in float32; saved to `path` if given."""
    from transformers import GPT2Config, GPT2LMHeadModel

    fields = dict(vocab_size=288, n_embd=64, n_layer=3, n_head=4, n_positions=256,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    fields.update(overrides)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(**fields)).eval()
    _spread_weights(model, seed, std=0.15, embed_std=0.5)
    if path is not None:
        model.save_pretrained(path)
    return model


def to_engine_model(hf_model, dtype=torch.float32, device="cpu"):
    """Convert a transformers model with llmapi's converter and load it into llmapi's model class."""
    from llmapi.models import convert_hf, get_model_class

    hf_config = hf_model.config.to_dict()
    hf_config.setdefault("architectures", [type(hf_model).__name__])
    engine_config, weights = convert_hf(hf_config, hf_model.state_dict(), dtype)
    model = get_model_class(engine_config["architecture"])(engine_config, device, dtype)
    model.load_weights(weights)
    return model.eval(), engine_config


class PagedDriver:
    """Feeds requests' tokens to a model step by step over a paged KV cache with scattered block ids."""

    def __init__(self, model, engine_config: dict, num_blocks: int = 96, tokens_per_block: int = 4,
                 dtype=torch.float32, seed: int = 0, device="cpu"):
        shape = (2, num_blocks, tokens_per_block, engine_config["num_key_value_heads"], engine_config["head_dim"])
        self.kv_caches = [torch.zeros(shape, dtype=dtype, device=device)
                          for _ in range(engine_config["num_hidden_layers"])]
        self.device = device
        # Hand out block ids in a shuffled order so that no request's blocks are contiguous.
        self.free_blocks = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed)).tolist()
        self.model, self.tokens_per_block = model, tokens_per_block
        self.blocks: dict[int, list[int]] = {}
        self.num_computed: dict[int, int] = {}

    def step(self, chunks: dict[int, list[int]]) -> dict[int, torch.Tensor]:
        """Run one packed step: request id -> its next tokens. Returns request id -> logits [len, V] float32."""
        ids, positions, query_lens, context_lens = [], [], [], []
        for rid, tokens in chunks.items():
            start = self.num_computed.get(rid, 0)
            end = start + len(tokens)
            table = self.blocks.setdefault(rid, [])
            while len(table) * self.tokens_per_block < end:
                table.append(self.free_blocks.pop())
            ids += tokens
            positions += range(start, end)
            query_lens.append(len(tokens))
            context_lens.append(end)
            self.num_computed[rid] = end
        width = max(len(self.blocks[rid]) for rid in chunks) + 1  # +1: padding the runner may leave
        tables = [self.blocks[rid] + [0] * (width - len(self.blocks[rid])) for rid in chunks]
        attn = AttentionMetadata.build(query_lens, context_lens, tables, self.tokens_per_block, device=self.device)
        input_ids, positions = torch.tensor(ids, device=self.device), torch.tensor(positions, device=self.device)
        with torch.no_grad():
            hidden = self.model(input_ids, positions, attn, self.kv_caches)  # [T, H]
            logits = self.model.compute_logits(hidden).cpu()  # [T, V]
        return dict(zip(chunks, logits.split(query_lens)))


def engine_logits(engine_dir, prompts, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """Logits [sum L, V] of an engine directory's model (quantized or not) over `prompts`, one prefill step."""
    from llmapi.distributed.mapping import Mapping
    from llmapi.distributed.sharding import build_rank_model, load_rank_model
    from llmapi.engine import read_engine

    cfg, _ = read_engine(engine_dir)
    model = build_rank_model(cfg, Mapping(1, 1), device, dtype)
    load_rank_model(model, engine_dir, 0, False, cfg, dtype, device)
    out = PagedDriver(model.eval(), cfg, dtype=dtype, device=device).step(dict(enumerate(prompts)))
    return torch.cat([out[i] for i in range(len(prompts))])


QUANT_PROMPTS = [[5, 9, 17, 33, 4, 100, 7, 250], [3, 60, 61]]
"""Prompts whose logits compare a quantized engine with its float twin (prefill only)."""


def logits_rel_error(float_engine_dir, quantized_engine_dir, prompts=QUANT_PROMPTS) -> float:
    """|quantized - float| / |float| of the two engines' logits over `prompts` (float32, CPU)."""
    fp = engine_logits(float_engine_dir, prompts)
    return float((engine_logits(quantized_engine_dir, prompts) - fp).norm() / fp.norm())


def check_cached_engine_generates(model, llm, builds: int, **llm_kwargs) -> None:
    """`llm` generates 6 greedy tokens; a second LLM of the same settings converts nothing (engine cache hit,
    `builds` conversions so far) and generates the same tokens."""
    from llmapi import LLM, SamplingParams
    from llmapi.engine import cache

    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    out = llm.generate([[5, 9, 17, 33, 4]], params)[0].outputs[0]
    assert len(out.token_ids) == 6
    with LLM(str(model), **llm_kwargs) as again:
        assert not again.engine_built and cache.stats.builds == builds
        assert again.generate([[5, 9, 17, 33, 4]], params)[0].outputs[0].token_ids == out.token_ids


def make_tiny_codellama(path=None, seed: int = 0, **overrides):
    """A tiny LlamaForCausalLM shaped like CodeLlama 7B/13B where it differs from Llama 2: rope_theta 1e6, the
    32016-token vocabulary (32000 + the infilling tokens) and 16K positions; saved to `path` if given."""
    fields = dict(rope_theta=1e6, vocab_size=32016, max_position_embeddings=16384)
    fields.update(overrides)
    return make_tiny_llama(path, seed=seed, **fields)


META_PARAMS = dict(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=-1, multiple_of=32, ffn_dim_multiplier=None,
                   norm_eps=1e-5)
"""params.json of the tiny Meta checkpoints: Llama 2's fields (vocab_size -1: the tokenizer's) at tiny sizes."""


def make_meta_checkpoint(path, num_shards: int = 1, vocab_size: int = 320, seed: int = 0,
                         vocab_parallel_embedding: bool = False, **params) -> dict:
    """Write a random-weight Meta-format Llama checkpoint into `path`: params.json and one consolidated.NN.pth per
    model-parallel rank, each holding that rank's pieces under Meta's tensor names, as Meta's model.py lays them
    out (fairscale ColumnParallelLinear wq/wk/wv/w1/w3/output: rows split; RowParallelLinear wo/w2: columns split;
    tok_embeddings a ParallelEmbedding, embedding dim split, or with vocab_parallel_embedding Llama 3's
    VocabParallelEmbedding, rows split; norms replicated). wq / wk are random in Meta's own (interleaved rotary)
    layout: nothing here knows about HF's. `params` override META_PARAMS; returns the params written."""
    import json
    import math
    from pathlib import Path

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    p = dict(META_PARAMS, **params)
    n = num_shards
    dim, heads, kv_heads = p["dim"], p["n_heads"], p["n_kv_heads"] or p["n_heads"]
    head_dim = dim // heads
    hidden = int(2 * (4 * dim) / 3)
    if p.get("ffn_dim_multiplier") is not None:
        hidden = int(p["ffn_dim_multiplier"] * hidden)
    hidden = p["multiple_of"] * math.ceil(hidden / p["multiple_of"])
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, std=0.15, mean=0.0):
        return mean + std * torch.randn(shape, generator=generator)

    norms = {"norm.weight": randn(dim, std=0.1, mean=1.0)}
    for i in range(p["n_layers"]):
        norms[f"layers.{i}.attention_norm.weight"] = randn(dim, std=0.1, mean=1.0)
        norms[f"layers.{i}.ffn_norm.weight"] = randn(dim, std=0.1, mean=1.0)
    for rank in range(n):
        shard = dict(norms)  # replicated on every rank
        shard["tok_embeddings.weight"] = (randn(vocab_size // n, dim, std=1.0) if vocab_parallel_embedding
                                          else randn(vocab_size, dim // n, std=1.0))
        shard["output.weight"] = randn(vocab_size // n, dim, std=0.3)
        for i in range(p["n_layers"]):
            layer = f"layers.{i}."
            shard[layer + "attention.wq.weight"] = randn(heads * head_dim // n, dim)
            shard[layer + "attention.wk.weight"] = randn(kv_heads * head_dim // n, dim)
            shard[layer + "attention.wv.weight"] = randn(kv_heads * head_dim // n, dim)
            shard[layer + "attention.wo.weight"] = randn(dim, heads * head_dim // n)
            shard[layer + "feed_forward.w1.weight"] = randn(hidden // n, dim)
            shard[layer + "feed_forward.w2.weight"] = randn(dim, hidden // n)
            shard[layer + "feed_forward.w3.weight"] = randn(hidden // n, dim)
        torch.save({k: v.clone() for k, v in shard.items()}, path / f"consolidated.{rank:02d}.pth")
    (path / "params.json").write_text(json.dumps({k: v for k, v in p.items() if v is not None}))
    return p


def save_tiny_sentencepiece(path, vocab_size: int = 320) -> None:
    """Train a SentencePiece BPE tokenizer.model (Llama's settings: byte fallback, <unk>=0 <s>=1 </s>=2, no
    normalization, digits split) on a few sentences into `path`; exactly `vocab_size` pieces."""
    import io
    from pathlib import Path

    import sentencepiece as spm
    from tiny_tokenizer import SENTENCES

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SENTENCES * 20), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0,
        normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True, minloglevel=2)
    (Path(path) / "tokenizer.model").write_bytes(model.getvalue())


def make_tiny_gpt_bigcode(path=None, seed: int = 0, **overrides):
    """A tiny transformers GPTBigCodeForCausalLM (multi-query by default, tied head, gelu_pytorch_tanh) in float32;
    saved to `path` if given. `overrides` are GPTBigCodeConfig fields, e.g. multi_query=False. Its weights are
    spread wider than the GPT-2's (std 0.3, embeddings 1.0): at 0.15 most prompts' greedy tokens repeat one token."""
    from transformers import GPTBigCodeConfig, GPTBigCodeForCausalLM

    fields = dict(vocab_size=288, n_embd=64, n_layer=3, n_head=4, n_positions=256,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    fields.update(overrides)
    torch.manual_seed(seed)
    model = GPTBigCodeForCausalLM(GPTBigCodeConfig(**fields)).eval()
    _spread_weights(model, seed, std=0.3, embed_std=1.0)
    if path is not None:
        model.save_pretrained(path)
    return model


def make_tiny_opt(path=None, seed: int = 0, **overrides):
    """A tiny transformers OPTForCausalLM (pre-norm, ReLU, tied head) in float32; saved to `path` if given.
    `overrides` are OPTConfig fields, e.g. do_layer_norm_before=False, word_embed_proj_dim=32 (OPT-350m's shape)."""
    from transformers import OPTConfig, OPTForCausalLM

    fields = dict(vocab_size=288, hidden_size=64, ffn_dim=128, num_hidden_layers=3, num_attention_heads=4,
                  max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    fields.update(overrides)
    torch.manual_seed(seed)
    model = OPTForCausalLM(OPTConfig(**fields)).eval()
    _spread_weights(model, seed, std=0.15, embed_std=0.5)
    if path is not None:
        model.save_pretrained(path)
    return model


def save_santacoder_checkpoint(hf_model, path) -> None:
    """Write `hf_model`'s weights into `path` in the original bigcode/santacoder remote-code layout
    (modeling_gpt2_mq.py / configuration_gpt2_mq.py): a GPT-2 config with `attention_head_type` and architectures
    ["GPT2LMHeadCustomModel"], GPT-2 tensor names, every linear a GPT-2 Conv1D (weight [in, out]).

    A GPTBigCodeForCausalLM with multi_query=True becomes "multiquery": c_attn's rows (q [H], k [hd], v [hd]) are
    SantaCoder's attn.q_attn ([H, H]) and attn.kv_attn ([H, 2 hd], key then value). A GPT2LMHeadModel becomes
    "multihead": its blocks are SantaCoder's multi-head blocks (attn.c_attn [H, 3H], q, k, v blocks) unchanged.
    Each layer also holds the causal-mask buffers (attn.bias, attn.masked_bias) the remote code saved."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    cfg = hf_model.config
    hidden, heads, layers = cfg.n_embd, cfg.n_head, cfg.n_layer
    sd = {k: v.detach().clone() for k, v in hf_model.state_dict().items()}
    out = {k: sd[k] for k in ("transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight",
                              "transformer.ln_f.bias")}
    gpt2 = cfg.model_type == "gpt2"
    for i in range(layers):
        p = f"transformer.h.{i}."
        for name in ("ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias",
                     "attn.c_proj.bias", "mlp.c_fc.bias", "mlp.c_proj.bias"):
            out[p + name] = sd[p + name]
        for name in ("attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"):
            out[p + name] = sd[p + name] if gpt2 else sd[p + name].t()  # nn.Linear [out, in] -> Conv1D [in, out]
        if gpt2:
            for name in ("attn.c_attn.weight", "attn.c_attn.bias"):
                out[p + name] = sd[p + name]
        else:
            w, b = sd[p + "attn.c_attn.weight"], sd[p + "attn.c_attn.bias"]  # [H + 2hd, H], [H + 2hd]
            out[p + "attn.q_attn.weight"], out[p + "attn.kv_attn.weight"] = w[:hidden].t(), w[hidden:].t()
            out[p + "attn.q_attn.bias"], out[p + "attn.kv_attn.bias"] = b[:hidden], b[hidden:]
        positions = cfg.n_positions
        out[p + "attn.bias"] = torch.tril(torch.ones(positions, positions, dtype=torch.uint8))[None, None]
        out[p + "attn.masked_bias"] = torch.tensor(-1e4)
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in out.items()}, str(path / "model.safetensors"))
    config = {
        "architectures": ["GPT2LMHeadCustomModel"], "model_type": "gpt2",
        "auto_map": {"AutoConfig": "configuration_gpt2_mq.GPT2CustomConfig",
                     "AutoModelForCausalLM": "modeling_gpt2_mq.GPT2LMHeadCustomModel"},
        "attention_head_type": "multihead" if gpt2 else "multiquery",
        "vocab_size": cfg.vocab_size, "n_positions": cfg.n_positions, "n_embd": hidden, "n_layer": layers,
        "n_head": heads, "n_inner": cfg.n_inner, "activation_function": cfg.activation_function,
        "layer_norm_epsilon": cfg.layer_norm_epsilon, "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
        "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
        "tie_word_embeddings": cfg.tie_word_embeddings,
    }
    (path / "config.json").write_text(json.dumps(config, indent=1))


def make_tiny_starcoder2(path=None, seed: int = 0, **overrides):
    """A tiny transformers Starcoder2ForCausalLM (GQA, biases, LayerNorm, gelu_pytorch_tanh MLP, rope_theta 1e6,
    tied head) in float32; saved to `path` if given. `overrides` are Starcoder2Config fields, e.g.
    sliding_window=16 (None: no window)."""
    from transformers import Starcoder2Config, Starcoder2ForCausalLM

    fields = dict(vocab_size=320, hidden_size=64, intermediate_size=256, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, norm_epsilon=1e-5,
                  rope_parameters={"rope_type": "default", "rope_theta": 1e6}, sliding_window=16, use_bias=True,
                  hidden_act="gelu_pytorch_tanh", tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                  pad_token_id=0)
    fields.update(overrides)
    torch.manual_seed(seed)
    model = Starcoder2ForCausalLM(Starcoder2Config(**fields)).eval()
    _spread_weights(model, seed, std=0.15, embed_std=1.0)
    if path is not None:
        model.save_pretrained(path)
    return model


def make_tiny_nemotron(path=None, seed: int = 0, **overrides):
    """A tiny transformers NemotronForCausalLM (LayerNorm1P, squared-ReLU MLP, partial rotary 0.5, GQA, untied head)
    in float32; saved to `path` if given. LayerNorm1P stores w - 1, so its norm weights are drawn around 0."""
    from transformers import NemotronConfig, NemotronForCausalLM

    fields = dict(vocab_size=320, hidden_size=64, intermediate_size=192, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, norm_eps=1e-5,
                  hidden_act="relu2", rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                       "partial_rotary_factor": 0.5},
                  tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    fields.update(overrides)
    torch.manual_seed(seed)
    model = NemotronForCausalLM(NemotronConfig(**fields)).eval()
    _spread_weights(model, seed, std=0.15, embed_std=1.0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm.weight" in name or name == "model.norm.weight":
                p.sub_(1.0)  # stored as w - 1: the model runs with weights around 1
    if path is not None:
        model.save_pretrained(path)
    return model


QUANT_MODE_BOUNDS = {
    "int8_weight_only": 0.03, "int4_weight_only": 0.45, "int4_awq": 0.45, "fp8": 0.16, "fp8_per_token": 0.14,
    "smoothquant": 0.06, "int8_kv_cache": 0.03, "fp8_kv_cache": 0.06,
}
"""Every LLM(quant=...) mode a family must take, with the relative logits error bound the tiny Llama's tests set for
it (tests/test_quant_*.py, tests/test_kv_cache_quant.py; see check_quant_mode)."""


def write_word_calibration(directory, vocab_size: int, lines: int = 16, words_per_line: int = 40):
    """A calibration text file for the tiny word-level tokenizer: its sentences, then lines of its filler words
    w<id> in a shuffled order (English text would read as <unk> to it). Returns the file's path."""
    import random
    from pathlib import Path

    from tiny_tokenizer import SENTENCES

    words = [f"w{i}" for i in random.Random(0).sample(range(32, vocab_size), vocab_size - 32)]
    text = list(SENTENCES) + [" ".join(words[i:i + words_per_line]) for i in range(0, len(words), words_per_line)]
    path = Path(directory) / "calibration.txt"
    path.write_text("\n".join(text[:lines]) + "\n")
    return path


def quant_mode_config(mode: str, calibration=None):
    """The QuantConfig of LLM(quant=mode); calibrated modes read `calibration` (16 samples of <= 64 tokens). AWQ
    takes groups of 64, which divide the tiny models' 64 hidden features (its default 128 does not)."""
    import dataclasses

    from llmapi.quantization import resolve_quant

    quant = resolve_quant(mode)
    if quant.quant_algo == "W4A16_AWQ":
        quant = dataclasses.replace(quant, group_size=64)
    if quant.needs_calibration and calibration is not None:
        quant = dataclasses.replace(quant, calibration_dataset=str(calibration), calibration_samples=16,
                                    calibration_max_seq_len=64, calibration_dataset_sha256=None)
    return quant


def cached_logits(engine_dir, prompts, steps: int = 3) -> torch.Tensor:
    """Logits [sum L, V] of an engine's model (quantized weights and KV cache as its config says) over `prompts`,
    each fed in `steps` chunks, so later chunks read the earlier ones' K/V back from the cache."""
    from llmapi.distributed.mapping import Mapping
    from llmapi.distributed.sharding import build_rank_model, load_rank_model
    from llmapi.engine import read_engine
    from llmapi.quantization import kv_cache

    cfg, _ = read_engine(engine_dir)
    model = build_rank_model(cfg, Mapping(1, 1), "cpu", torch.float32)
    load_rank_model(model, engine_dir, 0, False, cfg, torch.float32, "cpu")
    driver = PagedDriver(model.eval(), cfg, dtype=kv_cache.kv_cache_dtype(cfg, torch.float32))
    outs = {i: [] for i in range(len(prompts))}
    for s in range(steps):
        chunk = {i: p[s * len(p) // steps:(s + 1) * len(p) // steps] for i, p in enumerate(prompts)}
        for i, logits in driver.step(chunk).items():
            outs[i].append(logits)
    return torch.cat([torch.cat(outs[i]) for i in range(len(prompts))])


CACHE_PROMPTS = [[5, 9, 17, 33, 4, 100, 7, 250, 11, 12, 13, 14, 40, 41, 42, 43, 44, 45, 46, 47, 48],
                 [3, 60, 61, 62, 80, 90, 91, 92, 93]]
"""Prompts of check_quant_mode: the first is longer than a window of 16."""


def check_quant_mode(model, mode: str, calibration=None, prompts=CACHE_PROMPTS) -> float:
    """LLM(model, quant=mode) converts the model (calibrating on `calibration` where the mode needs it) and generates
    greedily; returns |quantized - float| / |float| of the logits over `prompts` through each engine's cache."""
    from llmapi import LLM, SamplingParams
    from llmapi.engine import build_engine

    quant = quant_mode_config(mode, calibration)
    with LLM(str(model), device="cpu", quant=quant) as llm:
        assert llm.engine_info.config["quantization"] == quant.to_dict()
        out = llm.generate([prompts[0]], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True),
                           use_tqdm=False)[0].outputs[0]
        assert len(out.token_ids) == 4
        quantized = llm.engine_info.path
    float_engine = build_engine(str(model), device_type="cpu").path
    fp = cached_logits(float_engine, prompts)
    return float((cached_logits(quantized, prompts) - fp).norm() / fp.norm())


def make_tiny_draft_llama(path=None, seed: int = 1, **overrides):
    """A smaller tiny Llama with make_tiny_llama's vocabulary (a speculative draft model): 1 layer, hidden 32, its
    own weights (seed); saved to `path` if given. `overrides` are LlamaConfig fields."""
    fields = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1)
    fields.update(overrides)
    return make_tiny_llama(path, seed=seed, **fields)


def make_tiny_eagle_head(path, target_config, seed: int = 0, num_layers: int = 1, fc_bias: bool = True,
                         embed_tokens: bool = False) -> dict:
    """A random-weight EAGLE-1 head for a Llama target (`target_config`: its transformers LlamaConfig), written in
    EAGLE's published layout (SafeAILab/EAGLE, model/cnets1.py): config.json (the target's LlamaConfig with
    num_hidden_layers=num_layers and "bias": fc_bias) and pytorch_model.bin holding fc.weight [H, 2H] (+ fc.bias),
    layers.N.self_attn.{q,k,v,o}_proj, layers.N.mlp.{gate,up,down}_proj, layers.N.post_attention_layernorm and, for
    N > 0, layers.N.input_layernorm (none on layer 0), and embed_tokens.weight if asked. Returns the state dict."""
    import json
    from pathlib import Path

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    c = target_config
    hidden, inter, heads, kv_heads = c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads
    head_dim = hidden // heads
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, std=0.15, mean=0.0):
        return mean + std * torch.randn(shape, generator=generator)

    state = {"fc.weight": randn(hidden, 2 * hidden, std=0.2)}
    if fc_bias:
        state["fc.bias"] = randn(hidden, std=0.05)
    for i in range(num_layers):
        layer = f"layers.{i}."
        state[layer + "self_attn.q_proj.weight"] = randn(heads * head_dim, hidden)
        state[layer + "self_attn.k_proj.weight"] = randn(kv_heads * head_dim, hidden)
        state[layer + "self_attn.v_proj.weight"] = randn(kv_heads * head_dim, hidden)
        state[layer + "self_attn.o_proj.weight"] = randn(hidden, heads * head_dim)
        state[layer + "mlp.gate_proj.weight"] = randn(inter, hidden)
        state[layer + "mlp.up_proj.weight"] = randn(inter, hidden)
        state[layer + "mlp.down_proj.weight"] = randn(hidden, inter)
        state[layer + "post_attention_layernorm.weight"] = randn(hidden, std=0.1, mean=1.0)
        if i > 0:
            state[layer + "input_layernorm.weight"] = randn(hidden, std=0.1, mean=1.0)
    if embed_tokens:
        state["embed_tokens.weight"] = randn(c.vocab_size, hidden, std=1.0)
    config = c.to_dict()
    config.update(num_hidden_layers=num_layers, bias=fc_bias, architectures=["LlamaForCausalLM"])
    (path / "config.json").write_text(json.dumps(config, indent=1))
    torch.save(state, path / "pytorch_model.bin")
    return state
