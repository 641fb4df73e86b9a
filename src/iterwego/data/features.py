"""Backbone features for a set of stories, and padded, shuffled batches over them.

Each distinct item (image file or sentence) is run through its frozen
backbone once; stories then refer to rows of one feature bank per modality,
kept on disk in the feature store (or in memory for small sets).
A batch is a few stories whose items are shuffled per story with a seeded
generator, independently for images and sentences, so neither the input
order nor a shared index leaks the answer or the alignment. It is first
planned (:class:`BatchPlan`: stories, slots, rows to read), then its rows are
gathered from the store, ahead of use, by a background loader (:func:`prefetch`).
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
from .store import StoredFeatures, compact


class FeatureBank:
    """Backbone features of distinct items, computed once; ``rows(items)`` maps items to rows.

    With a cache, :meth:`build` returns a :class:`~iterwego.data.store.StoredFeatures` view over the
    on-disk store (rows read per batch, memory flat in the dataset's size); without one, an in-memory
    tensor (small sets: ``iterwego order``, the web app). Either way floats are rounded to ``dtype``,
    so a model sees the same numbers whether its features were stored or not.
    """

    def __init__(self, encoder: Encoder, cache=None, dtype: str = "float32"):
        self.encoder = encoder
        self.cache = cache  # optional on-disk cache (iterwego.data.cache.FeatureCache)
        self.dtype = dtype
        self._row: dict[str, int] = {}
        self._items: list[str] = []
        self._feats: Tensor | StoredFeatures | None = None

    def rows(self, items: list[str]) -> np.ndarray:
        out = np.empty(len(items), np.int64)
        for k, it in enumerate(items):
            r = self._row.get(it)
            if r is None:
                r = self._row[it] = len(self._items)
                self._items.append(it)
            out[k] = r
        return out

    def build(self, progress: bool = False, share: tuple[int, int] = (0, 1), sync=None) -> Tensor | StoredFeatures:
        """Compute features for items not yet encoded; returns all features.

        ``share``/``sync``: data-parallel processes split the encoding (see
        :meth:`iterwego.data.cache.FeatureCache.ensure`).
        """
        have = 0 if self._feats is None else len(self._feats)
        todo = self._items[have:]
        if todo:
            if self.cache is not None:
                new = self.cache.ensure(self.encoder, todo, dtype=self.dtype, progress=progress, share=share, sync=sync)
            else:
                new = compact(self.encoder.featurize(todo, progress=progress), self.dtype)
            self._feats = new if self._feats is None else _concat(self._feats, new)
        assert self._feats is not None or not self._items
        return self._feats if self._feats is not None else torch.empty(0)

    @property
    def feats(self) -> Tensor | StoredFeatures:
        return self.build()

    def mirror(self, encoder: Encoder) -> "FeatureBank":
        """A bank over the same items with the same rows, for another backbone (e.g. the CLIP aligner)."""
        other = FeatureBank(encoder, self.cache, self.dtype)
        other._row, other._items = dict(self._row), list(self._items)
        return other


def _concat(old, new):
    """The features of two successive builds of one bank, as one."""
    if isinstance(old, StoredFeatures) or isinstance(new, StoredFeatures):
        return StoredFeatures.concat([_as_view(old), _as_view(new)])
    if old.dim() == 3 and old.shape[1] != new.shape[1]:
        L = max(old.shape[1], new.shape[1])
        old, new = (torch.nn.functional.pad(x, (0, 0, 0, L - x.shape[1])) for x in (old, new))
    return torch.cat([old, new])


def _as_view(x) -> StoredFeatures:
    return x if isinstance(x, StoredFeatures) else StoredFeatures([x], np.zeros(len(x)), np.arange(len(x)))


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
    dtype: str = "float32",
    share: tuple[int, int] = (0, 1),
    sync=None,
) -> tuple[dict[str, StorySet], dict[str, Tensor | StoredFeatures]]:
    """Index every split's stories and compute each backbone's features once.

    ``encoders`` maps a bank name ("image", "text", optionally "align_image" /
    "align_text") to an Encoder; align banks mirror their modality's rows.
    With a ``cache`` the features stay on disk (``StoredFeatures`` views, stored
    in ``dtype``); ``share``/``sync`` split the encoding across data-parallel
    processes.
    """
    banks = {m: FeatureBank(encoders[m], cache, dtype) for m in ("image", "text") if encoders.get(m) is not None}
    sets = {
        sp: index_stories(
            st, banks.get("image"), banks.get("text"), cross_modal=cross_modal, where=f"{where}/{sp}" if where else ""
        )
        for sp, st in stories.items()
    }
    for m in ("image", "text"):
        if encoders.get("align_" + m) is not None:
            banks["align_" + m] = banks[m].mirror(encoders["align_" + m])
    return sets, {name: b.build(progress=progress, share=share, sync=sync) for name, b in banks.items()}


@dataclass
class BatchPlan:
    """A batch before any feature is read: its stories, their items' shuffled slots, the rows to read.

    ``take[m]`` lists the feature rows of modality ``m``'s items in the flat
    order ``index[m]`` points into; :func:`gather` reads them into a :class:`Batch`.
    """

    ids: list[int]
    index: dict[str, Tensor]
    pos: dict[str, Tensor]
    take: dict[str, np.ndarray]

    def valid(self, modality: str) -> Tensor:
        return self.index[modality] >= 0

    def select(self, keep: list[int]) -> "BatchPlan":
        """The plan of stories ``keep`` (row numbers): what one data-parallel process reads."""
        r = torch.as_tensor(keep, dtype=torch.long)
        index, pos, take = {}, {}, {}
        for m, idx in self.index.items():
            sub = idx[r]
            ok = sub >= 0
            local = torch.full_like(sub, -1)
            local[ok] = torch.arange(int(ok.sum()))
            index[m], pos[m], take[m] = local, self.pos[m][r], self.take[m][sub[ok].numpy()]
        return BatchPlan([self.ids[k] for k in keep], index, pos, take)


def plan_batch(ss: StorySet, ids: list[int], rng: np.random.Generator, modalities, shuffle: bool = True) -> BatchPlan:
    """Stories ``ids`` with their items shuffled per story and per modality (in ``modalities``) with ``rng``."""
    index, pos, take = {}, {}, {}
    for mod, rows_all in (("image", ss.image_rows), ("text", ss.text_rows)):
        if rows_all is None or mod not in modalities:
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
        index[mod], pos[mod], take[mod] = torch.from_numpy(local), torch.from_numpy(p), glob[valid]
    return BatchPlan(list(ids), index, pos, take)


def gather(plan: BatchPlan, feats: dict, pin: bool = False) -> Batch:
    """Read a plan's rows from ``feats`` (bank name -> tensor or stored features) into a :class:`Batch`.

    Names starting with "align_" reuse the rows of the modality they end with.
    Stored features come back in their storage dtype; :meth:`Batch.to` widens
    them on the device the model runs on. ``pin``: page-locked, for a CUDA copy.
    """
    out = {}
    for mod, take in plan.take.items():
        for name, f in feats.items():
            if name == mod or name == "align_" + mod:
                out[name] = f[take] if isinstance(f, StoredFeatures) else f[torch.from_numpy(take)]
                if pin:
                    out[name] = out[name].pin_memory()
    return Batch(list(plan.ids), plan.index, plan.pos, out)


def make_batch(ss: StorySet, ids: list[int], rng: np.random.Generator, feats: dict, shuffle: bool = True) -> Batch:
    """Collate stories ``ids``; items are shuffled per story and per modality with ``rng``.

    ``feats`` maps a bank name to its features (a tensor or stored features);
    names starting with "align_" reuse the rows of the modality they end with.
    """
    return gather(plan_batch(ss, ids, rng, _modalities(feats), shuffle), feats)


def _modalities(feats: dict) -> tuple[str, ...]:
    return tuple(m for m in ("image", "text") if m in feats)


def plan_batches(
    ss: StorySet,
    batch_size: int,
    rng: np.random.Generator,
    modalities,
    *,
    shuffle_stories: bool,
    shuffle_items: bool = True,
) -> list[BatchPlan]:
    """The plans of one pass over the set, in a seeded story order (drawn all at once, so no read can reorder them)."""
    order = rng.permutation(len(ss)) if shuffle_stories else np.arange(len(ss))
    return [
        plan_batch(ss, [int(i) for i in order[s : s + batch_size]], rng, modalities, shuffle_items)
        for s in range(0, len(order), batch_size)
    ]


def batches(
    ss: StorySet,
    batch_size: int,
    rng: np.random.Generator,
    feats: dict,
    *,
    shuffle_stories: bool,
    shuffle_items: bool = True,
    prefetch_depth: int = 2,
):
    """Yield batches over the whole set in a seeded story order; reading overlaps the caller's compute."""
    plans = plan_batches(
        ss, batch_size, rng, _modalities(feats), shuffle_stories=shuffle_stories, shuffle_items=shuffle_items
    )
    yield from prefetch(lambda p: gather(p, feats), plans, prefetch_depth)


def prefetch(fn, items, depth: int = 2):
    """Yield ``fn(item)`` for each item in order, computed up to ``depth`` items ahead on a background thread.

    The loader of a training loop: while the model computes on one batch, the next ones are read from
    the store (file reads and copies release the GIL). One thread keeps the reads in order; a worker
    process per batch would add pickling and start-up for no gain on reads this cheap.
    """
    if depth <= 0:
        yield from map(fn, items)
        return
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor
    from itertools import islice

    it = iter(items)
    with ThreadPoolExecutor(1, thread_name_prefix="iterwego-load") as ex:
        pending = deque(ex.submit(fn, x) for x in islice(it, depth))
        try:
            while pending:
                done = pending.popleft()
                pending.extend(ex.submit(fn, x) for x in islice(it, 1))
                yield done.result()
        finally:
            for f in pending:
                f.cancel()
