"""From LLM(speculative_config=...) to the executor's settings and the runner's drafter."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ..errors import UnsupportedModelError
from .config import DraftTargetDecodingConfig, EagleDecodingConfig, NGramDecodingConfig, SpeculativeConfig


@dataclass
class SpeculativeSetup:
    """What the runner needs to build its drafter: the config and, for a draft model, its engine; for EAGLE, the
    head's directory."""

    config: SpeculativeConfig
    draft_engine: Optional[object] = None  # llmapi.engine.EngineInfo
    eagle_dir: Optional[Path] = None

    def executor_kwargs(self) -> dict:
        """ExecutorConfig's speculative fields."""
        c = self.config
        return dict(speculative_mode=c.mode, max_draft_len=c.max_draft_len,
                    max_matching_ngram_size=getattr(c, "max_matching_ngram_size", 0))

    def to_dict(self) -> dict:
        """The setup as JSON for the ranks of a multi-rank job (n-gram or a draft model: EAGLE runs on one rank)."""
        import dataclasses

        out = dict(config={"decoding_type": self.config.decoding_type, **dataclasses.asdict(self.config)})
        if self.draft_engine is not None:
            info = self.draft_engine
            out["draft_engine"] = dict(path=str(info.path), config=info.config, build_config=info.build_config)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "SpeculativeSetup":
        from types import SimpleNamespace

        from .config import resolve_speculative_config

        engine = data.get("draft_engine")
        return cls(resolve_speculative_config(dict(data["config"])),
                   draft_engine=None if engine is None else SimpleNamespace(**engine))

    @property
    def has_drafter(self) -> bool:
        """Whether the runner drafts (a draft model or an EAGLE head); n-gram drafts come from the executor."""
        return not isinstance(self.config, NGramDecodingConfig)

    def build(self, target_model, device: torch.device, dtype: torch.dtype, tokens_per_block: int):
        """The runner's SpeculativeDecoder (its drafter's weights loaded on `device`)."""
        from .step import SpeculativeDecoder

        c = self.config
        if isinstance(c, NGramDecodingConfig):
            return SpeculativeDecoder(c.mode, max_draft_len=c.max_draft_len)
        if isinstance(c, DraftTargetDecodingConfig):
            import os

            from ..distributed.mapping import Mapping
            from ..distributed.sharding import build_rank_model, load_rank_model
            from ..engine.format import rank_file
            from ..runtime.model_runner import torch_dtype
            from .drafter import DraftModelDrafter

            info = self.draft_engine
            cfg = info.config
            draft_dtype = torch_dtype(cfg["dtype"])
            model = build_rank_model(cfg, Mapping(), device, draft_dtype)
            dummy = info.build_config.get("load_format") == "dummy" and not os.path.exists(
                os.path.join(info.path, rank_file(0)))
            load_rank_model(model, info.path, 0, dummy, cfg, draft_dtype, device)
            return SpeculativeDecoder(c.mode, DraftModelDrafter(model.eval(), cfg, device, draft_dtype,
                                                                tokens_per_block), accept_all=c.accept_all_drafts)
        from .drafter import EagleDrafter
        from .eagle import load_eagle_head

        head = load_eagle_head(self.eagle_dir, target_model.config, device, dtype)
        return SpeculativeDecoder(c.mode, EagleDrafter(head, target_model, device, dtype, tokens_per_block))


def prepare(args, target_config: dict, device: torch.device, build_engine_fn,
            max_seq_len: int) -> Optional[SpeculativeSetup]:
    """Check LlmArgs.speculative_config against the target and fetch what its drafter needs: the draft model's
    engine (built or found in the engine cache with the target's dtype, unquantized), or the EAGLE head's
    directory. None without speculative decoding. `build_engine_fn(model)` builds an engine of the target's
    settings on one rank; `max_seq_len` is the LLM's (a draft model must hold as many positions)."""
    config = args.speculative_config
    if config is None:
        return None
    world = args.tensor_parallel_size * args.pipeline_parallel_size
    if getattr(config, "accept_all_drafts", False) and world > 1:
        raise ValueError(f"speculative_config=DraftTargetDecodingConfig(accept_all_drafts=True) is invalid with "
                         f"tensor_parallel_size * pipeline_parallel_size = {world}: the benchmark switch runs on one "
                         "rank only")
    if isinstance(config, EagleDecodingConfig) and world > 1:
        raise ValueError(f"speculative_config=EagleDecodingConfig(...) is invalid with tensor_parallel_size * "
                         f"pipeline_parallel_size = {world}: an EAGLE head runs on one rank only")
    if target_config.get("sliding_window"):
        raise ValueError(f"speculative_config={type(config).__name__}(...) is invalid for this model: speculative "
                         f"decoding does not support a sliding window (sliding_window="
                         f"{target_config['sliding_window']})")
    if target_config.get("is_encoder_decoder"):
        raise ValueError(f"speculative_config={type(config).__name__}(...) is invalid for an encoder-decoder model")
    if isinstance(config, NGramDecodingConfig):
        return SpeculativeSetup(config)
    if isinstance(config, DraftTargetDecodingConfig):
        info = build_engine_fn(config.speculative_model)
        draft_vocab, vocab = info.config["vocab_size"], target_config["vocab_size"]
        if draft_vocab != vocab:
            raise ValueError(f"speculative_model={config.speculative_model!r} is invalid: its vocabulary has "
                             f"{draft_vocab} tokens, the target's {vocab} (the draft must share the target's "
                             "tokenizer)")
        draft_positions = info.config["max_position_embeddings"]
        if draft_positions < max_seq_len:
            raise ValueError(f"speculative_model={config.speculative_model!r} is invalid with "
                             f"max_seq_len={max_seq_len}: the draft model has {draft_positions} positions "
                             f"(max_position_embeddings); pass LLM(max_seq_len={draft_positions}) or a draft with as "
                             "many positions as the target")
        if (info.config.get("quantization") or {}).get("quant_algo"):
            raise UnsupportedModelError(f"speculative_model={config.speculative_model!r}: a quantized draft model "
                                        "is not supported")
        return SpeculativeSetup(config, draft_engine=info)
    assert isinstance(config, EagleDecodingConfig)
    from .eagle import find_eagle_dir, head_config, read_eagle_config

    path = find_eagle_dir(config.speculative_model, revision=None, token=args.hf_token)
    head_config(read_eagle_config(path), target_config)  # a head that does not fit the target fails here, by name
    return SpeculativeSetup(config, eagle_dir=path)


__all__ = ["SpeculativeSetup", "prepare"]
