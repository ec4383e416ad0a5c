"""Shared fixtures: an isolated engine cache, and tiny random-weight Hugging Face models on disk."""

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def _isolated_engine_cache(tmp_path_factory):
    # Tests never read or write the user's engine cache, and never reach the hub.
    old = {k: os.environ.get(k) for k in ("LLMAPI_CACHE_DIR", "HF_HUB_OFFLINE")}
    os.environ["LLMAPI_CACHE_DIR"] = str(tmp_path_factory.mktemp("engine-cache"))
    os.environ["HF_HUB_OFFLINE"] = "1"
    yield
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def pytest_collection_modifyitems(config, items):
    # GPU tests run on a GPU machine (pytest -m gpu); without CUDA they are reported as skipped.
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="marked gpu: needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
