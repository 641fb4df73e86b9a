"""CUDA paths: the feature store on the GPU, bf16 autocast against float32, torch.compile, a 1-process NCCL group.

Marked ``gpu`` (off by default; ``pytest -m gpu``) and skipped without CUDA. ``make test-gpu`` runs them, then
``benchmarks/bench.py --size paper --device cuda``. GPU machines may lack pytest and the MiniLM package, so
nothing here needs either: ``python tests/test_gpu.py`` runs the same checks, and the text backbone is a tiny
random BERT with a vocabulary written from the data.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from floats import assert_float32_close

try:
    import pytest
except ImportError:  # `python tests/test_gpu.py` on a machine without pytest
    pytest = None

if pytest is not None:
    pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

# bf16 keeps 8 bits of mantissa: pair probabilities of a float32 model move by at most this much under autocast
BF16_PROB_TOL = 0.02
BF16_LOSS_RTOL = 0.02
# A store filled on the GPU against one filled on the CPU: the backbones' float32 results differ by GPU against CPU
# summation order (~1e-6 relative at features of scale ~1), then both are rounded to float16 for storage, where
# values that straddle a rounding boundary land one float16 ulp (2**-10, ~1e-3 relative) apart: 2 float16 ulps.
F16_STORE_TOL = 2 * 2**-10
#: torch.compile against eager on CUDA: Inductor fuses kernels and may reorder the orderer's reductions (~8 in
#: series), at the logits' scale; its generated kernels may also pick other reduction splits than cuBLAS. 256
#: float32 ulps (at scale 10: 3e-4) is about the 0.2 tolerance there (1e-4 + 1e-4 relative); a skipped round moves
#: logits by O(1). Not measured on a device in issue 19's sweep (no GPU was lent to it).
COMPILE_ULPS = 256


def _setup(tmp: Path) -> tuple[Path, list[str]]:
    """Synthetic stories and the overrides of a tiny model whose text path is a random BERT's tokens."""
    from transformers import BertConfig, BertModel, BertTokenizer

    from iterwego.data.synth import SynthConfig, synthesize

    data = tmp / "data"
    synthesize(data, SynthConfig(stories=40, seed=5, image_size=32))
    words = set()
    for split in ("train", "val", "test"):
        doc = json.loads((data / f"{split}.story-in-sequence.json").read_text())
        words.update(w for a in doc["annotations"] for w in a[0]["text"].split())
    bert = tmp / "bert"
    bert.mkdir()
    (bert / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(words)]) + "\n")
    tok = BertTokenizer.from_pretrained(bert)  # from the directory: transformers 5 may ignore a bare vocab_file
    tok.save_pretrained(bert)
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    BertModel(cfg).save_pretrained(bert)
    sets = [
        f"encoder.text=bert:{bert}",
        "encoder.text_train_layers=1",
        "encoder.text_max_length=24",
        "encoder.feature_dtype=float16",
        "encoder.image_size=32",
        "train.unimodal_epochs=1",
        "train.iterative_epochs=1",
        "aligner.epochs=1",
        "fusion.epochs=1",
        "train.device=cuda",
    ]
    return data, sets


def _recipe(data: Path, out: Path, sets: list[str], cache=None):
    from iterwego.config import preset
    from iterwego.training.recipe import TrainRecipe

    return TrainRecipe(preset("tiny").override(sets), data, out, progress=False, log=lambda *a: None, cache=cache)


def test_store_and_cache_on_cuda(tmp_path):
    """A store filled by backbones on the GPU equals one filled on the CPU; batches read from it train on CUDA."""
    from iterwego.data.cache import FeatureCache
    from iterwego.data.features import gather, plan_batches

    data, sets = _setup(tmp_path)
    r = _recipe(data, tmp_path / "run", sets, FeatureCache(tmp_path / "store"))
    try:
        r.setup()  # backbones on the CPU (they are not part of the module that moved to CUDA)
        assert r.device.type == "cuda"
        items = {"image": [it.image for s in r.train_stories for it in s.items]}
        items["text"] = [it.sentence for s in r.train_stories for it in s.items]
        gpu_store = FeatureCache(tmp_path / "gpu-store")
        for mod, its in items.items():
            enc = r.model.encoders()[mod]
            if getattr(enc.backbone, "model", None) is not None:
                enc.backbone.model.to("cuda")
            on_gpu = gpu_store.ensure(enc, its, dtype="float16").to_tensor().float()
            on_cpu = FeatureCache(tmp_path / "store").ensure(enc, its, dtype="float16").to_tensor().float()
            assert torch.allclose(on_gpu, on_cpu, atol=F16_STORE_TOL, rtol=F16_STORE_TOL), mod
        plan = plan_batches(r.train_set, 8, np.random.default_rng(0), ("image", "text"), shuffle_stories=True)[0]
        b = gather(plan, r.feats, pin=True)
        assert all(v.is_pinned() for v in b.feats.values())
        b = b.to("cuda")
        assert b.feats["text"].is_cuda and b.feats["text"].dtype == torch.float32  # widened on the device
        assert b.feats["image"].dtype == torch.uint8
        r.train()
        assert 0.0 <= r.val_eval(r.model).rounds["image"][0]["pmr"] <= 1.0
    finally:
        r.cleanup()


def test_bf16_autocast_matches_float32(tmp_path):
    from iterwego.data.cache import FeatureCache
    from iterwego.data.features import batches
    from iterwego.device import autocast

    data, sets = _setup(tmp_path)
    r = _recipe(data, tmp_path / "run", sets, FeatureCache(tmp_path / "store"))
    try:
        r.setup()
        m = r.model.eval()
        b = next(iter(batches(r.val_set, 32, np.random.default_rng(0), r.feats, shuffle_stories=False))).to("cuda")
        with torch.no_grad():
            with autocast("cuda", "off"):
                ref = m(b, 2)
            with autocast("cuda", "bf16"):
                low = m(b, 2)
        for mod in ("image", "text"):
            for r32, r16 in zip(getattr(ref, mod), getattr(low, mod)):
                assert r16.dtype == torch.float32  # forward lifts autocast logits back to float32
                p32, p16 = r32.softmax(-1), r16.softmax(-1)
                assert float((p32 - p16).abs().max()) <= BF16_PROB_TOL, mod
        for tgt in ("image", "text"):
            with torch.no_grad():
                a = float(m.guided_loss(b, tgt))
                with autocast("cuda", "bf16"):
                    c = float(m.guided_loss(b, tgt))
            assert abs(a - c) <= BF16_LOSS_RTOL * abs(a), (tgt, a, c)
    finally:
        r.cleanup()


def test_torch_compile_matches_eager(tmp_path):
    from iterwego.data.cache import FeatureCache
    from iterwego.data.features import batches

    data, sets = _setup(tmp_path)
    r = _recipe(data, tmp_path / "run", [*sets, "orderer.dropout=0"], FeatureCache(tmp_path / "store"))
    try:
        r.setup()
        b = next(iter(batches(r.train_set, 16, np.random.default_rng(0), r.feats, shuffle_stories=False))).to("cuda")
        m = r.model.eval()
        with torch.no_grad():
            eager = m(b, 1)
        for part in (m.image, m.text, m.aligner):
            part.compile()
        with torch.no_grad():
            compiled = m(b, 1)
        for x, y in zip(eager.image + eager.text, compiled.image + compiled.text):
            assert_float32_close(y, x, ulps=COMPILE_ULPS)
        m.train()
        loss = m.guided_loss(b, "text")
        loss.backward()
        assert all(p.grad is not None for p in m.text.parameters() if p.requires_grad)
        assert not any("_orig_mod" in k for k in m.state_dict())
    finally:
        r.cleanup()


NCCL_CHILD = """
import os, sys
from pathlib import Path
import torch.distributed as dist
import iterwego.training.recipe as recipe
from iterwego.training.distributed import Dist

class OneProcessGroup(Dist):
    enabled = property(lambda self: True)  # a real NCCL group, of one process

recipe.Dist = OneProcessGroup
sys.path.insert(0, sys.argv[1])
from test_gpu import _recipe
data, out, sets = Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4:]
r = _recipe(data, out, sets)
try:
    r.setup()
    assert dist.is_initialized() and dist.get_backend() == "nccl", dist.get_backend()
    r.train().save()
finally:
    r.cleanup()
assert not dist.is_initialized()
print("clean")
"""


def test_one_process_nccl_group_trains_and_tears_down_cleanly(tmp_path):
    data, sets = _setup(tmp_path)
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}
    env["MASTER_PORT"] = str(29500 + os.getpid() % 1000)
    cmd = [sys.executable, "-c", NCCL_CHILD, str(Path(__file__).parent), str(data), str(tmp_path / "run"), *sets]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and p.stdout.strip().endswith("clean"), p.stderr[-3000:]
    assert (tmp_path / "run" / "model.safetensors").is_file()
    assert "destroy_process_group" not in p.stderr  # torch warns when a group is left behind


if __name__ == "__main__":  # the same checks without pytest
    if not torch.cuda.is_available():
        print("test_gpu: no CUDA device; skipped")
        sys.exit(0)
    failed = 0
    for name, fn in list(globals().items()):
        if name.startswith("test_") and callable(fn):
            with tempfile.TemporaryDirectory() as d:
                try:
                    fn(Path(d))
                    print(f"PASSED {name}", flush=True)
                except Exception as err:  # report every test, then fail
                    failed += 1
                    print(f"FAILED {name}: {type(err).__name__}: {err}", flush=True)
    sys.exit(1 if failed else 0)
