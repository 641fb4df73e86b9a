"""Backbone features for a set of stories, and padded, shuffled batches over them.

Each distinct item (image file or sentence) is run through its frozen
backbone once; stories then refer to rows of one feature tensor per modality.
A batch is a few stories whose items are shuffled per story with a seeded
generator, independently for images and sentences, so neither the input
order nor a shared index leaks the answer or the alignment.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..batch import Batch
from ..encoders import Encoder
from ..errors import DataError
from .readers import Story


class FeatureBank:
    """Backbone features of distinct items, computed once; ``rows(items)`` maps items to rows."""

    def __init__(self, encoder: Encoder, cache=None):
        self.encoder = encoder
        self.cache = cache  # optional on-disk cache (iterwego.data.cache.FeatureCache)
        self._row: dict[str, int] = {}
        self._items: list[str] = []
        self._feats: Tensor | None = None

    def rows(self, items: list[str]) -> np.ndarray:
        out = np.empty(len(items), np.int64)
        for k, it in enumerate(items):
            r = self._row.get(it)
            if r is None:
                r = self._row[it] = len(self._items)
                self._items.append(it)
            out[k] = r
        return out

    def build(self, progress: bool = False) -> Tensor:
        """Compute features for items not yet encoded; returns all features."""
        have = 0 if self._feats is None else len(self._feats)
        todo = self._items[have:]
        if todo:
            if self.cache is not None:
                new = self.cache.get_or_compute(self.encoder, todo, progress=progress)
            else:
                new = self.encoder.featurize(todo, progress=progress)
            if self._feats is None:
                self._feats = new
            else:
                old = self._feats
                if old.dim() == 3 and old.shape[1] != new.shape[1]:
                    L = max(old.shape[1], new.shape[1])
                    old, new = (torch.nn.functional.pad(x, (0, 0, 0, L - x.shape[1])) for x in (old, new))
                self._feats = torch.cat([old, new])
        assert self._feats is not None or not self._items
        return self._feats if self._feats is not None else torch.empty(0)

    @property
    def feats(self) -> Tensor:
        return self.build()

    def mirror(self, encoder: Encoder) -> "FeatureBank":
        """A bank over the same items with the same rows, for another backbone (e.g. the CLIP aligner)."""
        other = FeatureBank(encoder, self.cache)
        other._row, other._items = dict(self._row), list(self._items)
        return other


@dataclass
class StorySet:
    """Stories of one split plus their feature rows per modality (``None`` where the modality is absent)."""

    stories: list[Story]
    image_rows: list[np.ndarray] | None
    text_rows: list[np.ndarray] | None

    def __len__(self) -> int:
        return len(self.stories)


def index_stories(
    stories: list[Story],
    image_bank: FeatureBank | None,
    text_bank: FeatureBank | None,
    *,
    cross_modal: bool,
    where: str = "",
) -> StorySet:
    """Register every story's items with the banks. Cross-modal use requires equal counts per story."""
    img_rows, txt_rows = [], []
    for s in stories:
        if image_bank is not None:
            if not s.has_images:
                raise DataError(
                    "story has items without an image, but the model orders images", path=where or None, story=s.id
                )
            img_rows.append(image_bank.rows([it.image for it in s.items]))
        if text_bank is not None:
            if not s.has_sentences:
                raise DataError(
                    "story has items without a sentence, but the model orders sentences", path=where or None, story=s.id
                )
            sentences = [it.sentence if it.sentence.strip() else "[empty]" for it in s.items]
            txt_rows.append(text_bank.rows(text_bank.encoder.story_items(sentences)))  # may carry story padding
    if cross_modal and image_bank is not None and text_bank is not None:
        for s, a, b in zip(stories, img_rows, txt_rows):
            if len(a) != len(b):
                raise DataError(
                    f"{len(a)} images but {len(b)} sentences: cross-modal training needs equal counts",
                    path=where or None,
                    story=s.id,
                )
    return StorySet(stories, img_rows if image_bank is not None else None, txt_rows if text_bank is not None else None)


def build_features(
    encoders: dict,
    stories: dict[str, list[Story]],
    *,
    cross_modal: bool = True,
    where: str = "",
    progress: bool = False,
    cache=None,
) -> tuple[dict[str, StorySet], dict[str, Tensor]]:
    """Index every split's stories and compute each backbone's features once.

    ``encoders`` maps a bank name ("image", "text", optionally "align_image" /
    "align_text") to an Encoder; align banks mirror their modality's rows.
    """
    banks = {m: FeatureBank(encoders[m], cache) for m in ("image", "text") if encoders.get(m) is not None}
    sets = {
        sp: index_stories(
            st, banks.get("image"), banks.get("text"), cross_modal=cross_modal, where=f"{where}/{sp}" if where else ""
        )
        for sp, st in stories.items()
    }
    for m in ("image", "text"):
        if encoders.get("align_" + m) is not None:
            banks["align_" + m] = banks[m].mirror(encoders["align_" + m])
    return sets, {name: b.build(progress=progress) for name, b in banks.items()}


def make_batch(
    ss: StorySet, ids: list[int], rng: np.random.Generator, feats: dict[str, Tensor], shuffle: bool = True
) -> Batch:
    """Collate stories ``ids``; items are shuffled per story and per modality with ``rng``.

    ``feats`` maps a bank name to its feature tensor; names starting with
    "align_" reuse the rows of the modality they end with.
    """
    index, pos, out = {}, {}, {}
    for mod, rows_all in (("image", ss.image_rows), ("text", ss.text_rows)):
        if rows_all is None or mod not in feats:
            continue
        rows = [rows_all[i] for i in ids]
        n = max(len(r) for r in rows)
        glob = np.full((len(rows), n), -1, np.int64)
        p = np.full((len(rows), n), -1, np.int64)
        for b, r in enumerate(rows):
            perm = rng.permutation(len(r)) if shuffle else np.arange(len(r))
            glob[b, : len(r)] = r[perm]
            p[b, : len(r)] = perm
        valid = glob >= 0
        local = np.full(glob.shape, -1, np.int64)
        local[valid] = np.arange(valid.sum())
        take = torch.from_numpy(glob[valid])
        index[mod], pos[mod] = torch.from_numpy(local), torch.from_numpy(p)
        for name, f in feats.items():
            if name == mod or name == "align_" + mod:
                out[name] = f[take]
    return Batch(list(ids), index, pos, out)


def batches(
    ss: StorySet,
    batch_size: int,
    rng: np.random.Generator,
    feats: dict[str, Tensor],
    *,
    shuffle_stories: bool,
    shuffle_items: bool = True,
):
    """Yield batches over the whole set in a seeded story order."""
    order = rng.permutation(len(ss)) if shuffle_stories else np.arange(len(ss))
    for s in range(0, len(order), batch_size):
        yield make_batch(ss, [int(i) for i in order[s : s + batch_size]], rng, feats, shuffle_items)
