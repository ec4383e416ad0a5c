"""SamplingParams, KvCacheConfig and LlmArgs reject bad values with errors that name the field."""

import pytest

from llmapi import KvCacheConfig, SamplingParams
from llmapi.config import validated_kwargs


@pytest.mark.parametrize("kwargs, field", [
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 2.5}, "max_tokens"),
    ({"min_tokens": -1}, "min_tokens"),
    ({"min_tokens": 9, "max_tokens": 4}, "min_tokens"),
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_k": -2}, "top_k"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"seed": "x"}, "seed"),
    ({"stop": ""}, "stop"),
    ({"stop": ["ok", 3]}, "stop"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"ignore_eos": "yes"}, "ignore_eos"),
    ({"stop": "x", "detokenize": False}, "stop"),
])
def test_sampling_params_rejects(kwargs, field):
    with pytest.raises(ValueError, match=rf"SamplingParams\.{field}="):
        SamplingParams(**kwargs)


def test_sampling_params_unknown_field():
    with pytest.raises(TypeError, match="bogus"):
        SamplingParams(bogus=1)


def test_sampling_params_normalises():
    p = SamplingParams(stop="END", stop_token_ids=(5, 6))
    assert p.stop_strings == ["END"]
    assert p.stop_token_ids == [5, 6]
    assert SamplingParams(temperature=0).greedy and not SamplingParams().greedy
    assert SamplingParams(seed=-1).effective_seed(7) == (1 << 63) - 1
    assert SamplingParams().effective_seed(7) == 7


def test_llm_args_unknown_kwargs_named():
    with pytest.raises(ValueError, match="max_batch, tpsize"):
        validated_kwargs({"model": "m", "tpsize": 2, "max_batch": 3})


def test_llm_args_tp_pp_spell_the_parallel_sizes():
    args = validated_kwargs({"model": "m", "tp": 2, "pp": 3, "pipeline_parallel_size": 3})
    assert (args.tensor_parallel_size, args.pipeline_parallel_size) == (2, 3)
    with pytest.raises(ValueError, match="tp=2 and tensor_parallel_size=4 disagree"):
        validated_kwargs({"model": "m", "tp": 2, "tensor_parallel_size": 4})
    with pytest.raises(ValueError, match="tensor_parallel_size"):  # validated as the long name
        validated_kwargs({"model": "m", "tp": 0})


@pytest.mark.parametrize("kwargs, field", [
    ({"dtype": "int3"}, "dtype"),
    ({"max_batch_size": 0}, "max_batch_size"),
    ({"max_num_tokens": True}, "max_num_tokens"),
    ({"max_seq_len": 1}, "max_seq_len"),
    ({"load_format": "npz"}, "load_format"),
    ({"device": "tpu"}, "device"),
    ({"kv_cache_config": {"max_tokens": 0}}, "max_tokens"),
    ({"kv_cache_config": {"free_gpu_memory_fraction": 1.5}}, "free_gpu_memory_fraction"),
    ({"kv_cache_config": {"nope": 1}}, "nope"),
])
def test_llm_args_rejects(kwargs, field):
    with pytest.raises(ValueError, match=field):
        validated_kwargs({"model": "m", **kwargs})


def test_kv_cache_config_from_dict():
    args = validated_kwargs({"model": "m", "kv_cache_config": {"max_tokens": 64}})
    assert args.kv_cache_config == KvCacheConfig(max_tokens=64)
