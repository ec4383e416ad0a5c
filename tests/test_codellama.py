"""CodeLlama (Llama with rope_theta 1e6, the 32016-token vocabulary and 16K positions) through LLM: greedy tokens
equal transformers' (chunked prefill, prefix reuse, the infilling ids, a prompt past Llama 2's 4096 positions),
TP=2 and PP=2 equal one rank, and a CodeLlama Meta checkpoint (params.json rope_theta 1e6) equals Meta's model."""

import logging

import pytest

from family_parity import check_multi_rank, check_parity, hf_greedy, llm_greedy, mixed_prompts, one_thread
from llmapi import LLM
from meta_reference import MetaReference
from tiny_models import make_meta_checkpoint, make_tiny_codellama
from tiny_tokenizer import save_tiny_tokenizer

VOCAB = 32016


@pytest.fixture(scope="module")
def codellama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-codellama")
    make_tiny_codellama(path)
    save_tiny_tokenizer(path, vocab_size=VOCAB)
    return path


def test_codellama_engine_config(codellama_dir):
    with LLM(str(codellama_dir)) as llm:
        cfg = llm.engine_info.config
        assert (cfg["vocab_size"], cfg["rotary_base"], cfg["max_position_embeddings"]) == (VOCAB, 1e6, 16384)
        assert len(llm.tokenizer) == VOCAB and llm.tokenizer.convert_ids_to_tokens(VOCAB - 1) == f"w{VOCAB - 1}"


def test_codellama_greedy_parity(codellama_dir):
    check_parity(codellama_dir, VOCAB)


def test_codellama_infilling_ids_and_a_prompt_past_4096_positions(codellama_dir):
    """The ids CodeLlama adds above Llama 2's 32000 (its infilling tokens) embed and come out as transformers'
    do; a 4200-token prompt runs at positions Llama 2 (4096) does not have."""
    infill = [[32000 + i for i in range(16)], [32007, 32013, 5, 32015]]
    long_prompt = mixed_prompts(VOCAB, seed=7)[8] * 70  # 4200 tokens
    with one_thread():
        with LLM(str(codellama_dir)) as llm:
            got = llm_greedy(llm, infill) + llm_greedy(llm, [long_prompt], max_tokens=5)
        want = hf_greedy(codellama_dir, infill) + hf_greedy(codellama_dir, [long_prompt], max_tokens=5)
    assert got == want


def test_codellama_tensor_and_pipeline_parallel_equal_one_rank(codellama_dir):
    check_multi_rank(codellama_dir, VOCAB, mappings=((2, 1), (1, 2)))


def test_codellama_meta_checkpoint(tmp_path, caplog):
    """CodeLlama's own release format: params.json with rope_theta 1e6 and vocab_size 32016, two model-parallel
    shards; no tokenizer.model here, so the engine has none (a warning says so) and prompts are ids."""
    make_meta_checkpoint(tmp_path, num_shards=2, vocab_size=VOCAB, rope_theta=1e6)
    prompts = mixed_prompts(VOCAB, seed=11)
    with caplog.at_level(logging.WARNING, logger="llmapi.engine.meta"), one_thread():
        with LLM(str(tmp_path), skip_tokenizer_init=True) as llm:
            cfg = llm.engine_info.config
            got = llm_greedy(llm, prompts)
        want = MetaReference(tmp_path).greedy(prompts, 20)
    assert (cfg["vocab_size"], cfg["rotary_base"], cfg["max_position_embeddings"]) == (VOCAB, 1e6, 16384)
    assert "has no tokenizer.model" in caplog.text
    assert got == want
