"""Adapters: LoRA (multi-LoRA batches, Hugging Face PEFT and NeMo checkpoints) and prompt tuning.

`LLM(model, enable_lora=True, max_loras=4, max_lora_rank=16)` (vLLM) or `LLM(model, lora_config=LoraConfig(...))`
(TensorRT-LLM), then `llm.generate(prompts, params, lora_request=LoRARequest("sql", 1, "/adapters/sql"))`.
Prompt tables: `LLM(model, enable_prompt_adapter=True)` and `prompt_adapter_request=PromptAdapterRequest(...)`.
"""

from .config import LoraConfig, PromptAdapterConfig
from .requests import LoRARequest, PromptAdapterRequest

__all__ = ["LoRARequest", "LoraConfig", "PromptAdapterRequest", "PromptAdapterConfig"]
