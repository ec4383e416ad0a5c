"""LoRARequest and PromptAdapterRequest: which adapter a request runs with, under vLLM's and TensorRT-LLM's names."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

_CKPT_SOURCES = (None, "hf", "nemo")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class LoRARequest:
    """A LoRA adapter for a request: `LoRARequest("sql", 1, "/adapters/sql")`.

    `lora_int_id` names the adapter inside the LLM (the loaded weights, the device slot and the prefix cache are
    keyed by it); -1 stands for the base model, as no adapter does.
    """

    lora_name: str
    """A name for the adapter (`llmapi serve` lists it in /v1/models; a request's `model` may name it)."""
    lora_int_id: int
    """The adapter's id: an int >= 1 (or -1: the base model)."""
    lora_path: str = ""
    """A Hugging Face PEFT directory (adapter_config.json + adapter_model.safetensors or .bin) or a NeMo LoRA
    .nemo file."""
    lora_ckpt_source: Optional[str] = None
    """"hf" (PEFT) or "nemo" (TensorRT-LLM's name); None: told from the path (a .nemo file is NeMo)."""

    def __post_init__(self):
        if not isinstance(self.lora_name, str) or not self.lora_name:
            raise ValueError(f"LoRARequest.lora_name={self.lora_name!r} is invalid: must be a non-empty string")
        if not _is_int(self.lora_int_id) or not (self.lora_int_id >= 1 or self.lora_int_id == -1):
            raise ValueError(f"LoRARequest.lora_int_id={self.lora_int_id!r} is invalid: must be an int >= 1 "
                             "(or -1 for the base model)")
        if not isinstance(self.lora_path, str):
            raise ValueError(f"LoRARequest.lora_path={self.lora_path!r} is invalid: must be a path string")
        if self.lora_int_id != -1 and not self.lora_path:
            raise ValueError(f"LoRARequest {self.lora_name!r}: lora_path is empty (a PEFT directory or a .nemo file)")
        if self.lora_ckpt_source not in _CKPT_SOURCES:
            raise ValueError(f"LoRARequest.lora_ckpt_source={self.lora_ckpt_source!r} is invalid: must be 'hf', "
                             "'nemo' or None")

    # vLLM's and TensorRT-LLM's accessors
    @property
    def adapter_id(self) -> int:
        return self.lora_int_id

    @property
    def name(self) -> str:
        return self.lora_name

    @property
    def path(self) -> str:
        return self.lora_path

    @property
    def is_base(self) -> bool:
        """Whether this request names the base model (lora_int_id -1)."""
        return self.lora_int_id == -1


@dataclass(frozen=True)
class PromptAdapterRequest:
    """A prompt-tuning table for a request: `PromptAdapterRequest("tasks", 1, "/tables/p_tuning.nemo", task_id=1)`.

    The table holds one or more tasks of virtual-token embeddings. A prompt token id v >= vocab_size stands for
    row v - vocab_size of the request's task; a prompt without such ids gets the task's virtual tokens in front
    of it (as vLLM prepends them).
    """

    prompt_adapter_name: str
    """A name for the table."""
    prompt_adapter_id: int
    """The table's id, an int >= 1 (the loaded table, its device slot and the prefix cache are keyed by it)."""
    prompt_adapter_local_path: str
    """A NeMo prompt-tuning .nemo file, or a tensor file (.safetensors, .pt, .npy) of [tasks, tokens, hidden] or
    [tokens, hidden] embeddings."""
    prompt_adapter_num_virtual_tokens: Optional[int] = None
    """Virtual tokens per task (vLLM's field); None: as many as the table's tasks have."""
    task_id: int = 0
    """Which of the table's tasks this request uses."""

    def __post_init__(self):
        if not isinstance(self.prompt_adapter_name, str) or not self.prompt_adapter_name:
            raise ValueError(f"PromptAdapterRequest.prompt_adapter_name={self.prompt_adapter_name!r} is invalid: "
                             "must be a non-empty string")
        if not _is_int(self.prompt_adapter_id) or self.prompt_adapter_id < 1:
            raise ValueError(f"PromptAdapterRequest.prompt_adapter_id={self.prompt_adapter_id!r} is invalid: must be "
                             "an int >= 1")
        if not isinstance(self.prompt_adapter_local_path, str) or not self.prompt_adapter_local_path:
            raise ValueError(f"PromptAdapterRequest.prompt_adapter_local_path={self.prompt_adapter_local_path!r} is "
                             "invalid: must be a path string")
        n = self.prompt_adapter_num_virtual_tokens
        if n is not None and (not _is_int(n) or n < 1):
            raise ValueError(f"PromptAdapterRequest.prompt_adapter_num_virtual_tokens={n!r} is invalid: must be an "
                             "int >= 1 or None")
        if not _is_int(self.task_id) or self.task_id < 0:
            raise ValueError(f"PromptAdapterRequest.task_id={self.task_id!r} is invalid: must be an int >= 0")


__all__ = ["LoRARequest", "PromptAdapterRequest"]
