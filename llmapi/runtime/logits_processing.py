"""Batched logits processors of the decoding step: logit bias, repetition / presence / frequency penalties."""

from __future__ import annotations

import torch


def csr_rows(offsets: torch.Tensor, num_entries: int) -> torch.Tensor:
    """Row of each entry of a CSR list given its [R+1] offsets: [num_entries] int64."""
    entries = torch.arange(num_entries, device=offsets.device)
    return torch.searchsorted(offsets[1:].to(torch.int64).contiguous(), entries, right=True)


def apply_logit_bias_(logits: torch.Tensor, bias_offsets: torch.Tensor, bias_ids: torch.Tensor,
                      bias_values: torch.Tensor) -> torch.Tensor:
    """Add each row's CSR (token id, bias) entries to its logits, in place (OpenAI's logit_bias).

    logits: [R, V] float32; bias_offsets: [R+1]; bias_ids: [B] int; bias_values: [B] float.
    """
    if bias_ids.shape[0] > 0:
        rows = csr_rows(bias_offsets, bias_ids.shape[0])  # [B]
        logits.index_put_((rows, bias_ids.to(torch.int64)), bias_values.to(logits.dtype), accumulate=True)
    return logits


def apply_penalties_(logits: torch.Tensor, output_counts: torch.Tensor, in_prompt: torch.Tensor,
                     repetition: torch.Tensor, presence: torch.Tensor, frequency: torch.Tensor) -> torch.Tensor:
    """Apply the three penalties to each row in place, as vLLM: repetition on every token seen
    (prompt or output), then presence and frequency on output tokens (OpenAI's formula).

    logits: [R, V] float32; output_counts: [R, V] int (times each token was generated);
    in_prompt: [R, V] bool; repetition, presence, frequency: [R] float (1, 0, 0 = off).
    Repetition follows transformers' RepetitionPenaltyLogitsProcessor: a seen token's logit is
    divided by the penalty if positive, multiplied by it if negative.
    """
    generated = output_counts > 0  # [R, V]
    seen = generated | in_prompt
    rep = repetition.to(logits.dtype).unsqueeze(1)  # [R, 1]
    penalised = torch.where(logits < 0, logits * rep, logits / rep)
    logits = torch.where(seen, penalised, logits)
    logits -= frequency.to(logits.dtype).unsqueeze(1) * output_counts.to(logits.dtype)
    logits -= presence.to(logits.dtype).unsqueeze(1) * generated.to(logits.dtype)
    return logits
