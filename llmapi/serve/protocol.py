"""The OpenAI API's request bodies (pydantic, strict JSON types) and their mapping to SamplingParams."""

from __future__ import annotations

import re
from typing import Any, Dict, List, Literal, Optional, Tuple, Union

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from ..guided_decoding import GuidedDecodingParams
from ..sampling_params import SamplingParams


class APIError(Exception):
    """An error answered as OpenAI's error object: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, message: str, param: Optional[str] = None, status: int = 400,
                 type: str = "invalid_request_error", code: Optional[str] = None):
        super().__init__(message)
        self.message, self.param, self.status, self.type, self.code = message, param, status, type, code

    def body(self) -> dict:
        return error_body(self.message, self.param, self.type, self.code)


def error_body(message: str, param: Optional[str] = None, type: str = "invalid_request_error",
               code: Optional[str] = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class _Body(BaseModel):
    # Strict: a string is not a number, a number is not a bool. Fields this server does not know are ignored
    # (and logged) as OpenAI-compatible servers do, so newer clients keep working.
    model_config = ConfigDict(strict=True, extra="allow")


class StreamOptions(_Body):
    include_usage: bool = False
    """Send a last chunk (before [DONE]) with the request's usage and no choices."""


class _Sampling(_Body):
    """Fields shared by /v1/completions and /v1/chat/completions (OpenAI's, then vLLM's extra ones)."""

    model: Optional[str] = None
    n: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    stop: Optional[Union[str, List[str]]] = None
    seed: Optional[int] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    logit_bias: Optional[Dict[str, float]] = None
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None
    # vLLM's extra sampling fields
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    repetition_penalty: Optional[float] = None
    min_tokens: Optional[int] = None
    ignore_eos: Optional[bool] = None
    skip_special_tokens: Optional[bool] = None
    spaces_between_special_tokens: Optional[bool] = None
    include_stop_str_in_output: Optional[bool] = None
    stop_token_ids: Optional[List[int]] = None
    # Structured outputs: OpenAI's response_format, vLLM's guided_* extras and its structured_outputs object
    response_format: Optional[Dict[str, Any]] = None
    guided_json: Optional[Union[str, Dict[str, Any]]] = None
    guided_regex: Optional[str] = None
    guided_choice: Optional[List[str]] = None
    guided_grammar: Optional[str] = None
    structured_outputs: Optional[Dict[str, Any]] = None

    @field_validator("stop", mode="wrap")
    @classmethod
    def _stop(cls, value, handler):
        return _union(value, handler, "a string or a list of strings")

    @field_validator("guided_json", mode="wrap")
    @classmethod
    def _guided_json(cls, value, handler):
        return _union(value, handler, "a JSON schema (an object, or its JSON text)")

    def guided(self) -> Tuple[Optional[GuidedDecodingParams], Optional[str]]:
        """(the request's grammar, the body field that gave it), or (None, None); 400 naming the field when one
        is malformed, or when more than one is given."""
        given = []
        rf = self.response_format
        if rf is not None:
            kind = rf.get("type")
            if kind == "json_object":
                given.append(("response_format", {"json_object": True}))
            elif kind == "json_schema":
                spec = rf.get("json_schema")
                if not isinstance(spec, dict):
                    raise APIError("response_format of type json_schema needs a json_schema object "
                                   '({"name": ..., "schema": {...}})', "response_format.json_schema")
                if not isinstance(spec.get("schema"), dict):
                    raise APIError("response_format.json_schema.schema must be a JSON schema object",
                                   "response_format.json_schema.schema")
                given.append(("response_format", {"json": spec["schema"]}))
            elif kind != "text":
                raise APIError(f"response_format type {kind!r} is not supported (text, json_object or json_schema)",
                               "response_format.type")
        for name, field in (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                            ("guided_grammar", "grammar")):
            if getattr(self, name) is not None:
                given.append((name, {field: getattr(self, name)}))
        if self.structured_outputs is not None:
            given.append(("structured_outputs", self.structured_outputs))
        if not given:
            return None, None
        if len(given) > 1:
            raise APIError(f"{given[0][0]} and {given[1][0]} both ask for structured output; give one",
                           given[1][0])
        name, fields = given[0]
        try:
            return GuidedDecodingParams.coerce(fields), name
        except ValueError as e:
            raise APIError(f"{name}: {e}", name) from None

    def check(self) -> None:
        if self.stream_options is not None and not self.stream:
            raise APIError("stream_options is only allowed when stream is true", "stream_options")
        for key, bias in (self.logit_bias or {}).items():
            if not re.fullmatch(r"\d+", key):
                raise APIError(f"logit_bias keys must be token ids, got {key!r}", "logit_bias")
            if not -100 <= bias <= 100:
                raise APIError(f"logit_bias[{key}]={bias} is invalid: must be in [-100, 100]", "logit_bias")

    def ignored_fields(self) -> List[str]:
        return sorted(self.model_extra or {})

    def sampling_kwargs(self, defaults: SamplingParams) -> Dict[str, Any]:
        """SamplingParams arguments: the fields given, else the model's generation_config defaults."""
        kw: Dict[str, Any] = {}
        for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty"):
            value = getattr(self, name)
            kw[name] = getattr(defaults, name) if value is None else value
        for name in ("n", "seed", "presence_penalty", "frequency_penalty", "min_tokens", "ignore_eos",
                     "skip_special_tokens", "spaces_between_special_tokens", "include_stop_str_in_output",
                     "stop_token_ids"):
            value = getattr(self, name)
            if value is not None:
                kw[name] = value
        if self.stop is not None:
            kw["stop"] = self.stop
        if self.logit_bias:
            kw["logit_bias"] = {int(k): v for k, v in self.logit_bias.items()}
        guided, _ = self.guided()
        if guided is not None:
            kw["guided_decoding"] = guided
        return kw

    def renamed(self) -> Dict[str, str]:
        """SamplingParams fields under this request's names for them (for 400s naming the request's field)."""
        _, field = self.guided()
        return {} if field is None else {"guided_decoding": field, "structured_outputs": field}


def _union(value, handler, what: str):
    """Run a union field's validation; on failure one error naming what it must be (not one per member)."""
    try:
        return handler(value)
    except ValidationError:
        raise ValueError(f"must be {what}") from None


class CompletionRequest(_Sampling):
    """POST /v1/completions."""

    prompt: Union[str, List[str], List[int], List[List[int]]]
    max_tokens: Optional[int] = 16
    best_of: Optional[int] = None
    logprobs: Optional[int] = None
    echo: Optional[bool] = False
    suffix: Optional[str] = None

    @field_validator("prompt", mode="wrap")
    @classmethod
    def _prompt(cls, value, handler):
        return _union(value, handler, "a string, a list of strings, a list of token ids or a list of lists of "
                                      "token ids")

    def prompts(self) -> list:
        """The prompts as generate_async takes them: strings or token-id lists."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        if not p:
            raise APIError("prompt must not be empty", "prompt")
        return list(p)

    def check(self, has_tokenizer: bool = True) -> None:
        super().check()
        if self.suffix is not None:
            raise APIError("suffix is not supported", "suffix")
        if self.echo and not has_tokenizer:
            raise APIError("echo needs a tokenizer (the server runs with --skip-tokenizer-init)", "echo")
        if self.echo and self.logprobs is not None and self.stream:
            raise APIError("echo with logprobs is not supported when streaming", "echo")

    def sampling_params(self, defaults: SamplingParams) -> SamplingParams:
        kw = self.sampling_kwargs(defaults)
        kw["max_tokens"] = 16 if self.max_tokens is None else self.max_tokens
        if self.best_of is not None:
            kw["best_of"] = self.best_of
        if self.logprobs is not None:
            kw["logprobs"] = self.logprobs
            if self.echo:
                kw["prompt_logprobs"] = self.logprobs
        return make_params(kw, self.renamed())


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: Optional[Union[str, List[TextPart]]] = None
    name: Optional[str] = None

    def template_dict(self) -> dict:
        """The message as a chat template reads it: the text parts joined by newlines (as vLLM)."""
        content = self.content
        if isinstance(content, list):
            content = "\n".join(part.text for part in content)
        message = {"role": "system" if self.role == "developer" else self.role, "content": content or ""}
        if self.name is not None:
            message["name"] = self.name
        return message


class ChatCompletionRequest(_Sampling):
    """POST /v1/chat/completions."""

    messages: List[ChatMessage]
    max_completion_tokens: Optional[int] = None
    max_tokens: Optional[int] = None
    """Deprecated by OpenAI in favour of max_completion_tokens; either one."""
    logprobs: Optional[bool] = False
    top_logprobs: Optional[int] = None
    tools: Optional[List[Any]] = None
    tool_choice: Optional[Any] = None
    add_generation_prompt: Optional[bool] = True
    """vLLM's extra field: end the prompt with the assistant's turn header."""

    def check(self) -> None:
        super().check()
        if not self.messages:
            raise APIError("messages must not be empty", "messages")
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError("top_logprobs needs logprobs=true", "top_logprobs")
        if self.tools:
            raise APIError("tool calling is not supported", "tools")
        if self.tool_choice not in (None, "none"):
            raise APIError("tool calling is not supported", "tool_choice")

    @property
    def max_tokens_field(self) -> str:
        return "max_tokens" if self.max_completion_tokens is None and self.max_tokens is not None \
            else "max_completion_tokens"

    def sampling_params(self, defaults: SamplingParams) -> SamplingParams:
        kw = self.sampling_kwargs(defaults)
        limit = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        kw["max_tokens"] = limit  # None: up to max_seq_len
        if self.logprobs:
            kw["logprobs"] = self.top_logprobs or 0
        return make_params(kw, {"max_tokens": self.max_tokens_field, "logprobs": "top_logprobs", **self.renamed()})


class TokenizeRequest(_Body):
    """POST /tokenize: a prompt, or chat messages through the chat template (vLLM's schema)."""

    model: Optional[str] = None
    prompt: Optional[str] = None
    messages: Optional[List[ChatMessage]] = None
    add_special_tokens: Optional[bool] = True
    add_generation_prompt: Optional[bool] = True

    def check(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise APIError("give either prompt or messages", "prompt" if self.prompt is None else "messages")


class DetokenizeRequest(_Body):
    """POST /detokenize."""

    model: Optional[str] = None
    tokens: List[int]


_FIELD = re.compile(r"SamplingParams\.(\w+)")
_FIELDS = re.compile(r"SamplingParams ([\w, ]+):")


def field_of(error: ValueError, renamed: Dict[str, str]) -> APIError:
    """A 400 for a SamplingParams ValueError: its field under the request's name for it (`renamed`)."""
    text = str(error)
    m = _FIELD.search(text) or _FIELDS.search(text)
    name = m.group(1).split(",")[0].strip() if m else None
    field = renamed.get(name, name)
    if m and m.re is _FIELD:
        text = text.replace(f"SamplingParams.{name}", field)
    return APIError(text, field)


def make_params(kwargs: Dict[str, Any], renamed: Dict[str, str]) -> SamplingParams:
    try:
        return SamplingParams(**kwargs)
    except ValueError as e:
        raise field_of(e, renamed) from None


def validation_error(errors: List[dict]) -> APIError:
    """A 400 for pydantic's (FastAPI's) errors: the first one, with its field as OpenAI's `param`."""
    first = errors[0]
    # A union reports one error per member, its loc tagged with the member's type ("str", "list[TextPart]"):
    # the deepest error under the first error's field says most (e.g. messages[0].content[1].type).
    e = max((x for x in errors if x.get("loc", ())[:2] == first.get("loc", ())[:2]), key=lambda x: len(x["loc"]))
    loc = [p for p in e.get("loc", ()) if p != "body" and not _is_type_tag(p)]
    if e.get("type") == "json_invalid":
        return APIError(f"the body is not valid JSON: {e.get('ctx', {}).get('error', e.get('msg'))}")
    if not loc or e.get("type") in ("model_attributes_type", "model_type", "dict_type"):
        return APIError("the body must be a JSON object")
    param = str(loc[0])
    for p in loc[1:]:
        param += f"[{p}]" if isinstance(p, int) else f".{p}"
    if e.get("type") == "missing":
        return APIError(f"{param} is required", param)
    msg = e.get("msg", "is invalid")
    msg = msg[len("Value error, "):] if msg.startswith("Value error, ") else msg
    return APIError(f"{param}: {msg}", param)


def _is_type_tag(part) -> bool:
    return isinstance(part, str) and (part in ("str", "int", "float", "bool", "list", "dict") or "[" in part)
