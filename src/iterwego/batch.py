"""A padded batch of stories: what the model's forward pass reads.

Stories have different lengths, so each modality's items sit in a ``(B, n)``
grid of rows into a flat feature tensor, ``-1`` marking padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Batch", "scatter_items"]


@dataclass
class Batch:
    """A padded batch of stories.

    ``index[m]``: (B, n) rows into ``feats[m]`` for modality ``m`` in
    {"image", "text"}, -1 for padding. ``pos[m]``: the gold position of the
    item shown at each slot. ``feats`` holds the gathered backbone features;
    extra banks (e.g. "align_image") share the row layout of their modality.
    """

    ids: list[int]
    index: dict[str, Tensor]
    pos: dict[str, Tensor]
    feats: dict[str, Tensor]

    def to(self, device) -> "Batch":
        """The batch on ``device``; features stored compact (float16/bfloat16) are widened to float32 there."""
        pin = torch.device(device).type == "cuda"  # pinned host memory lets the copy overlap with compute
        mv = lambda d: {k: (_pinned(v) if pin else v).to(device, non_blocking=True) for k, v in d.items()}  # noqa: E731
        feats = {k: _widen(v) for k, v in mv(self.feats).items()}
        return Batch(self.ids, mv(self.index), mv(self.pos), feats)

    def valid(self, modality: str) -> Tensor:
        return self.index[modality] >= 0

    def rows(self, keep: list[int]) -> "Batch":
        """The sub-batch of stories ``keep`` (row numbers), with features re-gathered (data-parallel shards)."""
        r = torch.as_tensor(keep, dtype=torch.long)
        index, pos, feats = {}, {}, {}
        for m, idx in self.index.items():
            sub = idx[r]
            ok = sub >= 0
            local = torch.full_like(sub, -1)
            local[ok] = torch.arange(int(ok.sum()))
            index[m], pos[m] = local, self.pos[m][r]
            for name, f in self.feats.items():
                if name == m or name == "align_" + m:
                    feats[name] = f[sub[ok]]
        return Batch([self.ids[k] for k in keep], index, pos, feats)


def _pinned(t: Tensor) -> Tensor:
    return t.pin_memory() if t.device.type == "cpu" and not t.is_pinned() else t  # only host memory pins


def _widen(t: Tensor) -> Tensor:
    # the model computes in float32 (autocast narrows where it is on); pixels stay uint8 for the CNN to scale
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def scatter_items(feats: Tensor, index: Tensor) -> Tensor:
    """Place per-item rows ``(N, d)`` into a padded ``(B, n, d)`` batch; ``index`` is ``(B, n)``, -1 for padding."""
    B, n = index.shape
    out = feats.new_zeros(B * n, feats.shape[-1])
    flat = index.reshape(-1)
    out[flat >= 0] = feats[flat[flat >= 0]]
    return out.view(B, n, -1)
