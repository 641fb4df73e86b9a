"""Typed configs and the named presets (``tiny``, ``paper``, ``paper+``).

Every field carries a comment; ``Config.override(["train.epochs=3", ...])``
applies dotted ``key=value`` overrides from the CLI, parsed as JSON where
possible so numbers, booleans and null work.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

CONFIG_VERSION = 1  # bump when a saved run can no longer be rebuilt from its config


@dataclass
class EncoderConfig:
    image: str = "cnn"  # "cnn" | "clip:<hf-name-or-local-dir>"
    text: str = "minilm"  # "minilm" | "bert:<hf-name-or-local-dir>" | "tokens"
    image_size: int = 64  # side the image is resized to (cnn); CLIP uses its own processor size
    cnn_width: int = 32  # channels of the first conv layer of the cnn encoder (doubles twice)
    cnn_stem_stride: int = (
        2  # stride of the cnn's first conv (4: an 8x8 stem that reads 2x larger images at the same cost)
    )
    text_max_length: int = 40  # tokens per sentence; longer sentences are truncated and counted
    text_train_layers: int = 0  # top transformer layers of the text backbone that train (paper: 2)
    image_train_projection: bool = True  # CLIP: train the visual projection (the only trainable part by default)
    local_files_only: bool = True  # never reach the network for weights; point names at local dirs instead
    official_text_pooling: bool = False  # authors' numerics: mean over ALL token positions, padding included
    feature_dtype: str = "float16"  # stored backbone features: "float16" | "bfloat16" | "float32" (pixels: uint8)


@dataclass
class OrdererConfig:
    d_model: int = 128  # width of the set transformer; item features are projected to it if they differ
    layers: int = 2  # set-transformer layers (post-norm, no positional encoding)
    heads: int = 4  # attention heads
    ffn: int = 256  # hidden width of the feed-forward block
    dropout: float = 0.1  # dropout in the set transformer's attention, FFN and residuals
    pair_dropout: float | None = None  # dropout in the pair classifier (authors: 0.1); None: the same as dropout
    input_dropout: float = 0.0  # dropout on the item features before the set transformer
    # a rank head also predicts each item's position from its state; decoders add rank_weight times its
    # log-probabilities (pair sums alone cannot spread items whose cue is hidden over the gaps); trained last
    rank_head: bool = False
    rank_weight: float = 3.0  # weight of the position terms in decoding (chosen on both synthetic families' val)
    rank_positions: int = 16  # positions the rank head predicts; longer stories are decoded from pairs alone


@dataclass
class AlignerConfig:
    kind: str = "learned"  # "learned" (InfoNCE heads, trained here) | "clip" (zero-shot CLIP similarity)
    clip_model: str = ""  # kind "clip": clip:<hf-name-or-dir>; empty = the image encoder's CLIP
    dim: int = 64  # joint embedding width of the learned heads
    mapping: str = "hungarian"  # "argmax" per row (paper) | "hungarian" one-to-one within the story
    epochs: int = 15  # training epochs of the learned aligner
    lr: float = 2e-3  # learning rate of the learned aligner
    temperature: float = 0.07  # initial InfoNCE temperature (learned)
    clip_text_max_length: int = 0  # kind "clip": tokens per sentence for CLIP's text tower (authors: 40); 0: CLIP's own


@dataclass
class GuidanceConfig:
    threshold_t2i: float = 0.8  # theta in training: text pairs more confident than this guide image pairs
    threshold_i2t: float = 0.9  # theta in training: image pairs more confident than this guide text pairs
    eval_threshold_t2i: float | None = None  # theta text -> image at inference; None: threshold_t2i
    eval_threshold_i2t: float | None = None  # theta image -> text at inference (authors: 0.8); None: threshold_i2t
    weight_t2i: float = 1.0  # lambda for text -> image
    weight_i2t: float = 0.25  # lambda for image -> text
    train_rule: str = "class0"  # selection rule in training: "class0" (authors) | "any"
    eval_rule: str = "any"  # selection rule at inference
    train_source_dropout: bool = False  # the guiding orderer runs in train mode (dropout on) in a guided phase
    max_rounds: int = 3  # inference rounds evaluated; the best on validation is chosen per modality

    def inference_thresholds(self) -> tuple[float, float]:
        """``(text -> image, image -> text)`` thresholds used at inference."""
        t2i = self.threshold_t2i if self.eval_threshold_t2i is None else self.eval_threshold_t2i
        i2t = self.threshold_i2t if self.eval_threshold_i2t is None else self.eval_threshold_i2t
        return t2i, i2t


@dataclass
class FusionConfig:
    # "sum": each aligned pair's round-0 log-odds of both orderers summed (iterwego 0.1/0.2's fused decoding);
    # "orderer": a set transformer over the aligned (image, sentence) items, trained after the iterative stage
    method: str = "sum"
    epochs: int = 30  # training epochs of the fused orderer (method "orderer"); early stopping as train.early_stop
    lr: float = 1e-3  # its learning rate (Adam, cosine decay as train.cosine)


FUSION_METHODS = ("sum", "orderer")


@dataclass
class TrainConfig:
    seed: int = 0  # seeds python, numpy and torch; shuffles are drawn from it
    batch_size: int = 16  # stories per optimiser step
    eval_batch_size: int = (
        64  # stories per forward in validation/evaluation (split across processes when data parallel)
    )
    lr: float = 1e-3  # base learning rate (Adam)
    weight_decay: float = 1e-5  # Adam weight decay
    backbone_lr_mult: float = 0.1  # trainable backbone parts (CLIP projection, top BERT layers) learn at lr * this
    head_lr_mult: float = 1.0  # set transformer and pair head learn at lr * this (paper: 0.5)
    unimodal_epochs: int = 20  # round-0 pre-training epochs of each orderer alone
    iterative_epochs: int = 4  # epochs of alternating guided training (image phase, then text phase)
    early_stop: int = 5  # stop a stage after this many epochs without validation improvement (0: never)
    grad_clip: float = 1.0  # max gradient norm (0: off)
    cosine: bool = True  # cosine learning-rate decay within each stage (to 5% of the base rate); false: constant
    loss_average: str = "pair"  # "pair": mean over all pairs of a batch | "story": mean of each story's mean (authors)
    select: str = "pmr"  # iterative-stage model selection on validation, see SELECTIONS
    decoder: str = "exact"  # decoder of validation metrics, and of `evaluate` / `order` on this run unless given
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N"
    amp: str = "auto"  # mixed precision of the orderers: "auto" (bf16 autocast on CUDA, off on CPU) | "bf16" | "off"
    compile: bool = False  # torch.compile the orderers and aligner in place (state-dict keys unchanged)
    num_threads: int = 0  # torch CPU threads (0: torch default)


@dataclass
class InferenceConfig:
    """How a trained run orders: the guidance rounds chosen on validation at the end of training.

    The decoder (``train.decoder``) and the position terms' weight (``orderer.rank_weight``) keep their homes;
    ``iterwego.result.Inference`` gathers all four. Runs saved by 0.1/0.2 kept the rounds in ``meta.json``
    (``InferenceConfig.from_meta``).
    """

    image_rounds: int | None = None  # guidance rounds of the guided image order; None: not chosen (evaluate: on val)
    text_rounds: int | None = None  # guidance rounds of the guided sentence order; None: not chosen
    capture_image_rounds: int | None = None  # image rounds chosen on val with capture times; None: image_rounds

    @classmethod
    def from_meta(cls, meta: dict) -> "InferenceConfig":
        """The section of a run saved before it existed, from its ``meta.json`` (``chosen_rounds``,
        ``capture_time.chosen_rounds``)."""
        chosen = meta.get("chosen_rounds") or {}
        timed = (meta.get("capture_time") or {}).get("chosen_rounds") or {}
        return cls(chosen.get("image"), chosen.get("text"), timed.get("image"))

    def chosen(self) -> bool:
        """Whether validation chose the rounds (training does; an imported checkpoint has not)."""
        return self.image_rounds is not None or self.text_rounds is not None


@dataclass
class Config:
    preset: str = "tiny"  # the preset this config started from
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    orderer: OrdererConfig = field(default_factory=OrdererConfig)
    aligner: AlignerConfig = field(default_factory=AlignerConfig)
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)  # runs saved before it existed: "sum"
    # the inference rounds chosen on validation; runs saved before it existed: from meta.json (pretrained.read_config)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    version: int = CONFIG_VERSION  # format of this config; a run with another version refuses to load

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        from .errors import ModelLoadError

        if d.get("version") != CONFIG_VERSION:
            raise ModelLoadError(
                f"config version {d.get('version')!r} is not supported by this iterwego (expects {CONFIG_VERSION}); "
                "retrain or use the iterwego version that wrote it"
            )
        kw: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in d:
                continue
            v = d[f.name]
            sub = _SECTIONS.get(f.name)
            if sub is not None:
                known = {x.name for x in fields(sub)}
                unknown = set(v) - known
                if unknown:
                    raise ModelLoadError(
                        f"config section {f.name!r} has unknown keys {sorted(unknown)}: "
                        "written by another iterwego version?"
                    )
                if f.name == "encoder" and "feature_dtype" not in v:
                    v = {**v, "feature_dtype": "float32"}  # written before the feature store: float32 features
                v = sub(**v)
            kw[f.name] = v
        return cls(**kw)

    def override(self, assignments: list[str] | None) -> "Config":
        """Return a copy with dotted ``section.key=value`` assignments applied.

        Raises:
            ConfigError: (a ``ValueError``) malformed assignment, unknown section or field, or a value
                of the wrong type -- caught here rather than as a TypeError deep inside training.
        """
        from .errors import ConfigError

        cfg = Config.from_dict(json.loads(self.to_json()))
        for a in assignments or []:
            if "=" not in a:
                raise ConfigError(f"override {a!r} is not of the form section.key=value")
            key, raw = a.split("=", 1)
            parts = key.strip().split(".")
            if len(parts) != 2 or parts[0] not in _SECTIONS:
                raise ConfigError(f"override key {key!r} must be one of {sorted(_SECTIONS)} followed by .field")
            section = getattr(cfg, parts[0])
            names = {x.name: x for x in fields(section)}
            if parts[1] not in names:
                raise ConfigError(
                    f"override {key.strip()!r}: {parts[0]} has no field {parts[1]!r}; fields: {sorted(names)}"
                )
            try:
                value = json.loads(raw)
            except json.JSONDecodeError:
                value = raw
            current = getattr(section, parts[1])
            is_int = isinstance(value, int) and not isinstance(value, bool)
            if value is None and "None" in str(names[parts[1]].type):  # an optional field set back to its default
                setattr(section, parts[1], None)
                continue
            if current is None and str(names[parts[1]].type).startswith("float"):
                current = 0.0  # checked as a number below
            if isinstance(current, bool) and not isinstance(value, bool):
                raise ConfigError(f"{key} expects true/false, got {raw!r}")
            if isinstance(current, float) and is_int:
                value = float(value)
            elif isinstance(current, int) and not isinstance(current, bool) and not is_int:
                raise ConfigError(f"{key} expects an integer, got {raw!r}")
            elif isinstance(current, float) and not isinstance(value, float):
                raise ConfigError(f"{key} expects a number, got {raw!r}")
            elif isinstance(current, str) and not isinstance(value, str):
                value = raw  # e.g. a name that happens to parse as JSON: strings are taken as written
            setattr(section, parts[1], value)
        return cfg


_SECTIONS = {
    "encoder": EncoderConfig,
    "orderer": OrdererConfig,
    "aligner": AlignerConfig,
    "guidance": GuidanceConfig,
    "train": TrainConfig,
    "fusion": FusionConfig,
    "inference": InferenceConfig,
}


SELECTIONS = {
    "pmr": "mean PMR of each modality's validation-chosen round; the models before guided training are a candidate",
    "pairwise": "the authors': mean over stories of the image and text pairwise accuracy after one guided round "
    "at the training thresholds and rule; the models before guided training are not a candidate",
}
LOSS_AVERAGES = ("pair", "story")


def preset(name: str) -> Config:
    """The named presets.

    ``tiny``: a from-scratch CNN for images and frozen all-MiniLM-L6-v2 for
    sentences, sized to train on 2 CPU cores in a few minutes.

    ``paper``: the authors' recipe, row by row as ``docs/fidelity.md`` lists it:
    CLIP ViT-L/14 (visual projection trains) + bert-base-uncased (top 2 layers
    train, mean over all token positions, padded per story), a 2-layer / 4-head
    / FFN-512 set transformer with dropout 0.2 and a pair classifier with dropout
    0.1, the frozen zero-shot CLIP aligner with argmax mapping, theta 0.8 / 0.9 in
    training (class-0 rule) and 0.8 / 0.8 at inference (either class), lambda
    1 / 0.25, Adam at 2e-4 (backbone parts 0.1x, set transformer and classifier
    0.5x), batch 64, constant rate, no clipping, 5 guided epochs, the best epoch
    by the authors' validation criterion, tsort decoding.

    ``paper+``: ``paper`` with this project's changes, each a row of
    ``docs/fidelity.md``: the learned InfoNCE aligner with one-to-one
    (Hungarian) mapping, cosine decay, clipping at 1.0, early stopping, model
    selection by validation PMR of the validation-chosen rounds, exact decoding.
    """
    if name == "tiny":
        # sized on the synthetic data: 32-px CNN input, a narrow set transformer with strong dropout
        # (it memorises story identities otherwise), symmetric guidance since both modalities are equally reliable
        return Config(
            preset="tiny",
            # float32 store: pooled 384-d sentence vectors are small (1.5 KB each), and the demo's table stays that
            # of float32 features (float16 moves its PMRs by 0.3 to 1.6 points, both ways)
            encoder=EncoderConfig(image="cnn", text="minilm", image_size=32, feature_dtype="float32"),
            orderer=OrdererConfig(d_model=96, layers=2, heads=4, ffn=256, dropout=0.25, rank_head=True),
            aligner=AlignerConfig(kind="learned", dim=64, mapping="hungarian", epochs=8),
            guidance=GuidanceConfig(threshold_t2i=0.8, threshold_i2t=0.8, weight_t2i=1.0, weight_i2t=1.0),
            train=TrainConfig(unimodal_epochs=15, iterative_epochs=3, early_stop=5),
            fusion=FusionConfig(method="orderer"),
        )
    if name == "paper":
        return _paper()
    if name == "paper+":
        cfg = _paper()
        cfg.preset = "paper+"
        a = cfg.aligner
        a.kind, a.mapping, a.dim, a.epochs, a.lr = "learned", "hungarian", 256, 5, 1e-3
        t = cfg.train
        t.cosine, t.grad_clip, t.early_stop, t.select, t.decoder = True, 1.0, 2, "pmr", "exact"
        cfg.fusion.method, cfg.orderer.rank_head = "orderer", True
        return cfg
    raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")


def _paper() -> Config:
    # every value is a row of docs/fidelity.md (tests/test_fidelity.py checks them against that table)
    return Config(
        preset="paper",
        encoder=EncoderConfig(
            image="clip:openai/clip-vit-large-patch14",
            text="bert:bert-base-uncased",
            image_size=224,
            text_max_length=40,
            text_train_layers=2,
            image_train_projection=True,
            official_text_pooling=True,
        ),
        orderer=OrdererConfig(
            d_model=768, layers=2, heads=4, ffn=512, dropout=0.2, pair_dropout=0.1, input_dropout=0.0
        ),
        aligner=AlignerConfig(kind="clip", clip_model="", mapping="argmax", clip_text_max_length=40),
        guidance=GuidanceConfig(
            threshold_t2i=0.8,
            threshold_i2t=0.9,
            eval_threshold_t2i=0.8,
            eval_threshold_i2t=0.8,
            weight_t2i=1.0,
            weight_i2t=0.25,
            train_rule="class0",
            eval_rule="any",
            train_source_dropout=True,
            max_rounds=3,
        ),
        train=TrainConfig(
            batch_size=64,
            lr=2e-4,
            weight_decay=1e-5,
            backbone_lr_mult=0.1,
            head_lr_mult=0.5,
            unimodal_epochs=5,
            iterative_epochs=5,
            early_stop=0,
            grad_clip=0.0,
            cosine=False,
            loss_average="story",
            select="pairwise",
            decoder="tsort",
        ),
    )


PRESETS = ("tiny", "paper", "paper+")
