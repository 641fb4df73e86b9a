"""Fused ordering (beyond the paper): one order from both modalities' pair evidence.

Images and sentences are paired one to one by the aligner; one order is decoded
on the image slots from fused pair logits. The fused logits come from the fused orderer
(``model.FusedOrderer``, ``fusion.method="orderer"``), or are the sum of each aligned pair's log-odds
(``"sum"``: a product of the two pairwise experts).

The sentences get that order in one of two ways (``fusion.sentences``): ``carried`` through the one-to-one
pairing (every pairing error is then an ordering error), or ``decoded`` in their own items: the sentence
orderer's own evidence plus a position term saying that the sentence at step k is the one paired with the
fused order's image at step k, weighted by the pairing's probability (:func:`soft_pairing`,
:func:`pairing_positions`). A confident pairing pins the sentence where the carried order puts it; a doubtful
one leaves the place to the sentence's own cues.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["fuse_logits", "gather_items", "gold_pairing", "pairing_positions", "sentence_order", "soft_pairing"]


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


def soft_pairing(logits: Tensor, image_valid: Tensor, text_valid: Tensor) -> Tensor:
    """``(B, n_img, n_txt)`` float64: the probability that image i and sentence a are paired, under the
    distribution over one-to-one pairings whose log-weight is the sum of their logits (the aligner's scores on
    its trained temperature): :func:`iterwego.aligner.pairing_marginals` per story, 0 on padding.

    Where the aligner is sure this is the Hungarian pairing; two sentences that fit an image equally share it.
    """
    from .aligner import pairing_marginals

    x = logits.detach().double().cpu().numpy()
    iv, tv = image_valid.cpu().numpy(), text_valid.cpu().numpy()
    out = np.zeros(x.shape)
    for b in range(x.shape[0]):  # one small table per story
        r, c = np.flatnonzero(iv[b]), np.flatnonzero(tv[b])
        if len(r) and len(c):
            out[b, r[:, None], c[None, :]] = pairing_marginals(x[b][np.ix_(r, c)])
    return torch.from_numpy(out).to(logits.device)


def pairing_positions(image_order: Sequence[int], soft: np.ndarray, floor: float = 1e-6) -> np.ndarray:
    """``(n_txt, n_img)`` log-probabilities that sentence a stands at step k because it pairs with the image
    the fused order puts at step k: ``log soft[image_order[k], a]`` (floored, so no step is ruled out)."""
    return np.log(np.maximum(soft[np.asarray(image_order, dtype=np.int64)].T, floor))
