"""Fusion prototypes tried before the fused orderer was built: calibration of the summed pair log-odds.

On one saved demo run (``iterwego demo --out DIR``), with its orderers and aligner fixed, it compares on the
validation split (test printed for the record): the guided image order; the sum of both round-0 pair
log-odds on the aligner's pairs (iterwego 0.2's fused decoding); the sum of the guided logits; the sum on
the gold pairs; Platt-style calibrations fitted by logistic regression on validation pairs (``a * img + b *
txt``; with the guided logits too; with each item's mean confidence, so a modality that hides an item's cue
can be discounted), each scored by 2-fold cross-fitting on validation; and a prototype of the fused orderer
(a set transformer over the two orderers' item states, trained on the training split's pairs, epoch chosen
by validation PMR). ``docs/fusion.md`` quotes its output.

    python benchmarks/fusion_prototypes.py DEMO_OUT [--no-fo]
"""

import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from iterwego.data.cache import FeatureCache
from iterwego.data.features import build_features, gather, plan_batches
from iterwego.data.readers import load_split
from iterwego.data.synth import pmr_ceilings
from iterwego.decode import decode_stories, pair_logprobs
from iterwego.fusion import fuse_logits
from iterwego.metrics import order_metrics
from iterwego.model import FusedOrderer, load_run, pair_loss

torch.set_num_threads(1)
out = Path(sys.argv[1])
data, run = out / "data", out / "run"
model, meta = load_run(run, "cpu")
model.eval()
cfg = model.cfg
stories = {sp: load_split(data, sp) for sp in ("train", "val", "test")}
sets, feats = build_features(
    model.encoders(),
    stories,
    where=str(data),
    progress=False,
    cache=FeatureCache(Path.home() / ".cache/iterwego"),
    dtype=cfg.encoder.feature_dtype,
)
chosen = meta["chosen_rounds"]
R = max(chosen.values())


@torch.no_grad()
def collect(split, seed=7):
    rng = np.random.default_rng(seed)
    plans = plan_batches(sets[split], 64, rng, ("image", "text"), shuffle_stories=False)
    recs = []
    for p in plans:
        b = gather(p, feats)
        fw = model(b, R)
        iv, tv = b.valid("image"), b.valid("text")
        gold_pair = torch.full_like(b.index["image"], -1)  # image slot -> sentence slot with same gold pos
        for k in range(iv.shape[0]):
            pt = b.pos["text"][k]
            pi = b.pos["image"][k]
            for s in range(iv.shape[1]):
                if iv[k, s]:
                    gold_pair[k, s] = int(((pt == pi[s]) & tv[k]).nonzero()[0])
        recs.append(
            dict(
                img=fw.image,
                txt=fw.text,
                pairing=fw.pairing,
                gold_pair=gold_pair,
                iv=iv,
                tv=tv,
                pos=b.pos["image"],
                h_img=model.image.states(b.feats["image"], b.index["image"]),
                h_txt=model.text.states(b.feats["text"], b.index["text"]),
            )
        )
    return recs


def pmr_of(recs, fn):
    preds, golds = [], []
    for r in recs:
        lg = fn(r)
        lengths = r["iv"].sum(1).tolist()
        slots, _ = decode_stories(pair_logprobs(lg).float().numpy(), lengths, "exact")
        pos = r["pos"].numpy()
        preds += [[int(pos[b, s]) for s in o] for b, o in enumerate(slots)]
        golds += [list(range(n)) for n in lengths]
    m = order_metrics(preds, golds)
    return m["pmr"]


t0 = time.time()
D = {sp: collect(sp) for sp in ("train", "val", "test")}
print("collected", round(time.time() - t0, 1), "s", flush=True)
ceil = {sp: pmr_ceilings(data, sp) for sp in ("val", "test")}
res = {}


def share(v, split):
    return f"{split} {100 * v:5.1f} ({100 * v / ceil[split]['fused']:4.0f}%)"


def report(name, fn, splits=("val", "test")):
    res[name] = {sp: pmr_of(D[sp], fn) for sp in splits}
    print(
        f"{name:28s}",
        "  ".join(f"{sp} {100 * v:5.1f} ({100 * v / ceil[sp]['fused']:4.0f}%)" for sp, v in res[name].items()),
        flush=True,
    )


ri, rt = chosen["image"], chosen["text"]
report("guided image", lambda r: r["img"][ri])
report("sum round0 (current)", lambda r: fuse_logits(r["img"][0], r["txt"][0], r["pairing"]))
report("sum guided", lambda r: fuse_logits(r["img"][ri], r["txt"][rt], r["pairing"]))
report("sum round0 gold pairing", lambda r: fuse_logits(r["img"][0], r["txt"][0], r["gold_pair"]))


# ---- calibration: fused = a*lo_img + b*lo_txt (log-odds), fit on a data set by logistic regression
def lo(lg):  # log-odds of class 1
    return lg[..., 1] - lg[..., 0]


def pair_xy(recs, feats_fn):
    X, Y = [], []
    for r in recs:
        x = feats_fn(r)  # (B,n,n,k)
        pos = r["pos"]
        iv = r["iv"]
        n = iv.shape[1]
        keep = iv[:, :, None] & iv[:, None, :] & ~torch.eye(n, dtype=torch.bool)
        y = (pos[:, :, None] < pos[:, None, :]).float()
        X.append(x[keep])
        Y.append(y[keep])
    return torch.cat(X), torch.cat(Y)


def fit_lr(X, Y, l2=1e-3, steps=300):
    w = torch.zeros(X.shape[1], requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(X @ w, Y) + l2 * (w**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach()


def to_logits(z):  # log-odds -> 2-class logits
    return torch.stack([-z / 2, z / 2], -1)


def crossfit(feats_fn, name):
    val = D["val"]
    half = len(val) // 2
    A, B = val[:half], val[half:]
    wA = fit_lr(*pair_xy(A, feats_fn))
    wB = fit_lr(*pair_xy(B, feats_fn))
    wall = fit_lr(*pair_xy(val, feats_fn))

    def apply(w):
        return lambda r: to_logits(feats_fn(r) @ w)

    v = (
        pmr_of(B, apply(wA)) * sum(len(r["pos"]) for r in B) + pmr_of(A, apply(wB)) * sum(len(r["pos"]) for r in A)
    ) / sum(len(r["pos"]) for r in val)
    t = pmr_of(D["test"], apply(wall))
    res[name] = {"val": v, "test": t, "w": wall.tolist()}
    print(
        f"{name:28s} {share(v, 'val')}  {share(t, 'test')}  w={[round(x, 3) for x in wall.tolist()]}",
        flush=True,
    )


def f_pair(r, i=0, t=0, pairing="pairing"):
    ac = r[pairing].clamp(min=0)
    B = ac.shape[0]
    lt = lo(r["txt"][t])[torch.arange(B)[:, None, None], ac[:, :, None], ac[:, None, :]]
    return torch.stack([lo(r["img"][i]), lt], -1)


crossfit(lambda r: f_pair(r), "calibrated a*img0+b*txt0")
crossfit(lambda r: torch.cat([f_pair(r), f_pair(r, ri, rt)], -1), "calibrated r0+guided")


def f_ctx(r):
    x = f_pair(r)
    conf = x.abs().mean(2, keepdim=True)  # per item i, mean |log-odds| over j: how informative i's cue is
    ci, cj = conf.expand_as(x), conf.transpose(1, 2).expand_as(x)
    return torch.cat([x, x * torch.tanh(ci / 4), x * torch.tanh(cj / 4)], -1)


crossfit(f_ctx, "calibrated + per-item conf")


# ---- fused orderer on frozen contextual states
def fused_orderer(epochs=30, seed=0, lr=1e-3):
    """The product's FusedOrderer (pair terms only), trained here on the run's frozen states."""
    torch.manual_seed(seed)
    oc = copy.deepcopy(cfg.orderer)
    oc.rank_head = False
    net = FusedOrderer(oc)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.01)

    def run(r, pairing):
        return net.classifier(net.states(r["h_img"], r["h_txt"], r[pairing], r["iv"]))

    best, best_state = -1, None
    for ep in range(epochs):
        net.train()
        order = np.random.default_rng(seed + ep).permutation(len(D["train"]))
        for k in order:
            r = D["train"][k]
            loss = pair_loss(run(r, "gold_pair"), r["pos"], r["iv"])
            opt.zero_grad()
            loss.backward()
            opt.step()
        net.eval()
        with torch.no_grad():
            v = pmr_of(D["val"], lambda r: run(r, "pairing"))
        if v > best:
            best, best_state, best_ep = v, copy.deepcopy(net.state_dict()), ep
    net.load_state_dict(best_state)
    net.eval()
    with torch.no_grad():
        t = pmr_of(D["test"], lambda r: run(r, "pairing"))
    res["fused orderer"] = {"val": best, "test": t, "epoch": best_ep}
    print(
        f"{'fused orderer (h)':28s} {share(best, 'val')}  {share(t, 'test')} ep {best_ep}",
        flush=True,
    )


t0 = time.time()
if "--no-fo" not in sys.argv:
    fused_orderer()
    print("fused orderer trained in", round(time.time() - t0, 1), "s")
print(json.dumps({"ceil": ceil, **{k: v for k, v in res.items()}}, default=str), file=open(out / "explore.json", "w"))
