"""The ``import-official`` sub-command: the authors' released checkpoint -> an iterwego run directory."""

from __future__ import annotations

import argparse
import json
import sys
import time

DEFAULT_TOKENIZERS = {"bert": "bert-base-uncased", "clip": "openai/clip-vit-large-patch14"}


def _tokenizer(given: str | None, kind: str):
    """The tokenizer named on the command line (must load), else the default one if it is cached locally.

    Returns ``(tokenizer or None, note)``. Nothing is downloaded.
    """
    from transformers import AutoTokenizer

    from ..errors import ModelLoadError

    name = given or DEFAULT_TOKENIZERS[kind]
    try:
        tok = AutoTokenizer.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError) as err:
        if given:
            raise ModelLoadError(
                f"cannot load the {kind} tokenizer {given!r} ({type(err).__name__}: {str(err).splitlines()[0][:160]}); "
                "pass a local directory holding its tokenizer files"
            ) from None
        return None, f"no {kind} tokenizer found locally ({name}); pass --{kind}-tokenizer DIR to include one"
    return tok, f"{kind} tokenizer: {name}"


def cmd_import_official(a: argparse.Namespace) -> int:
    """Load, check and convert the checkpoint; print a short summary."""
    from ..compat.official import load_official, save_as_run, tokenizer_fits

    t0 = time.time()
    print(f"reading {a.checkpoint}", flush=True)
    model = load_official(a.checkpoint, clip_config=a.clip_config, bert_config=a.bert_config)
    bert_tok, bert_note = _tokenizer(a.bert_tokenizer, "bert")
    clip_tok, clip_note = _tokenizer(a.clip_tokenizer, "clip")
    # A cached default tokenizer that does not fit this checkpoint's vocabulary is left out, not fatal;
    # one named on the command line is checked by save_as_run and refused if it does not fit.
    if (
        bert_tok is not None
        and not a.bert_tokenizer
        and not tokenizer_fits(bert_tok, model.txt_flow.bert.config.vocab_size)
    ):
        bert_tok, bert_note = None, "the cached bert tokenizer does not fit this checkpoint; left out"
    if (
        clip_tok is not None
        and not a.clip_tokenizer
        and not tokenizer_fits(clip_tok, model.clip_align.config.text_config.vocab_size)
    ):
        clip_tok, clip_note = None, "the cached CLIP tokenizer does not fit this checkpoint; left out"
    out = save_as_run(model, a.out, bert_tokenizer=bert_tok, clip_tokenizer=clip_tok, overwrite=a.force)
    cfg = model.img_flow.cfg
    summary = {
        "run": str(out),
        "set_transformer": {"layers": cfg.layers, "d_model": cfg.d_model, "heads": cfg.heads, "ffn": cfg.ffn},
        "best_score": model.best_score,
        "tokenizers": [bert_note, clip_note],
        "seconds": round(time.time() - t0, 1),
    }
    print(json.dumps(summary, indent=2))
    if bert_tok is None:
        print(f"warning: {bert_note}; the run's text encoder cannot be used until one is added", file=sys.stderr)
    return 0


def register(sub) -> None:
    """Add ``import-official`` to the ``iterwego`` sub-command parser ``sub``."""
    s = sub.add_parser(
        "import-official",
        help="convert the authors' released checkpoint (torch .pt of natorderNet) into an iterwego run directory",
        description="Read the authors' checkpoint without executing pickled code, check every tensor against the "
        "CLIP ViT-L/14 and bert-base-uncased architecture configs, and write a run directory.",
    )
    s.add_argument(
        "checkpoint", metavar="CKPT", help="the authors' checkpoint file (a dict with 'model', 'args', 'best_score')"
    )
    s.add_argument("--out", required=True, metavar="RUN", help="run directory to write (must not exist or be empty)")
    s.add_argument(
        "--clip-config",
        default=None,
        metavar="JSON",
        help="CLIP config.json (or model dir) if not ViT-L/14 (default: shipped)",
    )
    s.add_argument(
        "--bert-config",
        default=None,
        metavar="JSON",
        help="BERT config.json (or model dir) if not bert-base-uncased (default: shipped)",
    )
    s.add_argument(
        "--bert-tokenizer",
        default=None,
        metavar="DIR",
        help="local BERT tokenizer dir (default: bert-base-uncased if cached locally)",
    )
    s.add_argument(
        "--clip-tokenizer",
        default=None,
        metavar="DIR",
        help="local CLIP tokenizer dir (default: openai/clip-vit-large-patch14 if cached locally)",
    )
    s.add_argument("--force", action="store_true", help="write into a non-empty --out directory")
    s.set_defaults(func=cmd_import_official)
