"""Summarization of paper abstracts by greedy decoding, through our engine or transformers, on the same prompts."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import List, Sequence

import torch

INSTRUCTION = ("Summarize the following abstract of a scientific paper in three sentences: the challenge "
               "it addresses, the approach it takes, and its outcome.")


def prompt_ids(tokenizer, abstract: str, max_input_len: int) -> List[int]:
    """The prompt's token ids: the abstract (its first `max_input_len` tokens) under the instruction,
    in the chat template when the tokenizer has one."""
    if not isinstance(max_input_len, int) or isinstance(max_input_len, bool) or max_input_len < 1:
        raise ValueError(f"max_input_len={max_input_len!r} is invalid: must be an int >= 1")
    abstract_ids = tokenizer.encode(abstract, add_special_tokens=False)
    if len(abstract_ids) > max_input_len:
        abstract = tokenizer.decode(abstract_ids[:max_input_len], skip_special_tokens=True)
    if getattr(tokenizer, "chat_template", None):
        conv = [{"role": "user", "content": f"{INSTRUCTION}\n\n{abstract}"}]
        return list(tokenizer.apply_chat_template(conv, add_generation_prompt=True, tokenize=True,
                                                  return_dict=True)["input_ids"])
    return list(tokenizer.encode(f"{INSTRUCTION}\n\nAbstract: {abstract}\n\nSummary:"))


@dataclass
class Summaries:
    """Generated summaries, one per prompt, and what producing them cost."""

    texts: List[str]
    num_output_tokens: int
    seconds: float


def engine_summaries(llm, prompts: Sequence[List[int]], max_tokens: int) -> Summaries:
    """Greedy summaries from our engine (all prompts in one batch; each stops at EOS or max_tokens)."""
    from ..sampling_params import SamplingParams

    longest = max(len(p) for p in prompts) + max_tokens
    if longest > llm.max_seq_len:
        raise ValueError(f"a prompt plus max_tokens={max_tokens} needs {longest} tokens, more than the "
                         f"LLM's max_seq_len={llm.max_seq_len}: lower max_input_len or max_tokens")
    start = time.perf_counter()
    outs = llm.generate(list(prompts), SamplingParams(max_tokens=max_tokens, temperature=0.0), use_tqdm=False)
    texts = [o.outputs[0].text for o in outs]
    eos = set(llm.eos_token_ids)
    # Counted without the EOS token, as hf_summaries counts them.
    num_tokens = sum(len(t) - (bool(t) and t[-1] in eos) for t in (o.outputs[0].token_ids for o in outs))
    return Summaries(texts, num_tokens, time.perf_counter() - start)


def hf_summaries(model, tokenizer, prompts: Sequence[List[int]], max_tokens: int,
                 eos_token_ids: Sequence[int]) -> Summaries:
    """Greedy summaries from a transformers model, one prompt at a time (no padding), decoded as our
    engine decodes its outputs (special tokens skipped, no clean-up of spaces)."""
    from transformers import GenerationConfig

    eos = list(eos_token_ids)
    config = GenerationConfig(max_new_tokens=max_tokens, do_sample=False, eos_token_id=eos or None,
                              pad_token_id=eos[0] if eos else 0)
    device = next(model.parameters()).device
    start = time.perf_counter()
    texts, num_tokens = [], 0
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([p], device=device)  # [1, L]
            new = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)[0, len(p):]
            new = new.tolist()
            if new and new[-1] in eos:
                new = new[:-1]  # our engine's text leaves the EOS token out as well
            num_tokens += len(new)
            texts.append(tokenizer.decode(new, skip_special_tokens=True, clean_up_tokenization_spaces=False))
    return Summaries(texts, num_tokens, time.perf_counter() - start)
