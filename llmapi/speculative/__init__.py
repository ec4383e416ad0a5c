"""Speculative decoding: draft tokens (n-gram, a draft model, an EAGLE head) verified by the target in one step.

config.py holds the user's settings (TensorRT-LLM's names); the core (C++) schedules 1 + k tokens per decode step
and proposes n-gram drafts; drafter.py / eagle.py propose the others in the runner; rejection.py verifies them;
step.py is the runner's speculative step; setup.py wires an LLM's settings to the executor and the runner.
"""

from .config import (DraftTargetDecodingConfig, EagleDecodingConfig, NGramDecodingConfig, SpeculativeConfig,
                     resolve_speculative_config)

__all__ = ["DraftTargetDecodingConfig", "NGramDecodingConfig", "EagleDecodingConfig", "SpeculativeConfig",
           "resolve_speculative_config"]
