"""Image loading, checking and bulk resizing.

Every image the library touches goes through :func:`load_image`, which always
returns a fully decoded RGB picture or raises :class:`~iterwego.errors.ImageError`
with one line naming the file and what is wrong. A missing or broken image is
never replaced by a blank one: silently training on black squares hides data
problems that :func:`iterwego.data.readers.dataset_stats` is meant to surface.

Pillow's ``LOAD_TRUNCATED_IMAGES`` is deliberately left off so truncated files
are reported instead of being padded with grey.
"""

from __future__ import annotations

import math
import os
import stat
import struct
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import DataError, ImageError

#: File name extensions (compared case-insensitively) that :func:`resize_tree` picks up.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".bmp")

# Pillow raises a zoo of exception types on corrupt input (see Image.open's own
# list); all of them mean "this file is not a usable image".
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError, struct.error, ZeroDivisionError)

_SAVE_FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".gif": "GIF", ".bmp": "BMP"}

# EXIF orientation tag values -> the transpose that makes the picture upright.
_EXIF_ORIENTATION = 0x0112
_ORIENT_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


class _Bad(Exception):
    """Internal: carries the reason an image is unusable, without the path."""


def _stat_file(path: Path) -> os.stat_result:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise _Bad("file not found") from None
    except OSError as err:
        raise _Bad(f"cannot read file ({err.strerror or err})") from None
    if stat.S_ISDIR(st.st_mode):
        raise _Bad("is a directory, not an image file")
    if st.st_size == 0:
        raise _Bad("empty file (0 bytes)")
    return st


def _open(path: Path) -> Image.Image:
    """Open (header only) with the decompression-bomb limit enforced as an error."""
    try:
        im = Image.open(path)
    except Image.DecompressionBombError as err:
        raise _Bad(f"image too large for Pillow's decompression-bomb limit ({err})") from None
    except UnidentifiedImageError:
        raise _Bad("not an image file Pillow can read (unknown or corrupt format)") from None
    except PermissionError as err:
        raise _Bad(f"cannot read file ({err.strerror})") from None
    except _DECODE_ERRORS as err:
        raise _Bad(f"corrupt image header ({err})") from None
    # Pillow only *warns* between MAX_IMAGE_PIXELS and twice that; a warning is
    # easy to miss in a long run, so the limit is enforced here as an error.
    # (warnings.catch_warnings is not thread-safe, and stats checks in threads.)
    limit = Image.MAX_IMAGE_PIXELS
    w, h = im.size
    if limit is not None and w * h > limit:
        im.close()
        raise _Bad(
            f"image too large: {w}x{h} = {w * h} pixels exceeds Pillow's decompression-bomb limit of {limit} pixels"
        )
    return im


def _to_rgb(im: Image.Image) -> Image.Image:
    """Convert any decoded mode to 8-bit RGB; transparency is composited onto white."""
    mode = im.mode
    if mode.startswith("I;16") or mode == "I":
        a = np.asarray(im).astype(np.float64)
        peak = float(a.max()) if a.size else 0.0
        # Scale by the container's range rather than the image's own peak so a dark
        # 16-bit picture stays dark; Pillow's own convert() would clip to white.
        if mode == "I" and peak > 65535:
            a = a * (255.0 / peak)
        elif mode.startswith("I;16") or peak > 255:
            a = a / 257.0
        grey = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), mode="L")
        return grey.convert("RGB")
    if mode == "F":
        a = np.nan_to_num(np.asarray(im, dtype=np.float64))
        if a.size and a.max() <= 1.0:  # float images are usually 0..1
            a = a * 255.0
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), mode="L").convert("RGB")
    has_alpha = mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in im.info
    if has_alpha:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")  # a copy even when already RGB: detached from the file


def _exif_orientation(im: Image.Image) -> int:
    try:
        return int(im.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # broken EXIF must not make a decodable picture unusable
        return 1


def _load(path: Path, *, shorter_side: int | None = None) -> Image.Image:
    """Decode ``path`` to RGB or raise :class:`_Bad`.

    ``shorter_side`` lets JPEG decoding use DCT scaling (``draft``) when the
    caller will downscale anyway, which is several times faster on photos.
    """
    _stat_file(path)
    im = _open(path)
    try:
        try:
            im.seek(0)  # first frame of animated GIF/PNG/WebP
            if shorter_side is not None and im.format == "JPEG":
                w, h = im.size
                scale = shorter_side / min(w, h)
                if scale < 1:
                    im.draft("RGB", (math.ceil(w * scale), math.ceil(h * scale)))
            im.load()
        except Image.DecompressionBombError as err:
            raise _Bad(f"image too large for Pillow's decompression-bomb limit ({err})") from None
        except _DECODE_ERRORS as err:
            raise _Bad(f"truncated or corrupt image data ({err})") from None
        orientation = _exif_orientation(im)
        try:
            out = _to_rgb(im)
        except _DECODE_ERRORS as err:
            raise _Bad(f"cannot convert image mode {im.mode} to RGB ({err})") from None
    finally:
        im.close()
    method = _ORIENT_TRANSPOSE.get(orientation)
    return out.transpose(method) if method is not None else out


def load_image(path: str | os.PathLike) -> Image.Image:
    """Load an image as a fully decoded 8-bit RGB :class:`PIL.Image.Image`.

    Handles every mode Pillow decodes: CMYK, 16-bit grey (scaled, not clipped),
    palette images, anything with transparency (composited onto **white**),
    animated GIFs (first frame). The EXIF orientation tag is applied so photos
    come out upright.

    Raises:
        ImageError: one line naming ``path`` and the problem -- file not found,
            zero bytes, not an image, truncated/corrupt data, or more pixels than
            ``PIL.Image.MAX_IMAGE_PIXELS`` (the decompression-bomb limit).
    """
    p = Path(path)
    try:
        return _load(p)
    except _Bad as bad:
        raise ImageError(str(bad), path=str(p)) from None


def check_image(path: str | os.PathLike) -> str | None:
    """Fully decode ``path``; return ``None`` if it is usable, else the reason (no path in it)."""
    try:
        _load(Path(path))
    except _Bad as bad:
        return str(bad)
    return None


# Trailer bytes a complete file of each format ends with; seeing them lets
# quick_check_image skip the (slow) full decode for the common, healthy case.
_TRAILERS = {"JPEG": (b"\xff\xd9",), "PNG": (b"IEND\xaeB`\x82",), "GIF": (b";",)}


def quick_check_image(path: str | os.PathLike) -> str | None:
    """Cheap usability check used by the readers; ``None`` if fine, else the reason.

    Checks that the file exists, is non-empty, is recognised by Pillow and is
    within the pixel limit. Truncation is caught without decoding every pixel:
    a JPEG/PNG/GIF whose file ends with its format's trailer is accepted; any
    other file (no trailer, trailing junk, other formats) is fully decoded, so a
    truncated file is always reported.
    """
    p = Path(path)
    try:
        _stat_file(p)
        im = _open(p)
        fmt = im.format
        im.close()
        trailers = _TRAILERS.get(fmt or "")
        if trailers:
            with open(p, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 16))
                tail = f.read().rstrip(b"\x00\r\n ")
            if any(tail.endswith(t) for t in trailers):
                return None
        _load(p)
    except _Bad as bad:
        return str(bad)
    except OSError as err:
        return f"cannot read file ({err.strerror or err})"
    return None


# ----------------------------------------------------------------- resize_tree
@dataclass
class ResizeReport:
    """Outcome of :func:`resize_tree`."""

    done: int = 0
    skipped: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)  # (source path, reason)
    dst: str = ""

    def summary(self) -> str:
        """One line: how many were resized, skipped (already done) and failed."""
        total = self.done + self.skipped + len(self.failures)
        where = f" into {self.dst}" if self.dst else ""
        return (
            f"resized {self.done} of {total} images{where}; skipped {self.skipped} already done; "
            f"{len(self.failures)} failed"
        )


def _is_done(src: Path, dst: Path, size: int) -> bool:
    """A previous run finished ``dst``: at least as new as ``src``, decodes, and has this run's size.

    The size test makes a rerun with a different ``size`` redo the work instead
    of silently keeping the old outputs.
    """
    try:
        if dst.stat().st_mtime_ns < src.stat().st_mtime_ns:
            return False
        with Image.open(src) as s_im, Image.open(dst) as d_im:
            want = min(size, min(s_im.size))
            if min(d_im.size) != want:
                return False
    except Exception:  # any doubt about the old output means: redo it
        return False
    return check_image(dst) is None


def _resize_one(task: tuple[str, str, int]) -> tuple[str, str, str | None]:
    """Worker: returns (src, status, reason) with status in done/skipped/failed."""
    src_s, dst_s, size = task
    src, dst = Path(src_s), Path(dst_s)
    if _is_done(src, dst, size):
        return src_s, "skipped", None
    try:
        im = _load(src, shorter_side=size)
    except _Bad as bad:
        return src_s, "failed", str(bad)
    w, h = im.size
    short = min(w, h)
    if short > size:  # never upscale
        scale = size / short
        new = (max(1, round(w * scale)), max(1, round(h * scale)))
        if w <= h:  # make the shorter side exactly `size` despite rounding
            new = (size, new[1])
        else:
            new = (new[0], size)
        im = im.resize(new, Image.Resampling.LANCZOS, reducing_gap=3.0)
    fmt = _SAVE_FORMATS.get(dst.suffix.lower(), "PNG")
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        kwargs = {"quality": 95} if fmt == "JPEG" else {}
        im.save(tmp, format=fmt, **kwargs)
        os.replace(tmp, dst)  # readers never see a half-written file
    except OSError as err:
        try:
            tmp.unlink()
        except OSError:
            pass
        return src_s, "failed", f"cannot write {dst} ({err.strerror or err})"
    return src_s, "done", None


def _list_images(src: Path, exclude: Path | None) -> list[Path]:
    found: list[Path] = []
    for root, dirs, files in os.walk(src):
        rp = Path(root)
        if exclude is not None:
            # dst inside src: do not feed our own output back in on a rerun
            dirs[:] = [d for d in dirs if (rp / d).resolve() != exclude]
        dirs.sort()
        for name in sorted(files):
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES:
                found.append(rp / name)
    return found


def resize_tree(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    size: int = 256,
    workers: int = os.cpu_count() or 1,
    progress: bool = True,
) -> ResizeReport:
    """Resize every image under ``src`` so its shorter side is ``size`` pixels, into ``dst``.

    Walks ``src`` recursively for ``.jpg .jpeg .png .gif .bmp`` files (any case),
    keeps relative paths and file names, never upscales, converts to RGB (the
    first frame of an animated GIF is saved under the same ``.gif`` name) and
    saves in the format the extension names. Files are written to a temporary
    name and renamed, and a file whose output already exists, is at least as new
    as its source and decodes is skipped -- so an interrupted run resumes.

    ``workers`` processes resize in parallel (``workers=1`` runs inline).
    Failures are collected, not raised; the caller decides the exit status.

    Raises:
        DataError: ``src`` is not a directory, or ``dst`` is ``src`` itself.
    """
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    src_p, dst_p = Path(src), Path(dst)
    if not src_p.is_dir():
        raise DataError(
            "source image directory not found" if not src_p.exists() else "source is not a directory", path=str(src_p)
        )
    src_r, dst_r = src_p.resolve(), dst_p.resolve()
    if src_r == dst_r:
        raise DataError(
            "destination is the source directory; resizing in place would overwrite the originals", path=str(dst_p)
        )
    inside = dst_r if dst_r.is_relative_to(src_r) else None
    files = _list_images(src_p, inside)
    tasks = [(str(f), str(dst_p / f.relative_to(src_p)), size) for f in files]

    from tqdm import tqdm

    report = ResizeReport(dst=str(dst_p))
    bar = tqdm(total=len(tasks), unit="img", desc="resize", disable=not progress)
    try:
        if workers <= 1 or len(tasks) <= 1:
            results = map(_resize_one, tasks)
            _collect(results, report, bar)
        else:
            chunk = max(1, min(64, len(tasks) // (workers * 8)))
            with ProcessPoolExecutor(max_workers=min(workers, len(tasks))) as pool:
                _collect(pool.map(_resize_one, tasks, chunksize=chunk), report, bar)
    finally:
        bar.close()
    report.failures.sort()
    return report


def _collect(results, report: ResizeReport, bar) -> None:
    for src_s, status, reason in results:
        if status == "done":
            report.done += 1
        elif status == "skipped":
            report.skipped += 1
        else:
            report.failures.append((src_s, reason or "unknown error"))
        bar.update(1)
