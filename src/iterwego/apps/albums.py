"""Many albums in one process: ``iterwego order --albums PATH``.

``PATH`` is either a JSONL file of albums, one ``{"id", "images", "sentences"}`` object a line as for
``--jsonl`` (the listed order is not read as gold), or a folder of album folders: each sub-folder is one album,
its photos the image files in it and its sentences the lines of ``captions.txt`` beside them (blank lines
skipped; either may be absent, not both). The run loads once; each album is then ordered on its own
(:func:`iterwego.apps.order.order_stories`) and timed.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from ..data.readers import Story, read_jsonl
from ..errors import DataError
from ..images import IMAGE_SUFFIXES
from .order import check_orderable, order_stories, stories_from_args

#: The file, inside an album folder, whose lines are the album's sentences.
CAPTIONS = "captions.txt"


def read_albums(path: str | Path) -> list[Story]:
    """The albums in a JSONL file or a folder of album folders (see the module docstring), sorted by folder name.

    Raises:
        DataError: (one line) no such file or folder, a folder without album folders, an album folder with
            neither photos nor captions, captions that are not UTF-8, or any JSONL error of ``read_jsonl``.
    """
    p = Path(path)
    if p.is_file():
        return read_jsonl(p)
    if not p.is_dir():
        raise DataError("no such album file or folder (give a JSONL file or a folder of album folders)", path=str(p))
    folders = sorted(d for d in p.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not folders:
        raise DataError(
            f"no album folders in it: put each album in its own folder, its sentences one a line in {CAPTIONS}",
            path=str(p),
        )
    return [_album(d) for d in folders]


def _album(d: Path) -> Story:
    images = sorted(
        str(f) for f in d.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith(".")
    )
    sentences = _captions(d / CAPTIONS)
    if not images and not sentences:
        raise DataError(f"an album folder with no photos ({', '.join(IMAGE_SUFFIXES)}) and no {CAPTIONS}", path=str(d))
    return Story(d.name, stories_from_args(images, sentences)[0].items, meta={"source": str(d)})


def _captions(path: Path) -> list[str]:
    if not path.is_file():
        return []
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(f"not valid UTF-8 (byte at offset {err.start}); save it as UTF-8", path=str(path)) from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def order_albums(model, albums: list[Story], **kw) -> tuple[list[dict], list[float]]:
    """``(results, seconds)``: each album ordered alone by ``order_stories(model, [album], **kw)``, and its time.

    Every album is checked before the first is ordered, so a bad one fails the command before any work.
    """
    check_orderable(albums)
    results, seconds = [], []
    for a in albums:
        t0 = time.perf_counter()
        results += order_stories(model, [a], **kw)
        seconds.append(time.perf_counter() - t0)
    return results, seconds


def timing_line(seconds: list[float], load_s: float) -> str:
    """One line for people: albums, total time, the run's load time and the median time per album."""
    return (
        f"ordered {len(seconds)} album(s) in {sum(seconds):.2f}s after loading the run in {load_s:.2f}s "
        f"(median {statistics.median(seconds):.3f}s per album, slowest {max(seconds):.3f}s)"
    )
