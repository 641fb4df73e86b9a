"""The baseline for benchmarks/bench.py: IterWeGO's math computed the straightforward way.

Same weights and the same equations as the library, but organised as a
first implementation would be:

* one story at a time, float32;
* every backbone re-run from the raw items (image files, sentences) whenever
  a phase needs features, so nothing is cached between inference and the two
  training phases;
* the aligner gets its own second forward of the backbones it reads (for the
  learned aligner of both presets: the image and text backbones again; for a
  zero-shot CLIP aligner: CLIP's towers);
* the pair tensor built by a Python double loop over (i, j), one
  ``[h_i; h_j]`` concatenation and MLP call per ordered pair;
* guidance as Python loops over pairs, one softmax and one addition per pair.

It exists to be timed against, and its outputs are compared with the
batched path in bench.py to show both compute the same thing.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from iterwego.model import IterWeGO, Orderer


def backbone_features(model: IterWeGO, bank: str, items: Sequence[str]) -> Tensor:
    """Run the backbone of feature bank ``bank`` on ``items`` from scratch (no cache), float32."""
    enc = model.encoders()[bank]
    feats = enc.backbone.featurize(list(items))
    device = next(model.parameters()).device
    return feats.to(device)


def pair_logits(orderer: Orderer, feats: Tensor) -> Tensor:
    """One story's ``(n, n, 2)`` pair logits, the pair classifier called once per ordered pair."""
    h = orderer.encoder(
        orderer.input_drop(orderer.item_vectors(feats))[None],
        torch.ones(1, len(feats), dtype=torch.bool, device=feats.device),
    )[0]
    head = orderer.classifier
    rows = []
    for i in range(len(h)):
        row = []
        for j in range(len(h)):
            x = torch.cat([h[i], h[j]])
            row.append(head.classifier(torch.tanh(head.drop(head.linear(x)))))
        rows.append(torch.stack(row))
    return torch.stack(rows)


def aligner_scores(model: IterWeGO, images: Sequence[str], sentences: Sequence[str]) -> Tensor:
    """``(n_img, n_txt)`` scores of one story, after a second forward of the aligner's backbones."""
    al = model.aligner
    if model.align_encoders is not None:  # zero-shot CLIP: its own towers, run again
        ei = backbone_features(model, "align_image", images)
        et = backbone_features(model, "align_text", sentences)
        return al.logit_scale * ei @ et.T
    ei = al.embed_images(backbone_features(model, "image", images))
    et = al.embed_texts(backbone_features(model, "text", sentences))
    return ei @ et.T


def align_story(scores: Tensor, method: str) -> list[int]:
    """Row item -> column item for one story (argmax per row, or one-to-one Hungarian)."""
    s = scores.detach().float().cpu()
    if method == "argmax":
        out = []
        for row in s.tolist():
            best = 0
            for c, v in enumerate(row):
                if v > row[best]:
                    best = c
            out.append(best)
        return out
    from scipy.optimize import linear_sum_assignment

    r, c = linear_sum_assignment(s.numpy(), maximize=True)
    out = [-1] * s.shape[0]
    for a, b in zip(r.tolist(), c.tolist()):
        out[a] = b
    return out


def guide_story(
    target: Tensor, source: Tensor, mapping: list[int], threshold: float, weight: float, rule: str
) -> Tensor:
    """target[a(i), a(j)] += weight * source[i, j] for each confident source pair, pair by pair."""
    if weight == 0 or threshold >= 1:
        return target
    out = target.clone()
    m = source.shape[0]
    for i in range(m):
        for j in range(m):
            if i == j or mapping[i] < 0 or mapping[j] < 0:
                continue
            p0, p1 = torch.softmax(source[i, j].detach().float(), -1).tolist()
            if rule == "any":
                chosen = p0 > threshold or p1 > threshold
            elif rule == "class0":
                chosen = p0 > threshold
            else:
                chosen = p1 > threshold
            if chosen:
                out[mapping[i], mapping[j]] = out[mapping[i], mapping[j]] + weight * source[i, j].to(out.dtype)
    return out


def story_loss(logits: Tensor, positions: Sequence[int]) -> Tensor:
    """Mean cross-entropy over the story's off-diagonal pairs; label of (i, j) is "i before j"."""
    n = len(positions)
    picked, labels = [], []
    for i in range(n):
        for j in range(n):
            if i != j:
                picked.append(logits[i, j])
                labels.append(int(positions[i] < positions[j]))
    return F.cross_entropy(torch.stack(picked).float(), torch.tensor(labels, device=logits.device))


@torch.no_grad()
def infer_story(model: IterWeGO, images: Sequence[str], sentences: Sequence[str]) -> tuple[Tensor, Tensor]:
    """One guided round for one story: both orderers, aligner, image <- text, then text <- image."""
    g, mapping = model.cfg.guidance, model.cfg.aligner.mapping
    li = pair_logits(model.image, backbone_features(model, "image", images))
    lt = pair_logits(model.text, backbone_features(model, "text", sentences))
    scores = aligner_scores(model, images, sentences)
    i2t = align_story(scores, mapping)
    t2i = align_story(scores.T, mapping)
    thr_t2i, thr_i2t = g.inference_thresholds()
    li = guide_story(li, lt, t2i, thr_t2i, g.weight_t2i, g.eval_rule)
    lt = guide_story(lt, li, i2t, thr_i2t, g.weight_i2t, g.eval_rule)
    return li, lt


def phase_story_loss(
    model: IterWeGO,
    tgt: str,
    images: Sequence[str],
    sentences: Sequence[str],
    positions: Sequence[int],
    *,
    train: bool = True,
) -> Tensor:
    """Guided loss of one story in the ``tgt`` phase; every backbone is re-run."""
    g, mapping = model.cfg.guidance, model.cfg.aligner.mapping
    src = "text" if tgt == "image" else "image"
    thr, lam = (g.threshold_t2i, g.weight_t2i) if tgt == "image" else (g.threshold_i2t, g.weight_i2t)
    items = {"image": images, "text": sentences}
    with torch.no_grad():
        model.orderer(src).train(g.train_source_dropout)
        src_logits = pair_logits(model.orderer(src), backbone_features(model, src, items[src]))
        scores = aligner_scores(model, images, sentences)
        a = align_story(scores.T if src == "text" else scores, mapping)
        tgt_feats = backbone_features(model, tgt, items[tgt])
    model.orderer(tgt).train(train)
    logits = pair_logits(model.orderer(tgt), tgt_feats)
    return story_loss(guide_story(logits, src_logits, a, thr, lam, g.train_rule), positions)


def train_step(
    model: IterWeGO,
    tgt: str,
    opt: torch.optim.Optimizer,
    stories: list[tuple[list[str], list[str], list[int]]],
    grad_clip: float,
) -> float:
    """One optimiser step of the ``tgt`` phase over a batch, one story at a time (gradients accumulated)."""
    opt.zero_grad(set_to_none=True)
    total = 0.0
    for images, sentences, positions in stories:
        loss = phase_story_loss(model, tgt, images, sentences, positions) / len(stories)
        loss.backward()
        total += float(loss.detach())
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(model.orderer(tgt).parameters(), grad_clip)
    opt.step()
    return total
