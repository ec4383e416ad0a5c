"""Prefix caching keyed by adapter: a request's block-hash chain starts at its adapter's own root, so the same
prompt under two adapters (or an adapter and the base model) never shares KV blocks, and the same adapter twice
does."""

import pytest
from lora_adapters import generate, make_peft_adapter, peft_generate, prompts

from llmapi import LLM, KvCacheConfig, LoRARequest, _core

MAX_TOKENS = 8
BLOCK = 8


def test_block_manager_roots_keep_salted_chains_apart():
    bm = _core.BlockManager(16, 4, True)
    tokens = list(range(10, 23))  # 3 full blocks and a token
    root_a, root_b = _core.BlockManager.root_hash(11), _core.BlockManager.root_hash(12)
    assert _core.BlockManager.root_hash(0) == _core.BlockManager.ROOT_HASH
    assert len({root_a, root_b, _core.BlockManager.ROOT_HASH}) == 3
    blocks = bm.allocate([], len(tokens))
    bm.cache_full_blocks(blocks, tokens, len(tokens), root=root_a)
    assert bm.lookup(tokens, root=root_a) == blocks[:3]
    assert bm.lookup(tokens, root=root_b) == [] and bm.lookup(tokens) == []
    # the first block's hash chains from its root
    assert bm.block_hash(blocks[0]) == _core.BlockManager.hash_block_tokens(root_a, tokens[:4])


@pytest.fixture(scope="module")
def setup(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-prefix")
    a = make_peft_adapter(tiny_llama_dir, root / "a", 8, ["q_proj", "k_proj", "v_proj"], seed=7)
    b = make_peft_adapter(tiny_llama_dir, root / "b", 4, ["v_proj", "o_proj"], seed=8)
    prompt = prompts(320, [3 * BLOCK + 3], seed=21)  # three full KV blocks and three tokens
    refs = {name: peft_generate(tiny_llama_dir, path, prompt, MAX_TOKENS)[0]
            for name, path in (("a", a), ("b", b), ("base", None))}
    return prompt, {"a": LoRARequest("a", 1, str(a)), "b": LoRARequest("b", 2, str(b)), "base": None}, refs


def test_same_prompt_under_two_adapters_shares_no_block(tiny_llama_dir, setup):
    prompt, requests, refs = setup
    cache = KvCacheConfig(enable_block_reuse=True)
    with LLM(str(tiny_llama_dir), enable_lora=True, max_loras=2, max_lora_rank=8, tokens_per_block=BLOCK,
             kv_cache_config=cache) as llm:
        hits = []
        for name in ("a", "b", "base", "a", "b", "base"):
            before = llm.get_stats()["num_prefix_hit_tokens"]
            assert generate(llm, prompt, requests[name], MAX_TOKENS) == [refs[name]], name
            hits.append(llm.get_stats()["num_prefix_hit_tokens"] - before)
    # first round: each finds nothing of the others' blocks; second round: each finds its own three blocks
    assert hits[:3] == [0, 0, 0]
    assert hits[3:] == [3 * BLOCK] * 3
    # shared KV would show: each adapter's tokens differ from the others'
    assert refs["a"] != refs["b"] and refs["a"] != refs["base"] and refs["b"] != refs["base"]
