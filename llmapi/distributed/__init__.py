"""Tensor and pipeline parallelism over MPI ranks: mapping, sharding, rank runners, spawner and launcher."""

from llmapi.distributed.mapping import Mapping, check_mapping

__all__ = ["Mapping", "check_mapping"]
