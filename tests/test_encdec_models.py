"""The encoder-decoder model (llmapi/models/encdec.py) against transformers, one forward at a time: the logits of
every decoder position of a converted tiny T5 / T5 v1.1 / mT5 / ByT5 / BART / mBART / FSMT equal transformers'
(fp32), with the encoder written into cross blocks and the decoder reading a paged cache, as a step runs them."""

import pytest
import torch

import encdec_models as em
from llmapi.models import convert_hf, get_model_class
from llmapi.models.encdec import relative_position_bucket, start_step

BLOCK = 4


def _converted(hf):
    config = hf.config.to_dict()
    config["architectures"] = [type(hf).__name__]
    cfg, weights = convert_hf(config, hf.state_dict(), torch.float32)
    model = get_model_class(cfg["architecture"])(cfg, "cpu", torch.float32)
    model.load_weights(weights)
    return cfg, model


def _step(cfg, rows):
    """A step that starts every (encoder ids, decoder ids) row (models.encdec.start_step) and a cache for it."""
    ids, positions, attn, num_blocks = start_step(rows, BLOCK)
    caches = [torch.zeros(2, num_blocks, BLOCK, cfg["num_key_value_heads"], cfg["head_dim"])
              for _ in range(cfg["num_hidden_layers"])]
    return ids, positions, attn, caches


MODELS = {
    "t5": lambda: em.t5("t5"), "t5v1.1": lambda: em.t5("t5v1.1"), "mt5": lambda: em.t5("mt5"),
    "byt5": lambda: em.t5("byt5"), "bart": lambda: em.bart(), "mbart": lambda: em.bart(mbart=True),
    "bart-3-2": lambda: em.bart(encoder_layers=3, decoder_layers=2), "fsmt": lambda: em.fsmt(),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_logits_equal_transformers(name):
    hf = MODELS[name]()
    cfg, model = _converted(hf)
    start = hf.config.decoder_start_token_id
    vocab = cfg["encoder"]["vocab_size"]
    rows = [(enc, [start] + dec[: 2 + i]) for i, (enc, dec) in
            enumerate(zip(em.inputs(3, vocab, seed=1), em.inputs(3, cfg["vocab_size"], seed=2, lengths=(6, 9))))]
    ids, positions, attn, caches = _step(cfg, rows)
    with torch.no_grad():
        logits = model.compute_logits(model(ids, positions, attn, caches))  # [T, V]
        at = 0
        for enc, dec in rows:
            # use_cache=False: FSMT builds its causal decoder mask only then (generation feeds one token at a time).
            ref = hf(input_ids=torch.tensor([enc]), decoder_input_ids=torch.tensor([dec]), use_cache=False).logits[0]
            torch.testing.assert_close(logits[at:at + len(dec)], ref, atol=1e-3, rtol=1e-3)
            at += len(dec)


@pytest.mark.parametrize("bidirectional", [True, False])
def test_relative_buckets_equal_transformers(bidirectional):
    from transformers.models.t5.modeling_t5 import T5Attention

    relative = torch.arange(-300, 301)
    for buckets, distance in ((32, 128), (8, 20), (16, 64)):
        ours = relative_position_bucket(relative, bidirectional, buckets, distance)
        ref = T5Attention._relative_position_bucket(relative, bidirectional, buckets, distance)
        assert torch.equal(ours, ref)


@pytest.mark.parametrize("name", ["t5", "t5v1.1", "bart", "fsmt"])
def test_tensor_parallel_logits_equal_one_rank(name):
    """Two rank models (threads, summing collectives) of the converted model give one rank's logits."""
    import threading

    from test_distributed_sharding import ThreadComm, ThreadGroup
    from llmapi.distributed.mapping import Mapping
    from llmapi.distributed.sharding import build_rank_model, shard_weights

    hf = MODELS[name]()
    cfg, model = _converted(hf)
    weights = {k: v for k, v in model.state_dict().items()}
    start = hf.config.decoder_start_token_id
    rows = [(enc, [start] + dec[:3]) for enc, dec in
            zip(em.inputs(2, cfg["encoder"]["vocab_size"], seed=1), em.inputs(2, cfg["vocab_size"], seed=2))]
    ids, positions, attn, caches = _step(cfg, rows)
    with torch.no_grad():
        want = model.compute_logits(model(ids, positions, attn, caches))
    group, got, errors = ThreadGroup(2), [None, None], []

    def run(rank):
        try:
            ranked = build_rank_model(cfg, Mapping(2, 1, rank), "cpu", torch.float32, ThreadComm(group, rank))
            ranked.load_weights(shard_weights(ranked, weights))
            _, _, rank_attn, rank_caches = _step({**cfg, "num_key_value_heads": cfg["num_key_value_heads"] // 2}, rows)
            with torch.no_grad():
                got[rank] = ranked.compute_logits(ranked(ids, positions, rank_attn, rank_caches))
        except Exception as e:  # noqa: BLE001
            errors.append(e)
            group.barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for logits in got:
        torch.testing.assert_close(logits, want, atol=1e-3, rtol=1e-3)
