"""Speed of IterWeGO's batched computation over cached features, against a naive baseline and a floor.

Usage::

    python benchmarks/bench.py --size tiny|paper [--device cpu|cuda] [--stories N] [--json OUT]

One run measures, in milliseconds per story:

* ours: inference (both orderers, aligner scores, one guided round image <- text
  then text <- image) and one training step per phase (image phase: image
  orderer under text guidance; text phase), batched, over backbone features
  from :class:`iterwego.data.cache.FeatureCache`; the backbones' once-per-item cost
  (a cold cache) and the cost of a cache hit are reported separately;
* naive (benchmarks/naive.py): the same math story by story, float32,
  backbones re-run in every phase, the aligner as a second backbone forward,
  a Python double loop over pairs and Python loops for guidance;
* floor: one batched forward of the backbones over the same items (bf16 on
  GPU, float32 on CPU), input preparation (image decoding, tokenising) included.

It also reports cost per story for story lengths 5, 10, 20 and 50, the exact
decoder's time for n = 8, 10, 12, CLIP image preprocessing (transformers'
CLIPImageProcessor against iterwego's tensor path) and peak memory, and
checks that ours and naive agree numerically. ``paper`` builds CLIP
ViT-L/14 and bert-base-uncased from their architecture configs with random
weights (nothing is downloaded); the tokenizer is MiniLM's (same BERT
uncased vocabulary).

Random weights make every pair prediction near 50/50, so no pair would pass
the guidance thresholds and the guidance step would be skipped; the pair
heads' output layers are therefore rescaled once (same weights for ours and
naive) so that the logit gap has standard deviation 3, as a trained model's
confident predictions do.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import naive  # noqa: E402
from iterwego.batch import Batch  # noqa: E402
from iterwego.config import Config, preset  # noqa: E402
from iterwego.data.cache import FeatureCache  # noqa: E402
from iterwego.data.features import StorySet, build_features, make_batch  # noqa: E402
from iterwego.data.readers import Item, Story  # noqa: E402
from iterwego.data.store import StoredFeatures  # noqa: E402
from iterwego.decode import decode, pair_logprobs  # noqa: E402
from iterwego.device import autocast  # noqa: E402
from iterwego.encoders import (  # noqa: E402
    BertBackbone,
    CLIPTextBackbone,
    CLIPVisionBackbone,
    PixelBackbone,
    clip_pixel_values,
    minilm_dir,
    tokenize,
)  # noqa: E402
from iterwego.errors import ModelLoadError  # noqa: E402
from iterwego.guidance import select_pairs  # noqa: E402
from iterwego.model import IterWeGO, create_model  # noqa: E402

LENGTHS = (5, 10, 20, 50)
EXACT_NS = (8, 10, 12)
INFER_BATCH = 64  # stories per inference batch, as the Evaluator uses
WORDS = (
    "the red blue green old small happy family dog cat boat house park beach tree friends walked played "
    "looked waited near under after before morning evening day together again finally water road city"
).split()


# --------------------------------------------------------------------------- setup
def make_corpus(root: Path, n_stories: int, n_items: int, seed: int) -> list[Story]:
    """Stories of ``n_items`` 256-px JPEGs (smooth colour fields plus noise) and 8-16 word sentences."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    stories = []
    for s in range(n_stories):
        items = []
        for k in range(n_items):
            coarse = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((256, 256), Image.BICUBIC)
            arr = np.clip(np.asarray(coarse, np.int16) + rng.integers(-20, 21, (256, 256, 3)), 0, 255).astype(np.uint8)
            p = root / f"s{s:04d}_{k:02d}.jpg"
            Image.fromarray(arr).save(p, quality=90)
            words = rng.choice(WORDS, size=int(rng.integers(8, 17)))
            items.append(Item(image=str(p), sentence=" ".join(words) + "."))
        stories.append(Story(f"s{s:04d}", items))
    return stories


def paper_backbones(device: torch.device) -> dict:
    """Random-weight CLIP ViT-L/14 and bert-base-uncased from their architecture configs (no download)."""
    from transformers import BertConfig, BertModel, CLIPConfig, CLIPModel

    text = dict(
        vocab_size=49408,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=77,
        projection_dim=768,
    )
    vision = dict(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=224,
        patch_size=14,
        projection_dim=768,
    )
    torch.manual_seed(0)
    with torch.device(device):  # initialising on the accelerator is much faster than on 2 CPU cores
        clip = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=768))
        bert = BertModel(
            BertConfig(
                vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072
            )
        )
    tok = uncased_tokenizer()
    cfg = preset("paper")
    return {cfg.encoder.image: clip, cfg.encoder.text: (bert, tok)}


# The paper-size measurement keeps the computation it always timed: a learned aligner (which the naive
# path runs again) and a guiding orderer in eval mode (so ours and naive can be compared number for number).
PAPER_SIZE = ["aligner.kind=learned", "aligner.dim=256", "guidance.train_source_dropout=false"]


def uncased_tokenizer():
    """MiniLM's tokenizer (BERT's uncased vocabulary); without the minilm extra (a bare GPU machine), a WordPiece
    tokenizer over the corpus's own words, which tokenises the generated sentences the same way."""
    from transformers import AutoTokenizer, BertTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(minilm_dir()))
    except ModelLoadError:
        d = Path(tempfile.mkdtemp(prefix="iterwego-vocab-"))
        (d / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", *WORDS]) + "\n")
        return BertTokenizer(str(d / "vocab.txt"))


def build_model(size: str, device: torch.device) -> tuple[Config, IterWeGO]:
    cfg = preset(size).override(PAPER_SIZE if size == "paper" else [])
    torch.manual_seed(0)
    model = create_model(cfg, preloaded=paper_backbones(device) if size == "paper" else None).to(device)
    for enc in model.encoders().values():
        if getattr(enc.backbone, "model", None) is not None:
            enc.backbone.model.to(device)
    return cfg, model


def in_memory(built: tuple[dict, dict]) -> tuple[dict, dict]:
    """``build_features``' result with every stored bank read whole: the benchmark times compute over features
    in memory (float32, so ours and naive can agree to float precision), and a cache hit is a full read."""
    sets, feats = built
    return sets, {k: v.to_tensor() if isinstance(v, StoredFeatures) else v for k, v in feats.items()}


def sharpen(model: IterWeGO, batch: Batch) -> None:
    """Rescale each pair head's output layer so the logit gap has mean 0 and std 3 (see the module docstring)."""
    model.eval()
    with torch.no_grad():
        for m in ("image", "text"):
            o = model.orderer(m)
            lg = o(batch.feats[m], batch.index[m])
            gap = (lg[..., 1] - lg[..., 0]).float()
            s = 3.0 / max(float(gap.std()), 1e-6)
            out = o.classifier.classifier
            out.weight.mul_(s)
            out.bias.mul_(s)
            shift = s * float(gap.mean()) / 2  # moves the gap by -s * mean
            out.bias[1] -= shift
            out.bias[0] += shift


# --------------------------------------------------------------------------- measuring
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable, repeats: int, device: torch.device, warmup: Callable | None = None):
    """(fastest of ``repeats`` runs in seconds, last result); ``warmup`` runs once first, untimed.

    The minimum, not the median: on a shared machine the spread comes from
    other processes, and the fastest run is the one they disturbed least.
    """
    if warmup is not None:
        warmup()
    times, out = [], None
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return min(times), out


class Memory:
    """Peak memory per section: CUDA max_memory_allocated (reset per section), or the process's peak RSS so far."""

    def __init__(self, device: torch.device):
        self.device = device

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_mib(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux

    @property
    def what(self) -> str:
        return (
            "torch.cuda.max_memory_allocated per section"
            if self.device.type == "cuda"
            else "peak RSS of the process so far (getrusage)"
        )


# --------------------------------------------------------------------------- floor
@torch.no_grad()
def backbone_forward(backbone, items: list[str], device: torch.device) -> None:
    """The unavoidable work: prepare inputs once, one batched forward of the backbone."""
    if isinstance(backbone, PixelBackbone):  # the cnn's backbone is decoding + resizing itself
        backbone.featurize(items)
    elif isinstance(backbone, CLIPVisionBackbone):
        pv = backbone.pixel_values(items).to(device)
        with autocast(device):
            backbone.model.vision_model(pixel_values=pv)
    elif isinstance(backbone, BertBackbone):
        enc = {k: v.to(device) for k, v in backbone.tokenize(items).items()}
        with autocast(device):
            backbone.model(**enc)
    elif isinstance(backbone, CLIPTextBackbone):
        enc = tokenize(backbone.tokenizer, items, backbone.max_length)
        with autocast(device):
            backbone.model.text_model(
                input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device)
            )
    else:
        raise TypeError(f"no floor for backbone {type(backbone).__name__}")


def distinct_backbones(model: IterWeGO, stories: list[Story]) -> list[tuple[object, list[str]]]:
    seen, out = set(), []
    for name, enc in model.encoders().items():
        if id(enc.backbone) in seen:
            continue
        seen.add(id(enc.backbone))
        mod = "image" if name.endswith("image") else "text"
        items = [it.image if mod == "image" else it.sentence for s in stories for it in s.items]
        out.append((enc.backbone, list(dict.fromkeys(items))))
    return out


# --------------------------------------------------------------------------- ours
@torch.no_grad()
def ours_infer(model: IterWeGO, batches: list[Batch], device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One guided round per batch through the model's forward: both orderers, aligner, image <- text, text <- image."""
    model.eval()
    out = []
    for b in batches:
        fw = model(b.to(device), 1, fuse=False)
        out.append((fw.image[1], fw.text[1]))
    return out


def ours_phase_loss(model: IterWeGO, tgt: str, b: Batch, *, train: bool = True) -> torch.Tensor:
    """The guided loss of one batch in the ``tgt`` phase: :meth:`IterWeGO.guided_loss`, as training calls it."""
    model.orderer(tgt).train(train)
    return model.guided_loss(b, tgt)


def ours_train(model: IterWeGO, tgt: str, opt, batches: list[Batch], device: torch.device) -> float:
    """One optimiser step per batch of the ``tgt`` phase."""
    clip = model.cfg.train.grad_clip
    last = 0.0
    for b in batches:
        b = b.to(device)
        loss = ours_phase_loss(model, tgt, b)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.orderer(tgt).parameters(), clip)
        opt.step()
        last = float(loss.detach())
    return last


def phase_optimizers(model: IterWeGO) -> dict:
    lr = model.cfg.train.lr
    return {
        m: torch.optim.Adam([p for p in model.orderer(m).parameters() if p.requires_grad], lr=lr)
        for m in ("image", "text")
    }


def chunks(ids: list[int], size: int) -> list[list[int]]:
    return [ids[s : s + size] for s in range(0, len(ids), size)]


# --------------------------------------------------------------------------- naive glue
def story_views(
    stories: list[Story], batches: list[Batch]
) -> list[tuple[list[str], list[str], np.ndarray, np.ndarray]]:
    """Per story, in the batches' presentation: images and sentences in slot order, and their gold positions."""
    out = []
    for b in batches:
        for k, sid in enumerate(b.ids):
            s = stories[sid]
            pi = b.pos["image"][k][b.index["image"][k] >= 0].cpu().numpy()
            pt = b.pos["text"][k][b.index["text"][k] >= 0].cpu().numpy()
            out.append(([s.items[p].image for p in pi], [s.items[p].sentence for p in pt], pi, pt))
    return out


def naive_infer(model: IterWeGO, views) -> list[tuple[torch.Tensor, torch.Tensor]]:
    model.eval()
    return [naive.infer_story(model, im, se) for im, se, _, _ in views]


def naive_train(model: IterWeGO, tgt: str, opt, batches_of_views) -> None:
    for group in batches_of_views:
        naive.train_step(
            model,
            tgt,
            opt,
            [(im, se, (pi if tgt == "image" else pt).tolist()) for im, se, pi, pt in group],
            model.cfg.train.grad_clip,
        )


# --------------------------------------------------------------------------- other sections
def synthetic(like: dict[str, torch.Tensor], n: int, k: int, rng: np.random.Generator) -> tuple[StorySet, dict]:
    """``k`` stories of ``n`` items with random features shaped like the real ones in ``like`` (for the length sweep).

    uint8 pixels stay uint8; token features keep a 0/1 attention mask in their last channel.
    """
    N = n * k
    feats = {}
    for name, f in like.items():
        shape = (N, *f.shape[1:])
        if f.dtype == torch.uint8:
            feats[name] = torch.from_numpy(rng.integers(0, 256, shape, dtype=np.uint8))
        elif f.dim() == 3:
            L = f.shape[1]
            h = torch.from_numpy(rng.standard_normal((N, L, f.shape[2] - 1), dtype=np.float32))
            lens = torch.from_numpy(rng.integers(min(8, L), L + 1, N))
            mask = (torch.arange(L)[None] < lens[:, None]).float()
            feats[name] = torch.cat([h, mask[..., None]], -1)
        else:
            feats[name] = torch.from_numpy(rng.standard_normal(shape, dtype=np.float32))
    rows = [np.arange(s * n, (s + 1) * n) for s in range(k)]
    return StorySet([Story(f"syn{s}", []) for s in range(k)], rows, list(rows)), feats


def preprocessing(paths: list[str], repeats: int) -> dict:
    import warnings

    from transformers import CLIPImageProcessor
    from transformers.utils import logging as hf_logging

    from iterwego.images import load_image

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "torchvision not installed, using the PIL backend" notice
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            proc = CLIPImageProcessor()
    finally:
        hf_logging.set_verbosity(verbosity)
    cpu = torch.device("cpu")
    hf_fn = lambda: proc(images=[load_image(p) for p in paths], return_tensors="pt")["pixel_values"]  # noqa: E731
    ours_fn = lambda: clip_pixel_values(paths)  # noqa: E731
    t_hf, hf = timed(hf_fn, repeats, cpu, warmup=hf_fn)
    t_ours, ours = timed(ours_fn, repeats, cpu, warmup=ours_fn)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # its per-image normalisation is two small torch ops: thread start-up shows on busy cores
    try:
        t_ours1, _ = timed(ours_fn, repeats, cpu, warmup=ours_fn)
    finally:
        torch.set_num_threads(threads)
    return {
        "processor": type(proc).__name__,
        "images": len(paths),
        "hf_ms_per_image": 1e3 * t_hf / len(paths),
        "ours_ms_per_image": 1e3 * t_ours / len(paths),
        "ours_1thread_ms_per_image": 1e3 * t_ours1 / len(paths),
        "max_abs_diff": float((torch.as_tensor(hf).float() - ours).abs().max()),
        "shape": list(ours.shape),
    }


def exact_decoder(repeats: int) -> dict:
    rng = np.random.default_rng(0)
    out = {}
    for n in EXACT_NS:
        lp = pair_logprobs(rng.standard_normal((n, n, 2)) * 2)
        t, _ = timed(
            lambda: decode(lp, "exact"), max(repeats, 3), torch.device("cpu"), warmup=lambda: decode(lp, "exact")
        )
        out[n] = 1e3 * t
    return out


# --------------------------------------------------------------------------- main
def run(args) -> dict:
    device = torch.device(args.device)
    mem = Memory(device)
    torch.manual_seed(args.seed)
    work = Path(args.work or tempfile.mkdtemp(prefix="iterwego-bench-"))
    res: dict = {
        "load_average_start": os.getloadavg(),
        "size": args.size,
        "device": str(device),
        "stories": args.stories,
        "items_per_story": 5,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "cpu_cores": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "memory_measure": mem.what,
    }
    stories = make_corpus(work / "images", args.stories, 5, args.seed)
    cfg, model = build_model(args.size, device)
    for bb, items in distinct_backbones(
        model, stories[:1]
    ):  # first-call costs (kernel selection, allocator) out of every timing
        backbone_forward(bb, items[:1], device)
        bb.featurize(items[:1])

    # -- floor: one batched backbone forward over every item
    mem.start()
    t_floor, _ = timed(
        lambda: [backbone_forward(bb, items, device) for bb, items in distinct_backbones(model, stories)],
        args.repeats,
        device,
    )
    res["floor"] = {
        "ms_per_story": 1e3 * t_floor / args.stories,
        "peak_mib": mem.peak_mib(),
        "dtype": "bf16" if device.type == "cuda" else "float32",
    }

    # -- ours: backbones once per item through the cache (cold), then a hit
    mem.start()
    roots = iter(range(10**6))

    def cold():
        cache = FeatureCache(work / f"cache{next(roots)}")
        return in_memory(build_features(model.encoders(), {"bench": stories}, cache=cache, dtype="float32")), cache

    t_cold, ((sets, feats), cache) = timed(cold, args.repeats, device)
    cache_root = cache.root
    peak_cold = mem.peak_mib()
    t_hit, _ = timed(
        lambda: in_memory(
            build_features(model.encoders(), {"bench": stories}, cache=FeatureCache(cache_root), dtype="float32")
        ),
        args.repeats,
        device,
    )
    res["backbones_once"] = {"ms_per_story": 1e3 * t_cold / args.stories, "peak_mib": peak_cold}
    res["cache_hit"] = {"ms_per_story": 1e3 * t_hit / args.stories}
    feats = {k: v.to(device) for k, v in feats.items()}
    ss = sets["bench"]
    rng = np.random.default_rng(args.seed)
    ids = list(range(args.stories))
    infer_batches = [make_batch(ss, c, rng, feats) for c in chunks(ids, INFER_BATCH)]
    train_batches = [make_batch(ss, c, rng, feats) for c in chunks(ids, cfg.train.batch_size)]
    sharpen(model, infer_batches[0].to(device))

    # -- inference: ours (cached features) and naive (story by story), before any training step changes weights
    mem.start()
    t_inf, ours_out = timed(
        lambda: ours_infer(model, infer_batches, device),
        args.repeats,
        device,
        warmup=lambda: ours_infer(model, infer_batches[:1], device),
    )
    res["ours_inference"] = {"ms_per_story": 1e3 * t_inf / args.stories, "peak_mib": mem.peak_mib()}
    nv_ids = ids[: args.naive_stories]
    views = story_views(stories, infer_batches)[: args.naive_stories]
    mem.start()
    t_ninf, naive_out = timed(
        lambda: naive_infer(model, views), args.naive_repeats, device, warmup=lambda: naive_infer(model, views[:1])
    )
    res["naive_inference"] = {
        "ms_per_story": 1e3 * t_ninf / len(nv_ids),
        "peak_mib": mem.peak_mib(),
        "stories": len(nv_ids),
    }

    # -- agreement of the two computations
    flat = [
        (li[k], lt[k], int(b.valid("image")[k].sum()))
        for (li, lt), b in zip(ours_out, infer_batches)
        for k in range(len(b.ids))
    ]
    diff = max(
        max(float((a[:n, :n] - na).abs().max()), float((t[:n, :n] - nt).abs().max()))
        for (a, t, n), (na, nt) in zip(flat, naive_out)
    )
    g = cfg.guidance
    with torch.no_grad():
        b0 = infer_batches[0].to(device)
        sel = {
            m: float(
                select_pairs(model.orderer(m)(b0.feats[m], b0.index[m]), thr, g.eval_rule, b0.valid(m)).float().sum()
                / max(int(b0.valid(m).sum(1).mul(b0.valid(m).sum(1) - 1).sum()), 1)
            )
            for m, thr in zip(("text", "image"), g.inference_thresholds())
        }
        model.eval()
        one = make_batch(ss, [0], np.random.default_rng(1), feats).to(device)
        v0 = story_views(stories, [one])[0]
        loss_diff = {}
        for tgt in ("image", "text"):
            a = float(ours_phase_loss(model, tgt, one, train=False))
            b = float(
                naive.phase_story_loss(
                    model, tgt, v0[0], v0[1], (v0[2] if tgt == "image" else v0[3]).tolist(), train=False
                )
            )
            loss_diff[tgt] = abs(a - b)
    res["check"] = {"max_abs_diff_guided_logits": diff, "abs_diff_phase_loss": loss_diff, "guiding_pairs_selected": sel}

    # -- one training step per phase: ours batched, naive story by story
    for tgt in ("image", "text"):
        mem.start()
        opt = phase_optimizers(model)[tgt]
        t, _ = timed(
            lambda: ours_train(model, tgt, opt, train_batches, device),
            args.repeats,
            device,
            warmup=lambda: ours_train(model, tgt, opt, train_batches[:1], device),
        )
        res[f"ours_train_{tgt}"] = {"ms_per_story": 1e3 * t / args.stories, "peak_mib": mem.peak_mib()}
        groups = chunks(story_views(stories, train_batches)[: args.naive_stories], cfg.train.batch_size)
        mem.start()
        t, _ = timed(
            lambda: naive_train(model, tgt, opt, groups),
            args.naive_repeats,
            device,
            warmup=lambda: naive_train(model, tgt, opt, [groups[0][:1]]),
        )
        res[f"naive_train_{tgt}"] = {"ms_per_story": 1e3 * t / len(nv_ids), "peak_mib": mem.peak_mib()}

    # -- cost per story against story length (ours, cached features of the right shapes)
    sweep = {}
    srng = np.random.default_rng(args.seed + 1)
    for n in LENGTHS:
        mem.start()
        sset, sf = synthetic({k: v.cpu() for k, v in feats.items()}, n, args.stories, srng)
        sf = {k: v.to(device) for k, v in sf.items()}
        sid = list(range(args.stories))
        ib = [make_batch(sset, c, srng, sf) for c in chunks(sid, INFER_BATCH)]
        tb = [make_batch(sset, c, srng, sf) for c in chunks(sid, cfg.train.batch_size)]
        row = {
            "inference": 1e3
            * timed(
                lambda: ours_infer(model, ib, device),
                args.repeats,
                device,
                warmup=lambda: ours_infer(model, ib[:1], device),
            )[0]
            / args.stories
        }
        for tgt in ("image", "text"):
            opt = phase_optimizers(model)[tgt]
            row[f"train_{tgt}"] = (
                1e3
                * timed(
                    lambda: ours_train(model, tgt, opt, tb, device),
                    args.repeats,
                    device,
                    warmup=lambda: ours_train(model, tgt, opt, tb[:1], device),
                )[0]
                / args.stories
            )
        row["total"] = row["inference"] + row["train_image"] + row["train_text"]
        row["peak_mib"] = mem.peak_mib()
        sweep[n] = row
    res["lengths"] = sweep
    res["exact_decoder_ms"] = exact_decoder(args.repeats)
    res["clip_preprocessing"] = preprocessing(
        [it.image for s in stories[: max(1, min(len(stories), 8))] for it in s.items], args.repeats
    )
    res["summary"] = summarize(res)
    return res


def summarize(r: dict) -> dict:
    floor = r["floor"]["ms_per_story"]
    rows = {}
    parts = (
        ("inference", "ours_inference", "naive_inference"),
        ("train_image", "ours_train_image", "naive_train_image"),
        ("train_text", "ours_train_text", "naive_train_text"),
    )
    for name, o, n in parts:
        rows[name] = (r[o]["ms_per_story"], r[n]["ms_per_story"])
    rows["sum"] = tuple(sum(rows[p][k] for p, _, _ in parts) for k in (0, 1))
    rows["end_to_end"] = (rows["sum"][0] + r["backbones_once"]["ms_per_story"], rows["sum"][1])
    return {
        k: {
            "ours_ms": o,
            "naive_ms": n,
            "naive_over_ours": n / o if o else float("inf"),
            "ours_over_floor": o / floor if floor else float("inf"),
        }
        for k, (o, n) in rows.items()
    }


def table(r: dict) -> str:
    s = r["summary"]
    floor = r["floor"]["ms_per_story"]
    hw = f"{r['gpu']}" if r["gpu"] else f"{r['cpu_cores']} CPU cores, {r['threads']} torch threads"
    lines = [
        f"IterWeGO benchmark  size={r['size']}  device={r['device']} ({hw})  "
        f"stories={r['stories']} x {r['items_per_story']} items "
        f"(naive on {r['naive_inference']['stories']})  best of {r['repeats']}  torch {r['torch']}  "
        f"load avg {r['load_average_start'][0]:.1f}",
        f"{'ms per story':44s}{'ours':>10s}{'naive':>11s}{'naive/ours':>12s}{'ours/floor':>12s}{'peak MiB':>10s}",
    ]

    def row(label, o, n=None, ratio=None, of=None, peak=None):
        f = lambda v, w, spec: f"{v:{w}{spec}}" if v is not None else " " * (w - 1) + "-"  # noqa: E731
        lines.append(
            f"{label:44s}{f(o, 10, '.2f')}{f(n, 11, '.2f')}{f(ratio, 11, '.1f')}{'x' if ratio is not None else ' '}"
            f"{f(of, 12, '.3f')}{f(peak, 10, '.0f')}"
        )

    for key, label, peak_key in (
        ("inference", "inference, 1 guided round (cached feats)", "ours_inference"),
        ("train_image", "train step, image phase", "ours_train_image"),
        ("train_text", "train step, text phase", "ours_train_text"),
        ("sum", "sum of the three", None),
    ):
        e = s[key]
        row(
            label,
            e["ours_ms"],
            e["naive_ms"],
            e["naive_over_ours"],
            e["ours_over_floor"],
            r[peak_key]["peak_mib"] if peak_key else None,
        )
    bo = r["backbones_once"]["ms_per_story"]
    row(
        "backbones once per item (cache miss)",
        bo,
        None,
        None,
        bo / floor if floor else None,
        r["backbones_once"]["peak_mib"],
    )
    e = s["end_to_end"]
    row(
        "end to end: backbones once + the three",
        e["ours_ms"],
        e["naive_ms"],
        e["naive_over_ours"],
        e["ours_over_floor"],
    )
    row(
        "cache hit (read features from disk)",
        r["cache_hit"]["ms_per_story"],
        None,
        None,
        r["cache_hit"]["ms_per_story"] / floor if floor else None,
    )
    row(f"floor: 1 batched backbone forward ({r['floor']['dtype']})", floor, None, None, 1.0, r["floor"]["peak_mib"])
    lines.append("")
    lines.append(
        "ours, ms per story vs story length n: "
        + "  ".join(
            f"n={n}: {v['total']:.2f} (inf {v['inference']:.2f}, img {v['train_image']:.2f}, txt {v['train_text']:.2f})"
            for n, v in r["lengths"].items()
        )
    )
    lines.append(
        "exact decoder, ms per story: " + "  ".join(f"n={n}: {v:.2f}" for n, v in r["exact_decoder_ms"].items())
    )
    p = r["clip_preprocessing"]
    lines.append(
        f"CLIP preprocessing, ms per 256-px JPEG -> 224: transformers {p['processor']} {p['hf_ms_per_image']:.2f}, "
        f"iterwego tensor path {p['ours_ms_per_image']:.2f} (1 torch thread: {p['ours_1thread_ms_per_image']:.2f}); "
        f"max |diff| = {p['max_abs_diff']:.2e}"
    )
    c = r["check"]
    lines.append(
        f"check ours vs naive: max |diff| guided logits {c['max_abs_diff_guided_logits']:.1e}; "
        f"phase loss |diff| image {c['abs_diff_phase_loss']['image']:.1e}, "
        f"text {c['abs_diff_phase_loss']['text']:.1e}; "
        f"guiding pairs selected: text {100 * c['guiding_pairs_selected']['text']:.0f}%, "
        f"image {100 * c['guiding_pairs_selected']['image']:.0f}%"
    )
    lines.append(
        f"peak memory: {r['memory_measure']}; wall time of the whole run {r.get('wall_s', float('nan')):.0f} s"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=("tiny", "paper"), default="tiny")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument(
        "--stories", type=int, default=None, help="stories of 5 items (default: tiny 32; paper 4 on CPU, 64 on GPU)"
    )
    ap.add_argument(
        "--naive-stories",
        type=int,
        default=None,
        help="stories the naive baseline runs on (default: all; paper on GPU 16)",
    )
    ap.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed runs per measurement, median reported (default: 3; paper on CPU 1)",
    )
    ap.add_argument("--json", type=Path, default=None, help="also write every number to this JSON file")
    ap.add_argument(
        "--work",
        type=str,
        default=None,
        help="directory for the generated images and caches, kept afterwards (default: a temporary one, removed)",
    )
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but no CUDA device is available")
    paper_cpu = args.size == "paper" and args.device == "cpu"
    if args.stories is None:
        args.stories = 32 if args.size == "tiny" else (4 if paper_cpu else 64)
    if args.naive_stories is None:
        args.naive_stories = args.stories if args.size == "tiny" or paper_cpu else min(args.stories, 16)
    args.naive_stories = max(1, min(args.naive_stories, args.stories))
    if args.repeats is None:
        args.repeats = 1 if paper_cpu else 3
    args.naive_repeats = 1 if paper_cpu else args.repeats
    if args.stories < 1 or args.repeats < 1:
        ap.error("--stories and --repeats must be positive")
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    scratch = None
    if args.work is None:
        scratch = args.work = tempfile.mkdtemp(prefix="iterwego-bench-")
    try:
        res = run(args)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    res["wall_s"] = time.time() - t0
    res["load_average_end"] = os.getloadavg()
    print(table(res))
    if args.json:
        args.json.write_text(json.dumps(res, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
