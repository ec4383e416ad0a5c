"""Typed errors raised by llmapi: recoverable (one request failed) and fatal (the engine is dead)."""

from __future__ import annotations


class LLMAPIError(Exception):
    """Base class of every error llmapi raises on purpose."""


class ModelNotFoundError(LLMAPIError, FileNotFoundError):
    """The model source (hub id, directory, GGUF file or engine) cannot be found."""


class UnsupportedModelError(LLMAPIError, ValueError):
    """The model's architecture or layout is not one llmapi can convert."""


class UnsafeCheckpointError(UnsupportedModelError):
    """A pickled checkpoint (e.g. a fairseq model.pt) names a global (class or function) outside the reader's
    allow-list; it is refused before anything in it runs, and the message names the global."""


class MissingDependencyError(LLMAPIError, ImportError):
    """An optional package a feature needs is not installed; the message says what to install."""


class UnsupportedDeviceError(LLMAPIError, RuntimeError):
    """The device cannot run what was asked (e.g. FP8 below compute capability 8.9); the message says why."""


class EngineCacheError(LLMAPIError):
    """The engine cache cannot be read or written."""


class CorruptEngineError(EngineCacheError):
    """An engine directory fails its integrity check (missing, truncated or altered files)."""


class RequestError(LLMAPIError, ValueError):
    """One request is invalid (empty prompt, prompt too long, ...); the LLM stays usable."""


class LogitsProcessorError(RequestError):
    """A request's own logits_processor raised, hung or returned something that is not a row of logits;
    that request alone fails with it."""


class GuidedDecodingError(RequestError):
    """A request's guided decoding (SamplingParams.guided_decoding) cannot be had: its JSON schema, regex or
    grammar is invalid (raised by generate() before the request is queued), or its grammar matcher failed
    during generation (that request alone fails with it)."""


class AdapterError(RequestError):
    """A LoRA adapter or prompt-tuning table cannot be used: its files are not an adapter, its rank, modules or
    shapes do not fit the base model or the LLM's settings, or the LLM was not started with adapters enabled; the
    message names the problem."""


class AdapterNotFoundError(AdapterError, FileNotFoundError):
    """A LoRA adapter's or prompt table's path does not exist."""


class RequestAbortedError(LLMAPIError):
    """The request was aborted before it finished."""


class ExecutorError(LLMAPIError):
    """The model runner failed the step that held this request; the LLM stays usable."""


class ExecutorDeadError(LLMAPIError, RuntimeError):
    """The executor stopped (shut down, or a fatal runner error); every later call raises this."""


class WorkerDiedError(ExecutorDeadError):
    """A rank of a multi-rank LLM died or lost its peers; every pending request fails with this and the LLM shuts down."""

    fatal = True  # raised by a runner, it kills the executor (see _core's runner contract)


class StepTimeoutError(ExecutorDeadError):
    """A step made no progress for LLM(step_timeout=...) seconds; the message names the stalled rank or the
    request whose logits processor was running. Every pending request fails with it and the LLM is dead."""


class EngineLockTimeoutError(EngineCacheError):
    """Another process held the engine's build lock past LLM(cache_lock_timeout=...); the message names its pid."""


class LaunchError(LLMAPIError, RuntimeError):
    """The ranks of a multi-rank LLM could not be started (no MPI launcher, a rank failed at startup)."""


def runner_error(message: str) -> LLMAPIError:
    """The error of a request that failed in the executor: the type named at the head of the message
    ("Type: ...") when it is one of these request-level or fatal types, else ExecutorError."""
    for cls in (WorkerDiedError, LogitsProcessorError, GuidedDecodingError):
        if message.startswith(f"{cls.__name__}:"):
            return cls(message)
    return ExecutorError(message)
