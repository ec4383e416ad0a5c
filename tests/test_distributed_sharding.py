"""Sharded models (tensor-parallel swaps, pipeline stages) compute the full model's logits, run in one process:
TP ranks as threads whose collectives meet at a barrier, pipeline stages one after the other."""

import threading

import pytest
import torch

from llmapi.distributed.mapping import Mapping, check_mapping
from llmapi.distributed.pipeline import micro_batches, slice_batch
from llmapi.distributed.sharding import DummyWeights, build_rank_model, shard_weights
from llmapi.errors import UnsupportedModelError
from llmapi.layers.attention import AttentionMetadata
from tiny_models import make_tiny_gpt2, make_tiny_llama, to_engine_model


class ThreadGroup:
    """The TP group of threads: each collective is one barrier to publish, one to read."""

    def __init__(self, size: int):
        self.size, self.barrier, self.slots = size, threading.Barrier(size, timeout=30), [None] * size


class ThreadComm:
    def __init__(self, group: ThreadGroup, rank: int):
        self.group, self.rank, self.size = group, rank, group.size

    def _exchange(self, x):
        self.group.slots[self.rank] = x.clone()
        self.group.barrier.wait()
        parts = list(self.group.slots)
        self.group.barrier.wait()
        return parts

    def all_reduce(self, x):
        parts = self._exchange(x)
        return x.copy_(torch.stack(parts).sum(0))

    def all_gather(self, x, dim):
        return torch.cat(self._exchange(x), dim=dim)


def _attn(lengths):
    """Metadata of one prefill step of fresh requests, block ids 0, 1, 2, ... in order."""
    block, tables, next_block = 8, [], 0
    for n in lengths:
        count = -(-n // block)
        tables.append(list(range(next_block, next_block + count)))
        next_block += count
    width = max(len(t) for t in tables)
    tables = [t + [0] * (width - len(t)) for t in tables]
    return AttentionMetadata.build(lengths, lengths, tables, block), next_block


def _caches(cfg, mapping, num_blocks, kv_heads):
    """The KV cache of the stage's layers only."""
    shape = (2, num_blocks, 8, kv_heads, cfg["head_dim"])
    return [torch.zeros(shape) for _ in mapping.stage_layers(cfg["num_hidden_layers"])]


def _sharded_logits(cfg, full_weights, tp, pp, ids, positions, lengths):
    """Logits of the last token of each request through tp x pp rank models (threads per stage)."""
    attn, num_blocks = _attn(lengths)
    last = attn.query_start_loc[1:].long() - 1
    hidden = [None] * tp
    logits = [None] * tp
    for stage in range(pp):
        group = ThreadGroup(tp)
        errors = []

        def run(t, stage=stage, group=group):
            try:
                mapping = Mapping(tp, pp, stage * tp + t)
                model = build_rank_model(cfg, mapping, "cpu", torch.float32, ThreadComm(group, t))
                model.load_weights(shard_weights(model, full_weights))
                kv = max(cfg["num_key_value_heads"] // tp, 1)
                with torch.no_grad():
                    h = model(ids, positions, attn, _caches(cfg, mapping, num_blocks, kv), hidden=hidden[t])
                    hidden[t] = h
                    if mapping.is_last_stage:
                        logits[t] = model.compute_logits(h[last])
            except BaseException as e:  # reported by the main thread
                errors.append(e)
                group.barrier.abort()

        threads = [threading.Thread(target=run, args=(t,)) for t in range(tp)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        if errors:
            raise errors[0]
    for t in range(1, tp):
        assert torch.equal(logits[t], logits[0])  # every TP rank gathers the same rows
    return logits[0]


def _inputs(vocab, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (sum(lengths),), generator=g)
    positions = torch.cat([torch.arange(n) for n in lengths])
    return ids, positions


MODELS = {
    "llama-gqa": lambda: make_tiny_llama(),
    "llama-mqa": lambda: make_tiny_llama(num_key_value_heads=1),
    "llama-tied": lambda: make_tiny_llama(tie_word_embeddings=True),
    "gpt2": lambda: make_tiny_gpt2(),
    "gpt2-odd-vocab": lambda: make_tiny_gpt2(vocab_size=287),  # the last vocab shard is padded
}


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("tp,pp,dim", [(2, 1, 0), (2, 1, 1), (1, 2, 0), (4, 1, 0), (2, 2, 1), (1, 3, 0)])
def test_sharded_logits_equal_full_model(name, tp, pp, dim):
    model, cfg = to_engine_model(MODELS[name]())
    cfg = dict(cfg, embedding_sharding_dim=dim)
    full = model.state_dict()
    lengths = [5, 1, 12]
    ids, positions = _inputs(cfg["vocab_size"], lengths)
    attn, num_blocks = _attn(lengths)
    with torch.no_grad():
        kv = _caches(cfg, Mapping(), num_blocks, cfg["num_key_value_heads"])
        want = model.compute_logits(model(ids, positions, attn, kv)[attn.query_start_loc[1:].long() - 1])
    got = _sharded_logits(cfg, full, tp, pp, ids, positions, lengths)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_mqa_kv_heads_are_replicated():
    _, cfg = to_engine_model(make_tiny_llama(num_key_value_heads=1))
    models = [build_rank_model(cfg, Mapping(4, 1, r), "meta", torch.float32) for r in range(4)]
    hd, nh = cfg["head_dim"], cfg["num_attention_heads"]
    for model in models:
        qkv = model.transformer.layers[0].attention.qkv
        assert qkv.rows[1:] == [(nh * hd, hd), ((nh + 1) * hd, hd)]  # the one k head and the one v head
        assert model.transformer.layers[0].attention.num_kv_heads == 1


@pytest.mark.parametrize("heads,kv_heads,tp,needle", [
    (6, 3, 2, "num_key_value_heads=3"), (6, 6, 4, "num_attention_heads=6"), (8, 2, 3, "num_attention_heads=8")])
def test_unsplittable_shapes_name_the_numbers(heads, kv_heads, tp, needle):
    cfg = {"num_attention_heads": heads, "num_key_value_heads": kv_heads, "intermediate_size": 96,
           "hidden_size": 48, "num_hidden_layers": 2}
    with pytest.raises(UnsupportedModelError, match=needle):
        check_mapping(cfg, Mapping(tp, 1))


def test_too_many_stages_is_refused():
    cfg = {"num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 96, "hidden_size": 48,
           "num_hidden_layers": 3}
    with pytest.raises(UnsupportedModelError, match="pipeline_parallel_size=4 exceeds num_hidden_layers=3"):
        check_mapping(cfg, Mapping(1, 4))


def test_stage_layers_cover_every_layer_once():
    for layers in (3, 8, 32):
        for pp in (1, 2, 3):
            got = [i for s in range(pp) for i in Mapping(1, pp).stage_layers(layers, s)]
            assert got == list(range(layers))


def test_dummy_shards_cut_the_same_full_tensors():
    _, cfg = to_engine_model(make_tiny_llama())
    dummy = DummyWeights(cfg, torch.float32)
    shards = [shard_weights(build_rank_model(cfg, Mapping(2, 1, r), "meta", torch.float32), dummy) for r in range(2)]
    name = "transformer.layers.1.mlp.proj.weight"  # row-parallel: the two halves of the input features
    assert torch.equal(torch.cat([shards[0][name], shards[1][name]], dim=1), dummy[name])


def test_micro_batches_split_by_tokens():
    import numpy as np

    assert micro_batches(np.array([1, 1, 1, 1]), 2) == [(0, 2), (2, 4)]
    assert micro_batches(np.array([10, 1, 1, 1]), 2) == [(0, 1), (1, 4)]
    assert micro_batches(np.array([5]), 2) == [(0, 1)]
    assert micro_batches(np.array([1, 1, 9]), 3) == [(0, 1), (1, 2), (2, 3)]


def test_slice_batch_keeps_each_request_whole():
    import numpy as np
    from types import SimpleNamespace

    batch = SimpleNamespace(
        query_lens=np.array([2, 1, 3]), context_lens=np.array([2, 5, 3]), do_sample=np.array([1, 1, 1]),
        temperature=np.zeros(3), top_k=np.zeros(3), top_p=np.ones(3), seeds=np.arange(3), output_index=np.zeros(3),
        logprobs=np.array([-1, 3, 0]), input_ids=np.arange(6), positions=np.array([0, 1, 4, 0, 1, 2]), slot_mapping=np.arange(6),
        prev_rows=np.array([-1, -1, 0, -1, -1, -1]),
        suppress_offsets=np.array([0, 1, 1, 3]), suppress_ids=np.array([7, 8, 9]),
        block_tables=np.array([[0, 0], [1, 2], [3, 0]]))
    mb = slice_batch(batch, 1, 3)
    assert mb.input_ids.tolist() == [2, 3, 4, 5] and mb.positions.tolist() == [4, 0, 1, 2]
    assert mb.suppress_offsets.tolist() == [0, 0, 2] and mb.suppress_ids.tolist() == [8, 9]
    assert mb.block_tables.tolist() == [[1, 2], [3, 0]] and mb.num_tokens == 4 and mb.num_requests == 2
    assert mb.logprobs.tolist() == [3, 0]
    assert mb.prev_rows.tolist() == [0, -1, -1, -1]  # per token, like input_ids


def test_engine_has_one_file_per_rank_and_a_saved_engine_keeps_its_split(tiny_llama_dir, tmp_path):
    from safetensors.torch import load_file

    from llmapi import LLM
    from llmapi.engine import build_engine, save_engine

    mapping = {"world_size": 2, "tp_size": 2, "pp_size": 1}
    info = build_engine(str(tiny_llama_dir), mapping=mapping)
    assert info.config["mapping"] == mapping
    shards = [load_file(str(info.path / f"rank{r}.safetensors")) for r in range(2)]
    full = load_file(str(build_engine(str(tiny_llama_dir)).path / "rank0.safetensors"))
    name = "transformer.layers.0.mlp.gate_up.weight"  # each rank: its half of gate, then its half of up
    inter = full[name].shape[0] // 2
    gate, up = full[name][:inter], full[name][inter:]
    assert torch.equal(shards[1][name], torch.cat([gate[inter // 2:], up[inter // 2:]]))
    saved = save_engine(info.path, tmp_path / "saved")
    with pytest.raises(ValueError, match="split as .*'tp_size': 2"):
        LLM(str(saved))  # one rank asked, two-rank engine given


def test_embedding_sharding_dim_is_validated(tiny_llama_dir):
    from llmapi import LLM

    with pytest.raises(ValueError, match="embedding_sharding_dim=2"):
        LLM(str(tiny_llama_dir), tensor_parallel_size=2, embedding_sharding_dim=2)
