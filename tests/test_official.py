"""Importing the authors' checkpoint: safe reading, shape checks, their numerics, run directories.

The checkpoint is built here in the authors' format (their exact key names, an
``argparse.Namespace`` in ``'args'``, ``torch.save``) from tiny configs. The
reference below recomputes their evaluation step by step in plain torch with
explicit loops over pairs, independently of iterwego's modules.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from floats import assert_beyond_rounding, assert_float32_close
from iterwego.compat.official import load_official, official_guidance, save_as_run
from iterwego.errors import ModelLoadError

D, FFN, LAYERS = 32, 64, 2
CLIP_CFG = {
    "model_type": "clip",
    "projection_dim": D,
    "initializer_factor": 5.0,  # larger random weights make tiny backbones tell items apart
    "text_config": {
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "vocab_size": 99,
        "max_position_embeddings": 40,
        "bos_token_id": 97,
        "eos_token_id": 98,
        "pad_token_id": 1,
        "initializer_factor": 5.0,
    },
    "vision_config": {
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": 30,
        "patch_size": 15,
        "initializer_factor": 5.0,
    },
}
WORDS = [
    "[PAD]",
    "[UNK]",
    "[CLS]",
    "[SEP]",
    "[MASK]",
] + "the a cat dog sat on mat ran went home park we they saw big red old".split()
BERT_CFG = {
    "model_type": "bert",
    "vocab_size": len(WORDS),
    "hidden_size": D,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 37,
    "max_position_embeddings": 64,
    "initializer_range": 0.1,
}
SENTENCES = ["the cat sat", "we saw a big red dog on the mat", "they went home"]
THR, LAM_T, LAM_I = 0.8, 1.0, 0.25

# Float budgets. Comparisons of two float64 computations (official64, reference()) keep atol=1e-5: float64
# rounding on these logits (scale ~10, ~20 reductions in series) is ~1e-14, on every CPU, so 1e-5 only says "the
# same maths" and a real change (a skipped round, a wrong weight) misses it by far. The float32 ones use float32
# ulps at the logits' scale (tests/floats.py):
#: The authors' module in float32 against the float64 reference, or against our float32 modules: the whole chain
#: (the CLIP vision and BERT layers, the pair heads, the guidance rounds; ~20 reductions in series, and logits up
#: to ~170 from terms larger still) rounded in float32, at the logits' scale. Measured up to 34 ulps against float64
#: and 22 between the two float32 paths (AVX-512, AVX2, non-SIMD kernels); 256 leaves a factor 7. A skipped
#: guidance round still misses by over 100 budgets (test_official_logits_match_plain_reference).
OFFICIAL_ULPS = 256
#: Our orderer against the authors' module on the same image features: one layer and the pair head (~6
#: reductions in series), the same float32 operations arranged otherwise, at the logits' scale (measured 0).
ORDERER_ULPS = 32
#: Guidance alone in float32: each round adds up to n-1 weighted logits onto a pair, in another order than the
#: pair-by-pair loop, for up to 3 rounds (~2 ulps an addition at the logits' scale, ~3 x 5 additions).
GUIDANCE_ULPS = 32
#: A tiny backbone's output alone (CLIP's text tower and projection, BERT): ~10 reductions in series, one float32
#: computation along two paths (another padding, another caller), at the features' scale.
BACKBONE_ULPS = 64


def bert_tokenizer():
    from transformers import BertTokenizer

    vocab = {w: i for i, w in enumerate(WORDS)}
    try:
        return BertTokenizer(vocab=vocab)
    except TypeError:  # transformers 4: only a vocab file
        import tempfile

        f = Path(tempfile.mkdtemp()) / "vocab.txt"
        f.write_text("\n".join(WORDS) + "\n")
        return BertTokenizer(vocab_file=str(f))


def hf_models(seed: int):
    from transformers import BertConfig, BertModel, CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    return (
        CLIPModel(CLIPConfig.from_dict(CLIP_CFG)),
        BertModel(BertConfig.from_dict(BERT_CFG)),
        CLIPModel(CLIPConfig.from_dict(CLIP_CFG)),
    )


def authors_state(
    seed: int = 0, cls_scale: float = 6.0, diff_scale: float = 3.0, text_bias: tuple[float, float] | None = None
) -> dict:
    """A natorderNet state dict with the authors' key names and random (but confident) orderer weights."""
    clip, bert, clip_al = hf_models(seed)
    g = torch.Generator().manual_seed(seed + 1)
    r = lambda *s, scale=1.0: torch.randn(*s, generator=g) * scale  # noqa: E731
    sd = {}
    for flow, backbone_name, backbone in (("img_flow", "clip", clip), ("txt_flow", "bert", bert)):
        for layer in range(LAYERS):
            p = f"{flow}.encoder.layers.{layer}."
            for k in range(4):
                sd[p + f"self_attn.linears.{k}.weight"] = r(D, D, scale=1 / math.sqrt(D))
                sd[p + f"self_attn.linears.{k}.bias"] = r(D, scale=0.1)
            sd[p + "feed_forward.w_1.weight"], sd[p + "feed_forward.w_1.bias"] = (
                r(FFN, D, scale=1 / math.sqrt(D)),
                r(FFN, scale=0.1),
            )
            sd[p + "feed_forward.w_2.weight"], sd[p + "feed_forward.w_2.bias"] = (
                r(D, FFN, scale=1 / math.sqrt(FFN)),
                r(D, scale=0.1),
            )
            for s in range(2):
                sd[p + f"sublayer.{s}.norm.weight"], sd[p + f"sublayer.{s}.norm.bias"] = (
                    1 + r(D, scale=0.1),
                    r(D, scale=0.1),
                )
        # Tiny random backbones give similar items; a pair head reading mostly h_i - h_j turns their
        # differences into a mix of confident and unconfident pairs, so guidance has work to do.
        a = r(D, D, scale=diff_scale / math.sqrt(D))
        sd[f"{flow}.classifier.linear.weight"] = torch.cat([a, -a], 1) + r(D, 2 * D, scale=0.3 / math.sqrt(D))
        sd[f"{flow}.classifier.linear.bias"] = r(D, scale=0.1)
        sd[f"{flow}.classifier.classifier.weight"], sd[f"{flow}.classifier.classifier.bias"] = (
            r(2, D, scale=cls_scale / math.sqrt(D)),
            r(2, scale=0.1),
        )
        sd.update({f"{flow}.{backbone_name}.{k}": v.clone() for k, v in backbone.state_dict().items()})
    if text_bias is not None:
        sd["txt_flow.classifier.classifier.bias"] = torch.tensor(text_bias)
    sd.update({f"clip_align.{k}": v.clone() for k, v in clip_al.state_dict().items()})
    return sd


def authors_args() -> argparse.Namespace:
    return argparse.Namespace(
        model="wego",
        model_path="model",
        lr=2e-4,
        batch_size=64,
        seed=34,
        thr_thi=0.8,
        thr_iht=0.9,
        d_rnn=D,
        d_mlp=D,
        gnnl=LAYERS,
        attdp=0.2,
        lamda_t=1.0,
        lamda_i=0.25,
        cp="",
        do_test=False,
    )


def write_ckpt(path: Path, state: dict, **extra) -> Path:
    torch.save({"model": state, "args": authors_args(), "best_score": 0.625, **extra}, path)
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> tuple[Path, dict]:
    state = authors_state(0)
    return write_ckpt(tmp_path_factory.mktemp("ckpt") / "wego.best.pt", state), state


@pytest.fixture(scope="module")
def official(ckpt):
    return load_official(ckpt[0], clip_config=CLIP_CFG, bert_config=BERT_CFG)


@pytest.fixture(scope="module")
def official64(official):
    return copy.deepcopy(official).double()


def story_inputs(seed: int, clip_ids: torch.Tensor | None = None):
    g = torch.Generator().manual_seed(seed)
    pv = torch.randn(3, 3, 30, 30, generator=g)
    bert_in = bert_tokenizer()(SENTENCES, padding="longest", max_length=40, truncation=True, return_tensors="pt")
    if clip_ids is None:
        clip_ids = torch.randint(2, 97, (3, 6), generator=g)
    ids = torch.cat([torch.full((3, 1), 97), clip_ids, torch.full((3, 1), 98)], 1)
    clip_in = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return pv, dict(bert_in), clip_in


# --------------------------------------------------------------------------- the plain reference
def sub(state: dict, prefix: str) -> dict:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def ref_set_transformer(x: torch.Tensor, w: dict, heads: int = 4) -> torch.Tensor:
    """Post-norm layers: x = LN(x + MHA(x)); x = LN(x + FFN(x)); every item attends to every item."""
    n, d = x.shape
    dk = d // heads
    for layer in range(LAYERS):
        p = f"encoder.layers.{layer}."
        lin = lambda k, t: t @ w[p + f"self_attn.linears.{k}.weight"].T + w[p + f"self_attn.linears.{k}.bias"]  # noqa: E731
        q, k, v = lin(0, x), lin(1, x), lin(2, x)
        att = x.new_zeros(n, d)
        for h in range(heads):
            cols = slice(h * dk, (h + 1) * dk)
            scores = q[:, cols] @ k[:, cols].T / math.sqrt(dk)
            att[:, cols] = scores.softmax(-1) @ v[:, cols]
        y = lin(3, att)
        x = F.layer_norm(x + y, (d,), w[p + "sublayer.0.norm.weight"], w[p + "sublayer.0.norm.bias"])
        hid = torch.relu(x @ w[p + "feed_forward.w_1.weight"].T + w[p + "feed_forward.w_1.bias"])
        y = hid @ w[p + "feed_forward.w_2.weight"].T + w[p + "feed_forward.w_2.bias"]
        x = F.layer_norm(x + y, (d,), w[p + "sublayer.1.norm.weight"], w[p + "sublayer.1.norm.bias"])
    return x


def ref_pairs(h: torch.Tensor, w: dict) -> torch.Tensor:
    n = h.shape[0]
    out = h.new_zeros(n, n, 2)
    for i in range(n):
        for j in range(n):
            z = torch.tanh(torch.cat([h[i], h[j]]) @ w["classifier.linear.weight"].T + w["classifier.linear.bias"])
            out[i, j] = z @ w["classifier.classifier.weight"].T + w["classifier.classifier.bias"]
    return out


def ref_guide(target: torch.Tensor, source: torch.Tensor, mapping: list[int], thr: float, lam: float) -> torch.Tensor:
    """One pair at a time: a confident source pair (i, j) adds lam * source[i, j] onto target[a(i), a(j)]."""
    target = target.clone()
    p = source.softmax(-1)
    n = source.shape[0]
    for i in range(n):
        for j in range(n):
            if i != j and bool((p[i, j] > thr).any()):
                target[mapping[i], mapping[j]] = target[mapping[i], mapping[j]] + lam * source[i, j]
    return target


@torch.no_grad()
def reference(state: dict, pv, bert_in, clip_in, rounds: int):
    """Computed in the dtype of ``pv`` (float64 here, so that 1e-5 is a statement about the maths)."""
    from transformers import BertConfig, BertModel, CLIPConfig, CLIPModel

    dt = pv.dtype
    state = {k: v.to(dt) if v.is_floating_point() else v for k, v in state.items()}
    clip = CLIPModel(CLIPConfig.from_dict(CLIP_CFG)).to(dt).eval()
    clip.load_state_dict(sub(state, "img_flow.clip."))
    bert = BertModel(BertConfig.from_dict(BERT_CFG)).to(dt).eval()
    bert.load_state_dict(sub(state, "txt_flow.bert."))
    clip_al = CLIPModel(CLIPConfig.from_dict(CLIP_CFG)).to(dt).eval()
    clip_al.load_state_dict(sub(state, "clip_align."))

    e = clip.visual_projection(clip.vision_model(pixel_values=pv).pooler_output)
    img_feat = e / e.norm(dim=-1, keepdim=True)
    txt_feat = bert(**bert_in).last_hidden_state.mean(1)  # every position, padding too
    img = ref_pairs(ref_set_transformer(img_feat, sub(state, "img_flow.")), sub(state, "img_flow."))
    txt = ref_pairs(ref_set_transformer(txt_feat, sub(state, "txt_flow.")), sub(state, "txt_flow."))
    out = clip_al(pixel_values=pv, **clip_in)
    t2i = [int(out.logits_per_text[s].argmax()) for s in range(len(out.logits_per_text))]
    i2t = [int(out.logits_per_image[k].argmax()) for k in range(len(out.logits_per_image))]
    for _ in range(rounds):
        img = ref_guide(img, txt, t2i, THR, LAM_T)
        txt = ref_guide(txt, img, i2t, THR, LAM_I)
    return img, txt, t2i, i2t


# --------------------------------------------------------------------------- tests
def test_imports_with_checked_shapes(official, ckpt):
    m = official
    assert m.best_score == 0.625 and m.args["lr"] == 2e-4 and m.args["gnnl"] == LAYERS
    assert (m.img_flow.cfg.layers, m.img_flow.cfg.d_model, m.img_flow.cfg.ffn, m.img_flow.cfg.heads) == (
        LAYERS,
        D,
        FFN,
        4,
    )
    # the loaded weights are the checkpoint's, under the authors' own names
    own = m.state_dict()
    for k, v in ckpt[1].items():
        assert torch.equal(own[k], v), k


def test_wrong_config_names_the_key_and_both_shapes(ckpt):
    bad = copy.deepcopy(BERT_CFG)
    bad["intermediate_size"] = 40
    with pytest.raises(ModelLoadError) as e:
        load_official(ckpt[0], clip_config=CLIP_CFG, bert_config=bad)
    msg = str(e.value)
    assert "txt_flow.bert.encoder.layer.0.intermediate.dense.weight" in msg and "(37, 32)" in msg and "(40, 32)" in msg
    assert "--bert-config" in msg and "\n" not in msg
    # the shipped ViT-L/14 default does not fit a tiny checkpoint: refused before anything is built
    with pytest.raises(ModelLoadError, match="projection_dim is 768"):
        load_official(ckpt[0], bert_config=BERT_CFG)


def test_missing_and_unexpected_keys(tmp_path, ckpt):
    state = dict(ckpt[1])
    del state["clip_align.text_projection.weight"]
    with pytest.raises(ModelLoadError, match=r"missing key clip_align\.text_projection\.weight"):
        load_official(write_ckpt(tmp_path / "a.pt", state), CLIP_CFG, BERT_CFG)
    state = {**ckpt[1], "img_flow.extra.weight": torch.zeros(2)}
    with pytest.raises(ModelLoadError, match=r"unexpected key img_flow\.extra\.weight"):
        load_official(write_ckpt(tmp_path / "b.pt", state), CLIP_CFG, BERT_CFG)
    # buffers older transformers saved (constant position ids) are accepted
    state = {**ckpt[1], "txt_flow.bert.embeddings.position_ids": torch.arange(64)[None]}
    load_official(write_ckpt(tmp_path / "c.pt", state), CLIP_CFG, BERT_CFG)


@pytest.mark.parametrize("rounds", [0, 1, 2])
def test_official_logits_match_plain_reference(official, official64, ckpt, rounds):
    pv, bert_in, clip_in = story_inputs(2)
    img32, txt32 = official.official_logits(pv, bert_in, clip_in, rounds)
    assert img32.dtype == torch.float32  # the authors' precision; float32 rounding differs by ~1e-6 relative
    pv = pv.double()
    img, txt = official64.official_logits(pv, bert_in, clip_in, rounds)
    r_img, r_txt, _, _ = reference(ckpt[1], pv, bert_in, clip_in, rounds)
    torch.testing.assert_close(img, r_img, atol=1e-5, rtol=0)
    torch.testing.assert_close(txt, r_txt, atol=1e-5, rtol=0)
    assert_float32_close(img32, r_img, ulps=OFFICIAL_ULPS)
    assert_float32_close(txt32, r_txt, ulps=OFFICIAL_ULPS)
    if rounds == 0:  # the comparison is only meaningful if guidance has something to select and to skip
        for logits in (r_img, r_txt):
            conf = (logits.softmax(-1) > THR).any(-1) & ~torch.eye(3, dtype=torch.bool)
            assert 0 < int(conf.sum()) < 6
    else:
        r0_img, r0_txt, _, _ = reference(ckpt[1], pv, bert_in, clip_in, 0)
        # the companion of OFFICIAL_ULPS: skipping the guidance rounds misses by over 100 float32 budgets
        assert_beyond_rounding(img32, r0_img, ulps=OFFICIAL_ULPS)
        assert_beyond_rounding(txt32, r0_txt, ulps=OFFICIAL_ULPS)


def test_repeated_alignment_targets_accumulate(tmp_path):
    """Hand check: sentences 0 and 1 share one image, so their pairs add up on the same image pair."""
    state = authors_state(3, text_bias=(0.0, 12.0))  # every text pair is a confident "i before j"
    model = load_official(write_ckpt(tmp_path / "acc.pt", state), CLIP_CFG, BERT_CFG).double()
    same = torch.randint(2, 97, (1, 6), generator=torch.Generator().manual_seed(0))
    for seed in range(50):  # find images for which sentence 2 lands elsewhere than sentences 0 and 1
        other = torch.randint(2, 97, (1, 6), generator=torch.Generator().manual_seed(100 + seed))
        pv, bert_in, clip_in = story_inputs(seed, torch.cat([same, same, other]))
        pv = pv.double()
        t2i, _ = model.alignment(pv, clip_in)
        k, m = int(t2i[0]), int(t2i[2])
        if int(t2i[1]) == k and m != k:
            break
    else:
        pytest.fail("no input with a shared alignment target found")
    img0, txt0 = model.official_logits(pv, bert_in, clip_in, 0)
    img1, txt1 = model.official_logits(pv, bert_in, clip_in, 1)
    expected = img0.clone()
    expected[k, m] += txt0[0, 2] + txt0[1, 2]
    expected[m, k] += txt0[2, 0] + txt0[2, 1]
    expected[k, k] += txt0[0, 1] + txt0[1, 0]
    torch.testing.assert_close(img1, expected, atol=1e-5, rtol=0)
    r_img, r_txt, r_t2i, _ = reference(state, pv, bert_in, clip_in, 1)
    assert r_t2i == t2i.tolist()
    torch.testing.assert_close(img1, r_img, atol=1e-5, rtol=0)
    torch.testing.assert_close(txt1, r_txt, atol=1e-5, rtol=0)


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 6), st.integers(0, 3), st.integers(0, 2**31 - 1))
def test_guidance_equals_pair_by_pair_additions(n, rounds, seed):
    g = torch.Generator().manual_seed(seed)
    img, txt = torch.randn(n, n, 2, generator=g) * 3, torch.randn(n, n, 2, generator=g) * 3
    t2i, i2t = torch.randint(0, n, (n,), generator=g), torch.randint(0, n, (n,), generator=g)  # repeats allowed
    got_img, got_txt = official_guidance(img, txt, t2i, i2t, rounds)
    r_img, r_txt = img, txt
    for _ in range(rounds):
        r_img = ref_guide(r_img, r_txt, t2i.tolist(), THR, LAM_T)
        r_txt = ref_guide(r_txt, r_img, i2t.tolist(), THR, LAM_I)
    assert_float32_close(got_img, r_img, ulps=GUIDANCE_ULPS)
    assert_float32_close(got_txt, r_txt, ulps=GUIDANCE_ULPS)
    if rounds and not torch.equal(r_img, img):  # the companion: a skipped round misses by over 100 budgets
        assert_beyond_rounding(img, r_img, ulps=GUIDANCE_ULPS)


class _Hostile:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


@pytest.mark.parametrize("where", ["top", "args"])
def test_hostile_pickle_is_refused_without_running(tmp_path, where):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    payload = _Hostile(str(marker))
    obj = payload if where == "top" else {"model": {"w": torch.zeros(1)}, "args": payload, "best_score": 1.0}
    torch.save(obj, path)
    with pytest.raises(ModelLoadError) as e:
        load_official(path, CLIP_CFG, BERT_CFG)
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    assert not marker.exists()


def test_checkpoint_without_model_key(tmp_path):
    path = tmp_path / "nomodel.pt"
    torch.save({"args": authors_args(), "best_score": 0.5}, path)
    with pytest.raises(ModelLoadError, match="'model'") as e:
        load_official(path, CLIP_CFG, BERT_CFG)
    assert str(path) in str(e.value)
    with pytest.raises(ModelLoadError, match="not found"):
        load_official(tmp_path / "absent.pt")


def test_save_as_run_reloads_with_identical_orderer_logits(tmp_path, official):
    from iterwego.model import load_run

    tok = bert_tokenizer()
    run = save_as_run(official, tmp_path / "run", bert_tokenizer=tok)
    cfg = json.loads((run / "config.json").read_text())
    meta = json.loads((run / "meta.json").read_text())
    assert cfg["encoder"]["image"] == "clip:backbones/clip" and cfg["encoder"]["text"] == "bert:backbones/bert"
    assert cfg["encoder"]["official_text_pooling"] is True and cfg["encoder"]["text_train_layers"] == 0
    assert (cfg["orderer"]["d_model"], cfg["orderer"]["heads"], cfg["orderer"]["ffn"], cfg["orderer"]["layers"]) == (
        D,
        4,
        FFN,
        LAYERS,
    )
    assert cfg["aligner"]["kind"] == "clip" and cfg["aligner"]["mapping"] == "argmax"
    assert cfg["guidance"]["train_rule"] == "class0" and cfg["guidance"]["eval_rule"] == "any"
    assert meta["source"] == "official" and meta["best_score"] == 0.625 and meta["args"]["thr_iht"] == 0.9
    assert meta["tokenizers"] == {"bert": True, "clip_align": False}
    for d in ("clip", "bert", "clip_align"):
        assert (run / "backbones" / d / "config.json").is_file()
    card = (run / "README.md").read_text()
    assert (
        "library_name: iterwego" in card and "import-official" in card and "inside this run: `backbones/clip`" in card
    )

    pv, bert_in, clip_in = story_inputs(1)
    img0, txt0 = official.official_logits(pv, bert_in, clip_in, 0)
    model, _ = load_run(run, modalities=("image",))
    with torch.no_grad():
        feats = model.image_encoder.backbone.model.vision_model(pixel_values=pv).pooler_output
        got = model.image(feats, torch.arange(3)[None])[0]
    assert_float32_close(got, img0, ulps=ORDERER_ULPS)
    model, _ = load_run(run, modalities=("text",))
    with torch.no_grad():
        got = model.text(model.text_encoder.featurize(SENTENCES), torch.arange(3)[None])[0]
    assert_float32_close(got, txt0, ulps=OFFICIAL_ULPS)  # and through our BERT featurization: the whole chain

    # saving (or pushing) the loaded model elsewhere takes the run's own backbones along
    model.save_pretrained(tmp_path / "copy")
    assert (tmp_path / "copy" / "backbones" / "bert" / "config.json").is_file()
    assert (tmp_path / "copy" / "README.md").read_text() == card
    again, _ = load_run(tmp_path / "copy", modalities=("text",))
    with torch.no_grad():
        again_txt = again.text(again.text_encoder.featurize(SENTENCES), torch.arange(3)[None])[0]
        assert_float32_close(again_txt, txt0, ulps=OFFICIAL_ULPS)


def test_run_without_tokenizer_fails_clearly_on_text(tmp_path, official):
    from iterwego.model import load_run

    run = save_as_run(official, tmp_path / "run")
    assert json.loads((run / "meta.json").read_text())["tokenizers"]["bert"] is False
    assert "--bert-tokenizer" in (run / "backbones" / "bert" / "TOKENIZER_MISSING.txt").read_text()
    with pytest.raises(ModelLoadError, match="tokenizer"):
        load_run(run, modalities=("text",))
    load_run(run, modalities=("image",))  # the image side does not need it
    with pytest.raises(ModelLoadError, match="not an empty directory"):
        save_as_run(official, run)


def test_cli_import_official(tmp_path, ckpt, capsys):
    from iterwego.apps import official_cmd as cli_official

    clip_json, bert_json = tmp_path / "clip.json", tmp_path / "bert.json"
    clip_json.write_text(json.dumps(CLIP_CFG))
    bert_json.write_text(json.dumps(BERT_CFG))
    tok_dir = tmp_path / "tok"
    bert_tokenizer().save_pretrained(tok_dir)
    p = argparse.ArgumentParser()
    cli_official.register(p.add_subparsers(dest="command"))
    a = p.parse_args(
        [
            "import-official",
            str(ckpt[0]),
            "--out",
            str(tmp_path / "run"),
            "--clip-config",
            str(clip_json),
            "--bert-config",
            str(bert_json),
            "--bert-tokenizer",
            str(tok_dir),
        ]
    )
    assert a.func(a) == 0
    summary = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert summary["set_transformer"] == {"layers": LAYERS, "d_model": D, "heads": 4, "ffn": FFN}
    assert json.loads((tmp_path / "run" / "meta.json").read_text())["tokenizers"]["bert"] is True
    # a directory without vocabulary must not become a silently empty tokenizer
    empty = tmp_path / "empty_tok"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps(BERT_CFG))
    a = p.parse_args(
        [
            "import-official",
            str(ckpt[0]),
            "--out",
            str(tmp_path / "run2"),
            "--clip-config",
            str(clip_json),
            "--bert-config",
            str(bert_json),
            "--bert-tokenizer",
            str(empty),
        ]
    )
    with pytest.raises(ModelLoadError, match="tokenizer"):
        a.func(a)


def test_shipped_configs_are_the_released_architecture():
    """The default configs give the tensor shapes of CLIP ViT-L/14 and bert-base-uncased (built on meta, no memory)."""
    from iterwego.compat.official import HEADS, OfficialModel, _hf_config
    from iterwego.config import OrdererConfig

    cfg = OrdererConfig(d_model=768, layers=2, heads=HEADS, ffn=512, dropout=0.0)
    with torch.device("meta"):
        m = OfficialModel(_hf_config("clip", None), _hf_config("bert", None), cfg, cfg)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes["img_flow.clip.vision_model.embeddings.patch_embedding.weight"] == (1024, 3, 14, 14)
    assert shapes["img_flow.clip.vision_model.embeddings.position_embedding.weight"] == (257, 1024)
    assert shapes["img_flow.clip.visual_projection.weight"] == (768, 1024)
    assert shapes["clip_align.text_model.embeddings.token_embedding.weight"] == (49408, 768)
    assert shapes["txt_flow.bert.embeddings.word_embeddings.weight"] == (30522, 768)
    assert shapes["txt_flow.bert.pooler.dense.weight"] == (768, 768)
    assert shapes["img_flow.encoder.layers.1.feed_forward.w_1.weight"] == (512, 768)
    assert shapes["txt_flow.classifier.linear.weight"] == (768, 1536)
    assert (
        sum(
            1
            for k in shapes
            if k.startswith("img_flow.clip.vision_model.encoder.layers.") and k.endswith("q_proj.weight")
        )
        == 24
    )
    params = lambda p: sum(math.prod(s) for k, s in shapes.items() if k.startswith(p))  # noqa: E731
    assert round(params("img_flow.clip.") / 1e6, 1) == 427.6 and round(params("txt_flow.bert.") / 1e6, 1) == 109.5


def test_clip_align_encoders_reproduce_the_aligner(official):
    """The encoders a run uses for the 'clip' aligner give clip_align's normalised text embeddings."""
    from iterwego.compat.official import clip_align_encoders

    _, _, clip_in = story_inputs(2)
    fake_tokenizer = lambda sentences, **kw: dict(clip_in)  # noqa: E731 - stands in for CLIP's tokenizer
    _, text = clip_align_encoders("tiny", model=official.clip_align, tokenizer=fake_tokenizer)
    got = text.featurize(SENTENCES)
    with torch.no_grad():
        want = official.clip_align(pixel_values=torch.zeros(1, 3, 30, 30), **clip_in).text_embeds
    assert_float32_close(got, want, ulps=BACKBONE_ULPS)
