"""A plain-torch reference of Meta's published Llama model.py run straight from consolidated.NN.pth shards.

It computes what Meta's model-parallel ranks compute (fairscale layers): ColumnParallelLinear wq/wk/wv/w1/w3 give
each rank its heads / hidden units, RowParallelLinear wo/w2 give partial sums that are all-reduced, the output
ColumnParallelLinear is gathered on the vocabulary, and tok_embeddings is a ParallelEmbedding (each rank embeds
a slice of the embedding dim, gathered) or Llama 3's VocabParallelEmbedding (each rank its vocabulary rows,
zeros elsewhere, all-reduced). Rotary is Meta's complex-number form over adjacent pairs, with Llama 3.1's
apply_scaling when params.json says use_scaled_rope. Nothing here is shared with llmapi's converter.
"""

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F


def _apply_scaling(freqs: torch.Tensor, scale_factor: float, high_freq_factor: float) -> torch.Tensor:
    # Llama 3.1's apply_scaling (low_freq_factor 1, the original 8192-token context).
    low_freq_factor, old_context_len = 1.0, 8192
    low_freq_wavelen, high_freq_wavelen = old_context_len / low_freq_factor, old_context_len / high_freq_factor
    out = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            out.append(freq)
        elif wavelen > low_freq_wavelen:
            out.append(freq / scale_factor)
        else:
            smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            out.append((1 - smooth) * freq / scale_factor + smooth * freq)
    return torch.tensor(out, dtype=freqs.dtype)


def _freqs_cis(head_dim: int, end: int, theta: float, scaled: bool, factor: float, high: float) -> torch.Tensor:
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    if scaled:
        freqs = _apply_scaling(freqs, factor, high)
    angles = torch.outer(torch.arange(end, dtype=torch.float32), freqs)
    return torch.polar(torch.ones_like(angles), angles)  # [end, head_dim / 2] complex64


def _rotary(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:  # x: [T, h, hd]
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))  # adjacent pairs as complex numbers
    return torch.view_as_real(xc * freqs_cis[:, None, :]).flatten(2).type_as(x)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight


class MetaReference:
    """Meta's Llama forward over the shards of a Meta checkpoint directory; greedy decoding by full recompute."""

    def __init__(self, path):
        path = Path(path)
        params = json.loads((path / "params.json").read_text())
        self.p = params.get("model", params)
        files = sorted(path.glob("consolidated.*.pth"))
        self.shards = [torch.load(f, map_location="cpu", weights_only=True) for f in files]
        dim, heads = self.p["dim"], self.p["n_heads"]
        self.head_dim = dim // heads
        self.eps = self.p.get("norm_eps", 1e-5)
        self.freqs_cis = _freqs_cis(self.head_dim, 4096, self.p.get("rope_theta", 10000.0),
                                    self.p.get("use_scaled_rope", False), self.p.get("rope_scaling_factor") or 8.0,
                                    self.p.get("rope_high_freq_factor") or 4.0)

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:  # ids: [T] -> [T, dim]
        pieces = [s["tok_embeddings.weight"] for s in self.shards]
        if len(pieces) == 1 or pieces[0].shape[1] == self.p["dim"]:  # VocabParallelEmbedding (or one rank)
            out, start = 0, 0
            for rows in pieces:
                local = ids - start
                inside = (local >= 0) & (local < rows.shape[0])
                out = out + F.embedding(local.clamp(0, rows.shape[0] - 1), rows) * inside[:, None]
                start += rows.shape[0]
            return out
        return torch.cat([F.embedding(ids, cols) for cols in pieces], dim=-1)  # ParallelEmbedding: gather

    @torch.no_grad()
    def forward(self, tokens: list[int], start_pos: int = 0, cache: dict | None = None) -> torch.Tensor:
        """Logits [T, V] (float32) of `tokens` at positions start_pos.., computed rank by rank as Meta's model does;
        `cache` (a dict this fills) holds each rank's keys and values of the earlier positions, like Meta's
        cache_k / cache_v."""
        cache = {} if cache is None else cache
        ids = torch.tensor(tokens)
        T, hd = len(tokens), self.head_dim
        freqs = self.freqs_cis[start_pos:start_pos + T]
        mask = torch.hstack([torch.zeros(T, start_pos), torch.full((T, T), float("-inf")).triu(1)])
        first = self.shards[0]
        h = self._embed(ids)
        for i in range(self.p["n_layers"]):
            layer = f"layers.{i}."
            x = _rms_norm(h, first[layer + "attention_norm.weight"], self.eps)
            attn = 0
            for r, s in enumerate(self.shards):  # each rank: its local heads, then wo's partial sum (all-reduced)
                q = F.linear(x, s[layer + "attention.wq.weight"]).view(T, -1, hd)
                k = F.linear(x, s[layer + "attention.wk.weight"]).view(T, -1, hd)
                v = F.linear(x, s[layer + "attention.wv.weight"]).view(T, -1, hd)
                q, k = _rotary(q, freqs), _rotary(k, freqs)
                if (i, r) in cache:
                    k, v = torch.cat([cache[i, r][0], k]), torch.cat([cache[i, r][1], v])
                cache[i, r] = (k, v)  # [start_pos + T, local kv heads, hd]
                rep = q.shape[1] // k.shape[1]
                k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # repeat_kv
                scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(hd) + mask
                o = torch.einsum("hqk,khd->qhd", F.softmax(scores.float(), dim=-1).type_as(q), v)
                attn = attn + F.linear(o.reshape(T, -1), s[layer + "attention.wo.weight"])
            h = h + attn
            x = _rms_norm(h, first[layer + "ffn_norm.weight"], self.eps)
            h = h + sum(F.linear(F.silu(F.linear(x, s[layer + "feed_forward.w1.weight"]))
                                 * F.linear(x, s[layer + "feed_forward.w3.weight"]), s[layer + "feed_forward.w2.weight"])
                        for s in self.shards)
        x = _rms_norm(h, first["norm.weight"], self.eps)
        return torch.cat([F.linear(x, s["output.weight"]) for s in self.shards], dim=-1).float()

    def logits(self, tokens: list[int]) -> torch.Tensor:
        """Logits [T, V] (float32) of every position of `tokens`, in one forward from position 0."""
        return self.forward(tokens)

    def greedy(self, prompts: list[list[int]], max_tokens: int, eos_token_id: int = 2) -> list[list[int]]:
        """Greedy continuations (argmax of the last position, up to and including EOS) of each prompt: the prompt
        in one forward, then one token per forward over the cached keys and values, as Meta's generate does."""
        outs = []
        for prompt in prompts:
            cache, out = {}, []
            logits = self.forward(list(prompt), 0, cache)
            while len(out) < max_tokens:
                nxt = int(logits[-1].argmax())
                out.append(nxt)
                if nxt == eos_token_id:
                    break
                logits = self.forward([nxt], len(prompt) + len(out) - 1, cache)
            outs.append(out)
        return outs
