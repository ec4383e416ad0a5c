"""The streaming loader reads each tensor into its parameter exactly as safetensors' own load_file reads it."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from llmapi.engine.loader import load_into, read_header
from llmapi.errors import CorruptEngineError


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(37, 19, generator=g),
        "b.weight": torch.randn(8, 300, generator=g).to(torch.bfloat16),
        "c.qweight": torch.randint(-128, 127, (64, 33), generator=g, dtype=torch.int8),
        "d.scale": torch.randn(5, generator=g).to(torch.float8_e4m3fn),
        "e.ids": torch.randint(0, 1 << 30, (7,), generator=g, dtype=torch.int32),
        "f.empty": torch.zeros(0, 4),
    }


def _filled_like(tensors, device="cpu"):
    return {name: torch.full_like(t.float(), 3.0).to(t.dtype).to(device) for name, t in tensors.items()}


@pytest.mark.parametrize("chunk", [64 << 20, 100])
def test_load_into_equals_load_file(tmp_path, chunk):
    path = tmp_path / "rank0.safetensors"
    save_file(_tensors(), str(path))
    reference = load_file(str(path))
    params = _filled_like(reference)
    load_into(path, params, chunk=chunk)
    for name, ref in reference.items():
        assert params[name].dtype == ref.dtype
        assert torch.equal(params[name].view(torch.uint8), ref.view(torch.uint8)), name


def test_other_dtype_is_converted_as_copy_does(tmp_path):
    path = tmp_path / "rank0.safetensors"
    save_file({"w": torch.randn(4, 6)}, str(path))
    param = torch.zeros(4, 6, dtype=torch.bfloat16)
    load_into(path, {"w": param})
    assert torch.equal(param, load_file(str(path))["w"].to(torch.bfloat16))


def test_names_and_shapes_must_fit(tmp_path):
    path = tmp_path / "rank0.safetensors"
    save_file({"w": torch.randn(4, 6), "v": torch.randn(2)}, str(path))
    with pytest.raises(CorruptEngineError, match=r"missing \['u'\], unexpected \['v'\]"):
        load_into(path, {"w": torch.zeros(4, 6), "u": torch.zeros(2)})
    with pytest.raises(CorruptEngineError, match=r"'w' has shape \(4, 6\), expected \(6, 4\)"):
        load_into(path, {"w": torch.zeros(6, 4), "v": torch.zeros(2)})


def test_truncated_file_is_named(tmp_path):
    path = tmp_path / "rank0.safetensors"
    save_file({"w": torch.randn(64, 64)}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(CorruptEngineError, match="outside the data section"):
        read_header(path)
    with pytest.raises(CorruptEngineError, match="rank0.safetensors"):
        load_into(path, {"w": torch.zeros(64, 64)})


@pytest.mark.gpu
def test_load_into_cuda_through_staging(tmp_path):
    path = tmp_path / "rank0.safetensors"
    save_file(_tensors(), str(path))
    reference = load_file(str(path))
    params = _filled_like(reference, "cuda")
    load_into(path, params, chunk=1000)  # many chunks through the two buffers in turn
    for name, ref in reference.items():
        assert torch.equal(params[name].cpu().view(torch.uint8), ref.view(torch.uint8)), name
