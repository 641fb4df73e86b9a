"""The authors' pair TSV: every unordered item pair of every story, one row each.

Format (as written by the IterWeGO authors' ``data_prepare`` scripts):

* tab-separated, **no header row**, UTF-8, Python ``csv`` default dialect
  otherwise: fields containing a tab, quote or line break are wrapped in
  double quotes (``"`` doubled inside), rows end with ``\\r\\n``;
* one row per pair ``i < j`` of a story (``i`` outer, ``j`` inner loop), rows
  of one story contiguous, stories in input order;
* columns ``docid, item_a, item_b, label, pos_a, pos_b`` where ``docid`` is
  ``{k}-{n}-{npairs}`` (``k`` = 1-based story counter, ``n`` = story length,
  ``npairs`` = ``n(n-1)/2``), ``pos_a``/``pos_b`` the gold positions (0-based)
  of the two items and ``label`` is ``1`` iff ``item_a`` comes first. Each
  pair keeps gold direction (``i, j``, label 1) or is flipped (``j, i``,
  label 0) with probability 1/2;
* items are sentences (``modality="sentence"``) or image ids
  (``modality="image"``: the photo id, i.e. ``Item.key``, else the image file
  name).

Differences on purpose: the authors truncate long sentence pairs to 100 BERT
tokens and draw directions from Python's global ``random``; here sentences are
written whole (truncation belongs to the model's tokenizer) and directions come
from a seeded ``numpy.random.Generator``. The authors name the validation file
``dev.tsv``; here the file is ``{split}.tsv``. A story of length 1 has no pairs,
so it writes no rows (its counter ``k`` is still used up) and cannot be read back.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import DataError
from ..io import atomic_write_bytes
from .readers import Item, Story, read_text

MODALITIES = ("sentence", "image")


def _token(item: Item, modality: str) -> str | None:
    if modality == "sentence":
        return item.sentence
    if item.key is not None:
        return item.key
    return Path(item.image).name if item.image is not None else None


def write_pairs(
    stories: Sequence[Story],
    out_dir: str | os.PathLike,
    *,
    split: str,
    modality: str = "sentence",
    seed: int = 0,
) -> Path:
    """Write ``out_dir/{split}.tsv`` in the authors' pair format (see the module docstring).

    The file is written to a temporary name and renamed, so a crash never
    leaves a half-written TSV. The same stories and seed give the same file.

    Raises:
        DataError: an item lacks the chosen modality (no sentence, or no image id).
        ValueError: unknown ``modality``.
    """
    if modality not in MODALITIES:
        raise ValueError(f"unknown modality {modality!r}; expected one of {', '.join(MODALITIES)}")
    rng = np.random.default_rng(seed)
    out = Path(out_dir)
    buf = io.StringIO(newline="")
    writer = csv.writer(buf, delimiter="\t")
    for k, story in enumerate(stories, 1):
        tokens = [_token(it, modality) for it in story.items]
        for pos, t in enumerate(tokens):
            if t is None:
                what = "sentence" if modality == "sentence" else "image id"
                raise DataError(f"item {pos} has no {what} to write (modality={modality})", story=story.id)
        n = len(tokens)
        i, j = np.triu_indices(n, 1)  # i-major order, as the authors enumerate pairs
        keep = rng.random(i.size) >= 0.5  # True: gold direction, label 1
        pos_a = np.where(keep, i, j)
        pos_b = np.where(keep, j, i)
        docid = f"{k}-{n}-{i.size}"
        writer.writerows(
            [docid, tokens[a], tokens[b], int(lab), a, b]
            for a, b, lab in zip(pos_a.tolist(), pos_b.tolist(), keep.tolist())
        )
    out.mkdir(parents=True, exist_ok=True)
    target = out / f"{split}.tsv"
    atomic_write_bytes(target, buf.getvalue().encode("utf-8"))
    return target


def _parse_int(text: str, what: str, path: Path, line: int, story: str | None) -> int:
    try:
        return int(text)
    except ValueError:
        raise DataError(f"{what} must be an integer, got {text!r}", path=str(path), line=line, story=story) from None


class _Pending:
    """A story being rebuilt from its rows."""

    def __init__(self, key: str, docid: str, n: int, npairs: int, line: int, path: Path):
        self.key, self.docid, self.n, self.npairs, self.line, self.path = key, docid, n, npairs, line, path
        self.tokens: list[str | None] = [None] * n
        self.seen: set[tuple[int, int]] = set()

    def add(self, a_tok: str, b_tok: str, label_s: str, pa_s: str, pb_s: str, ln: int) -> None:
        """One pair row (line ``ln``): check its label and positions, and place its two items."""

        def fail(msg: str) -> DataError:
            return DataError(msg, path=str(self.path), line=ln, story=self.key)

        if label_s not in ("0", "1"):
            raise fail(f"label must be 0 or 1, got {label_s!r}")
        pa = _parse_int(pa_s, "pos_a", self.path, ln, self.key)
        pb = _parse_int(pb_s, "pos_b", self.path, ln, self.key)
        if not (0 <= pa < self.n and 0 <= pb < self.n) or pa == pb:
            raise fail(f"positions ({pa}, {pb}) must be two different values in 0..{self.n - 1}")
        if (label_s == "1") != (pa < pb):
            raise fail(f"label {label_s} disagrees with positions ({pa}, {pb})")
        pair = (min(pa, pb), max(pa, pb))
        if pair in self.seen:
            raise fail(f"pair of positions {pair} appears twice")
        self.seen.add(pair)
        for pos, tok in ((pa, a_tok), (pb, b_tok)):
            if self.tokens[pos] is None:
                self.tokens[pos] = tok
            elif self.tokens[pos] != tok:
                raise fail(f"position {pos} holds two different items")

    def story(self, modality: str) -> Story:
        """The rebuilt story, once every one of its pairs was read."""
        if len(self.seen) != self.npairs:
            raise DataError(
                f"{len(self.seen)} of its {self.npairs} pair rows present", path=str(self.path), line=self.line,
                story=self.key,
            )  # fmt: skip
        make = (lambda t: Item(sentence=t)) if modality == "sentence" else (lambda t: Item(key=t))
        meta = {"docid": self.docid, "line": self.line, "source": str(self.path)}
        return Story(id=self.key, items=[make(t) for t in self.tokens], meta=meta)


def _parse_docid(docid: str, p: Path, ln: int) -> tuple[str, int, int]:
    """``(key, n, npairs)`` of a docid ``K-N-NPAIRS``, checked to agree with each other."""
    parts = docid.split("-")
    if len(parts) != 3:
        raise DataError(f"docid must look like K-N-NPAIRS, got {docid!r}", path=str(p), line=ln)
    key = parts[0]
    n = _parse_int(parts[1], "docid length N", p, ln, key)
    npairs = _parse_int(parts[2], "docid pair count NPAIRS", p, ln, key)
    if n < 2 or npairs != n * (n - 1) // 2:
        raise DataError(
            f"docid {docid!r}: a story of {n} items has {n * (n - 1) // 2} pairs, not {npairs}",
            path=str(p),
            line=ln,
            story=key,
        )
    return key, n, npairs


def read_pairs(path: str | os.PathLike, *, modality: str = "sentence") -> list[Story]:
    """Rebuild stories (items in gold order) from a pair TSV written by :func:`write_pairs` or the authors.

    Each story's items come from the positions in its rows. Story ids are the
    docid counters (``"1"``, ``"2"``, ...); the original ids are not in the
    format. ``Story.meta`` has ``docid``, ``line`` (first row) and ``source``.
    With ``modality="sentence"`` items get ``sentence``; with ``"image"`` they
    get ``key`` (the image id).

    Raises:
        DataError (with line number): non-UTF-8 bytes, a row without 6 fields,
            a bad docid, label or position, a label that disagrees with the
            positions, a position given two different items, a repeated pair,
            non-contiguous rows of one story, or a story missing some of its pairs.
    """
    if modality not in MODALITIES:
        raise ValueError(f"unknown modality {modality!r}; expected one of {', '.join(MODALITIES)}")
    p = Path(path)
    reader = csv.reader(io.StringIO(read_text(p), newline=""), delimiter="\t")
    stories: list[Story] = []
    done: set[str] = set()
    cur: _Pending | None = None
    try:
        for row in reader:
            ln = reader.line_num
            if not row:
                continue
            if len(row) != 6:
                raise DataError(
                    f"expected 6 tab-separated fields (docid, item_a, item_b, label, pos_a, pos_b), got {len(row)}",
                    path=str(p),
                    line=ln,
                )
            docid = row[0]
            key, n, npairs = _parse_docid(docid, p, ln)
            if cur is None or cur.key != key:
                if cur is not None:
                    stories.append(cur.story(modality))
                    done.add(cur.key)
                if key in done:
                    raise DataError("rows of this story are not contiguous", path=str(p), line=ln, story=key)
                cur = _Pending(key, docid, n, npairs, ln, p)
            elif cur.docid != docid:
                raise DataError(
                    f"docid {docid!r} disagrees with {cur.docid!r} on line {cur.line}", path=str(p), line=ln, story=key
                )
            cur.add(*row[1:], ln)
    except csv.Error as err:
        raise DataError(f"malformed TSV ({err})", path=str(p), line=reader.line_num) from None
    if cur is not None:
        stories.append(cur.story(modality))
    if not stories:
        raise DataError("no pair rows", path=str(p))
    return stories
