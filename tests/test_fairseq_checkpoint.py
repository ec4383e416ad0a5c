"""Original fairseq translation checkpoints (model.pt + dict.{lang}.txt + bpecodes, the layout of fairseq's WMT'14
en-fr release) read as transformers' FSMT: the test writes a tiny model.pt in fairseq's 2018 layout (the module tree
of fairseq's TransformerModel then: in_proj attention, layer_norms lists, a shared embedding; an argparse.Namespace
`args`), a joined dictionary and BPE codes learned by subword-nmt; the reference is transformers' FSMT holding the
same weights as transformers' fairseq-to-FSMT conversion script maps them (after fairseq's own state-dict upgrade),
checked against a plain-torch forward of that fairseq model. Newer checkpoints (omegaconf `cfg`, current tensor
names) read to the same model; a pickle naming any other global is refused before it runs."""

import argparse
import io
import json
import math
import os
import pickle
import re
import sys
from collections import Counter, OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from llmapi.engine import fairseq
from llmapi.errors import MissingDependencyError, ModelNotFoundError, UnsafeCheckpointError, UnsupportedModelError
from llmapi.hub import resolve_source

pytest.importorskip("sacremoses")
pytest.importorskip("subword_nmt")

D_MODEL, HEADS, FFN, LAYERS = 32, 4, 64, 2
PAD, EOS, UNK = 1, 2, 3

EN = [
    "The house is wonderful and the garden is green.",
    "I would like a cup of coffee, please.",
    "The weather is cold in the north of the country today.",
    "We are going to the station to take the train to Paris.",
    "The children are playing in the park near the river.",
    "She reads a book every evening before going to bed.",
    "The government announced new measures for the economy.",
    "My brother works in a hospital in the city centre.",
    "It's raining, so we stay at home and cook dinner.",
    "The museum opens at nine o'clock in the morning.",
    "They have bought a new car for the family holidays.",
    "The president will meet the ministers on Tuesday.",
    "Can you tell me where the nearest pharmacy is?",
    "The students are preparing for their final examinations.",
    "A well-known writer visited our small village last week.",
    "The price of bread has increased by ten percent this year.",
]
FR = [
    "La maison est merveilleuse et le jardin est vert.",
    "Je voudrais une tasse de café, s'il vous plaît.",
    "Il fait froid dans le nord du pays aujourd'hui.",
    "Nous allons à la gare pour prendre le train pour Paris.",
    "Les enfants jouent dans le parc près de la rivière.",
    "Elle lit un livre chaque soir avant d'aller au lit.",
    "Le gouvernement a annoncé de nouvelles mesures pour l'économie.",
    "Mon frère travaille dans un hôpital au centre-ville.",
    "Il pleut, alors nous restons à la maison et préparons le dîner.",
    "Le musée ouvre à neuf heures du matin.",
    "Ils ont acheté une nouvelle voiture pour les vacances en famille.",
    "Le président rencontrera les ministres mardi.",
    "Pouvez-vous me dire où se trouve la pharmacie la plus proche ?",
    "Les étudiants se préparent pour leurs examens finaux.",
    "Un écrivain bien connu a visité notre petit village la semaine dernière.",
    "Le prix du pain a augmenté de dix pour cent cette année.",
]
# Sentences for the tokenizer checks: words of the corpus, words it never saw (split into BPE pieces), an apostrophe
# and a hyphen (Moses escapes and splits them), a character outside the vocabulary (<unk>).
PROBES = [
    "The house is wonderful.",
    "The wonderful gardens of the museum aren't open on Tuesdays.",
    "Ministers announced well-known measures, please!",
    "Zebra quartz jumps over the Ωmega river.",
]


# --- fairseq's side, written from its source (fairseq/models/transformer.py and fairseq/modules of June 2018, the
# --- release of the WMT'14 en-fr model; the upgrade rules of today's transformer_encoder.py / transformer_decoder.py
# --- / transformer_layer.py / multihead_attention.py; fairseq/data/dictionary.py)


class MultiheadAttention2018(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * dim))
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, query, key, causal=False):  # [batch, time, dim]
        dim = query.shape[-1]
        w, b = self.in_proj_weight, self.in_proj_bias
        q = F.linear(query, w[:dim], b[:dim]) * (dim // self.heads) ** -0.5
        k = F.linear(key, w[dim:2 * dim], b[dim:2 * dim])
        v = F.linear(key, w[2 * dim:], b[2 * dim:])

        def split(x):  # [batch, heads, time, head_dim]
            return x.view(x.shape[0], x.shape[1], self.heads, -1).transpose(1, 2)

        scores = split(q) @ split(k).transpose(-1, -2)
        if causal:
            t = scores.shape[-1]
            scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
        out = (scores.softmax(-1) @ split(v)).transpose(1, 2).reshape(query.shape)
        return self.out_proj(out)


class EncoderLayer2018(nn.Module):
    def __init__(self):
        super().__init__()
        self.self_attn = MultiheadAttention2018(D_MODEL, HEADS)
        self.fc1, self.fc2 = nn.Linear(D_MODEL, FFN), nn.Linear(FFN, D_MODEL)
        self.layer_norms = nn.ModuleList([nn.LayerNorm(D_MODEL) for _ in range(2)])

    def forward(self, x):  # post-norm (normalize_before False)
        x = self.layer_norms[0](x + self.self_attn(x, x))
        return self.layer_norms[1](x + self.fc2(F.relu(self.fc1(x))))


class DecoderLayer2018(nn.Module):
    def __init__(self):
        super().__init__()
        self.self_attn = MultiheadAttention2018(D_MODEL, HEADS)
        self.encoder_attn = MultiheadAttention2018(D_MODEL, HEADS)
        self.fc1, self.fc2 = nn.Linear(D_MODEL, FFN), nn.Linear(FFN, D_MODEL)
        self.layer_norms = nn.ModuleList([nn.LayerNorm(D_MODEL) for _ in range(3)])

    def forward(self, x, encoder_out):
        x = self.layer_norms[0](x + self.self_attn(x, x, causal=True))
        x = self.layer_norms[1](x + self.encoder_attn(x, encoder_out))
        return self.layer_norms[2](x + self.fc2(F.relu(self.fc1(x))))


class SinusoidalPositionalEmbedding2018(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("_float_tensor", torch.FloatTensor())

    @staticmethod
    def forward(tokens):  # unpadded rows: positions padding_idx + 1 ...
        half = D_MODEL // 2
        freq = torch.exp(torch.arange(half, dtype=torch.float) * -(math.log(10000) / (half - 1)))
        positions = torch.arange(PAD + 1, PAD + 1 + tokens.shape[1], dtype=torch.float)
        angles = positions[:, None] * freq[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)[None]


class Encoder2018(nn.Module):
    def __init__(self, embed_tokens):
        super().__init__()
        self.embed_tokens = embed_tokens
        self.embed_positions = SinusoidalPositionalEmbedding2018()
        self.layers = nn.ModuleList([EncoderLayer2018() for _ in range(LAYERS)])


class Decoder2018(nn.Module):
    def __init__(self, embed_tokens):
        super().__init__()
        self.embed_tokens = embed_tokens  # share_all_embeddings: no embed_out, the head is embed_tokens
        self.embed_positions = SinusoidalPositionalEmbedding2018()
        self.layers = nn.ModuleList([DecoderLayer2018() for _ in range(LAYERS)])


class Transformer2018(nn.Module):
    """fairseq's TransformerModel of June 2018 with share_all_embeddings, as a module tree (its state_dict() names are
    the checkpoint's) and its forward (teacher forcing, one unpadded row)."""

    def __init__(self, vocab):
        super().__init__()
        embed = nn.Embedding(vocab, D_MODEL, padding_idx=PAD)
        self.encoder, self.decoder = Encoder2018(embed), Decoder2018(embed)

    def forward(self, src, prev):
        scale = math.sqrt(D_MODEL)
        x = scale * self.encoder.embed_tokens(src) + self.encoder.embed_positions(src)
        for layer in self.encoder.layers:
            x = layer(x)
        y = scale * self.decoder.embed_tokens(prev) + self.decoder.embed_positions(prev)
        for layer in self.decoder.layers:
            y = layer(y, x)
        return F.linear(y, self.decoder.embed_tokens.weight)


def fairseq_upgrade(state_dict, share_input_output_embed=True):
    """fairseq's upgrade_state_dict_named of today's TransformerModel, as its checkpoint loading runs it on an old
    state dict."""
    sd = OrderedDict(state_dict)
    for k in [k for k in sd if k.endswith("in_proj_weight")]:  # MultiheadAttention
        prefix, dim = k[: -len("in_proj_weight")], sd[k].shape[0] // 3
        for j, part in enumerate(("q_proj", "k_proj", "v_proj")):
            sd[f"{prefix}{part}.weight"] = sd[k][j * dim:(j + 1) * dim]
            sd[f"{prefix}{part}.bias"] = sd[prefix + "in_proj_bias"][j * dim:(j + 1) * dim]
        del sd[k], sd[prefix + "in_proj_bias"]
    for side, names in (("encoder", {"0": "self_attn_layer_norm", "1": "final_layer_norm"}),
                        ("decoder", {"0": "self_attn_layer_norm", "1": "encoder_attn_layer_norm",
                                     "2": "final_layer_norm"})):
        for i in range(LAYERS):
            for old, new in names.items():
                for m in ("weight", "bias"):
                    k = f"{side}.layers.{i}.layer_norms.{old}.{m}"
                    if k in sd:
                        sd[f"{side}.layers.{i}.{new}.{m}"] = sd.pop(k)
        version = f"{side}.version"
        if sd.get(version, torch.Tensor([1]))[0].item() < 2:
            sd[version] = torch.Tensor([1])
    if "decoder.output_projection.weight" not in sd:
        key = "decoder.embed_tokens.weight" if share_input_output_embed else "decoder.embed_out"
        sd["decoder.output_projection.weight"] = sd[key]
        if not share_input_output_embed:
            del sd[key]
    return sd


def fairseq_dictionary(path):
    """fairseq's Dictionary.load: symbol -> id (specials first)."""
    indices = {s: i for i, s in enumerate(("<s>", "<pad>", "</s>", "<unk>"))}
    for line in open(path, encoding="utf-8"):
        word, _ = line.rstrip().rsplit(" ", 1)
        indices[word] = len(indices)
    return indices


def moses(text, lang):
    """fairseq's moses tokenizer encoder (fairseq/data/encoders/moses_tokenizer.py, default flags)."""
    from sacremoses import MosesTokenizer

    return MosesTokenizer(lang).tokenize(text, aggressive_dash_splits=True, return_str=True, escape=True)


def subword_nmt_bpe(codes):
    """fairseq's subword_nmt BPE encoder (fairseq/data/encoders/subword_nmt_bpe.py): apply_bpe.BPE on the codes."""
    from subword_nmt.apply_bpe import BPE

    with open(codes, encoding="utf-8") as f:
        return BPE(f, -1, "@@", None, None)


# --- transformers' conversion script (convert_fsmt_original_pytorch_checkpoint_to_pytorch.py), its mapping and its
# --- files


def rewrite_dict_keys(d):
    d2 = dict((re.sub(r"@@$", "", k), v) if k.endswith("@@") else (re.sub(r"$", "</w>", k), v) for k, v in d.items())
    for k in "<s> <pad> </s> <unk>".split():
        del d2[f"{k}</w>"]
        d2[k] = d[k]
    return d2


def script_model_conf(args, src_vocab_size, tgt_vocab_size):
    """The script's config.json, from args after fairseq's base_architecture filled what 2018 args lack."""
    a = dict(vars(args))
    for key, value in dict(activation_dropout=0.0, encoder_layerdrop=0, decoder_layerdrop=0,
                           no_scale_embedding=False).items():
        a.setdefault(key, value)
    return {
        "architectures": ["FSMTForConditionalGeneration"], "model_type": "fsmt",
        "activation_dropout": a["activation_dropout"], "activation_function": "relu",
        "attention_dropout": a["attention_dropout"], "d_model": a["decoder_embed_dim"], "dropout": a["dropout"],
        "init_std": 0.02, "max_position_embeddings": a["max_source_positions"],
        "num_hidden_layers": a["encoder_layers"], "src_vocab_size": src_vocab_size, "tgt_vocab_size": tgt_vocab_size,
        "langs": [a["source_lang"], a["target_lang"]],
        "encoder_attention_heads": a["encoder_attention_heads"], "encoder_ffn_dim": a["encoder_ffn_embed_dim"],
        "encoder_layerdrop": a["encoder_layerdrop"], "encoder_layers": a["encoder_layers"],
        "decoder_attention_heads": a["decoder_attention_heads"], "decoder_ffn_dim": a["decoder_ffn_embed_dim"],
        "decoder_layerdrop": a["decoder_layerdrop"], "decoder_layers": a["decoder_layers"],
        "bos_token_id": 0, "pad_token_id": 1, "eos_token_id": 2, "is_encoder_decoder": True,
        "scale_embedding": not a["no_scale_embedding"], "tie_word_embeddings": a["share_all_embeddings"],
        "num_beams": 5, "early_stopping": False, "length_penalty": 1.0,
    }


def script_state_dict(upgraded):
    sd = OrderedDict(("model." + k, v) for k, v in upgraded.items())
    for k in ["model.model", "model.encoder.version", "model.decoder.version", "model.encoder_embed_tokens.weight",
              "model.decoder_embed_tokens.weight", "model.encoder.embed_positions._float_tensor",
              "model.decoder.embed_positions._float_tensor"]:
        sd.pop(k, None)
    return sd


def fsmt_model(config_fields, state_dict):
    """FSMTForConditionalGeneration of these config fields holding `state_dict` (as the script loads it, strict=False:
    the sinusoidal tables are the model's own)."""
    from transformers import FSMTConfig, FSMTForConditionalGeneration

    fields = {k: v for k, v in config_fields.items() if k not in ("transformers_version", "dtype", "model_type")}
    model = FSMTForConditionalGeneration(FSMTConfig(**fields)).eval()
    result = model.load_state_dict(state_dict, strict=False)
    assert not result.unexpected_keys
    assert all(k.endswith("embed_positions.weight") for k in result.missing_keys), result.missing_keys
    return model


# --- the tiny checkpoint


def args_2018(**changes):
    """The args a 2018 fairseq training run saved (fields of its options, the translation task, the big en-fr
    architecture with tiny sizes given on the command line, which the architecture function does not override)."""
    fields = dict(
        task="translation", arch="transformer_vaswani_wmt_en_fr_big", data=["data-bin/wmt14_en_fr"],
        source_lang="en", target_lang="fr", raw_text=False, left_pad_source="True", left_pad_target="False",
        max_source_positions=1024, max_target_positions=1024, skip_invalid_size_inputs_valid_test=True,
        encoder_embed_dim=D_MODEL, encoder_ffn_embed_dim=FFN, encoder_layers=LAYERS, encoder_attention_heads=HEADS,
        encoder_normalize_before=False, encoder_learned_pos=False, decoder_embed_dim=D_MODEL,
        decoder_ffn_embed_dim=FFN, decoder_layers=LAYERS, decoder_attention_heads=HEADS,
        decoder_normalize_before=False, decoder_learned_pos=False, share_all_embeddings=True,
        share_decoder_input_output_embed=True, dropout=0.1, attention_dropout=0.0, relu_dropout=0.0,
        criterion="label_smoothed_cross_entropy", label_smoothing=0.1, optimizer="adam", adam_betas="(0.9, 0.98)",
        lr=[0.0007], lr_scheduler="inverse_sqrt", warmup_updates=4000, warmup_init_lr=1e-07, min_lr=1e-09,
        max_tokens=3584, update_freq=[16], fp16=True, seed=1, clip_norm=0.0, weight_decay=0.0,
        save_dir="checkpoints/transformer_vaswani_en_fr_big", no_progress_bar=True, log_interval=100,
    )
    fields.update(changes)
    return argparse.Namespace(**fields)


def checkpoint_2018(model, **args_changes):
    """fairseq's save_state layout of 2018: the fp32 state dict under 'model', the args, the optimizer history."""
    return {
        "args": args_2018(**args_changes),
        "model": OrderedDict((k, v.float()) for k, v in model.state_dict().items()),
        "optimizer_history": [{"criterion_name": "LabelSmoothedCrossEntropyCriterion", "optimizer_name": "FairseqAdam",
                               "lr_scheduler_state": {"best": 3.97}, "num_updates": 90000}],
        "last_optimizer_state": {"state": {}, "param_groups": [{"lr": 0.0007, "betas": (0.9, 0.98), "eps": 1e-08,
                                                                "weight_decay": 0.0, "params": [0, 1, 2]}]},
        "extra_state": {"epoch": 31, "batch_offset": 0, "val_loss": 3.97,
                        "train_iterator": {"epoch": 31, "iterations_in_epoch": 0}},
    }


def save_legacy(obj, path):
    """torch.save as PyTorch 0.4 wrote (the legacy, non-zip format of the 2018 releases)."""
    torch.save(obj, path, _use_new_zipfile_serialization=False)


def learn_codes(tokenized_lines, path, symbols=200):
    from subword_nmt.learn_bpe import learn_bpe

    out = io.StringIO()
    learn_bpe(io.StringIO("\n".join(tokenized_lines) + "\n"), out, symbols, min_frequency=1)
    path.write_text(out.getvalue(), encoding="utf-8")


def write_dictionary(lines, path, padding_factor=8):
    """fairseq-preprocess --joined-dictionary: symbols by count (Dictionary.finalize), padded to a multiple of 8 with
    madeupwordNNNN, written as "symbol count" lines (Dictionary.save)."""
    counts = Counter(w for line in lines for w in line.split())
    symbols = counts.most_common()
    i = 0
    while (len(symbols) + 4) % padding_factor:
        symbols.append((f"madeupword{i:04d}", 0))
        i += 1
    path.write_text("".join(f"{w} {c}\n" for w, c in symbols), encoding="utf-8")
    return len(symbols) + 4


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """A directory as wmt14.en-fr.joined-dict.transformer.tar.bz2 unpacks: model.pt, dict.en.txt, dict.fr.txt (the same
    joined dictionary), bpecodes; with the fairseq model object that made model.pt."""
    path = tmp_path_factory.mktemp("wmt14.en-fr")
    tokenized = [moses(s, "en") for s in EN] + [moses(s, "fr") for s in FR]
    learn_codes(tokenized, path / "bpecodes")
    bpe = subword_nmt_bpe(path / "bpecodes")
    vocab = write_dictionary([bpe.process_line(line) for line in tokenized], path / "dict.en.txt")
    (path / "dict.fr.txt").write_text((path / "dict.en.txt").read_text(encoding="utf-8"), encoding="utf-8")
    torch.manual_seed(1)
    model = Transformer2018(vocab).eval()
    # Widened weights: at fairseq's initial scale a random model of this size repeats one token (the tied head picks
    # what the residual carries); strong cross-attention and FFNs make its greedy output follow the source.
    gains = {"encoder_attn": 3.0, "fc1": 1.5, "fc2": 1.5}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norms" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn_like(p))
            elif "embed_tokens" in name:
                p.copy_(torch.randn_like(p) * D_MODEL ** -0.5)
                p[PAD] = 0
            elif p.dim() == 2:
                gain = next((g for key, g in gains.items() if key in name), 0.5)
                p.copy_(torch.randn_like(p) * gain / math.sqrt(p.shape[1]))
            else:
                p.copy_(0.1 * torch.randn_like(p))
    save_legacy(checkpoint_2018(model), path / "model.pt")
    return path, model


@pytest.fixture(scope="module")
def reference(release):
    """transformers' FSMT with the weights as the conversion script maps fairseq's (upgraded) state dict."""
    path, model = release
    state = torch.load(path / "model.pt", weights_only=False)  # the test's own file: the reference side may trust it
    vocab = len(fairseq_dictionary(path / "dict.en.txt"))
    conf = script_model_conf(state["args"], vocab, vocab)
    mapped = script_state_dict(fairseq_upgrade(state["model"]))
    return fsmt_model(conf, mapped), conf, mapped


@pytest.fixture(scope="module")
def converted(release, tmp_path_factory):
    """read_fairseq's config, state dict (materialized) and generation config, its tokenizer files in out_dir."""
    path, _ = release
    out_dir = tmp_path_factory.mktemp("fsmt-out")
    config, weights, generation = fairseq.read_fairseq(path / "model.pt", out_dir)
    state = dict(weights.items())
    weights.close()
    return config, state, generation, out_dir


def source_ids(text, path):
    """What fairseq's hub interface encodes a source sentence to: Moses, subword-nmt BPE, dictionary ids + </s>."""
    indices = fairseq_dictionary(path / "dict.en.txt")
    pieces = subword_nmt_bpe(path / "bpecodes").process_line(moses(text, "en")).split()
    return [indices.get(p, UNK) for p in pieces] + [EOS]


# --- the reader against the script and against fairseq


def test_config_and_tokenizer_files_are_what_the_conversion_script_writes(release, reference, converted):
    from transformers import FSMTConfig

    path, _ = release
    _, script_conf, _ = reference
    config, _, generation, out_dir = converted
    # config.json as transformers reads the script's (aliases such as num_hidden_layers resolved, defaults filled)
    want = FSMTConfig(**{k: v for k, v in script_conf.items() if k != "model_type"}).to_dict()
    skip = ("transformers_version", "dtype")
    assert {k: v for k, v in config.items() if k not in skip} == {k: v for k, v in want.items() if k not in skip}
    assert config["decoder_start_token_id"] == EOS and config["dtype"] == "float32"
    assert generation["num_beams"] == 5 and generation["decoder_start_token_id"] == EOS
    vocab = rewrite_dict_keys(fairseq_dictionary(path / "dict.en.txt"))
    assert json.loads((out_dir / "vocab-src.json").read_text()) == vocab
    assert json.loads((out_dir / "vocab-tgt.json").read_text()) == vocab
    # The script strips the counts of fastBPE codes and keeps subword-nmt's "#version: 0.2" header as a bogus first
    # merge (no token holds "#version:"); the reader drops the header. The merges in order are the same.
    script_merges = re.sub(r" \d+$", "", (path / "bpecodes").read_text(encoding="utf-8"), 0, re.M).split("\n")
    assert script_merges[0] == "#version: 0.2"
    assert (out_dir / "merges.txt").read_text(encoding="utf-8").split("\n") == script_merges[1:]
    tokenizer_config = json.loads((out_dir / "tokenizer_config.json").read_text())
    assert tokenizer_config["langs"] == ["en", "fr"] and tokenizer_config["do_lower_case"] is False


def test_state_dict_is_the_conversion_scripts_mapping(reference, converted):
    _, _, expected = reference
    _, state, _, _ = converted
    assert set(state) == set(expected)
    for name, tensor in state.items():
        assert torch.equal(tensor, expected[name]), name


@pytest.fixture(scope="module")
def loaded(converted):
    config, state, _, _ = converted
    return fsmt_model(config, state)


def test_logits_equal_fairseq_and_the_reference(release, reference, loaded):
    """Teacher-forced logits of the reader's FSMT = the script-mapped FSMT = fairseq's own forward of model.pt."""
    path, model = release
    ref_model, _, _ = reference
    torch.manual_seed(1)
    vocab = ref_model.config.src_vocab_size
    for length, target in ((5, 4), (13, 9), (1, 1)):
        src = torch.cat([torch.randint(4, vocab, (1, length)), torch.tensor([[EOS]])], dim=1)
        prev = torch.cat([torch.tensor([[EOS]]), torch.randint(4, vocab, (1, target - 1))], dim=1)
        with torch.no_grad():
            want = model(src, prev)
            # use_cache=False: with a cache FSMT builds no causal mask (it expects one decoder token per call)
            ref = ref_model(input_ids=src, decoder_input_ids=prev, use_cache=False).logits
            got = loaded(input_ids=src, decoder_input_ids=prev, use_cache=False).logits
        torch.testing.assert_close(ref, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got, ref, rtol=0, atol=0)


@pytest.mark.parametrize("num_beams", [1, 2, 4])
def test_generate_equals_the_reference(release, reference, loaded, num_beams):
    path, _ = release
    ref_model, _, _ = reference
    ids = torch.tensor([source_ids(PROBES[1], path)])
    kwargs = dict(num_beams=num_beams, do_sample=False, max_new_tokens=16, early_stopping=False)
    with torch.no_grad():
        want = ref_model.generate(ids, **kwargs)
        got = loaded.generate(ids, **kwargs)
    assert got.tolist() == want.tolist()
    assert len(set(want[0].tolist())) > 3  # not a degenerate repetition


# --- the tokenizer: Moses + BPE as fairseq ran them


@pytest.fixture(scope="module")
def tokenizer(converted):
    from transformers import AutoTokenizer, FSMTTokenizer

    tok = AutoTokenizer.from_pretrained(str(converted[3]))  # tokenizer_config.json names the class
    assert isinstance(tok, FSMTTokenizer)
    return tok


@pytest.mark.parametrize("text", PROBES)
def test_bpe_segmentation_equals_subword_nmt(release, tokenizer, text):
    path, _ = release
    want = subword_nmt_bpe(path / "bpecodes").process_line(moses(text, "en")).split()
    got = [t[:-len("</w>")] if t.endswith("</w>") else t + "@@" for t in tokenizer.tokenize(text)]
    assert got == want


@pytest.mark.parametrize("text", PROBES)
def test_encode_gives_the_fairseq_dictionary_ids(release, tokenizer, text):
    path, _ = release
    want = source_ids(text, path)
    assert tokenizer(text)["input_ids"] == want
    assert want[-1] == EOS and (UNK in want or "Ω" not in text)  # a character the corpus never had is <unk>


def test_decode_is_fairseq_post_processing(release, tokenizer):
    """fairseq's decode: remove "@@ ", Moses-detokenize (target language)."""
    from sacremoses import MosesDetokenizer

    path, _ = release
    indices = fairseq_dictionary(path / "dict.fr.txt")
    pieces = subword_nmt_bpe(path / "bpecodes").process_line(moses(FR[12], "fr")).split()
    ids = [indices[p] for p in pieces]
    want = MosesDetokenizer("fr").detokenize((" ".join(pieces) + " ").replace("@@ ", "").rstrip().split())
    assert tokenizer.decode(ids) == want


# --- newer checkpoints: an omegaconf cfg, today's tensor names


def modern_state_dict(old):
    """The state dict today's fairseq saves for the same model: its upgraded names and the version buffers of 3."""
    sd = fairseq_upgrade(old)
    sd["encoder.version"] = torch.Tensor([3])
    sd["decoder.version"] = torch.Tensor([3])
    return OrderedDict((k, v.clone()) for k, v in sd.items())


def cfg_checkpoint(old_state, as_dictconfig):
    """fairseq >= 0.10's layout: args None, cfg with model / task / bpe / tokenizer sections. 0.10.0 pickled the
    DictConfig itself (model: the legacy architecture's Namespace inside it, as convert_namespace_to_omegaconf puts
    it); later versions OmegaConf.to_container(cfg), plain containers around the Namespace."""
    model_args = vars(args_2018())
    model_args = {k: v for k, v in model_args.items() if k not in ("source_lang", "target_lang", "data", "task")}
    cfg = {
        "_name": None,
        "common": {"fp16": True, "seed": 1, "log_interval": 100},
        "model": argparse.Namespace(_name="transformer_vaswani_wmt_en_fr_big", activation_fn="relu",
                                    no_scale_embedding=False, layernorm_embedding=False, **model_args),
        "task": {"_name": "translation", "data": "data-bin/wmt14_en_fr", "source_lang": "en", "target_lang": "fr",
                 "max_source_positions": 1024, "max_target_positions": 1024, "left_pad_source": True},
        "criterion": {"_name": "label_smoothed_cross_entropy", "label_smoothing": 0.1},
        "optimizer": {"_name": "adam", "adam_betas": "(0.9, 0.98)", "lr": [0.0007]},
        "bpe": {"_name": "subword_nmt", "bpe_codes": "bpecodes", "bpe_separator": "@@"},
        "tokenizer": {"_name": "moses", "source_lang": "en", "target_lang": "fr"},
    }
    if as_dictconfig:
        from omegaconf import OmegaConf

        cfg = OmegaConf.create(cfg, flags={"allow_objects": True})
    return {"args": None, "cfg": cfg, "model": modern_state_dict(old_state),
            "optimizer_history": [{"criterion_name": "LabelSmoothedCrossEntropyCriterion",
                                   "optimizer_name": "FairseqAdam", "lr_scheduler_state": {"best": 3.97},
                                   "num_updates": 90000}],
            "extra_state": {"train_iterator": {"epoch": 31, "iterations_in_epoch": 0}}}


def copy_release(release, dest, checkpoint=None, name="model.pt"):
    path, _ = release
    dest.mkdir(exist_ok=True)
    for f in ("dict.en.txt", "dict.fr.txt", "bpecodes"):
        (dest / f).write_bytes((path / f).read_bytes())
    if checkpoint is None:
        (dest / name).write_bytes((path / "model.pt").read_bytes())
    else:
        torch.save(checkpoint, dest / name)
    return dest


@pytest.mark.parametrize("as_dictconfig", [True, False], ids=["DictConfig", "containers"])
def test_cfg_checkpoint_reads_to_the_same_model(release, converted, tmp_path, as_dictconfig):
    if as_dictconfig:
        pytest.importorskip("omegaconf")
    old = torch.load(release[0] / "model.pt", weights_only=False)["model"]
    d = copy_release(release, tmp_path / "ckpt", cfg_checkpoint(old, as_dictconfig))
    config, weights, generation = fairseq.read_fairseq(d / "model.pt", tmp_path / "out")
    want_config, want_state, want_generation, _ = converted
    assert config == want_config and generation == want_generation
    assert set(weights) == set(want_state)
    for name in weights:
        assert torch.equal(weights[name], want_state[name]), name
    assert (tmp_path / "out" / "vocab-src.json").read_text() == (converted[3] / "vocab-src.json").read_text()
    names = fairseq.pickle_globals(d / "model.pt")
    assert ("omegaconf.dictconfig.DictConfig" in names) == as_dictconfig


def test_namespace_checkpoint_needs_no_omegaconf(release, tmp_path, monkeypatch):
    """Without omegaconf importable, the 2018 checkpoint reads; one whose cfg is a DictConfig names the package."""
    path, _ = release
    pytest.importorskip("omegaconf")
    old = torch.load(path / "model.pt", weights_only=False)["model"]
    d = copy_release(release, tmp_path / "ckpt", cfg_checkpoint(old, as_dictconfig=True))
    for name in [m for m in sys.modules if m == "omegaconf" or m.startswith("omegaconf.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "omegaconf", None)  # import omegaconf raises; find_spec says None
    config, weights, _ = fairseq.read_fairseq(path / "model.pt")
    assert config["d_model"] == D_MODEL and len(weights) > 0
    with pytest.raises(MissingDependencyError, match="omegaconf"):
        fairseq.read_fairseq(d / "model.pt")


# --- the allow-list


class Arbitrary:
    """A class of this test module: not a global any fairseq checkpoint names."""


class RunsCommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def refused_checkpoints(marker):
    """name -> (checkpoint object, pickle protocol, the global the error must name)."""
    system = f"{os.system.__module__}.system"
    base = {"args": args_2018(), "model": {}}
    return {
        "os.system": ({**base, "extra_state": RunsCommand(marker)}, 2, system),
        "os.system-protocol4": ({**base, "extra_state": RunsCommand(marker)}, 4, system),
        "arbitrary-class": ({**base, "extra_state": Arbitrary()}, 2, f"{Arbitrary.__module__}.Arbitrary"),
        "eval-in-args": ({"args": argparse.Namespace(arch=RunsCommand(marker)), "model": {}}, 2, system),
    }


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("case", list(refused_checkpoints("x")))
def test_disallowed_global_is_refused_by_name_and_nothing_runs(tmp_path, case, legacy):
    marker = tmp_path / "ran"
    obj, protocol, name = refused_checkpoints(marker)[case]
    path = tmp_path / "model.pt"
    torch.save(obj, path, pickle_protocol=protocol, _use_new_zipfile_serialization=not legacy)
    assert name in fairseq.pickle_globals(path)
    with pytest.raises(UnsafeCheckpointError, match=re.escape(name)):
        fairseq.load_checkpoint(path)
    assert not marker.exists()


def test_disallowed_global_through_the_hub_and_reader(release, tmp_path):
    marker = tmp_path / "ran"
    d = copy_release(release, tmp_path / "ckpt", {"args": args_2018(), "model": {}, "x": RunsCommand(marker)})
    source = resolve_source(d)
    assert source.kind == "fairseq"
    with pytest.raises(UnsafeCheckpointError, match="system"):
        fairseq.read_fairseq(source.path, tmp_path / "out")
    assert not marker.exists()


def test_scan_reads_every_global_of_a_plain_pickle():
    class_ref = pickle.dumps({"a": OrderedDict(), "b": argparse.Namespace(x=1), "c": b"xy"}, protocol=2)
    names = fairseq._scan_pickle(io.BytesIO(class_ref))
    assert set(names) == {"collections.OrderedDict", "argparse.Namespace", "_codecs.encode"}
    names4 = fairseq._scan_pickle(io.BytesIO(pickle.dumps([OrderedDict(), OrderedDict(), Arbitrary()], protocol=4)))
    assert names4 == ["collections.OrderedDict", f"{Arbitrary.__module__}.Arbitrary"]


# --- what FSMT cannot express, and broken layouts


@pytest.mark.parametrize("changes, match", [
    (dict(arch="lstm_wiseman_iwslt_de_en"), "lstm_wiseman_iwslt_de_en"),
    (dict(arch="transformer_lm"), "transformer_lm"),
    (dict(encoder_normalize_before=True), "encoder_normalize_before"),
    (dict(decoder_normalize_before=True), "decoder_normalize_before"),
    (dict(decoder_learned_pos=True), "decoder_learned_pos"),
    (dict(layernorm_embedding=True), "layernorm_embedding"),
    (dict(activation_fn="softplus"), "softplus"),
    (dict(decoder_embed_dim=48), "decoder_embed_dim 48"),
    (dict(decoder_output_dim=16), "decoder_output_dim"),
    (dict(adaptive_softmax_cutoff="100,200"), "adaptive_softmax_cutoff"),
    (dict(scale_attn=True), "scale_attn"),
])
def test_unsupported_variant_is_named(release, tmp_path, changes, match):
    d = copy_release(release, tmp_path / "ckpt", checkpoint_2018(release[1], **changes))
    with pytest.raises(UnsupportedModelError, match=re.escape(match)):
        fairseq.read_fairseq(d / "model.pt")


def test_gelu_checkpoint_gets_fsmt_gelu(release, tmp_path):
    d = copy_release(release, tmp_path / "ckpt", checkpoint_2018(release[1], activation_fn="gelu_accurate"))
    config, _, _ = fairseq.read_fairseq(d / "model.pt")
    assert config["activation_function"] == "gelu_new"  # fairseq's gelu_accurate is the tanh form


def test_broken_layouts(release, tmp_path):
    model = release[1]
    ckpt = checkpoint_2018(model)
    del ckpt["model"]["decoder.layers.1.fc2.bias"]
    d = copy_release(release, tmp_path / "missing", ckpt)
    with pytest.raises(UnsupportedModelError, match=r"lacks 1 tensors.*decoder\.layers\.1\.fc2\.bias"):
        fairseq.read_fairseq(d / "model.pt")

    ckpt = checkpoint_2018(model)
    ckpt["model"]["encoder.layers.0.extra.weight"] = torch.zeros(2)
    d = copy_release(release, tmp_path / "unknown", ckpt)
    with pytest.raises(UnsupportedModelError, match=r"does not know.*encoder\.layers\.0\.extra\.weight"):
        fairseq.read_fairseq(d / "model.pt")

    d = copy_release(release, tmp_path / "short-dict")
    lines = (d / "dict.en.txt").read_text().splitlines()
    for lang in ("en", "fr"):
        (d / f"dict.{lang}.txt").write_text("\n".join(lines[:-8]) + "\n")
    with pytest.raises(UnsupportedModelError, match=r"encoder\.embed_tokens\.weight has \d+ rows"):
        fairseq.read_fairseq(d / "model.pt")

    d = copy_release(release, tmp_path / "split-dicts")
    (d / "dict.fr.txt").write_text("\n".join(reversed(lines)) + "\n")
    with pytest.raises(UnsupportedModelError, match="joined dictionary"):
        fairseq.read_fairseq(d / "model.pt")

    d = copy_release(release, tmp_path / "no-fr")
    (d / "dict.fr.txt").unlink()
    with pytest.raises(ModelNotFoundError, match=r"dict\.fr\.txt"):
        fairseq.read_fairseq(d / "model.pt")

    d = copy_release(release, tmp_path / "bad-dict")
    (d / "dict.fr.txt").write_text("hello\n")
    with pytest.raises(UnsupportedModelError, match=r"dict\.fr\.txt, line 1"):
        fairseq.read_fairseq(d / "model.pt")

    d = copy_release(release, tmp_path / "no-lang", checkpoint_2018(model, source_lang=None))
    with pytest.raises(UnsupportedModelError, match="source language"):
        fairseq.read_fairseq(d / "model.pt")

    d = copy_release(release, tmp_path / "not-a-dict", ["just", "a", "list"])
    with pytest.raises(UnsupportedModelError, match="not a fairseq checkpoint"):
        fairseq.read_fairseq(d / "model.pt")

    (d / "model.pt").write_bytes(b"\x80\x02garbage")
    with pytest.raises(UnsupportedModelError, match="not a torch checkpoint|cannot read"):
        fairseq.read_fairseq(d / "model.pt")


def test_no_bpe_codes_leaves_no_tokenizer(release, tmp_path, caplog):
    d = copy_release(release, tmp_path / "ckpt")
    (d / "bpecodes").unlink()
    config, _, _ = fairseq.read_fairseq(d / "model.pt", tmp_path / "out")
    assert config["d_model"] == D_MODEL
    assert not (tmp_path / "out" / "merges.txt").exists() and "no BPE codes" in caplog.text


# --- the model source


def test_hub_resolves_the_release_directory(release, tmp_path):
    d = copy_release(release, tmp_path / "wmt14")
    source = resolve_source(d)
    assert (source.kind, source.path) == ("fairseq", d / "model.pt")
    assert resolve_source(d / "model.pt").identity == source.identity
    (d / "bpecodes").write_text((d / "bpecodes").read_text() + "x y\n")
    changed = resolve_source(d).identity
    assert changed != source.identity
    (d / "dict.fr.txt").write_text((d / "dict.fr.txt").read_text() + "zz 1\n")
    assert resolve_source(d).identity != changed

    single = copy_release(release, tmp_path / "renamed", name="checkpoint_best.pt")
    assert resolve_source(single).path == single / "checkpoint_best.pt"
    (single / "checkpoint_last.pt").write_bytes((single / "checkpoint_best.pt").read_bytes())
    with pytest.raises(ModelNotFoundError, match="checkpoint_best.pt, checkpoint_last.pt"):
        resolve_source(single)


# --- end to end through our encoder-decoder runtime


def test_llm_generates_like_fsmt(release, reference):
    """LLM(dir) with greedy SamplingParams gives transformers' FSMT greedy tokens (the reference's generate)."""
    from llmapi import LLM, SamplingParams

    path, _ = release
    ref_model, _, _ = reference
    prompts = [source_ids(text, path) for text in PROBES + EN[:3]]
    want = []
    for ids in prompts:
        with torch.no_grad():
            # greedy with the model's generation config (FSMT's forced EOS on the last allowed token included)
            out = ref_model.generate(torch.tensor([ids]), num_beams=1, do_sample=False, max_new_tokens=12)
        tokens = out[0, 1:].tolist()  # after the decoder start (</s>)
        want.append(tokens[:tokens.index(EOS) + 1] if EOS in tokens else tokens)
    with LLM(str(path)) as llm:
        outs = llm.generate(prompts, SamplingParams(max_tokens=12, temperature=0), use_tqdm=False)
        got = [list(o.outputs[0].token_ids) for o in outs]
        # a text prompt goes through the engine's FSMTTokenizer: Moses + BPE + dictionary ids, as fairseq encodes it
        text_outs = llm.generate(PROBES[:2], SamplingParams(max_tokens=12, temperature=0), use_tqdm=False)
    assert got == want
    for text, out, tokens in zip(PROBES, text_outs, want):
        assert list(out.encoder_prompt_token_ids) == source_ids(text, path)
        assert list(out.outputs[0].token_ids) == tokens
