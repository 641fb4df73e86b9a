"""The IterWeGO model: two unimodal orderers and an aligner.

An orderer is a head over frozen backbone features, a set transformer with
no positional encoding (so the input order carries no information), and a
pair classifier over [h_i; h_j] for every ordered pair at once. Parameter
names of the set transformer and pair head follow the authors' checkpoint
(``encoder.layers.L.self_attn.linears.K``, ``classifier.linear`` ...), so
importing it is a key rename, not a translation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import AlignerConfig, Config, OrdererConfig
from .encoders import Encoder


class SelfAttention(nn.Module):
    def __init__(self, d: int, heads: int, dropout: float):
        super().__init__()
        if d % heads:
            raise ValueError(f"d_model={d} is not divisible by heads={heads}")
        self.heads, self.dropout = heads, dropout
        self.linears = nn.ModuleList(nn.Linear(d, d) for _ in range(4))  # q, k, v, out

    def forward(self, x: Tensor, valid: Tensor) -> Tensor:
        B, n, d = x.shape
        q, k, v = (lin(x).view(B, n, self.heads, d // self.heads).transpose(1, 2) for lin in self.linears[:3])
        # Padding keys are excluded; a padding query still sees the real keys, so no row is all -inf.
        mask = valid[:, None, None, :]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        return self.linears[3](y.transpose(1, 2).reshape(B, n, d))


class FeedForward(nn.Module):
    def __init__(self, d: int, hidden: int, dropout: float):
        super().__init__()
        self.w_1, self.w_2, self.drop = nn.Linear(d, hidden), nn.Linear(hidden, d), nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.w_2(self.drop(F.relu(self.w_1(x))))


class Residual(nn.Module):
    """Post-norm residual, x = LayerNorm(x + dropout(f(x))), as in the paper's encoder."""

    def __init__(self, d: int, dropout: float):
        super().__init__()
        self.norm, self.drop = nn.LayerNorm(d), nn.Dropout(dropout)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return self.norm(x + self.drop(y))


class SetLayer(nn.Module):
    def __init__(self, cfg: OrdererConfig):
        super().__init__()
        self.self_attn = SelfAttention(cfg.d_model, cfg.heads, cfg.dropout)
        self.feed_forward = FeedForward(cfg.d_model, cfg.ffn, cfg.dropout)
        self.sublayer = nn.ModuleList(Residual(cfg.d_model, cfg.dropout) for _ in range(2))

    def forward(self, x: Tensor, valid: Tensor) -> Tensor:
        x = self.sublayer[0](x, self.self_attn(x, valid))
        return self.sublayer[1](x, self.feed_forward(x))


class SetTransformer(nn.Module):
    def __init__(self, cfg: OrdererConfig):
        super().__init__()
        self.layers = nn.ModuleList(SetLayer(cfg) for _ in range(cfg.layers))

    def forward(self, x: Tensor, valid: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x, valid)
        return x


class PairHead(nn.Module):
    """Linear(2d -> d) -> tanh -> Linear(d -> 2) on [h_i; h_j], for all pairs by broadcasting.

    The first linear splits into the h_i and h_j halves, so the n^2 pair
    inputs are never materialised: cost O(n d^2 + n^2 d) instead of O(n^2 d^2).
    """

    def __init__(self, d: int, dropout: float):
        super().__init__()
        self.linear, self.classifier, self.drop = nn.Linear(2 * d, d), nn.Linear(d, 2), nn.Dropout(dropout)

    def forward(self, h: Tensor) -> Tensor:
        d = h.shape[-1]
        w = self.linear.weight
        left = h @ w[:, :d].T + self.linear.bias
        right = h @ w[:, d:].T
        return self.classifier(torch.tanh(self.drop(left[:, :, None, :] + right[:, None, :, :])))


def autocast(device: torch.device | str, mode: str = "auto"):
    """bf16 autocast on CUDA ("auto"/"bf16"); a no-op on CPU under "auto" and everywhere under "off"."""
    device = torch.device(device)
    if mode not in ("auto", "bf16", "off"):
        raise ValueError(f"train.amp must be 'auto', 'bf16' or 'off', got {mode!r}")
    on = mode == "bf16" or (mode == "auto" and device.type == "cuda")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=on)


def scatter_items(feats: Tensor, index: Tensor) -> Tensor:
    """Place per-item rows ``(N, d)`` into a padded ``(B, n, d)`` batch; ``index`` is ``(B, n)``, -1 for padding."""
    B, n = index.shape
    out = feats.new_zeros(B * n, feats.shape[-1])
    flat = index.reshape(-1)
    out[flat >= 0] = feats[flat[flat >= 0]]
    return out.view(B, n, -1)


class Orderer(nn.Module):
    """One modality's orderer: head -> (projection) -> set transformer -> pair head."""

    def __init__(self, encoder: Encoder, cfg: OrdererConfig):
        super().__init__()
        self.head = encoder.new_head()
        d = cfg.d_model
        self.proj = nn.Identity() if encoder.out_dim == d else nn.Linear(encoder.out_dim, d)
        self.input_drop = nn.Dropout(cfg.input_dropout)
        self.encoder = SetTransformer(cfg)
        self.classifier = PairHead(d, cfg.dropout)

    def item_vectors(self, feats: Tensor) -> Tensor:
        return self.proj(self.head(feats))

    def forward(self, feats: Tensor, index: Tensor) -> Tensor:
        """Pair logits ``(B, n, n, 2)`` (class 1: i before j) for the items ``index`` points at."""
        valid = index >= 0
        h = self.encoder(self.input_drop(scatter_items(self.item_vectors(feats), index)), valid)
        return self.classifier(h)


def pair_loss(logits: Tensor, positions: Tensor, valid: Tensor, reduction: str = "mean") -> Tensor:
    """Cross-entropy over valid off-diagonal pairs; the label of (i, j) is "i before j" (class 1)."""
    labels = (positions[:, :, None] < positions[:, None, :]).long()
    n = positions.shape[1]
    keep = valid[:, :, None] & valid[:, None, :] & ~torch.eye(n, dtype=torch.bool, device=valid.device)
    return F.cross_entropy(logits[keep].float(), labels[keep], reduction=reduction)


def n_pairs(valid: Tensor) -> int:
    """Ordered off-diagonal pairs in a padded batch."""
    k = valid.sum(1)
    return int((k * (k - 1)).sum())


class LearnedAligner(nn.Module):
    """Projection heads over each modality's backbone features, trained with symmetric InfoNCE."""

    def __init__(self, image_encoder: Encoder, text_encoder: Encoder, cfg: AlignerConfig):
        super().__init__()
        self.image_head, self.text_head = image_encoder.new_head(), text_encoder.new_head()
        self.image_proj = nn.Sequential(nn.Linear(image_encoder.out_dim, cfg.dim), nn.ReLU(), nn.Linear(cfg.dim, cfg.dim))
        self.text_proj = nn.Sequential(nn.Linear(text_encoder.out_dim, cfg.dim), nn.ReLU(), nn.Linear(cfg.dim, cfg.dim))
        self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.temperature)))

    def embed_images(self, feats: Tensor) -> Tensor:
        return F.normalize(self.image_proj(self.image_head(feats)), dim=-1)

    def embed_texts(self, feats: Tensor) -> Tensor:
        return F.normalize(self.text_proj(self.text_head(feats)), dim=-1)

    def loss(self, image_feats: Tensor, text_feats: Tensor) -> Tensor:
        """Symmetric InfoNCE over matched rows (row k of each modality is one item)."""
        logits = self.log_scale.exp().clamp(max=100) * self.embed_images(image_feats) @ self.embed_texts(text_feats).T
        target = torch.arange(len(logits), device=logits.device)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2

    def scores(self, image_feats: Tensor, text_feats: Tensor, img_index: Tensor, txt_index: Tensor) -> Tensor:
        """Within-story image x sentence scores ``(B, n_img, n_txt)``."""
        ei = scatter_items(self.embed_images(image_feats), img_index)
        et = scatter_items(self.embed_texts(text_feats), txt_index)
        return ei @ et.transpose(1, 2)


class CLIPAligner(nn.Module):
    """Zero-shot CLIP similarity; features are CLIP's normalised image and text embeddings."""

    def __init__(self, logit_scale: float = 100.0):
        super().__init__()
        self.register_buffer("logit_scale", torch.tensor(float(logit_scale)))

    def scores(self, image_feats: Tensor, text_feats: Tensor, img_index: Tensor, txt_index: Tensor) -> Tensor:
        ei, et = scatter_items(image_feats, img_index), scatter_items(text_feats, txt_index)
        return self.logit_scale * ei @ et.transpose(1, 2)


class IterWeGO(nn.Module):
    """Image orderer, text orderer and aligner; the encoders' frozen backbones live outside the state dict."""

    def __init__(self, cfg: Config, image_encoder: Encoder | None, text_encoder: Encoder | None, align_encoders: tuple[Encoder, Encoder] | None = None):
        super().__init__()
        self.cfg = cfg
        self.image_encoder, self.text_encoder = image_encoder, text_encoder
        self.image = Orderer(image_encoder, cfg.orderer) if image_encoder is not None else None
        self.text = Orderer(text_encoder, cfg.orderer) if text_encoder is not None else None
        self.align_encoders = align_encoders
        if image_encoder is None or text_encoder is None:
            self.aligner = None
        elif cfg.aligner.kind == "learned":
            self.aligner = LearnedAligner(image_encoder, text_encoder, cfg.aligner)
        elif cfg.aligner.kind == "clip":
            if align_encoders is None:
                raise ValueError("aligner kind 'clip' needs CLIP image/text embedding encoders")
            self.aligner = CLIPAligner()
        else:
            raise ValueError(f"unknown aligner kind {cfg.aligner.kind!r}; choose 'learned' or 'clip'")

    @classmethod
    def from_pretrained(cls, run_dir, device="cpu") -> "IterWeGO":
        """Rebuild a saved model (config, weights, backbones) from a run directory; see :mod:`iterwego.run`."""
        from .run import load_run

        model, meta = load_run(run_dir, device)
        model.meta = meta
        return model

    def save_pretrained(self, run_dir, meta: dict | None = None) -> None:
        """Write config, weights (safetensors) and metadata atomically into ``run_dir``."""
        from .run import save_run

        save_run(run_dir, self, {**getattr(self, "meta", {}), **(meta or {})})

    def encoders(self) -> dict:
        """Every backbone the model reads features from, by feature-bank name."""
        out = {"image": self.image_encoder, "text": self.text_encoder}
        if self.align_encoders is not None:
            out["align_image"], out["align_text"] = self.align_encoders
        return {k: v for k, v in out.items() if v is not None}

    def orderer(self, modality: str) -> Orderer:
        o = self.image if modality == "image" else self.text
        if o is None:
            raise ValueError(f"this model has no {modality} orderer")
        return o


def create_model(cfg: Config | str, *, base_dir=None, modalities: tuple[str, ...] = ("image", "text"), preloaded: dict | None = None) -> IterWeGO:
    """Build an untrained model from a config or a preset name (``"tiny"``, ``"paper"``).

    Backbone weights are loaded from the names or local directories in the
    config (relative paths resolve against ``base_dir``); nothing is downloaded
    unless ``encoder.local_files_only`` is false.
    """
    from .config import preset
    from .encoders import build_align_encoders, build_encoder

    if isinstance(cfg, str):
        cfg = preset(cfg)
    enc = {m: build_encoder(m, cfg.encoder, cfg.orderer.d_model, base_dir=base_dir, preloaded=preloaded) if m in modalities else None for m in ("image", "text")}
    align = None
    if enc["image"] is not None and enc["text"] is not None and cfg.aligner.kind == "clip":
        spec = cfg.aligner.clip_model or (cfg.encoder.image if cfg.encoder.image.startswith("clip:") else "")
        align = build_align_encoders(spec, cfg.encoder, base_dir=base_dir, preloaded=preloaded)
    return IterWeGO(cfg, enc["image"], enc["text"], align)
