"""Run directories, the saved form of a model: config, weights and metadata, reloaded identically.

This module reads and writes the files; :meth:`iterwego.model.IterWeGO.from_pretrained` builds the model.

Layout of ``RUN/``::

    config.json        the full typed config (Config.to_json)
    model.safetensors  orderers' and aligner's weights (frozen backbones are named in the config, not copied)
    meta.json          versions, backbone identities, validation-chosen inference rounds
    log.jsonl          training log (losses, learning rates, validation metrics)

Every file is written atomically (temporary file, then rename).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from . import __version__
from .config import Config
from .errors import ModelLoadError
from .io import atomic_write_bytes, atomic_write_json

REQUIRED = ("config.json", "model.safetensors", "meta.json")


def versions() -> dict:
    import transformers

    return {"iterwego": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


def save_run(run_dir: str | Path, model, meta: dict) -> None:
    """Write config, weights and metadata of ``model`` into ``run_dir``."""
    from safetensors.torch import save

    run_dir = Path(run_dir)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write_bytes(run_dir / "model.safetensors", save(state, metadata={"format": "pt", "iterwego": __version__}))
    atomic_write_bytes(run_dir / "config.json", (model.cfg.to_json() + "\n").encode())
    full = {**meta, "versions": versions(), "backbones": {k: e.identity for k, e in model.encoders().items()}}
    # the spec names the tokenizer / image processor too (they live beside the backbone weights)
    full["tokenizers_and_processors"] = {k: e.spec for k, e in model.encoders().items()}
    atomic_write_json(run_dir / "meta.json", full)


def read_config(run_dir: str | Path) -> tuple[Config, dict]:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ModelLoadError(
            f"{run_dir}: run directory not found (train one with `iterwego train --out {run_dir}` or `iterwego demo`)"
        )
    for name in REQUIRED:
        if not (run_dir / name).is_file():
            raise ModelLoadError(
                f"{run_dir / name}: missing from the run directory (incomplete copy or an interrupted save?)"
            )
    try:
        cfg_d = json.loads((run_dir / "config.json").read_text())
        meta = json.loads((run_dir / "meta.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelLoadError(f"{run_dir}: config.json or meta.json is not valid JSON ({err})") from None
    try:
        return Config.from_dict(cfg_d), meta
    except ModelLoadError as err:  # name the file: "config version 99 is not supported" alone does not say which run
        raise ModelLoadError(f"{run_dir / 'config.json'}: {err}") from None


def portable_identity(identity: str) -> str:
    """A backbone identity without the local directory's path (kept: its weights fingerprint), so runs can move."""
    import re

    return re.sub(r"^([a-z-]+):[^@]*@", r"\1:@", identity) if "@" in identity else identity


def check_backbones(run_dir: Path, encoders: dict, meta: dict) -> None:
    """Refuse a run whose backbones now resolve to other weights than those it was trained with."""
    for m, e in encoders.items():
        want = meta.get("backbones", {}).get(m)
        if want is not None and portable_identity(e.identity) != portable_identity(want):
            raise ModelLoadError(
                f"{run_dir}: the {m} backbone now resolves to {e.identity!r} but the run was trained with {want!r}"
            )


def read_weights(run_dir: Path, own: dict, modalities: tuple[str, ...]) -> dict:
    """The saved tensors that the freshly built model (state dict ``own``) takes, after name and shape checks."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = run_dir / "model.safetensors"
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ModelLoadError(f"{path}: corrupt or unreadable weights ({err})") from None
    state = {k: v for k, v in state.items() if k in own or not k.startswith(("image.", "text.", "aligner."))}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    skip = tuple(f"{m}." for m in ("image", "text") if m not in modalities) + (
        ("aligner.",) if len(modalities) < 2 else ()
    )
    missing = [k for k in missing if not k.startswith(skip)]
    if missing or unexpected:
        raise ModelLoadError(
            f"{path}: weights do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    bad = [k for k, v in state.items() if k in own and v.shape != own[k].shape]
    if bad:
        raise ModelLoadError(f"{path}: tensor shapes differ from the config for {bad[:3]}")
    return {k: v for k, v in state.items() if k in own}
