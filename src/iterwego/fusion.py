"""Fused ordering (beyond the paper): one order from both modalities' pair evidence.

Images and sentences are paired one to one by the aligner; one order is decoded
on the image slots from fused pair logits, and the same order is carried to the
sentences. The fused logits come from the fused orderer (``model.FusedOrderer``,
``fusion.method="orderer"``), or are the sum of each aligned pair's log-odds
(``"sum"``: a product of the two pairwise experts).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

__all__ = ["fuse_logits", "gather_items", "gold_pairing", "sentence_order"]


def gather_items(x: Tensor, index: Tensor) -> Tensor:
    """``x[b, index[b, i]]`` for ``x`` (B, n, d) and ``index`` (B, m); zeros where ``index`` is -1."""
    got = torch.gather(x, 1, index.clamp(min=0)[..., None].expand(-1, -1, x.shape[-1]))
    return got * (index >= 0)[..., None].to(got.dtype)


def gold_pairing(pos_image: Tensor, pos_text: Tensor, image_valid: Tensor, text_valid: Tensor) -> Tensor:
    """``(B, n_img)`` the sentence slot telling the same step as each image slot (same gold position), -1 if none.

    The training split's own pairs, as the learned aligner trains on; inference pairs by the aligner instead.
    """
    same = (pos_image[:, :, None] == pos_text[:, None, :]) & image_valid[:, :, None] & text_valid[:, None, :]
    return torch.where(same.any(-1), same.float().argmax(-1), torch.full_like(pos_image, -1))


def fuse_logits(img_logits: Tensor, txt_logits: Tensor, i2t: Tensor) -> Tensor:
    """Image pair logits plus the text pair logits of the aligned sentences (``i2t``: (B, n_img), -1 unpaired).

    Summing in logit space multiplies the two pairwise experts: each aligned
    pair's log-odds is the sum of both modalities' log-odds.
    """
    B = i2t.shape[0]
    ac = i2t.clamp(min=0)
    txt_on_img = txt_logits[torch.arange(B, device=i2t.device)[:, None, None], ac[:, :, None], ac[:, None, :]]
    paired = (i2t >= 0)[:, :, None] & (i2t >= 0)[:, None, :]
    return img_logits + torch.where(paired[..., None], txt_on_img, torch.zeros_like(txt_on_img))


def sentence_order(image_order: Sequence[int], i2t: Sequence[int], n_sentences: int) -> list[int]:
    """The fused image order carried to the sentences; unpaired sentences (unequal counts) go last, in slot order."""
    slots = [int(i2t[k]) for k in image_order if i2t[k] >= 0]
    seen = set(slots)
    return slots + [s for s in range(n_sentences) if s not in seen]
