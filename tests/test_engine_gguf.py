"""The bundled SmolLM2-135M-Instruct Q4_1 GGUF converts to an engine equal to transformers' GGUF reader output."""

import json

import pytest
import torch
from safetensors.torch import load_file

from llmapi.engine import build_engine, cache

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def built(tmp_path_factory, smollm2_gguf):
    """The engine built from the GGUF, and the paths the build opened with gguf's reader."""
    import gguf

    opened, init = [], gguf.GGUFReader.__init__

    def counting(self, path, *args, **kwargs):
        opened.append(path)
        init(self, path, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gguf.GGUFReader, "__init__", counting)
        engine = build_engine(smollm2_gguf, device_type="cpu", cache_dir=tmp_path_factory.mktemp("gguf-cache"))
    return engine, opened


@pytest.fixture(scope="module")
def engine(built):
    return built[0]


def test_gguf_engine_reads_the_file_once(built, smollm2_gguf):
    """transformers' config, tensor and tokenizer calls share one reader of the file (each opened its own before),
    and gguf's names are its own again after the build."""
    import gguf

    engine, opened = built
    assert engine.built and [str(p) for p in opened] == [str(smollm2_gguf)]
    assert isinstance(gguf.GGUFReader, type) and gguf.get_tensor_name_map.__module__ == "gguf.tensor_mapping"


def test_gguf_engine_config(engine):
    cfg = engine.config
    assert engine.built and engine.source.kind == "gguf"
    assert cfg["architecture"] == "LlamaForCausalLM" and cfg["dtype"] == "float32"
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"],
            cfg["num_key_value_heads"], cfg["head_dim"]) == (30, 576, 9, 3, 64)
    assert cfg["tie_word_embeddings"] and cfg["vocab_size"] == 49152 and cfg["intermediate_size"] == 1536
    assert cfg["rotary_base"] == 100000.0 and cfg["position_embedding_type"] == "rope_gpt_neox"
    assert cfg["eos_token_id"] == [2] and cfg["bos_token_id"] == 1


def test_gguf_engine_tokenizer_stops_on_im_end(engine):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(engine.path))
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.convert_ids_to_tokens(2) == "<|im_end|>"
    assert json.loads((engine.path / "generation_config.json").read_text())["eos_token_id"] == 2
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                           add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")


def test_gguf_engine_weights_equal_transformers_reader(engine, smollm2_gguf):
    GGUF = smollm2_gguf
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(str(GGUF.parent), gguf_file=GGUF.name)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    ref = load_gguf_checkpoint(str(GGUF), return_tensors=True, model_to_load=skeleton)["tensors"]  # HF names
    got = load_file(str(engine.path / "rank0.safetensors"))
    assert "lm_head.weight" not in got  # tied
    assert torch.equal(got["transformer.vocab_embedding.weight"], ref["model.embed_tokens.weight"])
    assert torch.equal(got["transformer.ln_f.weight"], ref["model.norm.weight"])
    for i in range(30):
        src, dst = f"model.layers.{i}.", f"transformer.layers.{i}."
        qkv = torch.cat([ref[src + f"self_attn.{p}_proj.weight"] for p in "qkv"])
        gate_up = torch.cat([ref[src + "mlp.gate_proj.weight"], ref[src + "mlp.up_proj.weight"]])
        assert torch.equal(got[dst + "attention.qkv.weight"], qkv)
        assert torch.equal(got[dst + "attention.dense.weight"], ref[src + "self_attn.o_proj.weight"])
        assert torch.equal(got[dst + "mlp.gate_up.weight"], gate_up)
        assert torch.equal(got[dst + "mlp.proj.weight"], ref[src + "mlp.down_proj.weight"])
        assert torch.equal(got[dst + "input_layernorm.weight"], ref[src + "input_layernorm.weight"])
        assert torch.equal(got[dst + "post_layernorm.weight"], ref[src + "post_attention_layernorm.weight"])
    assert len(got) == 2 + 6 * 30


def test_gguf_second_build_is_a_cache_hit(engine, smollm2_gguf):
    builds = cache.stats.builds
    again = build_engine(smollm2_gguf, device_type="cpu", cache_dir=engine.path.parent.parent)
    assert not again.built and again.path == engine.path and cache.stats.builds == builds
