"""Capture times from EXIF: hard order evidence between photos of one camera.

A photo's EXIF ``DateTimeOriginal`` (with ``SubSecTimeOriginal`` and
``OffsetTimeOriginal`` where present) says when it was taken. Two photos whose
times are both known, differ, and can be compared are ordered by them before
decoding; everything else (photos without a time, sentences) is placed by the
model. Times are *not* compared, and so are no evidence, when

* they are equal (a burst, or a copy that reset both);
* the two photos come from different cameras (EXIF ``Model`` differs), because
  one camera's clock may be off by hours.

Within one camera the photos are compared in UTC when every timed photo of it
carries ``OffsetTimeOriginal`` (a phone that crossed time zones), else on the
camera's wall clock; one rule per camera keeps the evidence free of cycles.

``DateTime`` (0x0132, rewritten by editors and copy tools) is never read.
The evidence is a boolean precedence matrix ``before[i, j]`` ("i was taken
before j"); it is transitive and acyclic by construction. :func:`pin_logits`
turns a story's pair logits into probability 1/0 on those pairs, and the
decoders (:func:`iterwego.decode.decode` with ``before=``) never return an
order that contradicts it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Sequence

import numpy as np

__all__ = [
    "MODES",
    "CaptureTime",
    "read_capture_time",
    "read_capture_times",
    "precedence",
    "placed_by_time",
    "times_in_effect",
    "pin_logits",
]

#: ``--capture-time`` values: ``auto`` uses times when at least two photos carry one.
MODES = ("auto", "on", "off")

_EXIF_IFD = 0x8769
_MODEL = 0x0110
_DATETIME_ORIGINAL = 0x9003
_OFFSET_TIME_ORIGINAL = 0x9011
_SUBSEC_TIME_ORIGINAL = 0x9291
_EPOCH = datetime(1970, 1, 1)
_OFFSET_RE = re.compile(r"^([+-])(\d{2}):?(\d{2})$")
#: Logit of a time-fixed pair's certain class (minus it for the other): softmax gives exactly 1 and 0 in float32.
PIN_LOGIT = 100.0


@dataclass(frozen=True)
class CaptureTime:
    """When one photo was taken, as its camera recorded it."""

    local: datetime  # the camera's wall-clock time, sub-seconds included (naive)
    offset: timedelta | None  # UTC offset from OffsetTimeOriginal; None when the photo has none
    camera: str  # EXIF Model, stripped; "" when the photo names none

    @property
    def utc(self) -> datetime | None:
        """The moment in UTC (naive), or None without an offset."""
        return self.local - self.offset if self.offset is not None else None

    def iso(self) -> str:
        """ISO 8601, with the offset when known (``2024-05-01T09:00:00.250+02:00``)."""
        s = self.local.isoformat()
        if self.offset is not None:
            mins = int(self.offset.total_seconds()) // 60
            s += f"{'+' if mins >= 0 else '-'}{abs(mins) // 60:02d}:{abs(mins) % 60:02d}"
        return s


def _text(v) -> str:
    if isinstance(v, bytes):
        v = v.decode("ascii", "replace")
    return str(v).replace("\x00", "").strip() if v is not None else ""


def _parse(value, subsec, offset) -> tuple[datetime, timedelta | None] | None:
    """``"YYYY:MM:DD HH:MM:SS"`` plus the optional sub-second digits and ``"+HH:MM"`` offset, or None."""
    try:
        local = datetime.strptime(_text(value), "%Y:%m:%d %H:%M:%S")
    except ValueError:  # "0000:00:00 00:00:00" (clock never set), blanks, other formats
        return None
    digits = _text(subsec)
    if digits.isdigit():
        local += timedelta(microseconds=round(float("0." + digits) * 1e6))
    m = _OFFSET_RE.match(_text(offset))
    off = None
    if m and int(m.group(2)) <= 14 and int(m.group(3)) < 60:
        off = timedelta(hours=int(m.group(2)), minutes=int(m.group(3))) * (-1 if m.group(1) == "-" else 1)
    return local, off


def read_capture_time(path: str | os.PathLike) -> CaptureTime | None:
    """The capture time in ``path``'s EXIF, or None (no EXIF, no ``DateTimeOriginal``, or unreadable).

    Only the header is read. A file Pillow cannot open gives None here: the
    image loaders report unusable files, this function only looks for evidence.
    """
    from PIL import Image

    try:
        with Image.open(path) as im:
            exif = im.getexif()
            sub = exif.get_ifd(_EXIF_IFD)
            # a few writers put the tag in IFD0 instead of the Exif sub-IFD
            value = sub.get(_DATETIME_ORIGINAL, exif.get(_DATETIME_ORIGINAL))
            parsed = _parse(value, sub.get(_SUBSEC_TIME_ORIGINAL), sub.get(_OFFSET_TIME_ORIGINAL))
            camera = _text(exif.get(_MODEL))
    except Exception:  # broken EXIF must never stop ordering: the photo just has no known time
        return None
    return None if parsed is None else CaptureTime(parsed[0], parsed[1], camera)


def read_capture_times(paths: Sequence[str | os.PathLike | None]) -> list[CaptureTime | None]:
    """:func:`read_capture_time` of each path (None stays None)."""
    return [None if p is None else read_capture_time(p) for p in paths]


def precedence(times: Sequence[CaptureTime | None]) -> np.ndarray:
    """``before[i, j]``: photo i was taken before photo j, by known, distinct times of the same camera."""
    n = len(times)
    before = np.zeros((n, n), dtype=bool)
    for camera in {t.camera for t in times if t is not None}:
        idx = [k for k, t in enumerate(times) if t is not None and t.camera == camera]
        utc = all(times[k].offset is not None for k in idx)
        # seconds from a fixed naive epoch: no local time zone or DST of this machine enters
        key = np.array([((times[k].utc if utc else times[k].local) - _EPOCH).total_seconds() for k in idx])
        before[np.ix_(idx, idx)] = key[:, None] < key[None, :]
    return before


def placed_by_time(before: np.ndarray) -> np.ndarray:
    """Per photo: whether its capture time fixes its order against at least one other photo."""
    before = np.asarray(before, dtype=bool)
    return before.any(0) | before.any(1)


def times_in_effect(mode: str, times: Sequence[CaptureTime | None]) -> bool:
    """Whether ``--capture-time MODE`` uses the times: ``on``, ``off``, or ``auto`` (at least two photos timed)."""
    if mode not in MODES:
        raise ValueError(f"capture-time mode must be one of {', '.join(MODES)}, got {mode!r}")
    return mode == "on" or (mode == "auto" and sum(t is not None for t in times) >= 2)


def pin_logits(logits, before):
    """Pair logits ``(B, n, n, 2)`` with every time-fixed pair set to probability 1 (class 1 of (i, j)) / 0.

    ``before`` is ``(B, n, n)`` bool (numpy or torch, in the logits' slot order). The
    other pairs are returned unchanged, so guidance and fusion evidence still place the rest.
    """
    import torch

    b = torch.as_tensor(np.asarray(before, dtype=bool) if not torch.is_tensor(before) else before)
    b = b.to(logits.device)
    if not bool(b.any()):
        return logits
    first = logits.new_tensor([-PIN_LOGIT, PIN_LOGIT])  # "i before j" certain
    out = torch.where(b[..., None], first, logits)
    return torch.where(b.transpose(1, 2)[..., None], first.flip(0), out)
