"""llmapi: LLM inference from Hugging Face models through cached engines and a C++ executor."""

from .config import CapacitySchedulerPolicy, KvCacheConfig, LlmArgs, SchedulerConfig
from .errors import (AdapterError, AdapterNotFoundError, CorruptEngineError, EngineCacheError,
                     EngineLockTimeoutError, ExecutorDeadError, ExecutorError, GuidedDecodingError, LaunchError,
                     LLMAPIError, LogitsProcessorError, ModelNotFoundError, RequestAbortedError, RequestError,
                     StepTimeoutError, UnsupportedModelError, WorkerDiedError)
from .guided_decoding import GuidedDecodingParams, StructuredOutputsParams
from .llm import LLM
from .lora import LoraConfig, LoRARequest, PromptAdapterRequest
from .quantization import QuantConfig
from .outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput, SpeculativeDecodingMetrics
from .sampling_params import SamplingParams
from .speculative import DraftTargetDecodingConfig, EagleDecodingConfig, NGramDecodingConfig

__version__ = "0.2.0"

__all__ = [
    "LLM", "SamplingParams", "GuidedDecodingParams", "StructuredOutputsParams", "RequestOutput", "CompletionOutput",
    "Logprob", "KvCacheConfig", "SchedulerConfig", "CapacitySchedulerPolicy", "LlmArgs", "QuantConfig", "LoRARequest",
    "LoraConfig", "PromptAdapterRequest",
    "DraftTargetDecodingConfig", "NGramDecodingConfig", "EagleDecodingConfig", "RequestMetrics",
    "SpeculativeDecodingMetrics",
    "LLMAPIError", "ModelNotFoundError", "UnsupportedModelError", "EngineCacheError",
    "CorruptEngineError", "RequestError", "RequestAbortedError", "ExecutorError", "ExecutorDeadError",
    "WorkerDiedError", "LaunchError", "StepTimeoutError", "EngineLockTimeoutError",
    "LogitsProcessorError", "GuidedDecodingError", "AdapterError", "AdapterNotFoundError",
]
