"""A request in flight on the Python side: per-sequence text and stop strings, logprobs, final assembly."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch

from .errors import runner_error
from .outputs import Logprob, RequestMetrics, RequestOutput, SpeculativeDecodingMetrics, TokenLogprobs
from .sampling_params import SamplingParams
from .tokenizer import IncrementalDetokenizer, StopStringMatcher


@dataclass
class _Sequence:
    detok: Optional[IncrementalDetokenizer]
    stops: Optional[StopStringMatcher]
    finished: bool = False


@dataclass
class LiveRequest:
    """Turns the executor's responses of one request into its RequestOutput.

    abort_seq(seq_index) stops one sequence in the executor (a stop string matched in its text).
    """

    output: RequestOutput
    params: SamplingParams
    tokenizer: object
    num_sequences: int
    abort_seq: Callable[[int], None]
    speculative: bool = False  # responses carry draft counts (RequestOutput.metrics)
    sequences: Dict[int, _Sequence] = field(default_factory=dict)

    def _sequence(self, index: int) -> _Sequence:
        seq = self.sequences.get(index)
        if seq is None:
            p = self.params
            detok = stops = None
            if p.detokenize:
                detok = IncrementalDetokenizer(self.tokenizer, skip_special_tokens=p.skip_special_tokens,
                                               spaces_between_special_tokens=p.spaces_between_special_tokens)
                if p.stop_strings:
                    stops = StopStringMatcher(p.stop_strings, p.include_stop_str_in_output)
            seq = self.sequences[index] = _Sequence(detok, stops)
        return seq

    def decoded(self, token_id: int) -> Optional[str]:
        if self.tokenizer is None or not self.params.detokenize:
            return None
        return self.tokenizer.decode([token_id])

    def token_logprobs(self, token_ids, logprobs, ranks, top_ids, top_logprobs, k) -> List[TokenLogprobs]:
        """One {token id: Logprob} per token: the token itself first, then the top k."""
        out = []
        for i, tid in enumerate(token_ids):
            entry = {tid: Logprob(logprobs[i], ranks[i], self.decoded(tid))}
            for j in range(k):
                t = top_ids[i * k + j]
                if t >= 0 and t not in entry:
                    entry[t] = Logprob(top_logprobs[i * k + j], j + 1, self.decoded(t))
            out.append(entry)
        return out

    def on_response(self, r) -> bool:
        """Apply one response; True when the request is finished (the caller then calls finish)."""
        index = r.seq_index  # each read of a field of r crosses into C++: every field is read once
        seq = self._sequence(index)
        if seq.finished:
            return r.request_finished
        tokens = r.token_ids  # a new list
        finished = r.finished
        if self.speculative:
            self.output.metrics = RequestMetrics(SpeculativeDecodingMetrics(r.num_draft_tokens,
                                                                            r.num_accepted_draft_tokens))
        text = ""
        matched = None
        if seq.stops is not None and len(tokens) > 1:
            # Several tokens at once (a speculative step): matched one by one, so that the output ends at the
            # token that completes a stop string, as when the tokens come one per step.
            for i, token in enumerate(tokens):
                final = finished and i == len(tokens) - 1
                piece, matched = seq.stops.feed(seq.detok.add([token], final=final), final=final)
                text += piece
                if matched is not None:
                    tokens = tokens[:i + 1]
                    break
        elif seq.detok is not None and (tokens or finished):
            text = seq.detok.add(tokens, final=finished)
            if seq.stops is not None:
                text, matched = seq.stops.feed(text, final=finished)
        finish_reason = r.finish_reason if finished else None
        stop_reason = None
        if finished:
            stop_reason = r.stop_reason
            stop_reason = stop_reason if stop_reason >= 0 else None
        if seq.stops is not None:
            if matched is not None:
                finish_reason, stop_reason = "stop", matched
                if not finished:
                    self.abort_seq(index)
        p = self.params
        logprobs = None
        if p.logprobs is not None and r.num_top_logprobs >= 0:
            logprobs = self.token_logprobs(tokens, r.logprobs, r.ranks, r.top_ids, r.top_logprobs,
                                           r.num_top_logprobs)
        wants_cumulative = p.logprobs is not None or p.num_sequences > 1 or p.use_beam_search
        cumulative = r.cumulative_logprob if wants_cumulative else None
        if cumulative is not None and logprobs is not None and len(tokens) < len(r.logprobs):
            cumulative -= sum(r.logprobs[len(tokens):])  # tokens after a stop string are not the output's
        error = runner_error(r.error) if finish_reason == "error" else None
        seq.finished = finish_reason is not None
        self.output._add(tokens, text, finish_reason=finish_reason, stop_reason=stop_reason, error=error,
                         seq_index=min(index, len(self.output.outputs) - 1), logprobs=logprobs,
                         cumulative_logprob=cumulative, request_finished=False)
        if not finished and not seq.finished:
            return False  # nothing finished: neither this sequence nor the request
        done = sum(s.finished for s in self.sequences.values()) >= self.num_sequences
        return r.request_finished or done

    def attach_records(self, prompt_record, generation: dict, prompt_logprobs) -> None:
        """Prompt logprobs, context logits and generation logits kept by the runner."""
        out, p = self.output, self.params
        if p.prompt_logprobs is not None:
            lps, ranks, top_ids, top_lps = prompt_logprobs
            ids = out.prompt_token_ids
            entries: List[Optional[TokenLogprobs]] = [None]
            for i in range(len(lps)):
                entry = {ids[i + 1]: Logprob(lps[i], ranks[i], self.decoded(ids[i + 1]))}
                for j, (t, v) in enumerate(zip(top_ids[i], top_lps[i])):
                    entry.setdefault(t, Logprob(v, j + 1, self.decoded(t)))
                entries.append(entry)
            out.prompt_logprobs = entries
        if p.return_context_logits and prompt_record is not None and prompt_record.logits:
            out.context_logits = torch.cat(prompt_record.logits).cpu()
        if p.return_generation_logits:
            for o in out.outputs:
                rows = generation.get(o.index, {})
                if rows:
                    o.generation_logits = torch.stack([rows[i] for i in sorted(rows)]).cpu()

    def finish(self, reason: Optional[str] = None, error: Optional[BaseException] = None) -> None:
        """Mark the request finished: sampled sequences are ranked by cumulative logprob, n kept."""
        p = self.params
        if p.num_sequences > 1 and not p.use_beam_search and error is None:
            self.output._rank_outputs(keep=p.n)
        self.output._add([], "", finish_reason=reason, error=error, request_finished=True)
