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
from .readers import Item, Story

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

    def __init__(self, key: str, docid: str, n: int, npairs: int, line: int):
        self.key, self.docid, self.n, self.npairs, self.line = key, docid, n, npairs, line
        self.tokens: list[str | None] = [None] * n
        self.seen: set[tuple[int, int]] = set()


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
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise DataError("file not found", path=str(p)) from None
    except OSError as err:
        raise DataError(f"cannot read file ({err.strerror or err})", path=str(p)) from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise DataError(
            f"not valid UTF-8 (byte 0x{raw[err.start]:02x} at offset {err.start})", path=str(p), line=line
        ) from None

    stories: list[Story] = []
    done: set[str] = set()
    cur: _Pending | None = None

    def finish(st: _Pending) -> None:
        if len(st.seen) != st.npairs:
            raise DataError(
                f"{len(st.seen)} of its {st.npairs} pair rows present", path=str(p), line=st.line, story=st.key
            )
        make = (lambda t: Item(sentence=t)) if modality == "sentence" else (lambda t: Item(key=t))
        stories.append(
            Story(
                id=st.key,
                items=[make(t) for t in st.tokens],
                meta={"docid": st.docid, "line": st.line, "source": str(p)},
            )
        )
        done.add(st.key)

    reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t")
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
            docid, a_tok, b_tok, label_s, pa_s, pb_s = row
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
            if cur is None or cur.key != key:
                if cur is not None:
                    finish(cur)
                if key in done:
                    raise DataError("rows of this story are not contiguous", path=str(p), line=ln, story=key)
                cur = _Pending(key, docid, n, npairs, ln)
            elif cur.docid != docid:
                raise DataError(
                    f"docid {docid!r} disagrees with {cur.docid!r} on line {cur.line}", path=str(p), line=ln, story=key
                )
            if label_s not in ("0", "1"):
                raise DataError(f"label must be 0 or 1, got {label_s!r}", path=str(p), line=ln, story=key)
            pa = _parse_int(pa_s, "pos_a", p, ln, key)
            pb = _parse_int(pb_s, "pos_b", p, ln, key)
            if not (0 <= pa < n and 0 <= pb < n) or pa == pb:
                raise DataError(
                    f"positions ({pa}, {pb}) must be two different values in 0..{n - 1}",
                    path=str(p),
                    line=ln,
                    story=key,
                )
            if (label_s == "1") != (pa < pb):
                raise DataError(
                    f"label {label_s} disagrees with positions ({pa}, {pb})", path=str(p), line=ln, story=key
                )
            pair = (min(pa, pb), max(pa, pb))
            if pair in cur.seen:
                raise DataError(f"pair of positions {pair} appears twice", path=str(p), line=ln, story=key)
            cur.seen.add(pair)
            for pos, tok in ((pa, a_tok), (pb, b_tok)):
                if cur.tokens[pos] is None:
                    cur.tokens[pos] = tok
                elif cur.tokens[pos] != tok:
                    raise DataError(f"position {pos} holds two different items", path=str(p), line=ln, story=key)
    except csv.Error as err:
        raise DataError(f"malformed TSV ({err})", path=str(p), line=reader.line_num) from None
    if cur is not None:
        finish(cur)
    if not stories:
        raise DataError("no pair rows", path=str(p))
    return stories
