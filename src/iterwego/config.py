"""Typed configs and the named presets (``tiny``, ``paper``, ``paper+``).

Every field is declared with :func:`setting`: its default, one line on what it does, and what it allows (a tuple
of ``choices``, the ``forms`` a backbone spec may take, or an :class:`Interval`). :meth:`Config.validate` checks
them all whenever a config is built, loaded (``from_dict``) or overridden (``override``), so a typo is refused
before any work starts, as one line naming the key, the value and what is allowed. ``Config.override(
["train.epochs=3", ...])`` applies dotted ``key=value`` overrides from the CLI, parsed as JSON where possible so
numbers, booleans and null work. :func:`reference_markdown` renders the same declarations as ``docs/config.md``
(``python -m iterwego.config > docs/config.md``).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

from .errors import ConfigError, ModelLoadError

CONFIG_VERSION = 1  # bump when a saved run can no longer be rebuilt from its config
PRESETS = ("tiny", "paper", "paper+")

# ---------------------------------------------------------------- allowed values, one home each
DECODERS = ("exact", "tsort", "beam", "auto")  # iterwego.decode.decode's methods
MAPPINGS = ("argmax", "hungarian")  # the aligner's mappings of images to sentences within a story
GUIDANCE_RULES = ("any", "class0", "class1")  # which confident source pairs guide (iterwego.guidance.select_pairs)
ALIGNER_KINDS = ("learned", "clip")
FUSION_METHODS = ("sum", "orderer")
FUSED_SENTENCES = ("carried", "decoded")  # how the fused order reaches the sentences (iterwego.fusion)
FEATURE_DTYPES = ("float16", "bfloat16", "float32")  # iterwego.data.store.STORAGE maps each to its torch dtype
AMP_MODES = ("auto", "bf16", "off")
LOSS_AVERAGES = ("pair", "story")
SELECTIONS = {
    "pmr": "mean PMR of each modality's validation-chosen round; the models before guided training are a candidate",
    "pairwise": "the authors': mean over stories of the image and text pairwise accuracy after one guided round "
    "at the training thresholds and rule; the models before guided training are not a candidate",
}
# backbone specs: "<...>" stands for a non-empty name ("<N>": digits)
IMAGE_SPECS = ("cnn", "clip:<hf-name-or-dir>")
TEXT_SPECS = ("minilm", "bert:<hf-name-or-dir>")
ALIGN_SPECS = ("", "clip:<hf-name-or-dir>")
DEVICES = ("auto", "cpu", "cuda", "cuda:<N>")


@dataclass(frozen=True)
class Interval:
    """The numbers a field allows: from ``lo`` to ``hi``, each end closed unless marked open (infinity: open)."""

    lo: float
    hi: float = math.inf
    lo_open: bool = False
    hi_open: bool = False

    def __contains__(self, x: float) -> bool:  # NaN is in no interval: every comparison with it is false
        above = self.lo < x if self.lo_open else self.lo <= x
        below = x < self.hi if self.hi_open or self.hi == math.inf else x <= self.hi
        return above and below

    def __str__(self) -> str:
        if self.hi == math.inf:
            return f"{'>' if self.lo_open else '>='} {self.lo:g}"
        return f"in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"


PROBABILITY = Interval(0, 1)  # thresholds on a probability
DROPOUT = Interval(0, 1, hi_open=True)  # a dropout of 1 drops everything
POSITIVE = Interval(0, lo_open=True)  # rates, temperatures
NON_NEGATIVE = Interval(0)  # epochs, weights, multipliers, clipping (0: off)
AT_LEAST_ONE = Interval(1)  # sizes and counts


def setting(default: Any, help: str, *, choices=None, forms=None, within: Interval | None = None) -> Any:
    """A config field: its default, what it does (``help``), and what it allows, checked by ``Config.validate``."""
    return field(default=default, metadata={"help": help, "choices": choices, "forms": forms, "within": within})


def section(factory, help: str) -> Any:
    return field(default_factory=factory, metadata={"help": help})


class Section:
    """A config section (a dataclass of settings): checked when built, and again by :meth:`Config.validate`."""

    key: ClassVar[str]  # the section's name in Config and in --set section.field=value

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> Any:
        """Check every field against what it allows; returns the section.

        Raises:
            ConfigError: (a ``ValueError``) one line naming the first bad key, its value and what is allowed.
        """
        _check_section(self.key, self)
        return self


@dataclass
class EncoderConfig(Section):
    key: ClassVar[str] = "encoder"
    image: str = setting("cnn", "image backbone: the small cnn trained here, or a CLIP model", forms=IMAGE_SPECS)
    text: str = setting("minilm", "text backbone: frozen all-MiniLM-L6-v2, or a BERT model", forms=TEXT_SPECS)
    image_size: int = setting(
        64, "side the image is resized to (cnn); CLIP uses its own processor size", within=AT_LEAST_ONE
    )
    cnn_width: int = setting(
        32, "channels of the first conv layer of the cnn encoder (doubles twice)", within=AT_LEAST_ONE
    )
    cnn_stem_stride: int = setting(
        2,
        "stride of the cnn's first conv (4: an 8x8 stem that reads 2x larger images at the same cost)",
        within=AT_LEAST_ONE,
    )
    text_max_length: int = setting(
        40, "tokens per sentence; longer sentences are truncated and counted", within=AT_LEAST_ONE
    )
    text_train_layers: int = setting(
        0, "top transformer layers of the text backbone that train (paper: 2)", within=NON_NEGATIVE
    )
    image_train_projection: bool = setting(
        True, "CLIP: train the visual projection (the only trainable part by default)"
    )
    local_files_only: bool = setting(True, "never reach the network for weights; point names at local dirs instead")
    official_text_pooling: bool = setting(False, "authors' numerics: mean over ALL token positions, padding included")
    feature_dtype: str = setting(
        "float16",
        "stored backbone features (pixels stay uint8); runs saved before the store: float32",
        choices=FEATURE_DTYPES,
    )


@dataclass
class OrdererConfig(Section):
    key: ClassVar[str] = "orderer"
    d_model: int = setting(
        128, "width of the set transformer; item features are projected to it if they differ", within=AT_LEAST_ONE
    )
    layers: int = setting(2, "set-transformer layers (post-norm, no positional encoding)", within=AT_LEAST_ONE)
    heads: int = setting(4, "attention heads; they divide d_model", within=AT_LEAST_ONE)
    ffn: int = setting(256, "hidden width of the feed-forward block", within=AT_LEAST_ONE)
    dropout: float = setting(0.1, "dropout in the set transformer's attention, FFN and residuals", within=DROPOUT)
    pair_dropout: float | None = setting(
        None, "dropout in the pair classifier (authors: 0.1); null: the same as dropout", within=DROPOUT
    )
    input_dropout: float = setting(0.0, "dropout on the item features before the set transformer", within=DROPOUT)
    # pair sums alone cannot spread items whose cue is hidden over the gaps: a rank head places each item
    rank_head: bool = setting(
        False,
        "a rank head also predicts each item's position from its state; decoders add rank_weight times its "
        "log-probabilities; trained last",
    )
    rank_weight: float = setting(
        3.0,
        "weight of the rank head's log-probabilities in decoding (chosen on both synthetic families' val)",
        within=NON_NEGATIVE,
    )
    rank_positions: int = setting(
        16, "positions the rank head predicts; longer stories are decoded from pairs alone", within=AT_LEAST_ONE
    )

    def validate(self) -> "OrdererConfig":
        super().validate()
        if self.d_model % self.heads:  # the attention splits d_model over the heads
            raise ConfigError(f"orderer.heads={self.heads} does not divide orderer.d_model={self.d_model}")
        return self


@dataclass
class AlignerConfig(Section):
    key: ClassVar[str] = "aligner"
    kind: str = setting(
        "learned", "learned: InfoNCE heads trained here; clip: zero-shot CLIP similarity", choices=ALIGNER_KINDS
    )
    clip_model: str = setting("", "kind clip: the CLIP model; empty: the image encoder's CLIP", forms=ALIGN_SPECS)
    dim: int = setting(64, "joint embedding width of the learned heads", within=AT_LEAST_ONE)
    mapping: str = setting(
        "hungarian", "argmax per row (paper), or hungarian: one-to-one within the story", choices=MAPPINGS
    )
    epochs: int = setting(15, "training epochs of the learned aligner", within=NON_NEGATIVE)
    lr: float = setting(2e-3, "learning rate of the learned aligner", within=POSITIVE)
    temperature: float = setting(0.07, "initial InfoNCE temperature (learned)", within=POSITIVE)
    clip_text_max_length: int = setting(
        0, "kind clip: tokens per sentence for CLIP's text tower (authors: 40); 0: CLIP's own", within=NON_NEGATIVE
    )


@dataclass
class GuidanceConfig(Section):
    key: ClassVar[str] = "guidance"
    threshold_t2i: float = setting(
        0.8, "theta in training: text pairs more confident than this guide image pairs", within=PROBABILITY
    )
    threshold_i2t: float = setting(
        0.9, "theta in training: image pairs more confident than this guide text pairs", within=PROBABILITY
    )
    eval_threshold_t2i: float | None = setting(
        None, "theta text -> image at inference; null: threshold_t2i", within=PROBABILITY
    )
    eval_threshold_i2t: float | None = setting(
        None, "theta image -> text at inference (authors: 0.8); null: threshold_i2t", within=PROBABILITY
    )
    weight_t2i: float = setting(1.0, "lambda for text -> image", within=NON_NEGATIVE)
    weight_i2t: float = setting(0.25, "lambda for image -> text", within=NON_NEGATIVE)
    train_rule: str = setting("class0", "selection rule in training (authors: class0)", choices=GUIDANCE_RULES)
    eval_rule: str = setting("any", "selection rule at inference", choices=GUIDANCE_RULES)
    train_source_dropout: bool = setting(False, "the guiding orderer runs in train mode (dropout on) in a guided phase")
    max_rounds: int = setting(
        3, "inference rounds evaluated; the best on validation is chosen per modality", within=AT_LEAST_ONE
    )

    def inference_thresholds(self) -> tuple[float, float]:
        """``(text -> image, image -> text)`` thresholds used at inference."""
        t2i = self.threshold_t2i if self.eval_threshold_t2i is None else self.eval_threshold_t2i
        i2t = self.threshold_i2t if self.eval_threshold_i2t is None else self.eval_threshold_i2t
        return t2i, i2t


@dataclass
class FusionConfig(Section):
    key: ClassVar[str] = "fusion"
    method: str = setting(
        "sum",
        "sum: each aligned pair's round-0 log-odds of both orderers summed (iterwego 0.1/0.2's fused decoding); "
        "orderer: a set transformer over the aligned (image, sentence) items, trained after the iterative stage",
        choices=FUSION_METHODS,
    )
    epochs: int = setting(
        30,
        "training epochs of the fused orderer (method orderer); early stopping as train.early_stop",
        within=NON_NEGATIVE,
    )
    lr: float = setting(1e-3, "its learning rate (Adam, cosine decay as train.cosine)", within=POSITIVE)
    ensemble: int = setting(
        1,
        "fused orderers trained side by side from different initialisations (method orderer); their pair "
        "logits and position probabilities are averaged",
        within=AT_LEAST_ONE,
    )
    sum_weight: float = setting(
        0.0,
        "method orderer: add this times the sum of both orderers' round-0 pair log-odds (method sum) to the fused "
        "orderer's logits",
        within=NON_NEGATIVE,
    )
    sentences: str = setting(
        "carried",
        "carried: the fused order goes to the sentences through the one-to-one pairing (0.2); decoded: each "
        "sentence placed by its own orderer's evidence plus the soft pairing's pull towards its image's step",
        choices=FUSED_SENTENCES,
    )
    pairing_weight: float = setting(
        1.0, "weight of the soft pairing's position term in decoded fused sentences", within=NON_NEGATIVE
    )


@dataclass
class TrainConfig(Section):
    key: ClassVar[str] = "train"
    seed: int = setting(0, "seeds python, numpy and torch; shuffles are drawn from it", within=NON_NEGATIVE)
    batch_size: int = setting(16, "stories per optimiser step", within=AT_LEAST_ONE)
    eval_batch_size: int = setting(
        64,
        "stories per forward in validation and evaluation (split across processes when data parallel)",
        within=AT_LEAST_ONE,
    )
    lr: float = setting(1e-3, "base learning rate (Adam)", within=POSITIVE)
    weight_decay: float = setting(1e-5, "Adam weight decay", within=NON_NEGATIVE)
    backbone_lr_mult: float = setting(
        0.1, "trainable backbone parts (CLIP projection, top BERT layers) learn at lr times this", within=NON_NEGATIVE
    )
    head_lr_mult: float = setting(
        1.0, "set transformer and pair head learn at lr times this (paper: 0.5)", within=POSITIVE
    )
    unimodal_epochs: int = setting(20, "round-0 pre-training epochs of each orderer alone", within=NON_NEGATIVE)
    iterative_epochs: int = setting(
        4, "epochs of alternating guided training (image phase, then text phase)", within=NON_NEGATIVE
    )
    early_stop: int = setting(
        5, "stop a stage after this many epochs without validation improvement (0: never)", within=NON_NEGATIVE
    )
    grad_clip: float = setting(1.0, "max gradient norm (0: off)", within=NON_NEGATIVE)
    cosine: bool = setting(
        True, "cosine learning-rate decay within each stage (to 5% of the base rate); false: constant"
    )
    loss_average: str = setting(
        "pair",
        "pair: mean over all pairs of a batch; story: mean of each story's mean (authors)",
        choices=LOSS_AVERAGES,
    )
    select: str = setting(
        "pmr", "iterative-stage model selection on validation (SELECTIONS)", choices=tuple(SELECTIONS)
    )
    decoder: str = setting(
        "exact", "decoder of validation metrics, and of evaluate / order on this run unless given", choices=DECODERS
    )
    device: str = setting(
        "auto", "where training runs (auto: the first CUDA device if any, else the CPU)", forms=DEVICES
    )
    amp: str = setting(
        "auto", "mixed precision of the orderers (auto: bf16 autocast on CUDA, off on CPU)", choices=AMP_MODES
    )
    compile: bool = setting(False, "torch.compile the orderers and aligner in place (state-dict keys unchanged)")
    num_threads: int = setting(0, "torch CPU threads (0: torch default)", within=NON_NEGATIVE)


@dataclass
class InferenceConfig(Section):
    """How a trained run orders: the guidance rounds chosen on validation at the end of training.

    The decoder (``train.decoder``) and the position terms' weight (``orderer.rank_weight``) keep their homes;
    ``iterwego.result.Inference`` gathers all four. Runs saved by 0.1/0.2 kept the rounds in ``meta.json``
    (``InferenceConfig.from_meta``).
    """

    key: ClassVar[str] = "inference"
    image_rounds: int | None = setting(
        None,
        "guidance rounds of the guided image order (null: not chosen; evaluate chooses on val)",
        within=NON_NEGATIVE,
    )
    text_rounds: int | None = setting(
        None, "guidance rounds of the guided sentence order (null: not chosen)", within=NON_NEGATIVE
    )
    capture_image_rounds: int | None = setting(
        None, "image rounds chosen on val with capture times (null: image_rounds)", within=NON_NEGATIVE
    )

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
    preset: str = setting("tiny", "the preset this config started from", choices=PRESETS)
    encoder: EncoderConfig = section(EncoderConfig, "backbones and the features stored from them")
    orderer: OrdererConfig = section(OrdererConfig, "each modality's set transformer, pair and rank heads")
    aligner: AlignerConfig = section(AlignerConfig, "which image goes with which sentence")
    guidance: GuidanceConfig = section(GuidanceConfig, "cross-modal guidance, in training and at inference")
    train: TrainConfig = section(TrainConfig, "the training recipe")
    fusion: FusionConfig = section(FusionConfig, "how the two modalities are ordered together (runs before it: sum)")
    inference: InferenceConfig = section(
        InferenceConfig, "how the trained run orders; runs saved before it existed: from meta.json"
    )
    version: int = setting(
        CONFIG_VERSION, "format of this config; a run with another version refuses to load", choices=(CONFIG_VERSION,)
    )

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> "Config":
        """Check every field against what it allows; returns the config.

        Raises:
            ConfigError: (a ``ValueError``) one line naming the first bad key, its value and what is allowed.
        """
        _check_section("", self)
        for name, cls in _SECTIONS.items():
            part = getattr(self, name)
            if not isinstance(part, cls):
                raise ConfigError(f"{name}={part!r} is not a {cls.__name__}")
            part.validate()
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
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
                if not isinstance(v, dict):
                    raise ModelLoadError(f"config section {f.name!r} is not a JSON object: {v!r}")
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
        """Return a copy with dotted ``section.key=value`` assignments applied, then validated.

        Raises:
            ConfigError: (a ``ValueError``) malformed assignment, unknown section or field, a value of the wrong
                type, or one the field does not allow -- caught here rather than deep inside training.
        """
        cfg = Config.from_dict(json.loads(self.to_json()))
        for a in assignments or []:
            key, value = _parse_assignment(cfg, a)
            section_name, name = key.split(".")
            setattr(getattr(cfg, section_name), name, value)
        return cfg.validate()


def _parse_assignment(cfg: Config, a: str) -> tuple[str, Any]:
    """``"section.key=value"`` -> ``("section.key", value)``, the value of the field's type."""
    if "=" not in a:
        raise ConfigError(f"override {a!r} is not of the form section.key=value")
    key, raw = a.split("=", 1)
    key = key.strip()
    parts = key.split(".")
    if len(parts) != 2 or parts[0] not in _SECTIONS:
        raise ConfigError(f"override key {key!r} must be one of {sorted(_SECTIONS)} followed by .field")
    section_obj = getattr(cfg, parts[0])
    names = {x.name: x for x in fields(section_obj)}
    if parts[1] not in names:
        raise ConfigError(f"override {key!r}: {parts[0]} has no field {parts[1]!r}; fields: {sorted(names)}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    kind, optional = _field_type(names[parts[1]])
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if value is None and optional:  # an optional field set back to its default
        return key, None
    if kind == "bool" and not isinstance(value, bool):
        raise ConfigError(f"{key} expects true/false, got {raw!r}")
    if kind == "int" and not is_int:
        raise ConfigError(f"{key} expects an integer, got {raw!r}")
    if kind == "float" and not (is_int or isinstance(value, float)):
        raise ConfigError(f"{key} expects a number, got {raw!r}")
    if kind == "float":
        return key, float(value)
    if kind == "str":
        return key, value if isinstance(value, str) else raw  # a name that parses as a number stays as written
    return key, value


_SECTIONS = {
    c.key: c
    for c in (EncoderConfig, OrdererConfig, AlignerConfig, GuidanceConfig, TrainConfig, FusionConfig, InferenceConfig)
}
_WORDS = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}


def _field_type(f) -> tuple[str, bool]:
    """``("int" | "float" | "bool" | "str" | a section's class name, optional)`` from the annotation's text."""
    parts = [p.strip() for p in str(f.type).split("|")]
    return parts[0], "None" in parts[1:]


def _fits(value: str, form: str) -> bool:
    """Whether a spec string takes ``form``: a literal, or a prefix followed by a name (``<N>``: digits)."""
    head, bracket, tail = form.partition("<")
    if not bracket:
        return value == form
    rest = value[len(head) :] if value.startswith(head) else ""
    return bool(rest.isdigit() if tail == "N>" else rest.strip())


def _check_value(key: str, value: Any, f) -> None:
    kind, optional = _field_type(f)
    if value is None and optional:
        return
    is_bool = isinstance(value, bool)
    ok = {
        "int": isinstance(value, int) and not is_bool,
        "float": isinstance(value, (int, float)) and not is_bool,
        "bool": is_bool,
        "str": isinstance(value, str),
    }.get(kind, True)
    if not ok:
        raise ConfigError(f"{key}={value!r} is not {_WORDS[kind]}")
    m = f.metadata
    if m.get("choices") is not None and value not in m["choices"]:
        raise ConfigError(f"{key}={value!r} is not one of {tuple(m['choices'])}")
    if m.get("forms") is not None and not any(_fits(value, form) for form in m["forms"]):
        raise ConfigError(f"{key}={value!r} is not one of {tuple(m['forms'])}")
    if kind == "float" and not math.isfinite(value):
        raise ConfigError(f"{key}={value!r} is not a finite number")
    if m.get("within") is not None and value not in m["within"]:
        raise ConfigError(f"{key}={value!r} is not {m['within']}")


def _check_section(name: str, obj: Any) -> None:
    """Check each field of one section (``name``: its key in ``Config``; "" for Config's own fields)."""
    for f in fields(obj):
        if f.name not in _SECTIONS or name:
            _check_value(f"{name}.{f.name}" if name else f.name, getattr(obj, f.name), f)


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


# ---------------------------------------------------------------- the reference page (docs/config.md)
def _allowed(f) -> str:
    m = f.metadata
    if m.get("choices") is not None:
        return ", ".join(f"`{json.dumps(c)}`" for c in m["choices"])
    if m.get("forms") is not None:
        return ", ".join(f"`{json.dumps(c)}`" for c in m["forms"])
    if m.get("within") is not None:
        return str(m["within"])
    return "`true`, `false`" if _field_type(f)[0] == "bool" else ""


def reference_markdown() -> str:
    """``docs/config.md``: every section and field with its type, default, allowed values and what it does."""
    lines = [
        "# Config reference",
        "",
        "<!-- generated by `python -m iterwego.config > docs/config.md`; tests/test_config.py checks it -->",
        "",
        "Every run saves its full config as `config.json`. Set a field on the command line with",
        "`--set SECTION.KEY=VALUE` (repeatable; the value is read as JSON where it parses, so `null`, `true` and",
        'numbers work), or in Python with `preset("tiny").override(["SECTION.KEY=VALUE"])`. A value outside what',
        "the field allows is refused before any data is read, as one line naming the key, the value and what is",
        "allowed. Defaults are the dataclasses'; the presets `tiny`, `paper` and `paper+` change the values listed",
        "beside them (`iterwego train --preset NAME --print-config` prints one in full).",
    ]
    top = [f for f in fields(Config) if f.name not in _SECTIONS]
    lines += ["", "## Top level", "", *_table("", top)]
    for f in fields(Config):
        if f.name in _SECTIONS:
            lines += ["", f"## `{f.name}`: {f.metadata['help']}", "", *_table(f.name, fields(_SECTIONS[f.name]))]
    return "\n".join(lines) + "\n"


def _table(name: str, fs) -> list[str]:
    rows = ["| key | type | default | allowed | presets that differ | what it does |", "|---|---|---|---|---|---|"]
    presets = {p: preset(p) for p in PRESETS}
    for f in fs:
        key = f"{name}.{f.name}" if name else f.name
        kind, optional = _field_type(f)
        kind += " or null" if optional else ""
        values = {p: getattr(getattr(c, name) if name else c, f.name) for p, c in presets.items()}
        differ = ", ".join(
            f"{p}: `{json.dumps(v)}`" for p, v in values.items() if v != f.default and f.name != "preset"
        )
        help_text = f.metadata["help"].replace("|", "\\|")
        rows.append(f"| `{key}` | {kind} | `{json.dumps(f.default)}` | {_allowed(f)} | {differ} | {help_text} |")
    return rows


if __name__ == "__main__":
    print(reference_markdown(), end="")
