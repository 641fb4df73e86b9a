"""Weak cross-modal guidance (WeGO): the one function that training and inference share.

Pair logits have shape ``(B, n, n, 2)``; class 1 of cell ``(i, j)`` means
"i before j" (the authors' convention). A *source* modality's confident pairs
are carried onto the *target* modality's pairs through an item alignment
``a`` (source item -> target item): target[a(i), a(j)] += lambda * source[i, j].
No gold order is involved anywhere.

The authors add pairs one at a time; repeated target pairs therefore
accumulate, and so they do here (``index_add``), in one vectorised call.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

RULES = ("any", "class0", "class1")


def select_pairs(source: Tensor, threshold: float, rule: str = "any", valid: Tensor | None = None) -> Tensor:
    """Boolean ``(B, n, n)``: off-diagonal source pairs whose softmax probability exceeds ``threshold``.

    ``any`` checks both classes, ``class0`` only "j before i" (the authors'
    training rule), ``class1`` only "i before j". ``valid`` (B, n) masks padding.
    """
    p = source.detach().float().softmax(-1)
    if rule == "any":
        sel = (p > threshold).any(-1)
    elif rule == "class0":
        sel = p[..., 0] > threshold
    elif rule == "class1":
        sel = p[..., 1] > threshold
    else:
        raise ValueError(f"unknown selection rule {rule!r}; choose one of {RULES}")
    n = source.shape[-2]
    sel = sel & ~torch.eye(n, dtype=torch.bool, device=source.device)
    if valid is not None:
        sel = sel & valid[:, :, None] & valid[:, None, :]
    return sel


def guide(
    target: Tensor,
    source: Tensor,
    alignment: Tensor,
    *,
    threshold: float,
    weight: float,
    rule: str = "any",
    valid: Tensor | None = None,
) -> Tensor:
    """Return ``target`` plus ``weight`` times the confident ``source`` pairs mapped through ``alignment``.

    Args:
        target: ``(B, n, n, 2)`` pair logits of the modality being guided.
        source: ``(B, m, m, 2)`` pair logits of the guiding modality.
        alignment: ``(B, m)`` long, target item index for each source item; ``-1`` drops the item.
        threshold: theta; ``>= 1`` selects nothing.
        weight: lambda; ``0`` changes nothing.
        rule: ``any`` | ``class0`` | ``class1`` (see :func:`select_pairs`).
        valid: ``(B, m)`` bool mask of real (non-padding) source items.

    Gradients flow into both ``target`` and ``source`` (the selection itself is not differentiable).
    """
    if weight == 0 or threshold >= 1:
        return target
    B, n = target.shape[0], target.shape[1]
    ok = alignment >= 0
    valid = ok if valid is None else (valid & ok)
    sel = select_pairs(source, threshold, rule, valid)  # (B, m, m)
    b, i, j = sel.nonzero(as_tuple=True)
    if b.numel() == 0:
        return target
    a = alignment.long()
    flat_index = (b * n + a[b, i]) * n + a[b, j]
    values = weight * source[b, i, j].to(target.dtype)
    out = target.reshape(B * n * n, 2).index_add(0, flat_index, values)
    return out.reshape(target.shape)


def iterate(
    image_logits: Tensor,
    text_logits: Tensor,
    t2i: Tensor,
    i2t: Tensor,
    rounds: int,
    *,
    threshold_t2i: float,
    threshold_i2t: float,
    weight_t2i: float,
    weight_i2t: float,
    rule: str = "any",
    image_valid: Tensor | None = None,
    text_valid: Tensor | None = None,
) -> list[tuple[Tensor, Tensor]]:
    """Iterative inference: the (image, text) logits after each of ``0..rounds`` rounds.

    Round r applies r alternating steps; each step guides the image logits by
    the text logits, then the text logits by the *updated* image logits.
    ``t2i[b, s]`` is the image aligned to sentence s, ``i2t[b, k]`` the sentence aligned to image k.
    """
    out = [(image_logits, text_logits)]
    img, txt = image_logits, text_logits
    for _ in range(rounds):
        img = guide(img, txt, t2i, threshold=threshold_t2i, weight=weight_t2i, rule=rule, valid=text_valid)
        txt = guide(txt, img, i2t, threshold=threshold_i2t, weight=weight_i2t, rule=rule, valid=image_valid)
        out.append((img, txt))
    return out


def align(scores: Tensor, method: str = "argmax", valid_rows: Tensor | None = None, valid_cols: Tensor | None = None) -> Tensor:
    """Map each row item to a column item from a ``(B, m, n)`` score matrix.

    ``argmax`` takes each row's best column (the paper; two rows may share a
    column). ``hungarian`` is one-to-one within each story
    (``scipy.optimize.linear_sum_assignment``). Padding rows map to ``-1``.
    """
    B, m, n = scores.shape
    s = scores.detach().float()
    if valid_cols is not None:
        s = s.masked_fill(~valid_cols[:, None, :], float("-inf"))
    if method == "argmax":
        out = s.argmax(-1)
    elif method == "hungarian":
        from scipy.optimize import linear_sum_assignment

        out = torch.full((B, m), -1, dtype=torch.long)
        s_np = s.cpu().numpy()
        rows_ok = np.ones((B, m), bool) if valid_rows is None else valid_rows.cpu().numpy()
        cols_ok = np.ones((B, n), bool) if valid_cols is None else valid_cols.cpu().numpy()
        for k in range(B):  # one small assignment per story, not per pair
            r_idx, c_idx = np.flatnonzero(rows_ok[k]), np.flatnonzero(cols_ok[k])
            sub = s_np[k][np.ix_(r_idx, c_idx)]
            rr, cc = linear_sum_assignment(sub, maximize=True)
            out[k, torch.as_tensor(r_idx[rr])] = torch.as_tensor(c_idx[cc])
        out = out.to(scores.device)
    else:
        raise ValueError(f"unknown alignment mapping {method!r}; choose 'argmax' or 'hungarian'")
    if valid_rows is not None:
        out = out.masked_fill(~valid_rows, -1)
    return out
