"""The IterWeGO model: two unimodal orderers, an aligner, and the figure as one ``forward``.

:meth:`IterWeGO.forward` is the paper's figure: each orderer scores every
ordered pair of its items, the aligner scores every image against every
sentence, and R rounds of weak cross-modal guidance carry each modality's
confident pairs onto the other's; the fused logits (beyond the paper) join
both modalities' evidence on one-to-one aligned items, by a fused orderer
over the aligned (image, sentence) items or as a sum of pair log-odds
(``fusion.method``). Evaluation, ``order``, the web app, the official import and the benchmark all call it, and only
decode, score or optimise what it returns. :meth:`IterWeGO.guided_loss` is
one phase of the paper's iterative learning.

An orderer is a head over frozen backbone features, a set transformer with
no positional encoding (so the input order carries no information), a pair
classifier over [h_i; h_j] for every ordered pair at once, and optionally a
rank head that says where each item stands; the blocks and losses live in
:mod:`iterwego.layers`. The fused orderer reads both orderers' item states on
the aligner's one-to-one pairs. Rank heads and the fused orderer learn in the
last training stage, on the fixed orderers (:meth:`IterWeGO.heads_loss`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from .aligner import align, build_aligner
from .batch import Batch, scatter_items
from .config import Config, GuidanceConfig, OrdererConfig
from .encoders import Encoder
from .errors import ModelLoadError
from .fusion import fuse_logits, gather_items, gold_pairing, soft_pairing
from .guidance import guide, iterate
from .layers import (  # noqa: F401  (re-exported: the losses and heads are part of the model's API)
    PairHead,
    RankHead,
    SetTransformer,
    loss_reduction,
    loss_units,
    n_pairs,
    pair_loss,
    pairwise_accuracy,
    rank_loss,
)
from .pretrained import RunDirectoryMixin


class Orderer(nn.Module):
    """One modality's orderer: head -> (projection) -> set transformer -> pair head (and rank head)."""

    def __init__(self, encoder: Encoder, cfg: OrdererConfig, salt: int = 1):
        super().__init__()
        self.head = encoder.new_head()
        d = cfg.d_model
        self.proj = nn.Identity() if encoder.out_dim == d else nn.Linear(encoder.out_dim, d)
        self.input_drop = nn.Dropout(cfg.input_dropout)
        self.encoder = SetTransformer(cfg)
        self.classifier = PairHead(d, cfg.dropout if cfg.pair_dropout is None else cfg.pair_dropout)
        self.ranker = _rank_head(cfg, salt)

    def item_vectors(self, feats: Tensor) -> Tensor:
        return self.proj(self.head(feats))

    def states(self, feats: Tensor, index: Tensor) -> Tensor:
        """Each item's state ``(B, n, d)`` after the set transformer: what the pair head (and fusion) reads."""
        return self.encoder(self.input_drop(scatter_items(self.item_vectors(feats), index)), index >= 0)

    def forward(self, feats: Tensor, index: Tensor) -> Tensor:
        """Pair logits ``(B, n, n, 2)`` (class 1: i before j) for the items ``index`` points at."""
        return self.classifier(self.states(feats, index))


class FusedOrderer(nn.Module):
    """An orderer over aligned (image, sentence) items: [image state; sentence state] -> set transformer -> pairs.

    Summing two orderers' pair log-odds counts the story-level prior twice and cannot tell which modality
    shows an item's cue; reading both items' states at once can (docs/fusion.md has the measurements).
    """

    def __init__(self, cfg: OrdererConfig):
        super().__init__()
        d = cfg.d_model
        self.proj, self.drop = nn.Linear(2 * d, d), nn.Dropout(cfg.dropout)
        self.encoder = SetTransformer(cfg)
        self.classifier = PairHead(d, cfg.dropout if cfg.pair_dropout is None else cfg.pair_dropout)
        self.ranker = _rank_head(cfg, 3)

    def states(self, h_image: Tensor, h_text: Tensor, i2t: Tensor, image_valid: Tensor) -> Tensor:
        """Each image slot's fused state ``(B, n_img, d)``, read by ``classifier`` (pairs) and ``ranker``;
        ``i2t`` pairs each image with a sentence slot (-1: none, its sentence half is zero)."""
        x = torch.cat([h_image, gather_items(h_text, i2t)], -1)
        return self.encoder(self.drop(self.proj(x)), image_valid)

    def forward(
        self, h_image: Tensor, h_text: Tensor, i2t: Tensor, image_valid: Tensor, positions: bool = True
    ) -> tuple[Tensor, Tensor | None]:
        """Fused pair logits ``(B, n_img, n_img, 2)`` and, with ``positions`` and a rank head, position
        log-probabilities ``(B, n_img, P)``, on the image slots."""
        h = self.states(h_image, h_text, i2t, image_valid)
        ranks = self.ranker(h, image_valid) if positions and self.ranker is not None else None
        return self.classifier(h), ranks

    def losses(self, h_image: Tensor, h_text: Tensor, i2t: Tensor, pos: Tensor, valid: Tensor) -> list[Tensor]:
        """The summed pair loss (and position loss) on gold positions ``pos`` of the image slots, as terms: the
        caller adds them to its running total one by one (the order 0.3's training summed them in)."""
        h = self.states(h_image, h_text, i2t, valid)
        terms = [pair_loss(self.classifier(h), pos, valid, "sum")]
        return terms if self.ranker is None else [*terms, rank_loss(self.ranker(h, valid), pos, valid)]


class FusedEnsemble(nn.ModuleList):
    """``fusion.ensemble`` fused orderers from different initialisations, trained side by side on the same
    batches; their pair logits are averaged (a geometric mean of their probabilities), their position
    probabilities too. One training run then depends less on one head's initialisation."""

    def forward(
        self, h_image: Tensor, h_text: Tensor, i2t: Tensor, image_valid: Tensor, positions: bool = True
    ) -> tuple[Tensor, Tensor | None]:
        outs = [m(h_image, h_text, i2t, image_valid, positions) for m in self]
        logits = torch.stack([lg for lg, _ in outs]).mean(0)
        if outs[0][1] is None:
            return logits, None
        return logits, torch.logsumexp(torch.stack([r for _, r in outs]), 0) - math.log(len(outs))

    def losses(self, h_image: Tensor, h_text: Tensor, i2t: Tensor, pos: Tensor, valid: Tensor) -> list[Tensor]:
        return [t for m in self for t in m.losses(h_image, h_text, i2t, pos, valid)]


def _fuser(cfg: Config) -> FusedOrderer | FusedEnsemble:
    """The fused orderer (``fusion.ensemble`` 1), or an ensemble whose first member initialises as it would."""
    k = cfg.fusion.ensemble
    if k == 1:
        return _off_stream(lambda: FusedOrderer(cfg.orderer), 4)
    return _off_stream(lambda: FusedEnsemble([FusedOrderer(cfg.orderer) for _ in range(k)]), 4)


def _off_stream(build, salt: int):
    """``build()`` initialised from a seed drawn from (and salted off) the global stream, which is then restored:
    the modules built after it initialise exactly as in a model without it."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(0, 2**62, ())) ^ salt)
        return build()


def _rank_head(cfg: OrdererConfig, salt: int) -> RankHead | None:
    return _off_stream(lambda: RankHead(cfg.d_model, cfg.rank_positions, cfg.dropout), salt) if cfg.rank_head else None


@dataclass
class ForwardOutput:
    """Everything the figure computes for a batch; decoders, metrics and losses read from here.

    ``image[r]`` / ``text[r]`` are ``(B, n, n, 2)`` pair logits after ``r``
    guidance rounds (``r = 0``: the orderer alone; class 1 of ``(i, j)`` is
    "i before j"); a modality the batch or model lacks has an empty list.
    Cross-modal fields are ``None`` unless both modalities and an aligner are present.
    """

    image: list[Tensor] = field(default_factory=list)  # per round 0..R, (B, n_img, n_img, 2)
    text: list[Tensor] = field(default_factory=list)  # per round 0..R, (B, n_txt, n_txt, 2)
    scores: Tensor | None = None  # (B, n_img, n_txt) aligner scores within each story
    i2t: Tensor | None = None  # (B, n_img) sentence slot guiding each image under the config's mapping, -1 padding
    t2i: Tensor | None = None  # (B, n_txt) image slot guiding each sentence
    pairing: Tensor | None = None  # (B, n_img) one-to-one image -> sentence pairing used by fusion
    soft_pairing: Tensor | None = None  # (B, n_img, n_txt) Sinkhorn pairing probabilities (decoded fused sentences)
    fused: Tensor | None = None  # (B, n_img, n_img, 2) fused pair logits on the image slots
    # rank heads' position log-probabilities (B, n, P) per "image" / "text" / "fused" (image slots); with
    # ``positions=False`` or without rank heads, empty
    ranks: dict[str, Tensor] = field(default_factory=dict)

    def unary(self, key: str, weight: float, rounds: int = 0) -> Tensor | None:
        """Position terms for the decoders (``weight`` times the rank log-probabilities), or None.

        A rank head reads its orderer's own states, so its terms go with round 0 (and the fused order) only:
        guided rounds (``rounds > 0``) are decoded from their pair logits alone, as in the paper.
        """
        r = self.ranks.get(key)
        return None if r is None or rounds > 0 else weight * r

    def logits(self, modality: str, rounds: int) -> Tensor:
        """A modality's logits after ``rounds`` rounds (clamped to the rounds computed)."""
        rs = self.image if modality == "image" else self.text
        return rs[min(rounds, len(rs) - 1)]


def _full_precision(x: Tensor) -> Tensor:
    """Guidance thresholds and decoding read probabilities: lift bf16/fp16 autocast logits to float32."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


class IterWeGO(
    nn.Module,
    RunDirectoryMixin,
    library_name="iterwego",
    tags=["iterwego", "sentence-ordering", "image-ordering", "coherence-modelling", "visual-storytelling"],
):
    """Image orderer, text orderer and aligner; the encoders' frozen backbones live outside the state dict.

    Shared like other Hugging Face models (:class:`iterwego.pretrained.RunDirectoryMixin`, a
    ``huggingface_hub.ModelHubMixin``): ``from_pretrained`` takes a run directory or a Hub id,
    ``save_pretrained`` writes a run directory and ``push_to_hub(repo_id)`` uploads one, model card included.
    """

    def __init__(
        self,
        cfg: Config,
        image_encoder: Encoder | None,
        text_encoder: Encoder | None,
        align_encoders: tuple[Encoder, Encoder] | None = None,
    ):
        super().__init__()
        self.cfg = cfg
        self.image_encoder, self.text_encoder = image_encoder, text_encoder
        self.image = Orderer(image_encoder, cfg.orderer, 1) if image_encoder is not None else None
        self.text = Orderer(text_encoder, cfg.orderer, 2) if text_encoder is not None else None
        self.align_encoders = align_encoders
        both = image_encoder is not None and text_encoder is not None
        self.aligner = (
            build_aligner(cfg.aligner, image_encoder, text_encoder, align_encoders is not None) if both else None
        )
        self.fuser = _fuser(cfg) if both and cfg.fusion.method == "orderer" else None
        self.meta: dict = {}
        self.run_dir: Path | None = None  # the run directory this model was loaded from
        self.card_text: str | None = None  # its model card (README.md), saved and pushed along

    # ------------------------------------------------------------------ the figure
    def forward(
        self,
        batch: Batch,
        rounds: int = 0,
        *,
        guidance: GuidanceConfig | None = None,
        mapping: str | None = None,
        modalities: tuple[str, ...] = ("image", "text"),
        fuse: bool = True,
        positions: bool = True,
    ) -> ForwardOutput:
        """Orderers -> aligner -> ``rounds`` guidance rounds -> fused logits, for one padded batch.

        ``guidance`` and ``mapping`` default to the model's config (inference
        thresholds, ``eval_rule``); ``modalities`` restricts the orderers run;
        ``positions`` adds the rank heads' outputs (training leaves them out until they have learned).
        Logits are float32 whatever the autocast the caller runs under.
        """
        g = self.cfg.guidance if guidance is None else guidance
        mods = [m for m in modalities if getattr(self, m) is not None and m in batch.index]
        states = {m: self.orderer(m).states(batch.feats[m], batch.index[m]) for m in mods}
        logits = {m: _full_precision(self.orderer(m).classifier(h)) for m, h in states.items()}
        out = ForwardOutput(**{m: [lg] for m, lg in logits.items()})
        if positions:
            out.ranks = {
                m: self.orderer(m).ranker(h, batch.valid(m)) for m, h in states.items() if self.orderer(m).ranker
            }
        if len(mods) < 2 or self.aligner is None:
            return out
        iv, tv = batch.valid("image"), batch.valid("text")
        out.scores = self.alignment_scores(batch)
        out.i2t, out.t2i = self.mappings(out.scores, batch, mapping)
        steps = iterate(logits["image"], logits["text"], out.t2i, out.i2t, rounds, g, image_valid=iv, text_valid=tv)
        out.image, out.text = [s[0] for s in steps], [s[1] for s in steps]
        if fuse:
            out.pairing = align(out.scores, "hungarian", iv, tv)
            if self.cfg.fusion.sentences == "decoded":  # exact marginals loop over stories: only when read
                out.soft_pairing = soft_pairing(self.aligner.pairing_logits(out.scores), iv, tv)
            if self.fuser is not None:
                fused, ranks = self.fuser(states["image"], states["text"], out.pairing, iv, positions)
                out.fused = _full_precision(fused)
                if self.cfg.fusion.sum_weight:  # and the product of both orderers' pair experts, weighted
                    pair_sum = fuse_logits(logits["image"], logits["text"], out.pairing)
                    out.fused = out.fused + self.cfg.fusion.sum_weight * pair_sum
                if ranks is not None:
                    out.ranks["fused"] = ranks
            else:
                out.fused = fuse_logits(logits["image"], logits["text"], out.pairing)
        return out

    @torch.no_grad()
    def frozen_states(self, batch: Batch) -> dict[str, Tensor]:
        """Both orderers' item states in eval mode: what the last stage's heads learn to read."""
        out = {}
        for m in ("image", "text"):
            o = self.orderer(m)
            was = o.training
            o.eval()
            out[m] = o.states(batch.feats[m], batch.index[m])
            o.train(was)
        return out

    def heads_loss(self, states: dict[str, Tensor], pos: dict[str, Tensor], valid: dict[str, Tensor]) -> Tensor:
        """The last stage's summed loss over the heads that read frozen states (``frozen_states``): each rank
        head's position NLL and the fused orderer's pair and position losses on the split's own pairs.

        Summed over items and pairs; the caller divides (by the global item count under data parallelism).
        """
        total = torch.zeros((), device=pos["image"].device)
        for m in ("image", "text"):
            if self.orderer(m).ranker is not None:
                total = total + rank_loss(self.orderer(m).ranker(states[m], valid[m]), pos[m], valid[m])
        if self.fuser is not None:
            iv = valid["image"]
            pairing = gold_pairing(pos["image"], pos["text"], iv, valid["text"])
            for term in self.fuser.losses(states["image"], states["text"], pairing, pos["image"], iv):
                total = total + term
        return total

    def heads(self) -> nn.ModuleDict:
        """The modules of the last training stage (rank heads, the fused orderer), shared, not copied."""
        parts = {"image_ranker": self.image and self.image.ranker, "text_ranker": self.text and self.text.ranker}
        return nn.ModuleDict({k: v for k, v in {**parts, "fuser": self.fuser}.items() if v is not None})

    def alignment_scores(self, batch: Batch) -> Tensor:
        """Within-story image x sentence scores ``(B, n_img, n_txt)``; CLIP aligners read their own features."""
        fi = batch.feats.get("align_image", batch.feats["image"])
        ft = batch.feats.get("align_text", batch.feats["text"])
        return self.aligner.scores(fi, ft, batch.index["image"], batch.index["text"])

    def mappings(self, scores: Tensor, batch: Batch, mapping: str | None = None) -> tuple[Tensor, Tensor]:
        """``(i2t, t2i)``: the aligned item of the other modality for every image and every sentence."""
        method = self.cfg.aligner.mapping if mapping is None else mapping
        iv, tv = batch.valid("image"), batch.valid("text")
        return align(scores, method, iv, tv), align(scores.transpose(1, 2), method, tv, iv)

    def guided_loss(self, batch: Batch, target: str, *, normalizer: int | None = None) -> Tensor:
        """One phase of iterative learning: the ``target`` orderer's pair loss under the other modality's guidance.

        The guiding orderer and the aligner run without gradients: they do not
        learn in this phase. The guiding orderer runs in eval mode, or in train
        mode (its dropout on, as in the authors' code) with ``guidance.train_source_dropout``.
        The loss is averaged as ``train.loss_average`` says (over pairs, or per story
        then over stories); with ``normalizer`` it is summed and divided by it (the global
        pair or story count under data parallelism). No gold cross-modal order is used.
        """
        g = self.cfg.guidance
        src = "text" if target == "image" else "image"
        thr, lam = (g.threshold_t2i, g.weight_t2i) if target == "image" else (g.threshold_i2t, g.weight_i2t)
        with torch.no_grad():
            self.orderer(src).train(g.train_source_dropout)
            src_logits = self.orderer(src)(batch.feats[src], batch.index[src])
            scores = self.alignment_scores(batch)
            if src == "text":
                scores = scores.transpose(1, 2)
            src_to_tgt = align(scores, self.cfg.aligner.mapping, batch.valid(src), batch.valid(target))
        logits = self.orderer(target)(batch.feats[target], batch.index[target])
        guided = guide(
            logits, src_logits, src_to_tgt, threshold=thr, weight=lam, rule=g.train_rule, valid=batch.valid(src)
        )
        return self._averaged_loss(guided, batch.pos[target], batch.valid(target), normalizer)

    def _averaged_loss(self, logits: Tensor, positions: Tensor, valid: Tensor, normalizer: int | None) -> Tensor:
        """:func:`pair_loss` averaged as ``train.loss_average`` says, or summed and divided by ``normalizer``."""
        per_story = self.cfg.train.loss_average == "story"
        if normalizer is None:
            if per_story:
                return pair_loss(logits, positions, valid, "story_sum") / valid.shape[0]
            return pair_loss(logits, positions, valid)
        return pair_loss(logits, positions, valid, loss_reduction(self.cfg.train.loss_average)) / max(normalizer, 1)

    # ------------------------------------------------------------------ parts and persistence
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

    @classmethod
    def _build_for_run(cls, cfg: Config, run_dir: Path, modalities: tuple[str, ...]) -> "IterWeGO":
        return _create_for_run(cfg, run_dir, modalities)


def _create_for_run(cfg: Config, run_dir: Path, modalities: tuple[str, ...]) -> IterWeGO:
    """``create_model`` for a saved run; a backbone that cannot load says how to point the run at a local copy."""
    try:
        return create_model(cfg, base_dir=run_dir, modalities=modalities)
    except ModelLoadError as err:
        if not str(err).startswith("cannot load"):
            raise
        raise ModelLoadError(
            f"{err}; for this run, --set encoder.image=clip:DIR / --set encoder.text=bert:DIR "
            '(Python: backbones={"image": DIR, "text": DIR}) use local copies'
        ) from None


def load_run(run_dir, device="cpu", *, modalities: tuple[str, ...] = ("image", "text"), **kw) -> tuple[IterWeGO, dict]:
    """``(model, meta)`` of a saved run or a Hub id; keyword arguments as :meth:`IterWeGO.from_pretrained`."""
    model = IterWeGO.from_pretrained(run_dir, device, modalities=modalities, **kw)
    return model, model.meta


def create_model(
    cfg: Config | str, *, base_dir=None, modalities: tuple[str, ...] = ("image", "text"), preloaded: dict | None = None
) -> IterWeGO:
    """Build an untrained model from a config or a preset name (``"tiny"``, ``"paper"``, ``"paper+"``).

    Backbone weights are loaded from the names or local directories in the
    config (relative paths resolve against ``base_dir``); nothing is downloaded
    unless ``encoder.local_files_only`` is false.
    """
    from .config import preset
    from .encoders import build_align_encoders, build_encoder

    if isinstance(cfg, str):
        cfg = preset(cfg)
    d = cfg.orderer.d_model
    enc = {
        m: build_encoder(m, cfg.encoder, d, base_dir=base_dir, preloaded=preloaded) if m in modalities else None
        for m in ("image", "text")
    }
    align_enc = None
    if enc["image"] is not None and enc["text"] is not None and cfg.aligner.kind == "clip":
        spec = cfg.aligner.clip_model or (cfg.encoder.image if cfg.encoder.image.startswith("clip:") else "")
        align_enc = build_align_encoders(
            spec,
            cfg.encoder,
            base_dir=base_dir,
            preloaded=preloaded,
            text_max_length=cfg.aligner.clip_text_max_length or None,
        )
    return IterWeGO(cfg, enc["image"], enc["text"], align_enc)
