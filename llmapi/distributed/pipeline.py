"""Pipeline parallelism: keep one stage's layers of a model, and cut a batch into micro-batches."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
from torch import nn

from llmapi.distributed.mapping import Mapping

# Batch arrays indexed by request ([R]), by token ([T]), and CSR lists ([R+1] offsets, their entries); see
# _core.Batch.
REQUEST_FIELDS = ("query_lens", "context_lens", "do_sample", "temperature", "top_k", "top_p", "seeds",
                  "output_index", "logprobs", "request_ids", "seq_index", "num_candidates", "beam", "min_p",
                  "repetition_penalty", "presence_penalty", "frequency_penalty", "prompt_logprobs", "context_logits",
                  "generation_logits", "prompt_lens", "next_token_ids", "slots", "slot_copy_from", "slot_reset",
                  "state_start", "adapter_slots", "num_draft_tokens", "draft_start")
TOKEN_FIELDS = ("input_ids", "prev_rows", "positions", "slot_mapping")
CSR_FIELDS = (("suppress_offsets", ("suppress_ids",)), ("bias_offsets", ("bias_ids", "bias_values")),
              ("state_offsets", ("state_ids",)), ("draft_offsets", ("draft_input_ids",)))

class StageLayers(nn.Module):
    """One stage's layers under their global indices (so their tensors keep the engine's names); it
    iterates like the ModuleList it replaces, so a model's layer loop runs just these."""

    def __init__(self, layers: dict):
        super().__init__()
        for index, layer in layers.items():
            self.add_module(str(index), layer)

    def __iter__(self):
        return iter(self._modules.values())

    def __len__(self) -> int:
        return len(self._modules)


class StageEnd(nn.Module):
    """Stands in for the final norm before the last stage: hands on the residual stream un-normalized.

    Called as the norms are: norm(x) -> x, and norm(x, residual) -> (x + residual, x + residual), the sum in
    the model dtype as the next stage's first norm would form it.
    """

    def forward(self, x, residual=None):
        if residual is None:
            return x
        x = x + residual
        return x, x


def apply_pipeline_stage(model: nn.Module, cfg: dict, mapping: Mapping) -> None:
    """Drop what this stage does not run (model on the meta device): other stages' layers, the embeddings
    before the first stage, the final norm and head after the last. The last stage keeps a tied embedding
    for its head."""
    if mapping.pp_size == 1:
        return
    t = model.transformer
    t.layers = StageLayers({i: t.layers[i] for i in mapping.stage_layers(cfg["num_hidden_layers"])})
    if not mapping.is_first_stage:
        if getattr(t, "position_embedding", None) is not None:
            t.position_embedding = None
        if not (mapping.is_last_stage and cfg["tie_word_embeddings"]):
            t.vocab_embedding = None
    if not mapping.is_last_stage:
        t.ln_f = StageEnd()
        model.lm_head = None


def micro_batches(query_lens: np.ndarray, count: int) -> list[tuple[int, int]]:
    """Split requests [0, R) into at most `count` contiguous, non-empty ranges of about equal tokens."""
    total, num = int(query_lens.sum()), len(query_lens)
    count = max(1, min(count, num))
    ends = np.cumsum(query_lens)
    cuts = [0]
    for k in range(1, count):
        # First request boundary at or past k/count of the tokens, leaving room for the later ranges.
        cut = int(np.searchsorted(ends, total * k / count, side="left")) + 1
        cut = min(max(cut, cuts[-1] + 1), num - (count - k))
        cuts.append(cut)
    cuts.append(num)
    return [(a, b) for a, b in zip(cuts[:-1], cuts[1:])]


def slice_batch(batch, start: int, stop: int):
    """Requests [start, stop) of a batch (a _core.Batch or its decoded copy) as a batch of their own. Fields
    the batch lacks stay absent; block copies are the whole step's (made before any micro-batch runs)."""
    q = np.asarray(batch.query_lens)
    t0, t1 = int(q[:start].sum()), int(q[:stop].sum())
    fields = {name: np.asarray(getattr(batch, name))[start:stop] for name in REQUEST_FIELDS if hasattr(batch, name)}
    fields.update({name: np.asarray(getattr(batch, name))[t0:t1] for name in TOKEN_FIELDS})
    for offsets_name, entry_names in CSR_FIELDS:
        if not hasattr(batch, offsets_name):
            continue
        offsets = np.asarray(getattr(batch, offsets_name))
        fields[offsets_name] = offsets[start:stop + 1] - offsets[start]
        for name in entry_names:
            fields[name] = np.asarray(getattr(batch, name))[offsets[start]:offsets[stop]]
    fields["block_tables"] = np.asarray(batch.block_tables)[start:stop]
    fields["block_copies"] = np.zeros((0, 2), dtype=np.int32)
    return SimpleNamespace(num_requests=stop - start, num_tokens=t1 - t0, **fields)
