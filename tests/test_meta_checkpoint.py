"""Meta's original Llama checkpoints (params.json + consolidated.NN.pth + tokenizer.model) load directly: LLM's
greedy tokens equal a plain-torch reference of Meta's model.py run on the shards as Meta's model-parallel ranks
run them (1 and 2 shards, Llama 3's vocabulary-split embedding with 3.1's scaled rope), also with chunked prefill
and prefix reuse; the HF-shaped state dict is what transformers' Llama reads; bad layouts get typed errors."""

import json
import shutil

import pytest
import torch

from family_parity import check_multi_rank, check_parity
from llmapi import LLM, ModelNotFoundError, SamplingParams, UnsupportedModelError
from llmapi.engine import meta
from llmapi.hub import resolve_source
from meta_reference import MetaReference
from tiny_models import make_meta_checkpoint, save_tiny_sentencepiece

VOCAB = 320
CHECKPOINTS = {
    "llama2-1shard": dict(num_shards=1),
    "llama2-2shards": dict(num_shards=2),
    # Llama 3.1's layout: VocabParallelEmbedding, rope_theta 5e5 with use_scaled_rope, an ffn_dim_multiplier.
    "llama3.1-2shards": dict(num_shards=2, vocab_parallel_embedding=True, rope_theta=500000.0, use_scaled_rope=True,
                             ffn_dim_multiplier=1.3),
}


@pytest.fixture(scope="module")
def meta_dirs(tmp_path_factory):
    dirs = {}
    for i, (name, kwargs) in enumerate(CHECKPOINTS.items()):
        path = tmp_path_factory.mktemp(name)
        make_meta_checkpoint(path, vocab_size=VOCAB, seed=i, **kwargs)
        save_tiny_sentencepiece(path, VOCAB)
        dirs[name] = path
    return dirs


@pytest.fixture(scope="module")
def meta_dir(meta_dirs):
    return meta_dirs["llama2-2shards"]


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_llm_greedy_equals_meta_reference(name, meta_dirs):
    """Chunked prefill (10 mixed prompts) and prefix reuse, each output against Meta's model run on the shards."""
    ref = MetaReference(meta_dirs[name])
    stats = check_parity(meta_dirs[name], VOCAB, reference=lambda prompts, n: ref.greedy(prompts, n))
    assert max(stats["chunks"]) > 1 and stats["prefix_hit_tokens"] > 0


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_hf_state_dict_is_what_transformers_reads(name, meta_dirs):
    """The reader's HF config + state dict in transformers' LlamaForCausalLM (rotate-half rotary, its own llama3
    rope scaling) give the logits of Meta's model (complex rotary over adjacent pairs) on the shards."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_config, state_dict = meta.load_meta(meta_dirs[name])
    fields = {k: v for k, v in hf_config.items() if k not in ("dtype", "torch_dtype", "transformers_version")}
    model = LlamaForCausalLM(LlamaConfig(**fields)).eval()
    model.load_state_dict({k: state_dict[k] for k in state_dict}, strict=True)
    tokens = list(range(3, VOCAB, 3))  # 106 positions
    with torch.no_grad():
        got = model(torch.tensor([tokens])).logits[0]
    want = MetaReference(meta_dirs[name]).logits(tokens)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()


def test_engine_config_follows_params_json(meta_dirs, tmp_path):
    def config(name):
        with LLM(str(meta_dirs[name]) if name in meta_dirs else name, skip_tokenizer_init=True) as llm:
            assert llm.engine_info.source.kind == "meta"
            return llm.engine_info.config

    cfg = config("llama2-2shards")
    # Meta's FeedForward: int(2 * 4 * 64 / 3) = 170, rounded up to multiple_of 32: 192; vocab_size -1 is the 320
    # rows of tok_embeddings; no rope_theta is Llama 2's 10000 and 4096 positions.
    assert (cfg["intermediate_size"], cfg["vocab_size"], cfg["num_key_value_heads"]) == (192, VOCAB, 2)
    assert (cfg["rotary_base"], cfg["rotary_scaling"], cfg["max_position_embeddings"]) == (10000.0, None, 4096)
    assert cfg["bos_token_id"] == 1 and cfg["eos_token_id"] == [2] and not cfg["tie_word_embeddings"]
    cfg = config("llama3.1-2shards")
    # ffn_dim_multiplier 1.3: int(1.3 * 170) = 221 -> 224; use_scaled_rope is Llama 3.1's llama3 scaling.
    assert cfg["intermediate_size"] == 224 and cfg["max_position_embeddings"] == 131072
    assert cfg["rotary_base"] == 500000.0
    assert cfg["rotary_scaling"] == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    path = _copy(meta_dirs["llama2-1shard"], tmp_path)
    _params(path, max_seq_len=512)  # when params.json names the context, it is the engine's
    assert config(str(path))["max_position_embeddings"] == 512


def test_text_prompts_tokenize_as_sentencepiece(meta_dir):
    """The HF tokenizer made from tokenizer.model encodes as SentencePiece itself does, with Meta's BOS."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(meta_dir / "tokenizer.model"))
    texts = ["hello the quick fox", "a cache must never convert 1234 models twice", "Hello  world\nünïcode"]
    with LLM(str(meta_dir)) as llm:
        outs = llm.generate(texts, SamplingParams(max_tokens=4, temperature=0), use_tqdm=False)
        assert [o.prompt_token_ids for o in outs] == [sp.encode(t, add_bos=True) for t in texts]
        assert llm.tokenizer.decode(sp.encode(texts[1])) == texts[1]


def test_two_shard_checkpoint_under_tensor_parallel(meta_dir):
    check_multi_rank(meta_dir, VOCAB, mappings=((2, 1),))


def test_second_llm_hits_the_cache_and_a_changed_shard_changes_the_key(tmp_path, meta_dir):
    from llmapi.engine import cache

    path = tmp_path / "ckpt"
    shutil.copytree(meta_dir, path)
    with LLM(str(path), skip_tokenizer_init=True) as llm:
        assert llm.engine_built
    builds = cache.stats.builds
    with LLM(str(path), skip_tokenizer_init=True) as llm:
        assert not llm.engine_built and cache.stats.builds == builds
    identity = resolve_source(path).identity
    assert identity["kind"] == "meta" and {"consolidated.00.pth", "consolidated.01.pth", "params.json",
                                           "tokenizer.model"} <= {f["name"] for f in identity["files"]}
    shard = torch.load(path / "consolidated.01.pth", weights_only=True)
    shard["norm.weight"] = shard["norm.weight"] * 2
    torch.save(shard, path / "consolidated.01.pth")
    assert resolve_source(path).identity != identity


# --- bad layouts: typed errors that name the problem ---

def _copy(meta_dir, tmp_path):
    path = tmp_path / "bad"
    shutil.copytree(meta_dir, path)
    return path


def _params(path, **changes):
    params = json.loads((path / "params.json").read_text())
    params.update(changes)
    (path / "params.json").write_text(json.dumps({k: v for k, v in params.items() if v is not None}))


def test_gap_in_shard_numbers(tmp_path, meta_dir):
    path = _copy(meta_dir, tmp_path)
    (path / "consolidated.01.pth").rename(path / "consolidated.02.pth")
    with pytest.raises(ModelNotFoundError, match=r"consolidated\.01\.pth is missing"):
        LLM(str(path))


def test_params_json_without_shards(tmp_path):
    (tmp_path / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 2, "n_heads": 4}))
    with pytest.raises(ModelNotFoundError, match=r"params\.json but no consolidated\.NN\.pth"):
        LLM(str(tmp_path))


def test_shards_not_split_as_params_json_says(tmp_path, meta_dirs):
    # Two copies of a one-shard checkpoint: each holds whole tensors, not a model-parallel half.
    path = _copy(meta_dirs["llama2-1shard"], tmp_path)
    shutil.copyfile(path / "consolidated.00.pth", path / "consolidated.01.pth")
    with pytest.raises(UnsupportedModelError, match=r"layers\.0\.attention\.wq\.weight merged from 2 shard\(s\) is "
                                                    r"\[128, 64\], params\.json implies \[64, 64\]"):
        LLM(str(path))


def test_shards_of_unequal_pieces(tmp_path, meta_dir):
    path = _copy(meta_dir, tmp_path)
    shard = torch.load(path / "consolidated.01.pth", weights_only=True)
    shard["layers.1.feed_forward.w1.weight"] = shard["layers.1.feed_forward.w1.weight"][:64]
    torch.save(shard, path / "consolidated.01.pth")
    with pytest.raises(UnsupportedModelError, match=r"layers\.1\.feed_forward\.w1\.weight is \[96, 64\] in "
                                                    r"consolidated\.00\.pth but \[64, 64\] in consolidated\.01\.pth"):
        LLM(str(path))


def test_unreadable_shard(tmp_path, meta_dir):
    path = _copy(meta_dir, tmp_path)
    (path / "consolidated.01.pth").write_bytes(b"not a torch file")
    with pytest.raises(UnsupportedModelError, match=r"cannot read Meta checkpoint shard .*consolidated\.01\.pth"):
        LLM(str(path))


def test_shard_missing_a_tensor(tmp_path, meta_dir):
    path = _copy(meta_dir, tmp_path)
    shard = torch.load(path / "consolidated.00.pth", weights_only=True)
    del shard["layers.2.ffn_norm.weight"]
    torch.save(shard, path / "consolidated.00.pth")
    with pytest.raises(UnsupportedModelError, match=r"consolidated\.00\.pth lacks 1 tensors .*layers\.2\.ffn_norm"):
        LLM(str(path))


@pytest.mark.parametrize("changes,match", [
    ({"multiple_of": 128}, r"feed_forward\.w1\.weight merged from 2 shard\(s\) is \[192, 64\], params\.json "
                           r"implies \[256, 64\] \(params\.json dim=64, multiple_of=128"),
    ({"vocab_size": 32000}, r"says vocab_size 32000, but tok_embeddings\.weight holds 320 rows"),
    ({"n_kv_heads": 1}, r"2 model-parallel shards .* cannot each hold whole heads of n_heads=4, n_kv_heads=1"),
    ({"dim": None}, r"'dim' must be a positive integer, got None"),
    ({"n_heads": 3}, r"dim 64 is not divisible by n_heads 3"),
    ({"quantization_args": {"scheme": "int4_weight_int8_dynamic_activation"}}, r"quantization_args"),
])
def test_params_json_that_does_not_match_the_shards(tmp_path, meta_dir, changes, match):
    path = _copy(meta_dir, tmp_path)
    _params(path, **changes)
    with pytest.raises(UnsupportedModelError, match=match):
        LLM(str(path))


def test_interleaved_to_half_rotary_moves_pairs_apart():
    """Per head, Meta's rows (x0, x1), (x2, x3), ... become HF's x0, x2, ... then x1, x3, ... (rotate-half pairs)."""
    rows = torch.arange(2 * 8, dtype=torch.float32)[:, None]  # 2 heads of head_dim 8
    got = meta.interleaved_to_half_rotary(rows, heads=2)[:, 0].tolist()
    assert got == [0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15]
