"""Run directories: a trained model's config, weights and metadata, saved and reloaded identically.

Layout of ``RUN/``::

    config.json        the full typed config (Config.to_json)
    model.safetensors  orderers' and aligner's weights (frozen backbones are named in the config, not copied)
    meta.json          versions, backbone identities, validation-chosen inference rounds
    log.jsonl          training log (losses, learning rates, validation metrics)

Every file is written atomically (temporary file, then rename).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from . import __version__
from .config import Config
from .errors import ModelLoadError, WriteError

REQUIRED = ("config.json", "model.safetensors", "meta.json")


def _write_error(message: str, cause: OSError) -> WriteError:
    e = WriteError(message)
    e.errno = cause.errno  # keep what callers that handle OSError test for (e.g. ENOSPC)
    return e


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file and a rename: readers see the old or the new file, never a part.

    Raises:
        WriteError: (an ``OSError`` too) the directory or file cannot be written, e.g. the disk is full;
            the temporary file is removed and ``path`` keeps its previous content.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise _write_error(f"{path}: cannot write ({err.strerror or err})", err) from None
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a run directory should be readable like any file
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError) and not isinstance(err, WriteError):
            # one line for the CLI, naming the file the user cares about rather than the temporary one
            raise _write_error(f"{path}: cannot write ({err.strerror or err}); its previous version, if any, is unchanged", err) from None
        raise


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


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
        raise ModelLoadError(f"{run_dir}: run directory not found (train one with `iterwego train --out {run_dir}` or `iterwego demo`)")
    for name in REQUIRED:
        if not (run_dir / name).is_file():
            raise ModelLoadError(f"{run_dir / name}: missing from the run directory (incomplete copy or an interrupted save?)")
    try:
        cfg_d = json.loads((run_dir / "config.json").read_text())
        meta = json.loads((run_dir / "meta.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelLoadError(f"{run_dir}: config.json or meta.json is not valid JSON ({err})") from None
    try:
        return Config.from_dict(cfg_d), meta
    except ModelLoadError as err:  # name the file: "config version 99 is not supported" alone does not say which run
        raise ModelLoadError(f"{run_dir / 'config.json'}: {err}") from None


def _portable(identity: str) -> str:
    """A backbone identity without the local directory's path (kept: its weights fingerprint), so runs can move."""
    import re

    return re.sub(r"^([a-z-]+):[^@]*@", r"\1:@", identity) if "@" in identity else identity


def load_run(run_dir: str | Path, device: str | torch.device = "cpu", *, modalities: tuple[str, ...] = ("image", "text")):
    """Rebuild the model saved in ``run_dir``. Returns ``(model, meta)``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .model import create_model

    run_dir = Path(run_dir)
    cfg, meta = read_config(run_dir)
    model = create_model(cfg, base_dir=run_dir, modalities=modalities)
    for m, e in model.encoders().items():
        want = meta.get("backbones", {}).get(m)
        if want is not None and _portable(e.identity) != _portable(want):
            raise ModelLoadError(f"{run_dir}: the {m} backbone now resolves to {e.identity!r} but the run was trained with {want!r}")
    try:
        state = load_file(str(run_dir / "model.safetensors"))
    except (SafetensorError, OSError, ValueError) as err:
        raise ModelLoadError(f"{run_dir / 'model.safetensors'}: corrupt or unreadable weights ({err})") from None
    own = model.state_dict()
    state = {k: v for k, v in state.items() if k in own or not any(k.startswith(p) for p in ("image.", "text.", "aligner."))}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    skip_prefixes = tuple(f"{m}." for m in ("image", "text") if m not in modalities) + (("aligner.",) if len(modalities) < 2 else ())
    missing = [k for k in missing if not k.startswith(skip_prefixes)]
    if missing or unexpected:
        raise ModelLoadError(f"{run_dir / 'model.safetensors'}: weights do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    bad = [k for k, v in state.items() if k in own and v.shape != own[k].shape]
    if bad:
        raise ModelLoadError(f"{run_dir / 'model.safetensors'}: tensor shapes differ from the config for {bad[:3]}")
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    return model.to(device).eval(), meta
