"""Encoder-decoder requests (T5, BART, FSMT): their prompts as vLLM spells them, and the model's generation settings.

A plain prompt (text or token ids) is the encoder input, and the decoder prompt defaults to the model's decoder start
token; `{"encoder_prompt": ..., "decoder_prompt": ...}` sets both (each text, ids, or a {"prompt": ...} /
{"prompt_token_ids": ...} dict). A decoder prompt that does not begin with the decoder start token gets it in front,
as transformers' generate does. A forced BOS (BART's `forced_bos_token_id`) is the first generated token, forced as
transformers' ForcedBOSTokenLogitsProcessor forces it; a forced EOS (`forced_eos_token_id`) the last.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional, Sequence

from .errors import RequestError

T5_MAX_ENCODER_INPUT_LEN = 1024
"""The default encoder input limit of a model without a position limit of its own (T5: relative positions)."""

# generation_config.json fields (transformers' names) -> SamplingParams defaults of an encoder-decoder model.
GENERATION_FIELDS = ("num_beams", "length_penalty", "early_stopping", "min_length", "max_length", "max_new_tokens",
                     "no_repeat_ngram_size", "decoder_start_token_id", "forced_bos_token_id", "forced_eos_token_id",
                     "temperature", "top_k", "top_p", "repetition_penalty", "do_sample")


@dataclass
class EncoderDecoderSettings:
    decoder_start_token_id: int
    forced_bos_token_id: int = -1
    forced_eos_token_id: int = -1
    max_encoder_input_len: int = T5_MAX_ENCODER_INPUT_LEN
    encoder_vocab_size: int = 0
    sampling_defaults: dict = field(default_factory=dict)


def _generation(engine_dir: Path, engine_config: dict) -> dict:
    """The model's generation settings: generation_config.json, over those its config.json held (kept in the
    engine config's `generation`, as transformers derives a generation config from config.json)."""
    path = Path(engine_dir) / "generation_config.json"
    saved = json.loads(path.read_text()) if path.is_file() else {}
    merged = dict(engine_config.get("generation") or {})
    merged.update({k: v for k, v in saved.items() if v is not None})
    return merged


def sampling_defaults(generation: dict, decoder_prompt_len: int = 1) -> dict:
    """SamplingParams fields of transformers' generation settings for the default decoder prompt
    (`decoder_prompt_len` tokens): num_beams > 1 is beam search of that width; min_length / max_length count the
    decoder prompt, as transformers counts the decoder start token; sampling knobs apply only with do_sample."""
    out: dict = {}
    beams = generation.get("num_beams") or 1
    if beams > 1:
        out.update(use_beam_search=True, best_of=int(beams))
        if generation.get("length_penalty") is not None:
            out["length_penalty"] = float(generation["length_penalty"])
        if generation.get("early_stopping") is not None:
            out["early_stopping"] = generation["early_stopping"]
    if generation.get("max_new_tokens") is not None:
        out["max_tokens"] = int(generation["max_new_tokens"])
    elif generation.get("max_length") is not None:
        out["max_tokens"] = max(1, int(generation["max_length"]) - decoder_prompt_len)
    if generation.get("min_length"):
        out["min_tokens"] = max(0, int(generation["min_length"]) - decoder_prompt_len)
        if "max_tokens" in out:
            out["min_tokens"] = min(out["min_tokens"], out["max_tokens"])
    if generation.get("no_repeat_ngram_size"):
        out["no_repeat_ngram_size"] = int(generation["no_repeat_ngram_size"])
    if generation.get("do_sample"):
        for name in ("temperature", "top_k", "top_p"):
            if generation.get(name) is not None:
                out[name] = generation[name]
    else:
        out["temperature"] = 0.0  # transformers decodes greedily (or by beams) unless do_sample
    if generation.get("repetition_penalty") is not None:
        out["repetition_penalty"] = float(generation["repetition_penalty"])
    return out


def encdec_settings(engine_dir, engine_config: dict, max_encoder_input_len: Optional[int],
                    max_num_tokens: int) -> EncoderDecoderSettings:
    """The settings of an encoder-decoder engine; max_encoder_input_len (LLM's argument, or the model's default)
    is checked against the position limit and the step budget (ValueError naming the limit)."""
    generation = _generation(engine_dir, engine_config)
    limit = engine_config.get("max_encoder_input_len") or T5_MAX_ENCODER_INPUT_LEN
    chosen = limit if max_encoder_input_len is None else max_encoder_input_len
    if max_encoder_input_len is not None and max_encoder_input_len > limit:
        raise ValueError(f"max_encoder_input_len={max_encoder_input_len} is invalid: this model's encoder takes at "
                         f"most {limit} tokens")
    if max_encoder_input_len is not None and max_encoder_input_len > max_num_tokens - 1:
        raise ValueError(f"max_encoder_input_len={max_encoder_input_len} is invalid: an encoder input runs in one "
                         f"step with at least one decoder token, so it must be < max_num_tokens={max_num_tokens}")
    chosen = min(chosen, max_num_tokens - 1)

    def token(name: str, default: int = -1) -> int:
        value = generation.get(name, engine_config.get(name))
        return default if value is None else int(value)

    return EncoderDecoderSettings(
        decoder_start_token_id=token("decoder_start_token_id", 0), forced_bos_token_id=token("forced_bos_token_id"),
        forced_eos_token_id=token("forced_eos_token_id"), max_encoder_input_len=int(chosen),
        encoder_vocab_size=engine_config["encoder"]["vocab_size"], sampling_defaults=sampling_defaults(generation))


def unwrap_prompt(prompt: Any, what: str = "a dict prompt") -> Any:
    """A vLLM-style {"prompt_token_ids": ...} / {"prompt": ...} dict's ids or text; anything else unchanged.
    RequestError ("{what} needs ...") for a dict with neither."""
    if not isinstance(prompt, dict):
        return prompt
    if "prompt_token_ids" in prompt:
        return prompt["prompt_token_ids"]
    if "prompt" in prompt:
        return prompt["prompt"]
    raise RequestError(f"{what} needs 'prompt' or 'prompt_token_ids'")


def _ids(part: Any, name: str, tokenizer, vocab_size: int, special_tokens: bool) -> tuple[Optional[str], List[int]]:
    """(text or None, ids) of one side's prompt: text (tokenized), a list of ids, or a vLLM-style dict."""
    part = unwrap_prompt(part, f"the {name} dict")
    if isinstance(part, str):
        if tokenizer is None:
            raise RequestError(f"a text {name} needs a tokenizer (skip_tokenizer_init=True)")
        if part == "" and special_tokens:
            raise RequestError(f"the {name} is empty")
        return part, list(tokenizer.encode(part, add_special_tokens=special_tokens))
    if not isinstance(part, Sequence):
        raise RequestError(f"the {name} must be a str, a list of token ids or a dict, got {type(part).__name__}")
    ids = list(part)
    if any(not isinstance(t, int) or isinstance(t, bool) for t in ids) or (ids and (min(ids) < 0
                                                                                    or max(ids) >= vocab_size)):
        raise RequestError(f"{name} token ids must be ints in [0, {vocab_size})")
    return None, ids


def split_prompt(prompt: Any, settings: EncoderDecoderSettings, tokenizer, vocab_size: int):
    """(decoder text, decoder ids, encoder text, encoder ids) of an encoder-decoder prompt; RequestError naming the
    problem (no encoder prompt, an encoder input over max_encoder_input_len, bad ids)."""
    if isinstance(prompt, dict) and ("encoder_prompt" in prompt or "decoder_prompt" in prompt):
        unknown = set(prompt) - {"encoder_prompt", "decoder_prompt"}
        if unknown:
            raise RequestError(f"an encoder-decoder prompt dict takes 'encoder_prompt' and 'decoder_prompt', not "
                               f"{sorted(unknown)}")
        if prompt.get("encoder_prompt") is None:
            raise RequestError("this encoder-decoder model needs an encoder prompt: the dict has a 'decoder_prompt' "
                               "but no 'encoder_prompt'")
        encoder, decoder = prompt["encoder_prompt"], prompt.get("decoder_prompt")
    else:
        encoder, decoder = prompt, None
    enc_text, enc_ids = _ids(encoder, "encoder prompt", tokenizer, settings.encoder_vocab_size, True)
    if not enc_ids:
        raise RequestError("the encoder prompt is empty (no token ids)")
    if len(enc_ids) > settings.max_encoder_input_len:
        raise RequestError(f"the encoder prompt has {len(enc_ids)} tokens; max_encoder_input_len is "
                           f"{settings.max_encoder_input_len} (LLM(max_encoder_input_len=...), at most the model's "
                           "position limit and max_num_tokens - 1)")
    start = settings.decoder_start_token_id
    dec_text, dec_ids = (None, []) if decoder is None else _ids(decoder, "decoder prompt", tokenizer, vocab_size, False)
    if not dec_ids or dec_ids[0] != start:
        dec_ids = [start] + dec_ids
    return dec_text, dec_ids, enc_text, enc_ids
