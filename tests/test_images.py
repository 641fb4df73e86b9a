"""Image loading, checking and resize_tree on small images the tests draw themselves."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile

from iterwego.apps.cli import main
from iterwego.errors import DataError, ImageError
from iterwego.images import ResizeReport, check_image, load_image, quick_check_image, resize_tree


def noisy_jpeg(path: Path, size=(64, 48), seed=0) -> Path:
    """A JPEG with enough entropy that cutting it really truncates pixel data."""
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path, quality=90)
    return path


def truncated_jpeg(path: Path) -> Path:
    noisy_jpeg(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


# ----------------------------------------------------------------- load_image: modes that must work
def test_rgb_jpeg_loads_fully_decoded(tmp_path):
    p = noisy_jpeg(tmp_path / "a.jpg")
    im = load_image(p)
    assert im.mode == "RGB" and im.size == (64, 48)
    assert np.asarray(im).shape == (48, 64, 3)


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    p = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (16, 8), (0, 255, 255, 0)).save(p)  # pure red in CMYK
    im = load_image(p)
    assert im.mode == "RGB" and im.size == (16, 8)
    r, g, b = np.asarray(im)[4, 8].astype(int)
    assert r > 200 and g < 60 and b < 60


def test_16bit_grey_is_scaled_not_clipped(tmp_path):
    p = tmp_path / "g16.png"
    a = np.zeros((8, 16), dtype=np.uint16)
    a[:, :8] = 0x4000  # a quarter of full scale: dark grey, not white
    a[:, 8:] = 0xFFFF
    Image.fromarray(a).save(p)
    assert Image.open(p).mode.startswith("I")
    px = np.asarray(load_image(p)).astype(int)
    assert abs(px[0, 0, 0] - 64) <= 1 and px[0, 15, 0] == 255
    assert (px[..., 0] == px[..., 1]).all()


def test_palette_with_transparency_goes_onto_white(tmp_path):
    p = tmp_path / "pal.png"
    im = Image.new("P", (8, 8), 0)
    im.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    im.paste(1, (0, 0, 4, 8))  # left half blue, right half index 0 = transparent black
    im.info["transparency"] = 0
    im.save(p, transparency=0)
    px = np.asarray(load_image(p))
    assert tuple(px[0, 0]) == (0, 0, 255)
    assert tuple(px[0, 7]) == (255, 255, 255)


@pytest.mark.parametrize("mode,colour", [("RGBA", (255, 0, 0, 0)), ("LA", (0, 0))])
def test_alpha_composited_onto_white_not_black(tmp_path, mode, colour):
    p = tmp_path / f"{mode}.png"
    Image.new(mode, (6, 6), colour).save(p)  # fully transparent
    assert (np.asarray(load_image(p)) == 255).all()


def test_half_transparent_rgba_blends_with_white(tmp_path):
    p = tmp_path / "half.png"
    Image.new("RGBA", (4, 4), (0, 0, 0, 128)).save(p)
    v = np.asarray(load_image(p)).astype(int)
    assert (abs(v - 127) <= 2).all()


def test_animated_gif_first_frame(tmp_path):
    p = tmp_path / "anim.gif"
    frames = [Image.new("RGB", (10, 10), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    frames[0].save(p, save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(p).n_frames == 3
    px = np.asarray(load_image(p)).astype(int)
    assert px[5, 5, 0] > 200 and px[5, 5, 1] < 50


def test_exif_orientation_applied(tmp_path):
    p = tmp_path / "rot.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view"
    Image.new("RGB", (20, 10), (10, 20, 30)).save(p, exif=exif)
    assert load_image(p).size == (10, 20)


# ----------------------------------------------------------------- load_image: errors
def _bad(tmp_path: Path, kind: str) -> Path:
    if kind == "missing":
        return tmp_path / "nope.jpg"
    if kind == "zero":
        p = tmp_path / "zero.jpg"
        p.write_bytes(b"")
        return p
    if kind == "truncated":
        return truncated_jpeg(tmp_path / "cut.jpg")
    if kind == "text":
        p = tmp_path / "notes.jpg"
        p.write_text("this is not a picture\n")
        return p
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind,words",
    [("missing", "not found"), ("zero", "empty"), ("truncated", "truncated"), ("text", "not an image")],
)
def test_load_image_errors_name_the_file(tmp_path, kind, words):
    p = _bad(tmp_path, kind)
    with pytest.raises(ImageError) as ei:
        load_image(p)
    msg = str(ei.value)
    assert p.name in msg and words in msg and "\n" not in msg
    assert check_image(p) is not None and words in check_image(p)
    assert quick_check_image(p) is not None


def test_truncated_images_are_not_silently_loaded():
    import iterwego.images  # noqa: F401  (importing must not change the global)

    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


@pytest.mark.parametrize("side", [12, 15])  # 144 px: Pillow only warns; 225 px: Pillow raises
def test_decompression_bomb_is_an_error(tmp_path, monkeypatch, side):
    p = tmp_path / "bomb.png"
    Image.new("RGB", (side, side)).save(p)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.warns(Image.DecompressionBombWarning) if side == 12 else _nullcontext():
        with pytest.raises(ImageError, match="decompression-bomb") as ei:
            load_image(p)
    assert "bomb.png" in str(ei.value)


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_check_image_ok_and_quick_check_trailing_junk(tmp_path):
    p = noisy_jpeg(tmp_path / "ok.jpg")
    assert check_image(p) is None and quick_check_image(p) is None
    q = tmp_path / "junk.jpg"
    q.write_bytes(p.read_bytes() + b"camera maker trailer" * 4)  # decodes fine despite no trailer at the end
    assert quick_check_image(q) is None


# ----------------------------------------------------------------- resize_tree
def make_tree(root: Path) -> dict[str, Path]:
    (root / "a" / "b").mkdir(parents=True)
    files = {
        "big": noisy_jpeg(root / "a" / "big.jpg", size=(80, 60)),
        "upper": noisy_jpeg(root / "a" / "b" / "UP.JPG", size=(40, 100), seed=1),
        "small": root / "small.png",
        "rgba": root / "a" / "alpha.png",
        "gif": root / "anim.gif",
    }
    Image.new("RGB", (20, 10), (1, 2, 3)).save(files["small"])
    Image.new("RGBA", (64, 64), (0, 0, 0, 0)).save(files["rgba"])
    frames = [Image.new("RGB", (50, 40), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(files["gif"], save_all=True, append_images=frames[1:])
    (root / "readme.txt").write_text("not an image")
    return files


def test_resize_tree_sizes_names_and_modes(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    files = make_tree(src)
    rep = resize_tree(src, dst, size=32, workers=1, progress=False)
    assert isinstance(rep, ResizeReport)
    assert (rep.done, rep.skipped, rep.failures) == (5, 0, [])
    out = {k: dst / v.relative_to(src) for k, v in files.items()}
    assert Image.open(out["big"]).size == (43, 32)
    assert Image.open(out["upper"]).size == (32, 80) and out["upper"].name == "UP.JPG"
    assert Image.open(out["small"]).size == (20, 10)  # never upscaled
    assert (np.asarray(load_image(out["rgba"])) == 255).all()  # RGB on white
    assert Image.open(out["gif"]).format == "GIF" and Image.open(out["gif"]).size == (40, 32)
    assert not (dst / "readme.txt").exists()
    assert not [p for p in dst.rglob("*") if p.name.startswith(".")]  # no temp files left behind
    assert "resized 5" in rep.summary() and "0 failed" in rep.summary()


def test_resize_tree_failures_and_resume(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    files = make_tree(src)
    truncated_jpeg(src / "a" / "broken.jpg")
    rep = resize_tree(src, dst, size=32, workers=1, progress=False)
    assert rep.done == 5 and len(rep.failures) == 1
    assert rep.failures[0][0].endswith("broken.jpg") and "truncated" in rep.failures[0][1]
    assert not (dst / "a" / "broken.jpg").exists()

    again = resize_tree(src, dst, size=32, workers=1, progress=False)
    assert (again.done, again.skipped, len(again.failures)) == (0, 5, 1)

    # the source changed after its output was written: output older than source
    older = files["small"].stat().st_mtime - 10
    os.utime(dst / "small.png", (older, older))
    third = resize_tree(src, dst, size=32, workers=1, progress=False)
    assert (third.done, third.skipped) == (1, 4)

    (dst / "a" / "big.jpg").write_bytes(b"")  # a damaged output is redone, not trusted
    assert resize_tree(src, dst, size=32, workers=1, progress=False).done == 1
    assert (
        resize_tree(src, dst, size=16, workers=1, progress=False).done == 4
    )  # new size: redo (small.png is 20x10 either way)


def test_resize_tree_in_parallel_matches_inline(tmp_path):
    src = tmp_path / "src"
    make_tree(src)
    inline = resize_tree(src, tmp_path / "d1", size=32, workers=1, progress=False)
    par = resize_tree(src, tmp_path / "d2", size=32, workers=2, progress=False)
    assert (par.done, par.skipped, par.failures) == (inline.done, 0, [])
    for p in (tmp_path / "d1").rglob("*.*"):
        q = tmp_path / "d2" / p.relative_to(tmp_path / "d1")
        assert Image.open(q).size == Image.open(p).size


def test_resize_tree_bad_src(tmp_path):
    with pytest.raises(DataError, match="not found") as ei:
        resize_tree(tmp_path / "absent", tmp_path / "dst", progress=False)
    assert "absent" in str(ei.value)
    (tmp_path / "same").mkdir()
    with pytest.raises(DataError, match="source"):
        resize_tree(tmp_path / "same", tmp_path / "same", progress=False)


def test_resize_tree_skips_its_own_output_inside_src(tmp_path):
    src = tmp_path / "src"
    make_tree(src)
    first = resize_tree(src, src / "small", size=32, workers=1, progress=False)
    second = resize_tree(src, src / "small", size=32, workers=1, progress=False)
    assert first.done == 5 and second.skipped == 5 and second.done == 0


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(w=st.integers(1, 90), h=st.integers(1, 90), size=st.integers(1, 60))
def test_resize_shorter_side_property(w, h, size):
    with tempfile.TemporaryDirectory() as d:
        src, dst = Path(d) / "s", Path(d) / "t"
        src.mkdir()
        Image.new("RGB", (w, h), (9, 9, 9)).save(src / "x.png")
        rep = resize_tree(src, dst, size=size, workers=1, progress=False)
        assert rep.done == 1
        ow, oh = Image.open(dst / "x.png").size
        assert min(ow, oh) == min(size, w, h)
        if min(w, h) > size:  # aspect kept to within rounding
            assert abs(ow / oh - w / h) <= (w / h) / min(ow, oh) + 1e-9
        else:
            assert (ow, oh) == (w, h)


# ----------------------------------------------------------------- CLI
def test_cli_resize_exit_codes_and_rerun(tmp_path, capsys):
    src, dst = tmp_path / "src", tmp_path / "dst"
    make_tree(src)
    assert main(["resize", str(src), str(dst), "--size", "32", "--workers", "1", "--quiet"]) == 0
    assert "resized 5" in capsys.readouterr().out
    assert main(["resize", str(src), str(dst), "--size", "32", "--workers", "1", "--quiet"]) == 0
    assert "skipped 5" in capsys.readouterr().out

    truncated_jpeg(src / "cut.jpg")
    assert main(["resize", str(src), str(dst), "--size", "32", "--workers", "1", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "cut.jpg" in err and "Traceback" not in err


def test_cli_resize_bad_src_one_line(tmp_path, capsys):
    code = main(["resize", str(tmp_path / "nowhere"), str(tmp_path / "dst"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "nowhere" in err and "Traceback" not in err
