"""The frozen BERT path (iterwego.frozen_bert) gives transformers' features, and `order` never imports transformers.

The two paths run the same torch kernels in the same order (embedding sums, SDPA with the same boolean mask,
post-norm layers), so on the CPUs tested they agree bit for bit. The comparisons allow float32 rounding all the
same: 1e-5 absolute on hidden states and pooled features of order 1 (about 100 float32 ulps at that scale), room
for a torch build that picks another SDPA kernel for one of the two mask layouts.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from iterwego import frozen_bert
from iterwego.config import EncoderConfig
from iterwego.encoders import BertBackbone, build_encoder, minilm_dir, tokenize

ATOL = 1e-5  # float32 rounding of a 6-layer encoder's outputs at scale 1 (see the module docstring)
SENTENCES = [
    "the green square checks the water at hour six .",
    "",
    "Über café naïve émigré, don't x-ray 東京 tabs\tand\nnewlines",
    " ".join(["word"] * 80),  # cut at the token limit
    "a",
    "At hour seven, the ORANGE triangle looks at the water level.",
]


def _transformers(d):
    from transformers import AutoModel, AutoTokenizer

    return AutoModel.from_pretrained(str(d)).eval(), AutoTokenizer.from_pretrained(str(d))


@pytest.mark.parametrize("which", ["minilm", "tiny_bert"])
@pytest.mark.parametrize("padding,max_length", [("longest", 40), ("max_length", 40), ("longest", 512)])
def test_tokens_and_hidden_states_equal_transformers(which, padding, max_length, request):
    d = minilm_dir() if which == "minilm" else request.getfixturevalue("tiny_bert_dir")
    hf_model, hf_tok = _transformers(d)
    model, tok = frozen_bert.load(d), frozen_bert.FastTokenizer(d / "tokenizer.json")
    max_length = min(max_length, model.config.max_position_embeddings)  # the tiny model has 64 positions
    a, b = tokenize(hf_tok, SENTENCES, max_length, padding), tokenize(tok, SENTENCES, max_length, padding)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    with torch.no_grad():
        want, got = hf_model(**a).last_hidden_state, model(**b).last_hidden_state
    torch.testing.assert_close(got, want, rtol=0, atol=ATOL)
    lengths = hf_tok(SENTENCES, add_special_tokens=True, truncation=False)["input_ids"]
    assert [len(x) for x in lengths] == [len(x) for x in tok(SENTENCES, truncation=False)["input_ids"]]


@pytest.mark.parametrize("official", [False, True])
def test_minilm_backbone_features_equal_the_transformers_path(official):
    """What the feature bank stores: pooled sentence vectors, masked or over every position of the story's padding."""
    d = str(minilm_dir())
    hf_model, hf_tok = _transformers(d)
    fast = BertBackbone(d, official_pooling=official)
    slow = BertBackbone(d, official_pooling=official, model=hf_model, tokenizer=hf_tok)
    assert isinstance(fast.model, frozen_bert.FrozenBert) and not isinstance(slow.model, frozen_bert.FrozenBert)
    assert fast.identity == slow.identity  # one feature cache for both: the features are the same
    items = fast.story_items(SENTENCES)
    torch.testing.assert_close(fast.featurize(items), slow.featurize(items), rtol=0, atol=ATOL)
    assert fast.truncated == slow.truncated == 1


def test_only_plain_bert_directories_take_the_fast_path(tmp_path, tiny_clip_dir, tiny_bert_dir):
    """Anything the plain-torch encoder does not run exactly goes through transformers, as before."""
    assert frozen_bert.loadable(minilm_dir()) and frozen_bert.loadable(tiny_bert_dir)
    assert not frozen_bert.loadable(tiny_clip_dir)  # another model type
    assert not frozen_bert.loadable(tmp_path / "missing")
    for f in ("config.json", "model.safetensors", "tokenizer.json"):
        d = tmp_path / f"no-{f}"
        d.mkdir()
        for g in frozen_bert.FILES:
            if g != f:
                (d / g).write_bytes((tiny_bert_dir / g).read_bytes())
        assert not frozen_bert.loadable(d), f
    cfg = json.loads((tiny_bert_dir / "config.json").read_text())
    for key, value in (("is_decoder", True), ("position_embedding_type", "relative_key"), ("hidden_act", "relu")):
        d = tmp_path / key
        d.mkdir()
        for g in frozen_bert.FILES:
            (d / g).write_bytes((tiny_bert_dir / g).read_bytes())
        (d / "config.json").write_text(json.dumps({**cfg, key: value}))
        assert not frozen_bert.loadable(d), key
    # trainable top layers need transformers' layers (training keeps its path)
    enc = build_encoder("text", EncoderConfig(text=f"bert:{tiny_bert_dir}", text_train_layers=1))
    assert not isinstance(enc.backbone.model, frozen_bert.FrozenBert)


def test_a_broken_weights_file_is_one_line(tmp_path, tiny_bert_dir):
    from iterwego.errors import ModelLoadError

    for g in frozen_bert.FILES:
        (tmp_path / g).write_bytes((tiny_bert_dir / g).read_bytes())
    (tmp_path / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ModelLoadError, match="cannot load text model"):
        BertBackbone(str(tmp_path))


# The libraries `iterwego order` must not import: transformers' model-loading path pulls torch._dynamo and
# torch.distributed.tensor in (seconds), and sentence-transformers imports transformers. scipy.optimize alone costs
# a third of `import torch`: the aligner's one-to-one mapping solves stories of up to 12 items without it.
EXCLUDED = ("sentence_transformers", "transformers", "torch._dynamo", "torch.distributed.tensor", "scipy.optimize")


def _loaded_after(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_importing_the_order_app_imports_no_transformers():
    code = "import sys, json; import iterwego.apps.order, iterwego.apps.cli; print(json.dumps(sorted(sys.modules)))"
    loaded = set(_loaded_after(code))
    assert not loaded & set(EXCLUDED)


def test_the_order_command_imports_no_transformers(trained_run, tmp_path):
    """Through the whole command: load the tiny run (MiniLM), featurize, forward, decode, print."""
    imgs = sorted(str(p) for p in (trained_run.data / "images" / "test").iterdir())[:4]
    argv = ["order", "--run", str(trained_run.run), "--images", *imgs, "--sentences", "a b", "c", "d e f", "g"]
    code = (
        "import sys, json, contextlib, io\nfrom iterwego.apps.cli import main\n"
        f"with contextlib.redirect_stdout(io.StringIO()): rc = main({argv!r})\n"
        "print(json.dumps({'rc': rc, 'modules': sorted(sys.modules)}))"
    )
    got = _loaded_after(code)
    assert got["rc"] == 0
    assert not set(got["modules"]) & set(EXCLUDED), sorted(set(got["modules"]) & set(EXCLUDED))
    assert "iterwego.frozen_bert" in got["modules"]
