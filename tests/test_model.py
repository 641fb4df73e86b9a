"""Behaviour of the model: encoders (cnn, clip, bert, minilm), the orderer, the pair loss and run directories."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from floats import assert_beyond_rounding, assert_float32_close
from iterwego.config import Config, EncoderConfig, OrdererConfig
from iterwego.encoders import BertTopHead, CNNHead, Encoder, L2Head, ProjectionHead, build_encoder, pool_tokens
from iterwego.errors import ModelLoadError
from iterwego.model import IterWeGO, Orderer, PairHead, load_run, pair_loss
from iterwego.pretrained import save_run

SMALL = OrdererConfig(d_model=16, layers=2, heads=2, ffn=32, dropout=0.1)
SENTENCES = [
    "the red circle waits by the tank.",
    "hour seven: a green square looks at the water level today.",
    "a cat.",
]


pytestmark = pytest.mark.usefixtures("one_thread")  # 2 shared cores: extra threads only contend

# Float budgets, in float32 ulps at the compared tensor's scale (tests/floats.py). Each compares one float32
# computation with itself along another path (other shapes, padding, chunking or order), so what differs is the
# summation order of its reductions, which other SIMD kernels (AVX-512, AVX2, none) change again.
#: Unit-norm features: one projection (a 32-term dot product) and an L2 norm (16 squares) in series, at scale 1.
NORM_ULPS = 16
#: The tiny BERT/CLIP backbone: 2 layers of attention, projections, FFN and LayerNorms (~10 reductions in series)
#: at the scale of the hidden states; padding to another length or chunking adds masked terms to each softmax sum.
BACKBONE_ULPS = 64
#: The orderer (2 layers over d_model 16) and its pair head, ~8 reductions in series, at the logits' scale; the same
#: budget as tests/test_forward.py's REFERENCE_ULPS. A non-permuted order misses by over 100 budgets (below).
ORDERER_ULPS = 32
#: A loss: log-softmax over 2 classes, then a mean or sum over up to 14 pairs, at the loss's scale (~1).
LOSS_ULPS = 16


@pytest.fixture
def image_paths(tmp_path) -> list[str]:
    """Three RGB PNGs of different sizes and aspect ratios."""
    rng = np.random.default_rng(0)
    out = []
    for k, (w, h) in enumerate([(40, 30), (32, 32), (50, 70)]):
        p = tmp_path / f"img{k}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(p)
        out.append(str(p))
    return out


def fake_encoder(dim: int = 16) -> Encoder:
    """An encoder whose features are already item vectors (no backbone): isolates the orderer."""
    return Encoder("text", "fake", None, lambda: L2Head(dim), dim)


def backward_reaches(module: torch.nn.Module, loss: torch.Tensor) -> list[str]:
    """Names of trainable parameters of ``module`` left without a gradient after ``loss.backward()``."""
    loss.backward()
    return [
        n
        for n, p in module.named_parameters()
        if p.requires_grad and (p.grad is None or not torch.isfinite(p.grad).all())
    ]


def orderer_loss(orderer: Orderer, feats: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and pair loss for one story made of all ``n`` feature rows in a random gold order."""
    index = torch.arange(n)[None]
    logits = orderer(feats, index)
    pos = torch.randperm(n, generator=torch.Generator().manual_seed(0))[None]
    return logits, pair_loss(logits, pos, index >= 0)


# --------------------------------------------------------------------------- cnn
def test_cnn_encoder_shapes_and_backward(image_paths):
    torch.manual_seed(0)
    enc = build_encoder("image", EncoderConfig(image="cnn", image_size=32), d_cnn=24)
    feats = enc.featurize(image_paths)
    assert feats.shape == (3, 3, 32, 32) and feats.dtype == torch.uint8
    orderer = Orderer(enc, SMALL)
    assert isinstance(orderer.head, CNNHead)
    assert orderer.head(feats).shape == (3, 24)
    logits, loss = orderer_loss(orderer, feats, 3)
    assert logits.shape == (1, 3, 3, 2)
    assert backward_reaches(orderer, loss) == []


def test_cnn_featurize_is_deterministic_and_resizes(image_paths):
    enc = build_encoder("image", EncoderConfig(image="cnn", image_size=32))
    a, b = enc.featurize(image_paths), enc.featurize(image_paths[::-1])
    assert torch.equal(a, b.flip(0))
    assert enc.identity != build_encoder("image", EncoderConfig(image="cnn", image_size=48)).identity


# --------------------------------------------------------------------------- clip
def test_clip_encoder_featurize_head_and_grads(tiny_clip_dir, image_paths):
    enc = build_encoder("image", EncoderConfig(image=f"clip:{tiny_clip_dir}"))
    feats = enc.featurize(image_paths)
    assert feats.shape == (3, 32)  # pooled vision output (hidden 32) for a trainable projection
    assert enc.out_dim == 16
    head = enc.new_head()
    assert isinstance(head, ProjectionHead)
    out = head(feats)
    assert out.shape == (3, 16)
    assert_float32_close(out.norm(dim=-1), torch.ones(3), ulps=NORM_ULPS)
    out.sum().backward()
    with_grad = [n for n, p in head.named_parameters() if p.grad is not None]
    assert with_grad and all(n.startswith("visual_projection.") for n in with_grad)
    assert all(n.startswith("visual_projection.") for n, p in head.named_parameters() if p.requires_grad)
    # the backbone is frozen and untouched
    assert not any(p.requires_grad for p in enc.backbone.model.parameters())
    assert all(p.grad is None for p in enc.backbone.model.parameters())
    # the head trains a copy: the backbone's own projection is a different tensor
    assert head.visual_projection.weight.data_ptr() != enc.backbone.model.visual_projection.weight.data_ptr()


def test_clip_frozen_projection_gives_normalised_embeddings(tiny_clip_dir, image_paths):
    enc = build_encoder("image", EncoderConfig(image=f"clip:{tiny_clip_dir}", image_train_projection=False))
    feats = enc.featurize(image_paths)
    assert feats.shape == (3, 16)
    assert_float32_close(feats.norm(dim=-1), torch.ones(3), ulps=NORM_ULPS)
    assert list(enc.new_head().parameters()) == []
    # and it equals the trainable head applied to the pooled features (same projection, before training)
    trainable = build_encoder("image", EncoderConfig(image=f"clip:{tiny_clip_dir}"))
    assert_float32_close(trainable.new_head()(trainable.featurize(image_paths)), feats, ulps=NORM_ULPS)


def test_orderer_over_clip_shapes_and_backward(tiny_clip_dir, image_paths):
    torch.manual_seed(0)
    enc = build_encoder("image", EncoderConfig(image=f"clip:{tiny_clip_dir}"))
    orderer = Orderer(enc, SMALL)
    logits, loss = orderer_loss(orderer, enc.featurize(image_paths), 3)
    assert logits.shape == (1, 3, 3, 2)
    assert backward_reaches(orderer, loss) == []


# --------------------------------------------------------------------------- bert
@pytest.mark.parametrize("layers", [0, 1])
def test_bert_encoder_shapes_and_backward(tiny_bert_dir, layers):
    torch.manual_seed(0)
    enc = build_encoder(
        "text", EncoderConfig(text=f"bert:{tiny_bert_dir}", text_train_layers=layers, text_max_length=16)
    )
    feats = enc.featurize(SENTENCES)
    if layers == 0:
        assert feats.shape == (3, 32)
    else:
        assert feats.shape == (3, 16, 33)  # hidden states padded to max_length + the attention mask channel
        assert set(feats[..., -1].unique().tolist()) == {0.0, 1.0}
    head = enc.new_head()
    assert head(feats).shape == (3, 32)
    orderer = Orderer(enc, SMALL)
    logits, loss = orderer_loss(orderer, feats, 3)
    assert logits.shape == (1, 3, 3, 2)
    assert backward_reaches(orderer, loss) == []
    if layers:
        assert isinstance(orderer.head, BertTopHead) and len(orderer.head.layers) == 1
        assert any(n.startswith("head.layers.") for n, _ in orderer.named_parameters())
    assert not any(p.requires_grad for p in enc.backbone.model.parameters())


@pytest.mark.parametrize("layers", [1, 2])
def test_bert_split_head_matches_the_full_model(tiny_bert_dir, layers):
    """Frozen lower layers + trainable top layers compute exactly what the whole model computes."""
    enc = build_encoder(
        "text", EncoderConfig(text=f"bert:{tiny_bert_dir}", text_train_layers=layers, text_max_length=16)
    )
    with torch.no_grad():
        split = enc.new_head()(enc.featurize(SENTENCES))
        tok = enc.backbone.tokenize(SENTENCES)
        full = pool_tokens(enc.backbone.model(**tok).last_hidden_state, tok["attention_mask"], False)
    assert_float32_close(split, full, ulps=BACKBONE_ULPS)


@pytest.mark.parametrize("layers", [0, 1])
def test_masked_mean_and_official_pooling_differ_only_with_padding(tiny_bert_dir, layers):
    kw = dict(text=f"bert:{tiny_bert_dir}", text_train_layers=layers, text_max_length=32)
    masked, official = (
        build_encoder("text", EncoderConfig(**kw)),
        build_encoder("text", EncoderConfig(**kw, official_text_pooling=True)),
    )
    assert masked.identity != official.identity  # cached features must not mix the two
    with torch.no_grad():
        a = masked.new_head()(masked.featurize(SENTENCES))
        b = official.new_head()(official.featurize(SENTENCES))
    # sentences given together form one story, padded to its longest sentence (the authors' padding)
    lengths = masked.backbone.tokenize(SENTENCES)["attention_mask"].sum(1)
    padded = lengths < lengths.max()
    assert padded.any()
    for k in range(3):
        if padded[k]:
            # the companion of BACKBONE_ULPS: reading padding moves a feature by over 100 budgets
            assert_beyond_rounding(a[k], b[k], ulps=BACKBONE_ULPS)
        else:
            assert_float32_close(a[k], b[k], ulps=BACKBONE_ULPS)


PADDED_STORIES = [
    ["a cat.", "the red circle waits by the tank.", "hour seven: a green square looks at the water level today."],
    ["a cat.", "the dog.", "one more."],  # "a cat." again, in a story padded to another length
    [" ".join(["word"] * 20), "short.", "a brown star rolls over the old wooden floor."],  # cut at 16 tokens
]


@pytest.mark.parametrize("layers", [0, 1])
def test_story_padding_is_invariant_to_batching_and_cache(tiny_bert_dir, tmp_path, layers):
    """All-position pooling: each sentence is featurized padded to its story's longest sentence, as the authors
    pad, whatever the chunking or the cache; the same sentence in two stories keeps two features."""
    from iterwego.data.cache import FeatureCache
    from iterwego.data.features import build_features
    from iterwego.data.readers import Item, Story

    cfg = EncoderConfig(text=f"bert:{tiny_bert_dir}", text_train_layers=layers, text_max_length=16)
    enc = build_encoder("text", EncoderConfig(**{**cfg.__dict__, "official_text_pooling": True}))
    head = enc.new_head().eval()
    stories = [Story(f"s{k}", [Item(sentence=t) for t in sents]) for k, sents in enumerate(PADDED_STORIES)]
    with torch.no_grad():
        want = [  # the authors' computation, one story at a time
            enc.backbone.model(**enc.backbone.tokenizer(sents, padding="longest", max_length=16, truncation=True,
                                                        return_tensors="pt")).last_hidden_state.mean(1)
            for sents in PADDED_STORIES
        ]  # fmt: skip
        for _ in range(2):  # the second pass reads every feature back from the cache
            sets, feats = build_features({"text": enc}, {"x": stories}, cross_modal=False, cache=FeatureCache(tmp_path))
            got = [head(feats["text"][torch.as_tensor(rows)]) for rows in sets["x"].text_rows]
            for g, w in zip(got, want):
                assert_float32_close(g, w, ulps=BACKBONE_ULPS)
        assert sets["x"].text_rows[0][0] != sets["x"].text_rows[1][0]
        assert_beyond_rounding(got[0][0], got[1][0], ulps=BACKBONE_ULPS)  # padded to 17 and to 5 tokens
        items = [it for st in stories for it in enc.story_items([i.sentence for i in st.items])]
        one_by_one = head(enc.featurize(items, batch_size=1))
        assert_float32_close(head(enc.featurize(items, batch_size=4)), one_by_one, ulps=BACKBONE_ULPS)
        assert_float32_close(one_by_one, torch.cat(want), ulps=BACKBONE_ULPS)
        # masked pooling reads no padding: any chunking gives the same features
        masked = build_encoder("text", cfg)
        plain = [t for sents in PADDED_STORIES for t in sents]
        m_head = masked.new_head().eval()
        assert_float32_close(
            m_head(masked.featurize(plain, batch_size=1)), m_head(masked.featurize(plain)), ulps=BACKBONE_ULPS
        )


def test_truncation_is_counted(tiny_bert_dir):
    enc = build_encoder("text", EncoderConfig(text=f"bert:{tiny_bert_dir}", text_max_length=8))
    enc.featurize(["short one."])
    assert enc.backbone.truncated == 0
    enc.featurize(["short one.", " ".join(["word"] * 30)])
    assert enc.backbone.truncated == 1
    enc.featurize([" ".join(["more"] * 12)] * 2)
    assert enc.backbone.truncated == 3


def test_bert_too_many_train_layers_is_rejected(tiny_bert_dir):
    with pytest.raises(ValueError, match="text_train_layers=3"):
        build_encoder("text", EncoderConfig(text=f"bert:{tiny_bert_dir}", text_train_layers=3))


# --------------------------------------------------------------------------- minilm
def test_minilm_loads_offline_and_gives_384_dims(no_network):
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    enc = build_encoder("text", EncoderConfig(text="minilm"))
    feats = enc.featurize(["the red circle waits.", "a green square.", "the red circle waits."])
    assert feats.shape == (3, 384) and enc.out_dim == 384
    assert torch.equal(feats[0], feats[2])
    assert not torch.allclose(feats[0], feats[1])  # two sentences: features apart by O(1), not by rounding
    assert "minilm" in enc.identity and str(Path.home()) not in enc.identity  # portable cache identity
    assert no_network == []


# --------------------------------------------------------------------------- missing models
@pytest.mark.parametrize(
    "modality,cfg",
    [
        ("image", lambda d: EncoderConfig(image=f"clip:{d}")),
        ("text", lambda d: EncoderConfig(text=f"bert:{d}")),
        ("image", lambda d: EncoderConfig(image=f"clip:{d}", local_files_only=False)),
    ],
)
def test_missing_local_model_dir_is_a_clear_model_load_error(tmp_path, no_network, modality, cfg):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelLoadError) as err:
        build_encoder(modality, cfg(missing))
    msg = str(err.value)
    assert str(missing) in msg and "not found" in msg and "\n" not in msg
    assert "Repo id" not in msg  # not reported as a malformed hub name
    assert no_network == []
    assert not missing.exists()


def test_empty_model_dir_is_a_model_load_error(tmp_path, no_network):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError) as err:
        build_encoder("image", EncoderConfig(image=f"clip:{empty}"))
    assert str(empty) in str(err.value) and "\n" not in str(err.value)
    assert no_network == []


def test_unknown_hub_name_offline_is_a_model_load_error(no_network):
    with pytest.raises(ModelLoadError, match="no-such-org/no-such-model"):
        build_encoder("text", EncoderConfig(text="bert:no-such-org/no-such-model"))
    assert no_network == []


# --------------------------------------------------------------------------- orderer
def test_orderer_logits_shape_for_a_padded_batch():
    torch.manual_seed(0)
    o = Orderer(fake_encoder(), SMALL).eval()
    feats = torch.randn(7, 16)
    index = torch.tensor([[0, 1, 2, 3], [4, 5, 6, -1]])
    assert o(feats, index).shape == (2, 4, 4, 2)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 6), extra=st.integers(1, 4))
def test_orderer_padding_invariance(seed, n, extra):
    torch.manual_seed(seed % 1000)
    o = Orderer(fake_encoder(), SMALL).eval().requires_grad_(False)  # compared values carry no graph
    g = torch.Generator().manual_seed(seed)
    short, long = torch.randn(n, 16, generator=g), torch.randn(n + extra, 16, generator=g)
    alone = o(short, torch.arange(n)[None])[0]
    index = torch.full((2, n + extra), -1)
    index[0, :n] = torch.arange(n)
    index[1] = torch.arange(n, 2 * n + extra)
    batched = o(torch.cat([short, long]), index)
    assert_float32_close(batched[0, :n, :n], alone, ulps=ORDERER_ULPS)
    assert_float32_close(batched[1], o(long, torch.arange(n + extra)[None])[0], ulps=ORDERER_ULPS)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(2, 7))
def test_orderer_permutation_equivariance(seed, n):
    torch.manual_seed(seed % 1000)
    o = Orderer(fake_encoder(), SMALL).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(n, 16, generator=g)
    perm = torch.randperm(n, generator=g)
    base = o(feats, torch.arange(n)[None])[0]
    permuted = o(feats[perm], torch.arange(n)[None])[0]  # item k now shown at slot perm^-1(k)
    assert_float32_close(permuted, base[perm][:, perm], ulps=ORDERER_ULPS)
    via_index = o(feats, perm[None])[0]  # the same through the index instead of the rows
    assert_float32_close(via_index, base[perm][:, perm], ulps=ORDERER_ULPS)
    if not torch.equal(perm, torch.arange(n)):  # the companion: the unpermuted logits miss by over 100 budgets
        assert_beyond_rounding(permuted, base, ulps=ORDERER_ULPS)


def test_orderer_dropout_only_in_training():
    torch.manual_seed(0)
    o = Orderer(fake_encoder(), OrdererConfig(d_model=16, layers=1, heads=2, ffn=32, dropout=0.5))
    feats, index = torch.randn(4, 16), torch.arange(4)[None]
    o.eval()
    assert torch.equal(o(feats, index), o(feats, index))
    o.train()
    assert not torch.equal(o(feats, index), o(feats, index))


def test_pair_head_broadcasting_equals_explicit_concatenation():
    torch.manual_seed(0)
    d, B, n = 8, 2, 5
    head = PairHead(d, dropout=0.0)
    h = torch.randn(B, n, d)
    hi = h[:, :, None, :].expand(B, n, n, d)
    hj = h[:, None, :, :].expand(B, n, n, d)
    explicit = head.classifier(
        torch.tanh(head.linear(torch.cat([hi, hj], -1)))
    )  # [h_i; h_j] -> Linear -> tanh -> Linear
    got, explicit = head(h).detach(), explicit.detach()
    assert_float32_close(got, explicit, ulps=ORDERER_ULPS)  # two linears and a tanh, at the logits' scale
    assert_beyond_rounding(got, got.transpose(1, 2), ulps=ORDERER_ULPS)  # order matters: (i, j) != (j, i)


def test_pair_loss_matches_manual_cross_entropy_and_ignores_diagonal_and_padding():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 4, 2, generator=g)
    pos = torch.tensor([[2, 0, 1, -1], [3, 1, 0, 2]])
    valid = pos >= 0
    loss = pair_loss(logits, pos, valid)
    terms = []
    for b in range(2):
        for i in range(4):
            for j in range(4):
                if i != j and valid[b, i] and valid[b, j]:
                    label = int(pos[b, i] < pos[b, j])  # class 1: i before j
                    terms.append(-F.log_softmax(logits[b, i, j], -1)[label])
    assert_float32_close(loss, torch.stack(terms).mean(), ulps=LOSS_ULPS)
    noisy = logits.clone()
    eye = torch.eye(4, dtype=torch.bool)
    noisy[:, eye] = 1e3 * torch.randn(2, 4, 2, generator=g)
    noisy[0, 3, :] = -1e3
    noisy[0, :, 3] = 1e3
    assert_float32_close(pair_loss(noisy, pos, valid), loss, ulps=LOSS_ULPS)  # the garbage is never read


def test_story_loss_averaging_weighs_every_story_alike():
    """train.loss_average="story" (the authors'): each story's mean pair loss, summed; "pair": all pairs alike."""
    from iterwego.model import loss_units, pairwise_accuracy

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 4, 2, generator=g)
    pos = torch.tensor([[2, 0, 1, 3], [1, 0, -1, -1]])
    valid = pos >= 0
    per_story = [pair_loss(logits[b : b + 1], pos[b : b + 1], valid[b : b + 1]) for b in range(2)]
    assert_float32_close(pair_loss(logits, pos, valid, "story_sum"), per_story[0] + per_story[1], ulps=LOSS_ULPS)
    want = (12 * per_story[0] + 2 * per_story[1]) / 14
    assert_float32_close(pair_loss(logits, pos, valid, "sum") / 14, want, ulps=LOSS_ULPS)
    # the companion of LOSS_ULPS: the other averaging (per story) misses the pair average by over 100 budgets
    assert_beyond_rounding((per_story[0] + per_story[1]) / 2, want, ulps=LOSS_ULPS)
    assert loss_units(valid, "story") == 2 and loss_units(valid, "pair") == 14
    # the authors' validation score reads each ordered cell (i, j) on its own
    hand = torch.zeros(1, 3, 3, 2)
    hand[0, 0, 1, 1] = hand[0, 1, 0, 0] = hand[0, 1, 2, 1] = 1.0  # right: (0,1), (1,0), (1,2)
    hand[0, 2, 1, 1] = hand[0, 0, 2, 0] = hand[0, 2, 0, 1] = 1.0  # wrong: (2,1), (0,2), (2,0)
    acc = pairwise_accuracy(hand, torch.tensor([[0, 1, 2]]), torch.ones(1, 3, dtype=torch.bool))
    assert acc.tolist() == [0.5]


def test_pair_classifier_has_its_own_dropout():
    cfg = OrdererConfig(d_model=16, layers=1, heads=2, ffn=32, dropout=0.2, pair_dropout=0.1)
    o = Orderer(Encoder("image", "x", None, lambda: L2Head(16), 16), cfg)
    assert o.classifier.drop.p == 0.1 and o.encoder.layers[0].self_attn.dropout == 0.2
    same = Orderer(Encoder("image", "x", None, lambda: L2Head(16), 16), OrdererConfig(d_model=16, dropout=0.3))
    assert same.classifier.drop.p == 0.3  # None: one dropout for both, as runs saved before the split


def test_config_of_an_older_run_keeps_the_old_behaviour_and_optional_overrides():
    from iterwego.config import preset
    from iterwego.errors import ConfigError

    old = preset("tiny").to_dict()
    for section, key in (("orderer", "pair_dropout"), ("guidance", "eval_threshold_i2t"), ("train", "select")):
        del old[section][key]  # written before these rows existed
    cfg = Config.from_dict(old)
    assert cfg == preset("tiny")
    assert cfg.orderer.pair_dropout is None and cfg.train.select == "pmr" and cfg.train.loss_average == "pair"
    assert cfg.guidance.inference_thresholds() == (cfg.guidance.threshold_t2i, cfg.guidance.threshold_i2t)
    paper = preset("paper")
    assert paper.override(["guidance.eval_threshold_i2t=null"]).guidance.eval_threshold_i2t is None
    assert preset("tiny").override(["guidance.eval_threshold_i2t=0.7"]).guidance.eval_threshold_i2t == 0.7
    assert preset("tiny").override(["orderer.pair_dropout=0"]).orderer.pair_dropout == 0.0
    with pytest.raises(ConfigError, match="expects a number"):
        preset("tiny").override(["guidance.eval_threshold_i2t=high"])


def test_pair_loss_label_convention():
    pos = torch.tensor([[0, 1, 2]])
    right = torch.zeros(1, 3, 3, 2)
    i, j = torch.meshgrid(torch.arange(3), torch.arange(3), indexing="ij")
    right[0, ..., 1] = 20.0 * (i < j)  # confident "i before j" exactly where gold agrees
    right[0, ..., 0] = 20.0 * (i > j)
    assert pair_loss(right, pos, pos >= 0) < 1e-6  # log(1 + e^-20) = 2e-9: far from 1e-6 on any CPU
    assert pair_loss(right.flip(-1), pos, pos >= 0) > 10


# --------------------------------------------------------------------------- run directories
def _tiny_run(tiny_bert_dir, image_paths):
    cfg = Config(
        encoder=EncoderConfig(
            image="cnn",
            image_size=32,
            cnn_width=4,
            text=f"bert:{tiny_bert_dir}",
            text_train_layers=1,
            text_max_length=16,
        ),
        orderer=OrdererConfig(d_model=16, layers=1, heads=2, ffn=16),
    )
    torch.manual_seed(0)
    img = build_encoder("image", cfg.encoder, cfg.orderer.d_model)
    txt = build_encoder("text", cfg.encoder, cfg.orderer.d_model)
    model = IterWeGO(cfg, img, txt).eval()
    feats = {"image": img.featurize(image_paths), "text": txt.featurize(SENTENCES)}
    index = {m: torch.tensor([[2, 0, 1]]) for m in feats}
    return model, feats, index


def _outputs(model, feats, index):
    with torch.no_grad():
        out = {m: model.orderer(m)(feats[m], index[m]) for m in ("image", "text")}
        out["align"] = model.aligner.scores(feats["image"], feats["text"], index["image"], index["text"])
    return out


@pytest.mark.parametrize("on", [False, True])
def test_guiding_orderer_keeps_its_dropout_only_when_asked(tiny_bert_dir, image_paths, on):
    """guidance.train_source_dropout: in a guided phase the guiding orderer runs in train mode, as the authors'."""
    from iterwego.batch import Batch

    model, feats, index = _tiny_run(tiny_bert_dir, image_paths)
    model.cfg.guidance.train_source_dropout = on
    model.train()
    loss = model.guided_loss(Batch([0], index, {m: v.clone() for m, v in index.items()}, feats), "image")
    loss.backward()
    assert model.text.training is on and model.image.training
    assert all(p.grad is None for p in model.text.parameters())  # the guiding orderer does not learn


@pytest.fixture
def saved_run(tmp_path, tiny_bert_dir, image_paths):
    model, feats, index = _tiny_run(tiny_bert_dir, image_paths)
    run = tmp_path / "run"
    save_run(run, model, {"chosen_rounds": {"image": 1, "text": 0}})
    return run, model, feats, index


def test_save_then_load_gives_identical_logits(saved_run):
    run, model, feats, index = saved_run
    assert sorted(p.name for p in run.iterdir()) == ["config.json", "meta.json", "model.safetensors"]
    loaded, meta = load_run(run)
    assert meta["chosen_rounds"] == {"image": 1, "text": 0}
    assert loaded.cfg == model.cfg
    assert not loaded.training
    a, b = _outputs(model, feats, index), _outputs(loaded, feats, index)
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("name", ["config.json", "model.safetensors", "meta.json"])
def test_missing_run_file_is_a_model_load_error(saved_run, name):
    run = saved_run[0]
    (run / name).unlink()
    with pytest.raises(ModelLoadError, match=name):
        load_run(run)


def test_missing_run_dir_is_a_model_load_error(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        load_run(tmp_path / "nope")


@pytest.mark.parametrize("corrupt", ["garbage", "truncated", "empty"])
def test_corrupt_weights_are_a_model_load_error(saved_run, corrupt):
    run = saved_run[0]
    w = run / "model.safetensors"
    data = w.read_bytes()
    w.write_bytes(
        {"garbage": b"not a safetensors file at all" * 10, "truncated": data[: len(data) // 2], "empty": b""}[corrupt]
    )
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        load_run(run)


def test_other_config_version_is_a_model_load_error(saved_run):
    run = saved_run[0]
    cfg = json.loads((run / "config.json").read_text())
    cfg["version"] += 1
    (run / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="version"):
        load_run(run)


def test_weights_from_another_config_are_a_model_load_error(saved_run):
    run = saved_run[0]
    cfg = json.loads((run / "config.json").read_text())
    cfg["orderer"]["d_model"] = 32
    (run / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        load_run(run)


# --------------------------------------------------------------------------- evaluation report
def _m(acc: float, pmr: float, tau: float) -> dict:
    return {"acc": acc, "pmr": pmr, "tau": tau, "extra": 1}  # extra keys are not reported


def test_choose_rounds_prefers_pmr_then_tau_then_fewer_rounds():
    from iterwego.training.evaluator import EvalResult

    res = EvalResult(rounds={
        # round 2: tau breaks the tie, 3 loses to fewer rounds
        "image": [_m(0.5, 0.2, 0.1), _m(0.6, 0.4, 0.2), _m(0.7, 0.4, 0.3), _m(0.1, 0.4, 0.3)],
        "text": [_m(0.5, 0.3, 0.5), _m(0.5, 0.3, 0.5)],  # a full tie keeps round 0
    })  # fmt: skip
    assert res.choose_rounds() == {"image": 2, "text": 0}
    assert res.selection_score() == pytest.approx((0.4 + 0.3) / 2)  # a float64 mean of two given numbers


def test_report_uses_the_given_rounds_and_the_documented_shape():
    from iterwego.training.evaluator import EvalResult

    res = EvalResult(
        rounds={
            "image": [_m(0.1, 0.0, 0.1), _m(0.2, 0.1, 0.2), _m(0.3, 0.2, 0.3)],
            "text": [_m(0.4, 0.3, 0.4), _m(0.5, 0.4, 0.5)],
        },
        fused=_m(0.9, 0.8, 0.7),
        alignment_accuracy=0.75,
    )
    rep = res.report({"image": 1, "text": 1})
    assert set(rep) == {"image", "text", "fused", "fusion", "alignment_accuracy"} and rep["fusion"] == "sum"
    assert rep["image"] == {
        "unimodal": {"acc": 0.1, "pmr": 0.0, "tau": 0.1},
        "rounds": [
            {"acc": 0.1, "pmr": 0.0, "tau": 0.1},
            {"acc": 0.2, "pmr": 0.1, "tau": 0.2},
            {"acc": 0.3, "pmr": 0.2, "tau": 0.3},
        ],
        "chosen_round": 1,
        "guided": {"acc": 0.2, "pmr": 0.1, "tau": 0.2},
    }
    assert rep["text"]["guided"] == rep["text"]["rounds"][1] == {"acc": 0.5, "pmr": 0.4, "tau": 0.5}
    assert rep["fused"] == {"acc": 0.9, "pmr": 0.8, "tau": 0.7} and rep["alignment_accuracy"] == 0.75
    assert json.loads(json.dumps(rep)) == rep


@pytest.mark.parametrize("wh", [(256, 256), (401, 333), (333, 401), (640, 480), (225, 900)])
def test_clip_preprocessing_matches_transformers_processor(tmp_path, wh):
    """The tensor path equals CLIPImageProcessor's output up to float32 rounding (square and non-square inputs)."""
    from PIL import Image
    from transformers import CLIPImageProcessor

    from iterwego.encoders import clip_pixel_values

    rng = np.random.default_rng(wh[0])
    p = tmp_path / "x.jpg"
    Image.fromarray(rng.integers(0, 255, (wh[1], wh[0], 3), dtype=np.uint8)).save(p, quality=90)
    ours = clip_pixel_values([str(p)], 224)
    ref = CLIPImageProcessor()(Image.open(p).convert("RGB"), return_tensors="pt")["pixel_values"]
    assert ours.shape == ref.shape == (1, 3, 224, 224)
    # both resize with PIL's bicubic (integer arithmetic), then rescale and normalise each pixel in float32 (torch
    # against numpy): a few operations, a few ulps at the normalised pixels' scale (~2); measured 0 on all three
    # kernel variants. One 8-bit level off in one pixel moves it by 1/255/0.27 (6e4 ulps there).
    assert_float32_close(ours, ref, ulps=8)


def test_backbone_identity_follows_the_weights_not_the_path(tiny_bert_dir, tmp_path):
    """Replacing weights in the same directory changes the identity (stale cache entries are not reused);
    copying the directory elsewhere keeps the fingerprint, so a run can move between machines."""
    import shutil

    from transformers import BertModel

    from iterwego.encoders import weights_fingerprint
    from iterwego.pretrained import portable_identity as _portable

    d = tmp_path / "bert"
    shutil.copytree(tiny_bert_dir, d)
    before = weights_fingerprint(str(d))
    moved = tmp_path / "elsewhere"
    shutil.copytree(d, moved)
    assert weights_fingerprint(str(moved)) == before != ""
    assert _portable(f"bert:{d}{before}:skip0") == _portable(f"bert:{moved}{before}:skip0")
    m = BertModel.from_pretrained(str(d))
    torch.manual_seed(0)
    for p in m.parameters():
        p.data.normal_()
    m.save_pretrained(str(d))
    assert weights_fingerprint(str(d)) != before
    assert weights_fingerprint("bert-base-uncased") == ""  # hub names: the name is the identity


def test_save_pretrained_from_pretrained_round_trip(tmp_path):
    """The sentence-transformers habit: a model saves its config beside its weights and loads back identically."""
    from iterwego.config import preset
    from iterwego.model import IterWeGO, create_model

    cfg = preset("tiny").override(["encoder.image_size=32"])
    torch.manual_seed(0)
    m = create_model(cfg).eval()
    m.save_pretrained(tmp_path / "run", meta={"chosen_rounds": {"image": 1, "text": 2}})
    back = IterWeGO.from_pretrained(tmp_path / "run")
    assert back.meta["chosen_rounds"] == {"image": 1, "text": 2}
    assert back.cfg.to_dict() == m.cfg.to_dict()
    a, b = m.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    feats = torch.randn(7, back.text_encoder.out_dim)
    index = torch.tensor([[0, 1, 2, 3], [4, 5, 6, -1]])
    assert torch.equal(m.text(feats, index), back.text(feats, index))
