"""The aligner: image x sentence scores within a story, and the item mapping read off them.

Two kinds score pairs: :class:`LearnedAligner` (projection heads trained here
with symmetric InfoNCE) and :class:`CLIPAligner` (zero-shot CLIP similarity,
the authors' choice). :func:`align` turns a score matrix into a mapping
(argmax per row as in the paper, or one-to-one), and
:func:`alignment_hits` counts how often the top-1 sentence of an image is its own.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .batch import Batch, scatter_items
from .config import MAPPINGS, AlignerConfig
from .encoders import Encoder

__all__ = [
    "CLIPAligner",
    "LearnedAligner",
    "align",
    "alignment_hits",
    "best_assignment",
    "build_aligner",
    "pairing_marginals",
]


class LearnedAligner(nn.Module):
    """Projection heads over each modality's backbone features, trained with symmetric InfoNCE."""

    def __init__(self, image_encoder: Encoder, text_encoder: Encoder, cfg: AlignerConfig):
        super().__init__()
        self.image_head, self.text_head = image_encoder.new_head(), text_encoder.new_head()
        self.image_proj = _mlp(image_encoder.out_dim, cfg.dim)
        self.text_proj = _mlp(text_encoder.out_dim, cfg.dim)
        self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.temperature)))

    def embed_images(self, feats: Tensor) -> Tensor:
        return F.normalize(self.image_proj(self.image_head(feats)), dim=-1)

    def embed_texts(self, feats: Tensor) -> Tensor:
        return F.normalize(self.text_proj(self.text_head(feats)), dim=-1)

    def loss(self, image_feats: Tensor, text_feats: Tensor) -> Tensor:
        """Symmetric InfoNCE over matched rows (row k of each modality is one item)."""
        logits = self.log_scale.exp().clamp(max=100) * self.embed_images(image_feats) @ self.embed_texts(text_feats).T
        target = torch.arange(len(logits), device=logits.device)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2

    def scores(self, image_feats: Tensor, text_feats: Tensor, img_index: Tensor, txt_index: Tensor) -> Tensor:
        """Within-story image x sentence scores ``(B, n_img, n_txt)``."""
        ei = scatter_items(self.embed_images(image_feats), img_index)
        et = scatter_items(self.embed_texts(text_feats), txt_index)
        return ei @ et.transpose(1, 2)

    def pairing_logits(self, scores: Tensor) -> Tensor:
        """``scores`` (cosines) on the temperature the aligner learned: the logits its InfoNCE was trained on."""
        return self.log_scale.detach().exp().clamp(max=100) * scores


def _mlp(d_in: int, d: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d), nn.ReLU(), nn.Linear(d, d))


class CLIPAligner(nn.Module):
    """Zero-shot CLIP similarity; features are CLIP's normalised image and text embeddings."""

    def __init__(self, logit_scale: float = 100.0):
        super().__init__()
        self.register_buffer("logit_scale", torch.tensor(float(logit_scale)))

    def scores(self, image_feats: Tensor, text_feats: Tensor, img_index: Tensor, txt_index: Tensor) -> Tensor:
        ei, et = scatter_items(image_feats, img_index), scatter_items(text_feats, txt_index)
        return self.logit_scale * ei @ et.transpose(1, 2)

    def pairing_logits(self, scores: Tensor) -> Tensor:
        """CLIP's scores already carry its logit scale."""
        return scores


def build_aligner(
    cfg: AlignerConfig, image_encoder: Encoder, text_encoder: Encoder, has_clip_features: bool
) -> nn.Module:
    if cfg.kind == "learned":
        return LearnedAligner(image_encoder, text_encoder, cfg)
    if cfg.kind == "clip":
        if not has_clip_features:
            raise ValueError("aligner kind 'clip' needs CLIP image/text embedding encoders")
        return CLIPAligner()
    raise ValueError(f"unknown aligner kind {cfg.kind!r}; choose 'learned' or 'clip'")


def align(
    scores: Tensor, method: str = "argmax", valid_rows: Tensor | None = None, valid_cols: Tensor | None = None
) -> Tensor:
    """Map each row item to a column item from a ``(B, m, n)`` score matrix.

    ``argmax`` takes each row's best column (the paper; two rows may share a
    column). ``hungarian`` is one-to-one within each story
    (:func:`best_assignment`). Padding rows map to ``-1``.
    """
    B, m, n = scores.shape
    s = scores.detach().float()
    if valid_cols is not None:
        s = s.masked_fill(~valid_cols[:, None, :], float("-inf"))
    if method == "argmax":
        out = s.argmax(-1)
    elif method == "hungarian":
        out = torch.full((B, m), -1, dtype=torch.long)
        s_np = s.cpu().numpy()
        rows_ok = np.ones((B, m), bool) if valid_rows is None else valid_rows.cpu().numpy()
        cols_ok = np.ones((B, n), bool) if valid_cols is None else valid_cols.cpu().numpy()
        for k in range(B):  # one small assignment per story, not per pair
            r_idx, c_idx = np.flatnonzero(rows_ok[k]), np.flatnonzero(cols_ok[k])
            rr, cc = best_assignment(s_np[k][np.ix_(r_idx, c_idx)])
            out[k, torch.as_tensor(r_idx[rr])] = torch.as_tensor(c_idx[cc])
        out = out.to(scores.device)
    else:
        raise ValueError(f"unknown alignment mapping {method!r}; choose one of {MAPPINGS}")
    if valid_rows is not None:
        out = out.masked_fill(~valid_rows, -1)
    return out


#: Stories up to this many items on the shorter side are assigned by :func:`best_assignment`'s own dynamic
#: programme; longer ones by scipy, whose import alone costs a third of ``import torch`` (``iterwego order``).
MAX_SUBSET_ASSIGNMENT = 12


def best_assignment(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(rows, cols)`` of a one-to-one assignment with the largest total score, as scipy's
    ``linear_sum_assignment(scores, maximize=True)`` returns it (rows ascending; ``min(m, n)`` pairs).

    Up to :data:`MAX_SUBSET_ASSIGNMENT` items a dynamic programme over the subsets of the columns (of the rows,
    when they are fewer) finds it, vectorised over the subsets; longer stories go to scipy.
    """
    m, n = scores.shape
    if m > n:
        cols, rows = best_assignment(scores.T)
        order = np.argsort(rows)
        return rows[order], cols[order]
    if n > MAX_SUBSET_ASSIGNMENT:
        from scipy.optimize import linear_sum_assignment

        return linear_sum_assignment(scores, maximize=True)
    s = scores.astype(np.float64)
    masks = np.arange(1 << n)
    best = np.full(1 << n, -np.inf)  # best total of rows 0..i-1 on exactly the columns of the mask
    best[0] = 0.0
    choice = np.full((m, 1 << n), -1)  # the column row i took to reach the mask
    for i in range(m):
        new = np.full(1 << n, -np.inf)
        for j in range(n):  # ascending j and a strict > : of equal totals, the lower column wins
            free = masks[(masks >> j) & 1 == 0]
            total = best[free] + s[i, j]
            better = total > new[free | (1 << j)]
            new[free[better] | (1 << j)] = total[better]
            choice[i, free[better] | (1 << j)] = j
        best = new
    mask, cols = int(np.argmax(best)), np.empty(m, dtype=np.int64)
    for i in range(m - 1, -1, -1):
        cols[i] = choice[i, mask]
        mask &= ~(1 << int(cols[i]))
    return np.arange(m), cols


def pairing_marginals(logits: np.ndarray) -> np.ndarray:
    """``(m, n)`` probability that row i pairs with column j, under the distribution over one-to-one pairings
    ``P(pairing) ∝ exp(sum of its logits)``: the soft counterpart of :func:`best_assignment`, exact.

    Up to :data:`MAX_SUBSET_ASSIGNMENT` items on the shorter side, a forward-backward pass over the subsets of the
    columns (the sum-product form of :func:`best_assignment`'s programme); longer stories get Sinkhorn's scaling,
    which approximates it. Each row of the shorter side sums to 1.
    """
    m, n = logits.shape
    if m > n:
        return pairing_marginals(logits.T).T
    s = logits.astype(np.float64)
    if n > MAX_SUBSET_ASSIGNMENT:
        return _sinkhorn(s)
    masks = np.arange(1 << n)
    bits = ((masks[:, None] >> np.arange(n)) & 1).astype(bool)  # (2^n, n)
    size = bits.sum(1)
    fwd = np.full(1 << n, -np.inf)  # log-sum over pairings of rows 0..|mask|-1 onto exactly the columns of mask
    fwd[0] = 0.0
    for i in range(m):
        layer = masks[size == i]
        for j in range(n):
            free = layer[~bits[layer, j]]
            fwd[free | (1 << j)] = np.logaddexp(fwd[free | (1 << j)], fwd[free] + s[i, j])
    bwd = np.full(1 << n, -np.inf)  # log-sum over pairings of rows |mask|..m-1 onto columns outside mask
    bwd[size == m] = 0.0
    for i in range(m - 1, -1, -1):
        layer = masks[size == i]
        for j in range(n):
            free = layer[~bits[layer, j]]
            bwd[free] = np.logaddexp(bwd[free], s[i, j] + bwd[free | (1 << j)])
    out = np.zeros((m, n))
    for i in range(m):
        layer = masks[size == i]
        for j in range(n):
            free = layer[~bits[layer, j]]
            if len(free):
                out[i, j] = np.exp(np.logaddexp.reduce(fwd[free] + s[i, j] + bwd[free | (1 << j)]) - bwd[0])
    return out


def _sinkhorn(s: np.ndarray, iters: int = 200) -> np.ndarray:
    """Rows summing to 1 and columns to ``m / n``: the doubly stochastic scaling of ``exp(s)`` (m <= n)."""
    m, n = s.shape
    x = s - s.max()
    for _ in range(iters):
        x = x - np.logaddexp.reduce(x, axis=1, keepdims=True)
        x = x - (np.logaddexp.reduce(x, axis=0, keepdims=True) - np.log(m / n))
    return np.exp(x - np.logaddexp.reduce(x, axis=1, keepdims=True))


def alignment_hits(scores: Tensor, batch: Batch) -> tuple[int, int]:
    """(images whose top-1 sentence within the story is their own, images): top-1 alignment accuracy's parts."""
    iv, tv = batch.valid("image"), batch.valid("text")
    am = align(scores, "argmax", iv, tv)
    hit = (batch.pos["text"].gather(1, am.clamp(min=0)) == batch.pos["image"]) & iv
    return int(hit.sum()), int(iv.sum())
