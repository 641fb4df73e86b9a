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

import torch
from torch import Tensor

from .config import GUIDANCE_RULES, GuidanceConfig

__all__ = ["RULES", "guide", "iterate", "select_pairs"]

RULES = GUIDANCE_RULES  # declared with the settings that take them (guidance.*_rule)


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
    g: GuidanceConfig,
    *,
    rule: str | None = None,
    image_valid: Tensor | None = None,
    text_valid: Tensor | None = None,
) -> list[tuple[Tensor, Tensor]]:
    """Iterative inference: the (image, text) logits after each of ``0..rounds`` rounds.

    Round r applies r alternating steps; each step guides the image logits by
    the text logits, then the text logits by the *updated* image logits.
    ``t2i[b, s]`` is the image aligned to sentence s, ``i2t[b, k]`` the sentence aligned to image k.
    Thresholds (``g.inference_thresholds()``) and weights come from ``g``; ``rule`` defaults to ``g.eval_rule``.
    """
    rule = g.eval_rule if rule is None else rule
    thr_t2i, thr_i2t = g.inference_thresholds()
    out = [(image_logits, text_logits)]
    img, txt = image_logits, text_logits
    for _ in range(rounds):
        img = guide(img, txt, t2i, threshold=thr_t2i, weight=g.weight_t2i, rule=rule, valid=text_valid)
        txt = guide(txt, img, i2t, threshold=thr_i2t, weight=g.weight_i2t, rule=rule, valid=image_valid)
        out.append((img, txt))
    return out
