"""The ``iterwego`` command line.

Every sub-command lives in its own small ``_cmd_*`` function that parses
nothing itself and calls the library: the CLI owns argument parsing, progress
output and the error policy (one line on stderr, non-zero exit, no traceback
unless ``--debug``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from ..errors import IterWeGOError

EXIT_USER_ERROR = 2


def _parse_lengths(text: str) -> tuple[int, int]:
    try:
        if "-" in text:
            lo, hi = (int(x) for x in text.split("-", 1))
        else:
            lo = hi = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO-HI such as 3-8, got {text!r}") from None
    if lo < 1 or hi < lo:
        raise argparse.ArgumentTypeError(f"lengths must satisfy 1 <= LO <= HI, got {text!r}")
    return lo, hi


def _rate(text: str) -> float:
    try:
        r = float(text)
    except ValueError:
        r = -1.0
    if not 0.0 <= r <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a share between 0 and 1, got {text!r}")
    return r


def _add_data_args(p: argparse.ArgumentParser, *, positional: bool = False, required: bool = True) -> None:
    if positional:
        p.add_argument(
            "data",
            help="data directory in the standard layout (DIR/{split}.story-in-sequence.json, DIR/images/{split}/) "
            "or DIR/{split}.jsonl",
        )
    else:
        p.add_argument("--data", required=required, help="data directory in the standard layout")
    p.add_argument(
        "--format", dest="fmt", default="vist", choices=["vist", "tacos", "jsonl"], help="reader to use (default: vist)"
    )
    p.add_argument(
        "--image-dir", default=None, help="where the images are, if not DIR/images/{split}/ (SIND keeps them elsewhere)"
    )
    p.add_argument(
        "--text-field",
        default="text",
        choices=["text", "original_text"],
        help="VIST/TACoS field to read sentences from (default: text)",
    )


# ----------------------------------------------------------------- foundation
def _cmd_synth(a: argparse.Namespace) -> int:
    from ..data.synth import SynthConfig, synthesize
    from ..errors import ConfigError

    try:
        cfg = _synth_config(SynthConfig, a)
    except ValueError as err:  # a bad option value: one line, not a traceback
        raise ConfigError(f"synth: {err}") from None
    summary = synthesize(a.out, cfg, progress=not a.quiet)
    print(json.dumps(summary, indent=2))
    return 0


def _synth_config(SynthConfig, a: argparse.Namespace):
    return SynthConfig.for_family(
        a.family,
        stories=a.stories,
        seed=a.seed,
        lengths=a.lengths,
        image_size=a.image_size,
        exif_rate=a.exif_rate,
        clock_shift=a.clock_shift,
        hide_image=a.hide_image,
        hide_text=a.hide_text,
        time_steps=a.time_steps,
        narrate=a.narrate,
    )


def _cmd_stats(a: argparse.Namespace) -> int:
    from ..data.readers import dataset_stats, format_stats

    stats = dataset_stats(a.data, fmt=a.fmt, image_dir=a.image_dir, text_field=a.text_field, splits=a.splits)
    if a.json:
        print(json.dumps(stats, indent=2))
    else:
        print(format_stats(stats))
    return 1 if a.strict and stats.get("problems") else 0


def _cmd_resize(a: argparse.Namespace) -> int:
    from ..images import resize_tree

    report = resize_tree(a.src, a.dst, size=a.size, workers=a.workers, progress=not a.quiet)
    print(report.summary())
    for path, why in report.failures:
        print(f"failed: {path}: {why}", file=sys.stderr)
    return 1 if report.failures else 0


def _cmd_prepare_pairs(a: argparse.Namespace) -> int:
    from ..data.pairs import write_pairs
    from ..data.readers import load_split

    stories = load_split(
        a.data, a.split, fmt=a.fmt, image_dir=a.image_dir, text_field=a.text_field, check_images=a.modality == "image"
    )
    out = write_pairs(stories, a.out, split=a.split, modality=a.modality, seed=a.seed)
    print(f"wrote {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    p = argparse.ArgumentParser(
        prog="iterwego",
        description="Order unordered images and sentences of one story with weak cross-modal guidance (IterWeGO).",
    )
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    p.add_argument("--version", action="version", version=f"iterwego {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for register in (_register_synth, _register_stats, _register_resize, _register_prepare_pairs):
        register(sub)

    from . import commands, official_cmd

    commands.register(sub, _add_data_args)
    official_cmd.register(sub)
    commands.register_serve(sub)
    return p


def _register_synth(sub) -> None:
    from .commands import NARRATE_HELP, SYNTH_FAMILIES

    s = sub.add_parser("synth", help="write a synthetic visual-story dataset (the embedded default data)")
    s.add_argument("out", help="output directory (SIND layout)")
    s.add_argument("--stories", type=int, default=600, help="total number of stories over train/val/test (default 600)")
    s.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    s.add_argument("--lengths", type=_parse_lengths, default=(3, 8), help="story length range LO-HI (default 3-8)")
    s.add_argument("--image-size", type=int, default=64, help="image side in pixels (default 64)")
    s.add_argument(
        "--family",
        default="tank",
        choices=SYNTH_FAMILIES,
        help="generator: tank (water level; 'at hour seven'; default) or sky (sun on an arc; 'after the seventh bell'; "
        "other hide rates and 16 time steps). docs/synthetic.md describes both",
    )
    s.add_argument(
        "--hide-image", type=_rate, default=None, metavar="P", help="share of images that hide their cue (family's)"
    )
    s.add_argument(
        "--hide-text", type=_rate, default=None, metavar="P", help="share of sentences that hide their cue (family's)"
    )
    s.add_argument("--time-steps", type=int, default=None, metavar="T", help="hidden time steps (family's: 12 / 16)")
    s.add_argument("--narrate", type=_rate, default=0.0, metavar="P", help=NARRATE_HELP)
    s.add_argument(
        "--exif-rate",
        type=_rate,
        default=0.0,
        metavar="R",
        help="share of the photos that carry an EXIF capture time (DateTimeOriginal), e.g. 0.5 (default 0)",
    )
    s.add_argument(
        "--clock-shift",
        type=float,
        default=0.0,
        metavar="HOURS",
        help="a second camera (another EXIF Model), whose clock is HOURS off, takes about half the timed photos",
    )
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=_cmd_synth)


def _register_stats(sub) -> None:
    s = sub.add_parser("stats", help="stories, items, length histogram, missing or unreadable files")
    _add_data_args(s, positional=True)
    s.add_argument(
        "--splits", nargs="+", default=["train", "val", "test"], help="splits to inspect (default: train val test)"
    )
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")
    s.add_argument("--strict", action="store_true", help="exit 1 if any file is missing or unreadable")
    s.set_defaults(func=_cmd_stats)


def _register_resize(sub) -> None:
    s = sub.add_parser("resize", help="resize every image under SRC into DST (parallel, resumable)")
    s.add_argument("src")
    s.add_argument("dst")
    s.add_argument("--size", type=int, default=256, help="shorter side in pixels (default 256)")
    s.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="worker processes (default: all cores)")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=_cmd_resize)


def _register_prepare_pairs(sub) -> None:
    s = sub.add_parser("prepare-pairs", help="export a split as the authors' pair TSV")
    _add_data_args(s, positional=True)
    s.add_argument("--split", default="test")
    s.add_argument("--out", required=True, help="output directory")
    s.add_argument(
        "--modality",
        default="sentence",
        choices=["sentence", "image"],
        help="items written into the TSV (default: sentence)",
    )
    s.add_argument("--seed", type=int, default=0, help="seed for the random pair directions")
    s.set_defaults(func=_cmd_prepare_pairs)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except IterWeGOError as err:
        if args.debug:
            raise
        print(f"iterwego {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except BrokenPipeError:  # e.g. `iterwego synth ... | head`: the reader left, which is not an error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print(f"iterwego {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
