"""Calibration: run the float engine model over text and record the activation ranges quantization needs."""

from __future__ import annotations

import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llmapi.errors import MissingDependencyError

DEFAULT_DATASET = "gensim/test/test_data/lee_background.cor"
"""The default calibration text (300 news articles, one per line), shipped inside gensim's wheel: no network."""
_TOKENS_PER_STEP = 4096  # texts are packed into forward passes of about this many tokens


@dataclass
class ActivationStats:
    """What calibration saw at the input of each quantized linear and in each layer's K/V."""

    input_amax: dict[str, torch.Tensor] = field(default_factory=dict)
    """"transformer.layers.{i}.attention.qkv" -> [K] float32 per-input-channel max |x| over calibration tokens."""
    input_abs_mean: dict[str, torch.Tensor] = field(default_factory=dict)
    """Same keys -> [K] float32 mean |x| over calibration tokens (collected with hessians=True)."""
    input_hessian: dict[str, torch.Tensor] = field(default_factory=dict)
    """Same keys -> [K, K] float32 mean of x^T x over calibration tokens (hessians=True): the mean squared output
    error of a weight error D [N, K] is tr(D H D^T)."""
    kv_amax: dict[int, tuple[float, float]] = field(default_factory=dict)
    """Layer -> (max |k| after rotary, max |v|) over calibration tokens; an encoder-decoder model's decoder
    layer -> its self-attention's (max |k|, max |v|) over the decoder tokens."""
    cross_kv_amax: dict[int, tuple[float, float]] = field(default_factory=dict)
    """Encoder-decoder models: decoder layer -> its cross-attention's (max |k|, max |v|), the K/V of the encoder
    output (over the encoder tokens); empty for decoder-only models."""
    num_tokens: int = 0
    """Calibration tokens the statistics cover."""


def _gensim_file(relative: str) -> Path:
    """A file of gensim's wheel, found through its package directory (no import of gensim itself: it is slow)."""
    import importlib.util

    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(
            "the default calibration text comes from the gensim package, which is not installed: "
            "pip install 'llmapi[quant]' (or gensim), or pass a calibration dataset")
    path = Path(next(iter(spec.submodule_search_locations))).parent / relative
    if not path.is_file():
        raise MissingDependencyError(f"the installed gensim lacks {relative}: reinstall gensim from its wheel")
    return path


def calibration_texts(dataset: str | os.PathLike | Sequence[str] | None = None, num_samples: int = 64,
                      seed: int = 0) -> list[str]:
    """Up to `num_samples` non-empty calibration texts, drawn at random (by `seed`) without repetition.

    dataset: None (gensim's lee_background.cor), a path to a text file (one sample per line), or a list of strings.
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples={num_samples!r} is invalid: must be an int >= 1")
    if dataset is None:
        lines = _gensim_file(DEFAULT_DATASET).read_text(encoding="utf-8", errors="replace").splitlines()
    elif isinstance(dataset, (str, os.PathLike)):
        path = Path(dataset)
        if not path.is_file():
            raise ValueError(f"calibration dataset={os.fspath(dataset)!r} is not a file (one sample per line)")
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    elif isinstance(dataset, Sequence) and all(isinstance(t, str) for t in dataset):
        lines = list(dataset)
    else:
        raise ValueError(f"calibration dataset={dataset!r} is invalid: must be None, a path or a list of strings")
    texts = [t.strip() for t in lines if t.strip()]
    if not texts:
        raise ValueError(f"calibration dataset={dataset!r} holds no non-empty text")
    if len(texts) <= num_samples:
        return texts
    return [texts[i] for i in sorted(random.Random(seed).sample(range(len(texts)), num_samples))]


class _Recorder:
    """Running per-channel amax and, with hessians, the sums of |x| and of x^T x (on the model's device)."""

    def __init__(self, hessians: bool):
        self.hessians = hessians
        self.amax: dict[str, torch.Tensor] = {}
        self.abs_sum: dict[str, torch.Tensor] = {}
        self.xtx: dict[str, torch.Tensor] = {}
        self.kv_amax: dict[int, list[float]] = {}
        self.cross_kv_amax: dict[int, list[float]] = {}
        self.rows: dict = {}  # rows each linear saw (its means' divisor)

    def linear_input(self, name: str, x: torch.Tensor) -> None:  # x: [T, K]
        self.rows[name] = self.rows.get(name, 0) + x.shape[0]
        x = x.detach().float()
        amax = x.abs().amax(dim=0)  # [K]
        self.amax[name] = amax if name not in self.amax else torch.maximum(self.amax[name], amax)
        if not self.hessians:
            return
        if name not in self.xtx:
            self.abs_sum[name] = torch.zeros_like(amax)
            self.xtx[name] = torch.zeros(x.shape[1], x.shape[1], device=x.device)
        self.abs_sum[name] += x.abs().sum(dim=0)
        self.xtx[name].addmm_(x.T, x)

    def kv(self, layer: int, k: torch.Tensor, v: torch.Tensor, cross: bool = False) -> None:
        """Running max |k| and max |v| of a layer's cache (`cross`: an encoder-decoder layer's cross-attention)."""
        seen = self.cross_kv_amax if cross else self.kv_amax
        old = seen.get(layer, [0.0, 0.0])
        seen[layer] = [max(old[0], float(k.detach().abs().amax())), max(old[1], float(v.detach().abs().amax()))]


def _attention_hook(recorder: _Recorder, layer: int):
    """A forward pre-hook on a layer's Attention: records |k| after rotary (as the cache stores it) and |v|."""
    from llmapi.layers.rotary import rotate_qk

    def hook(module, args, kwargs):
        q, k, v = args[:3]  # [T, nh, hd], [T, nkv, hd], [T, nkv, hd]
        rotary = kwargs.get("rotary", args[5] if len(args) > 5 else None)
        if rotary is not None:
            k = rotate_qk(q, k, *rotary)[1]
        recorder.kv(layer, k, v)

    return hook


def _cached_kv_hook(recorder: _Recorder, layer: int, cross: bool):
    """A forward hook on an encoder-decoder decoder layer's fused K/V projection (self-attention's qkv: [T, 3I],
    cross-attention's kv: [E, 2I]): records |k| and |v| as its output gives them to the cache (no rotary)."""

    def hook(module, args, out):
        parts = out.chunk(2 if cross else 3, dim=-1)
        recorder.kv(layer, parts[-2], parts[-1], cross=cross)

    return hook


def _text_batches(tokenizer, texts: Sequence[str], max_seq_len: int) -> list[list[list[int]]]:
    """Token ids of each text (cut to max_seq_len), grouped into steps of about _TOKENS_PER_STEP tokens."""
    batches, current, size = [], [], 0
    for text in texts:
        ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])[:max_seq_len]
        if not ids:
            continue
        if current and size + len(ids) > _TOKENS_PER_STEP:
            batches.append(current)
            current, size = [], 0
        current.append(ids)
        size += len(ids)
    return batches + ([current] if current else [])


def _run_encoder_decoder(model, config: dict, recorder: _Recorder, batches, device, dtype) -> int:
    """An encoder-decoder model over the calibration batches: each text is the encoder input and, after the
    decoder start token, the decoder's input too (teacher-forced; ids past a separate target vocabulary dropped).
    Records every encoder and decoder linear's input (each linear's means divide by the rows it saw: encoder tokens
    for the encoder's linears and cross-attention's K/V, decoder tokens for the rest) and each decoder layer's cached
    K/V ranges (self-attention's over the decoder tokens, cross-attention's over the encoder output); returns the
    decoder tokens."""
    from llmapi.models.encdec import encdec_linears, start_step

    specs = encdec_linears(config)
    handles = []
    for stack in ("encoder", "decoder"):
        for i, layer in enumerate(getattr(model, stack).layers):
            for spec in specs[stack]:
                block, attr = spec.name.split(".")
                full = f"{stack}.layers.{i}.{spec.name}"
                handles.append(getattr(getattr(layer, block), attr).register_forward_pre_hook(
                    lambda mod, args, full=full: recorder.linear_input(full, args[0])))
    for i, layer in enumerate(model.decoder.layers):
        handles.append(layer.attention.qkv.register_forward_hook(_cached_kv_hook(recorder, i, cross=False)))
        handles.append(layer.cross_attention.kv.register_forward_hook(_cached_kv_hook(recorder, i, cross=True)))
    start, vocab = config.get("decoder_start_token_id", 0), config["vocab_size"]
    block = 16
    num_tokens = 0
    try:
        with torch.no_grad():
            for batch in batches:
                rows = [(ids, [start] + [t for t in ids if t < vocab][:len(ids) - 1]) for ids in batch]
                ids, positions, attn, num_blocks = start_step(rows, block, device)
                caches = [torch.zeros(2, num_blocks, block, config["num_key_value_heads"], config["head_dim"],
                                      dtype=dtype, device=device) for _ in range(config["num_hidden_layers"])]
                model(ids, positions, attn, caches)
                num_tokens += int(ids.shape[0])
    finally:
        for handle in handles:
            handle.remove()
    return num_tokens


def collect_activation_stats(config: dict, weights: Mapping[str, torch.Tensor], tokenizer, texts: Sequence[str],
                             max_seq_len: int = 512, hessians: bool = False, device=None) -> ActivationStats:
    """Run the float engine model (engine config + engine-named float weights) over `texts`; return its statistics.

    device: where the model runs (default: the weights' device); CPU runs in float32, CUDA in the config's dtype.
    Each text is one sequence (cut to max_seq_len tokens), several packed into one step without a KV cache.
    hessians: also collect each linear's mean |x| and mean x^T x (AWQ, FP8); 4 K^2 bytes per linear, on `device`.
    """
    from llmapi.engine.format import DTYPES
    from llmapi.layers.attention import AttentionMetadata
    from llmapi.models import get_model_class, layer_linears

    if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < 1:
        raise ValueError(f"max_seq_len={max_seq_len!r} is invalid: must be an int >= 1")
    device = torch.device(device if device is not None else next(iter(weights.values())).device)
    dtype = torch.float32 if device.type == "cpu" else DTYPES[config.get("dtype", "float32")]
    max_seq_len = min(max_seq_len, config["max_position_embeddings"])
    batches = _text_batches(tokenizer, texts, max_seq_len)
    if not batches:
        raise ValueError("calibration texts gave no tokens")

    model = get_model_class(config["architecture"])(config, device, dtype)
    model.load_weights(weights)
    model.eval()
    recorder = _Recorder(hessians)
    if config.get("is_encoder_decoder"):
        num_tokens = _run_encoder_decoder(model, config, recorder, batches, device, dtype)
        return ActivationStats(
            input_amax={name: amax.cpu() for name, amax in recorder.amax.items()},
            input_abs_mean={name: (total / recorder.rows[name]).cpu() for name, total in recorder.abs_sum.items()},
            input_hessian={name: (xtx / recorder.rows[name]).cpu() for name, xtx in recorder.xtx.items()},
            kv_amax={layer: (k, v) for layer, (k, v) in recorder.kv_amax.items()},
            cross_kv_amax={layer: (k, v) for layer, (k, v) in recorder.cross_kv_amax.items()},
            num_tokens=num_tokens)
    handles = []
    for i, layer in enumerate(model.transformer.layers):
        for spec in layer_linears(config):  # the linears quantization swaps
            block, attr = spec.name.split(".")
            full = f"transformer.layers.{i}.{spec.name}"
            handles.append(getattr(getattr(layer, block), attr).register_forward_pre_hook(
                lambda mod, args, full=full: recorder.linear_input(full, args[0])))
        handles.append(layer.attention.attn.register_forward_pre_hook(_attention_hook(recorder, i), with_kwargs=True))
    num_tokens = 0
    try:
        with torch.no_grad():
            for batch in batches:
                lens = [len(ids) for ids in batch]
                ids = torch.tensor([t for seq in batch for t in seq], device=device)  # [T]
                positions = torch.cat([torch.arange(n) for n in lens]).to(device)  # [T]
                attn = AttentionMetadata.build(lens, lens, [[0]] * len(lens), 1, device=device,
                                               slot_mapping=torch.full((len(ids),), -1))
                model(ids, positions, attn, None)
                num_tokens += len(ids)
    finally:
        for handle in handles:
            handle.remove()
    return ActivationStats(
        input_amax={name: amax.cpu() for name, amax in recorder.amax.items()},
        input_abs_mean={name: (total / num_tokens).cpu() for name, total in recorder.abs_sum.items()},
        input_hessian={name: (xtx / num_tokens).cpu() for name, xtx in recorder.xtx.items()},
        kv_amax={layer: (k, v) for layer, (k, v) in recorder.kv_amax.items()},
        num_tokens=num_tokens,
    )
