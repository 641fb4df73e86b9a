"""Run directories, the saved form of a model: config, weights and metadata, reloaded identically.

This module reads and writes the files; :meth:`iterwego.model.IterWeGO.from_pretrained` builds the model.

Layout of ``RUN/``::

    config.json        the full typed config (Config.to_json)
    model.safetensors  orderers' and aligner's weights (frozen backbones are named in the config, not copied)
    meta.json          versions, backbone identities and sources, validation-chosen inference rounds, evaluations
    README.md          the model card (written by training, ``import-official`` and ``evaluate --update-card``)
    log.jsonl          training log (losses, learning rates, validation metrics)

Every file is written atomically (temporary file, then rename). A run is shared as a Hugging Face Hub model
repository holding the same files: :func:`resolve_run` turns a Hub id into a local snapshot directory, and
:func:`push_run` uploads a run directory.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from huggingface_hub import ModelCard, ModelHubMixin

from . import __version__
from .config import Config, InferenceConfig
from .errors import ConfigError, HubError, ModelLoadError
from .io import atomic_write_bytes, atomic_write_json

REQUIRED = ("config.json", "model.safetensors", "meta.json")


def versions() -> dict:
    import transformers

    return {"iterwego": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


def save_run(run_dir: str | Path, model, meta: dict, card: str | None = None) -> None:
    """Write config, weights and metadata of ``model`` into ``run_dir``, and the model card ``card`` if given.

    The inference rounds a model without them gets in ``meta`` (``chosen_rounds``, ``capture_time``) become its
    config's typed ``inference`` section, saved in ``config.json``.

    Backbones that live inside the run the model was loaded from (an imported official run) are copied along.
    """
    from safetensors.torch import save

    run_dir = Path(run_dir)
    if not model.cfg.inference.chosen():  # rounds handed over in meta (training, save_pretrained(meta=...))
        model.cfg.inference = InferenceConfig.from_meta(meta)
    _carry_backbones(model, run_dir)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write_bytes(run_dir / "model.safetensors", save(state, metadata={"format": "pt", "iterwego": __version__}))
    atomic_write_bytes(run_dir / "config.json", (model.cfg.to_json() + "\n").encode())
    encs = model.encoders()
    full = {**meta, "versions": versions(), "backbones": {k: e.identity for k, e in encs.items()}}
    # the spec names the tokenizer / image processor too (they live beside the backbone weights)
    full["tokenizers_and_processors"] = {k: e.spec for k, e in encs.items()}
    full["backbone_sources"] = {k: s for k, e in encs.items() if (s := backbone_source(e, run_dir)) is not None}
    atomic_write_json(run_dir / "meta.json", full)
    if card is not None:
        atomic_write_bytes(run_dir / "README.md", card.encode())


def read_card(run_dir: str | Path) -> str | None:
    """The run's model card (``README.md``) as text, or None."""
    path = Path(run_dir) / "README.md"
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


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
        cfg = Config.from_dict(cfg_d)
    except (ModelLoadError, ConfigError) as err:  # name the file: "config version 99 is not supported" alone does
        raise ModelLoadError(f"{run_dir / 'config.json'}: {err}") from None  # not say which run
    if not cfg.inference.chosen():  # saved by 0.1/0.2 (or save_pretrained(meta=...)): the rounds are in meta.json
        cfg.inference = InferenceConfig.from_meta(meta)
    return cfg, meta


def portable_identity(identity: str) -> str:
    """A backbone identity without the local directory's path (kept: its weights fingerprint), so runs can move."""
    return re.sub(r"^([a-z-]+):[^@]*@", r"\1:@", identity) if "@" in identity else identity


def _identity_parts(identity: str) -> tuple[str, str, str, str]:
    """``kind:name[@fingerprint]:preprocessing`` -> (kind, name, fingerprint, preprocessing)."""
    kind, _, rest = identity.partition(":")
    weights, _, tail = rest.partition(":")
    name, _, fp = weights.partition("@")
    return kind, name, fp, tail


def same_weights(trained: str, now: str, hub: str | None = None) -> bool:
    """Whether backbone identity ``now`` can stand for ``trained`` (``hub``: the Hub name the run records).

    The preprocessing must match. Weight fingerprints decide when both sides have one (a local directory,
    wherever it lies); otherwise a Hub name stands for its weights. A local copy given for a backbone the
    run knows only by Hub name cannot be checked and is trusted: the user pointed at it.
    """
    k1, n1, f1, t1 = _identity_parts(trained)
    k2, n2, f2, t2 = _identity_parts(now)
    if (k1, t1) != (k2, t2):
        return False
    if f1 and f2:
        return f1 == f2
    return bool(f2) or n2 in (n1, hub)


def check_backbones(run_dir: Path, encoders: dict, meta: dict) -> None:
    """Refuse a run whose backbones now resolve to other weights than those it was trained with."""
    sources = meta.get("backbone_sources") or {}
    for m, e in encoders.items():
        want = meta.get("backbones", {}).get(m)
        if want is not None and not same_weights(want, e.identity, (sources.get(m) or {}).get("hub")):
            raise ModelLoadError(
                f"{run_dir}: the {m} backbone now resolves to {e.identity!r} but the run was trained with {want!r}"
            )


# --------------------------------------------------------------------------- portable backbones
MINILM_HUB = "sentence-transformers/all-MiniLM-L6-v2"  # what the `minilm` spec's pip package ships
SPEC_FIELDS = {"image": ("encoder", "image"), "text": ("encoder", "text"), "align_image": ("aligner", "clip_model")}
BACKBONE_KEYS = {"image": "image", "text": "text", "aligner": "align_image"}  # from_pretrained(backbones=...) keys
_SNAPSHOT = re.compile(r"/models--([^/]+)/snapshots/([^/]+)")


def _cached_snapshot(name: str) -> Path | None:
    """The local Hugging Face cache snapshot a Hub name loads from (revision ``main``), if cached."""
    from huggingface_hub import try_to_load_from_cache

    try:
        hit = try_to_load_from_cache(name, "config.json")
    except (ValueError, OSError):
        return None
    return Path(hit).parent if isinstance(hit, str) else None


def backbone_source(encoder, run_dir: Path) -> dict | None:
    """Where a backbone's weights came from: Hub name and revision when known, and the local path loaded.

    A spec naming a Hub model records that name; a local directory inside a Hugging Face cache
    (``models--ORG--NAME/snapshots/REV``) records the name it caches; any other local directory records
    its path only. Backbones stored inside the run are recorded by their path in the run. None: no weights.
    """
    name = getattr(encoder.backbone, "name", None)
    if name is None:
        return None
    kind, _, spec_name = encoder.spec.partition(":")
    src = {"spec": encoder.spec, "hub": None, "revision": None, "local_path": None}
    if spec_name and not Path(spec_name).is_absolute() and (run_dir / spec_name).is_dir():
        return {**src, "local_path": spec_name, "in_run": True}
    path = Path(name)
    if path.is_dir():
        src["local_path"] = str(path.resolve())
        m = _SNAPSHOT.search(path.resolve().as_posix())
        if m:
            src["hub"], src["revision"] = m[1].replace("--", "/"), m[2]
    else:
        src["hub"] = name
        snap = _cached_snapshot(name)
        if snap is not None:
            src["local_path"], src["revision"] = str(snap), snap.name
    if kind == "minilm":
        src["hub"] = MINILM_HUB
    return src


def _carry_backbones(model, run_dir: Path) -> None:
    """Copy the backbones that live inside the model's source run into ``run_dir`` (relative specs keep working)."""
    source = getattr(model, "run_dir", None)
    if source is None or Path(source).resolve() == run_dir.resolve():
        return
    for e in model.encoders().values():
        name = e.spec.partition(":")[2]
        if name and not Path(name).is_absolute() and (Path(source) / name).is_dir():
            shutil.copytree(Path(source) / name, run_dir / name, dirs_exist_ok=True)


def backbone_overrides(cfg: Config, backbones: dict[str, str] | None) -> list[str]:
    """``{"image": DIR, "text": "bert:DIR", "aligner": DIR}`` as ``section.field=kind:DIR`` config overrides."""
    out = []
    for key, value in (backbones or {}).items():
        if key not in BACKBONE_KEYS:
            raise ModelLoadError(f"backbones: unknown key {key!r}; use one of {sorted(BACKBONE_KEYS)}")
        section, field = SPEC_FIELDS[BACKBONE_KEYS[key]]
        value = str(value)
        if ":" not in value:  # a bare directory keeps the recorded kind (clip / bert)
            current = getattr(getattr(cfg, section), field) or cfg.encoder.image
            value = f"{current.partition(':')[0]}:{value}"
        out.append(f"{section}.{field}={value}")
    return out


def _exists_here(name: str, run_dir: Path) -> bool:
    p = Path(name).expanduser()
    return p.exists() if p.is_absolute() else (run_dir / p).exists() or p.exists()


def portable_config(cfg: Config, meta: dict, run_dir: Path, keep: set[str] = frozenset()) -> Config:
    """Point each backbone at weights this machine has: the recorded local path if present, else its Hub name.

    ``keep``: ``section.field`` names overridden by the caller, used as given. Runs written before backbone
    sources were recorded load as they always did.

    Raises:
        ModelLoadError: a backbone's recorded directory is missing here and the run knows no Hub name for it.
    """
    sources = meta.get("backbone_sources") or {}
    for bank, (section, field) in SPEC_FIELDS.items():
        part, src = getattr(cfg, section), sources.get(bank)
        spec = getattr(part, field)
        kind, _, name = spec.partition(":")
        if f"{section}.{field}" in keep or not src or not name or src.get("spec") != spec:
            continue
        if src.get("in_run") or _exists_here(name, run_dir):
            continue
        if not src.get("hub"):
            key = next(k for k, b in BACKBONE_KEYS.items() if b == bank)
            raise ModelLoadError(
                f"{run_dir}: its {bank} backbone {name!r} is not on this machine and the run records no Hub name "
                f"for it; point at a copy with --set {section}.{field}={kind}:DIR (Python: backbones={{{key!r}: DIR}})"
            )
        setattr(part, field, f"{kind}:{src['hub']}")
    return cfg


def read_weights(run_dir: Path, own: dict, modalities: tuple[str, ...]) -> dict:
    """The saved tensors that the freshly built model (state dict ``own``) takes, after name and shape checks."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = run_dir / "model.safetensors"
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ModelLoadError(f"{path}: corrupt or unreadable weights ({err})") from None
    state = {k: v for k, v in state.items() if k in own or not k.startswith(("image.", "text.", "aligner.", "fuser."))}
    missing = [k for k in own if k not in state]
    if any(k.startswith("fuser.") for k in missing) and len(modalities) == 2:
        raise ModelLoadError(
            f"{path}: this run has no fused orderer (it was trained with fusion.method=sum); "
            "load it with --set fusion.method=sum"
        )
    unexpected = [k for k in state if k not in own]
    skip = tuple(f"{m}." for m in ("image", "text") if m not in modalities) + (
        ("aligner.", "fuser.") if len(modalities) < 2 else ()
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


def run_config(
    run_dir: Path, overrides: list[str] | None = None, backbones: dict | None = None, *, may_download: bool = False
) -> tuple[Config, dict]:
    """``(config, meta)`` of a run as it loads here: the caller's overrides applied, backbones made portable.

    ``may_download``: backbones named by Hub id may be downloaded (a run that itself came from the Hub).
    """
    cfg, meta = read_config(run_dir)
    extra = backbone_overrides(cfg, backbones) + list(overrides or [])
    cfg = portable_config(cfg.override(extra), meta, run_dir, keep={a.split("=", 1)[0].strip() for a in extra})
    if may_download:
        cfg.encoder.local_files_only = False
    return cfg, meta


# --------------------------------------------------------------------------- the Hugging Face Hub
FIRST_FILES = ["meta.json", "config.json"]  # fetched alone first: a repo that is not a run costs no download
NOT_PUSHED = ["train_state.pt", "tb/*", "tb/**", ".cache/**", "*.tmp"]  # resume state and TensorBoard stay local


def _hub_errors() -> tuple[type[BaseException], ...]:
    """What talking to the Hub raises: HTTP errors (HfHubHTTPError is an OSError too, as are cache misses and
    offline refusals), and ValueErrors for malformed ids. The HTTP library's own base class is taken from
    huggingface_hub, which has changed HTTP libraries before."""
    from huggingface_hub.errors import HfHubHTTPError

    http = [b for b in HfHubHTTPError.__mro__[1:] if b.__name__ == "HTTPError"]
    return (OSError, ValueError, *http[:1])


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [""])[0][:200]


def looks_local(name: str) -> bool:
    """A name that can only be a path (never sent to the Hub): absolute, ``./``, ``~``, or deeper than ORG/NAME."""
    return os.path.isabs(name) or name.startswith((".", "~")) or "\\" in name or name.count("/") > 1


def _hub_load_error(name: str, revision: str | None, err: BaseException) -> ModelLoadError:
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    rev = f" at revision {revision!r}" if revision else ""
    if isinstance(err, HFValidationError):
        why = "no such run directory, and not a valid Hugging Face Hub id (ORG/NAME)"
    elif isinstance(err, GatedRepoError):
        why = "a gated Hub repository: accept its terms on the Hub and set HF_TOKEN"
    elif isinstance(err, RepositoryNotFoundError):
        why = "no such run directory, and no such Hub repository (a private one needs HF_TOKEN or `hf auth login`)"
    elif isinstance(err, RevisionNotFoundError):
        why = f"the Hub repository has no revision {revision!r}"
    elif isinstance(err, LocalEntryNotFoundError):
        why = f"no such run directory, and not in the local Hugging Face cache{rev}" + (
            " (HF_HUB_OFFLINE is set, so nothing was downloaded)"
            if constants.is_offline_mode()
            else " (the Hub could not be reached)"
        )
    else:
        why = f"cannot fetch it from the Hugging Face Hub{rev} ({type(err).__name__}: {_first_line(err)})"
    return ModelLoadError(f"{name}: {why}")


def resolve_run(
    name: str | Path,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | Path | None = None,
    force_download: bool = False,
    local_files_only: bool = False,
) -> Path:
    """A run directory for ``name``: a local directory as it is, else a Hub id through ``snapshot_download``.

    The Hub path honours ``HF_HUB_OFFLINE`` and the local cache (``HF_HUB_CACHE``), ``revision`` and the token
    of the environment (``HF_TOKEN`` or ``hf auth login``) unless ``token`` is given. ``meta.json`` and
    ``config.json`` come first, so a repository that is not an iterwego run is refused before its weights are
    fetched; ``train_state.pt`` and TensorBoard logs are never fetched.

    Raises:
        ModelLoadError: (one line) no such directory or repository, not in the cache while offline, unknown
            revision, or a repository that is not an iterwego run.
    """
    local = Path(name).expanduser()
    if local.is_dir():
        return local
    if isinstance(name, Path) or looks_local(str(name)) or local.exists():  # a Path object is never a Hub id
        raise ModelLoadError(
            f"{name}: run directory not found (train one with `iterwego train --out {name}` or `iterwego demo`)"
        )
    from huggingface_hub import snapshot_download

    name = str(name)
    kw = dict(revision=revision, token=token, cache_dir=cache_dir, local_files_only=local_files_only)
    try:
        head = Path(snapshot_download(name, allow_patterns=FIRST_FILES, **kw))
        if not (head / "meta.json").is_file():
            raise ModelLoadError(
                f"{name}: this Hub repository is not an iterwego run (no meta.json beside config.json"
                f"{'' if (head / 'config.json').is_file() else ' and no config.json'}; {head} holds what was fetched)"
            )
        return Path(snapshot_download(name, ignore_patterns=NOT_PUSHED, force_download=force_download, **kw))
    except _hub_errors() as err:
        raise _hub_load_error(name, revision, err) from None


def push_run(
    run_dir: str | Path,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str | None = None,
) -> str:
    """Upload a run directory as the Hub model repository ``repo_id`` (created if missing); returns the commit URL.

    Everything in the run is uploaded except the resume state and TensorBoard logs (``NOT_PUSHED``).

    Raises:
        ModelLoadError: ``run_dir`` is not a complete run.
        HubError: (one line) not logged in, no permission, offline, or any other refusal by the Hub.
    """
    from huggingface_hub import HfApi, constants

    run_dir = Path(run_dir)
    read_config(run_dir)
    try:
        api = HfApi(token=token)
        repo = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        info = api.upload_folder(
            repo_id=repo,
            folder_path=run_dir,
            repo_type="model",
            commit_message=commit_message or f"Upload iterwego run {run_dir.resolve().name}",
            ignore_patterns=NOT_PUSHED,
        )
    except _hub_errors() as err:
        hint = " (HF_HUB_OFFLINE is set)" if constants.is_offline_mode() and "HF_HUB_OFFLINE" not in str(err) else ""
        if "401" in str(err) or "403" in str(err) or "token" in str(err).lower():
            hint = "; log in with `hf auth login` or set HF_TOKEN to a token with write access"
        raise HubError(f"{repo_id}: cannot push {run_dir} ({type(err).__name__}: {_first_line(err)}){hint}") from None
    return str(getattr(info, "commit_url", info))


class RunDirectoryMixin(ModelHubMixin):
    """Loading and saving a model as a run directory, locally or through the Hugging Face Hub.

    The model class provides ``_build_for_run(cfg, run_dir, modalities)`` (an untrained model for a run's
    config), ``cfg``, ``meta``, ``card_text`` and ``encoders()``; everything about the files lives here.
    """

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path,
        device="cpu",
        *,
        modalities: tuple[str, ...] = ("image", "text"),
        overrides: list[str] | None = None,
        backbones: dict[str, str] | None = None,
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir=None,
        force_download: bool = False,
        local_files_only: bool = False,
    ) -> "RunDirectoryMixin":
        """Rebuild a saved model (config, weights, backbones) from a run directory or a Hugging Face Hub id.

        A name that is not a local directory is fetched with ``snapshot_download`` (``revision``, ``token``,
        ``cache_dir``, ``HF_HUB_OFFLINE`` and the local cache apply; see :func:`iterwego.pretrained.resolve_run`).
        Each backbone loads from the local path the run recorded if it exists here, else by its recorded Hub
        name (which a run fetched from the Hub may download too, unless ``local_files_only``);
        ``backbones={"image": DIR, "text": DIR, "aligner": DIR}`` or ``overrides=["encoder.image=clip:DIR"]``
        point at local copies instead. ``model.meta`` holds the run's metadata, ``model.card_text`` its card.
        """
        hub = dict(revision=revision, token=token, cache_dir=cache_dir, local_files_only=local_files_only)
        run_dir = resolve_run(pretrained_model_name_or_path, force_download=force_download, **hub)
        from_hub = not Path(pretrained_model_name_or_path).expanduser().is_dir()
        return cls._load_run_dir(run_dir, device, modalities, overrides, backbones, from_hub and not local_files_only)

    @classmethod
    def _from_pretrained(cls, *, model_id: str, **kw) -> "RunDirectoryMixin":
        """The ``ModelHubMixin`` hook, for callers that go through it: the same as :meth:`from_pretrained`."""
        return cls.from_pretrained(model_id, **kw)

    @classmethod
    def _load_run_dir(
        cls, run_dir: Path, device, modalities, overrides, backbones, may_download
    ) -> "RunDirectoryMixin":
        cfg, meta = run_config(run_dir, overrides, backbones, may_download=may_download)
        model = cls._build_for_run(cfg, run_dir, modalities)
        check_backbones(run_dir, model.encoders(), meta)
        model.load_state_dict(read_weights(run_dir, model.state_dict(), modalities), strict=False)
        model.meta, model.run_dir, model.card_text = meta, run_dir, read_card(run_dir)
        return model.to(device).eval()

    def save_pretrained(
        self,
        save_directory,
        meta: dict | None = None,
        *,
        config=None,
        model_card_kwargs: dict | None = None,
        push_to_hub: bool = False,
        repo_id: str | None = None,
        **push_to_hub_kwargs,
    ):
        """Write config, weights (safetensors), metadata and the model card into ``save_directory``.

        ``meta`` is merged over ``model.meta``. The ``ModelHubMixin`` contract otherwise (``push_to_hub=True,
        repo_id=...``), except that every file is replaced atomically (the mixin first deletes ``config.json``)
        and ``config`` is ignored: the config is ``model.cfg``. A model without a card gets the mixin's.
        """
        save_directory = Path(save_directory)
        save_run(save_directory, self, {**self.meta, **(meta or {})}, self.card_text)
        if not (save_directory / "README.md").exists():
            card = self.generate_model_card(**(model_card_kwargs or {}))
            atomic_write_bytes(save_directory / "README.md", str(card).encode())
        if push_to_hub:
            repo_id = repo_id or save_directory.name
            return self.push_to_hub(repo_id, model_card_kwargs=model_card_kwargs, **push_to_hub_kwargs)
        return None

    def _save_pretrained(self, save_directory: Path) -> None:
        save_run(save_directory, self, self.meta, self.card_text)

    def generate_model_card(self, *args, **kwargs) -> ModelCard:
        """The run's own card when it has one (``iterwego train`` and ``import-official`` write it)."""
        if self.card_text:
            return ModelCard(self.card_text, ignore_metadata_errors=True)
        return super().generate_model_card(*args, **kwargs)
