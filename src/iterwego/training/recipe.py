"""Training as a recipe object: ``setup()`` / ``train()`` / ``save()`` / ``cleanup()``.

Stages, all selected on the validation split (never test):

1. unimodal pre-training of each orderer alone (the "round 0" models);
2. the learned aligner (symmetric InfoNCE on the training stories' image-sentence pairs);
3. iterative learning: each epoch updates the image orderer under text->image
   guidance, then the text orderer under image->text guidance, each phase
   with its own optimiser. The guidance step is :func:`iterwego.guidance.guide`,
   the same function inference uses;
4. the rank heads and the fused orderer, on the fixed orderers' item states.

Finally the inference round per modality is chosen on validation and saved.

Each stage is one ``fit_*`` method that reads top to bottom: for each epoch left, a pass over the training
batches (loss, backward, step), validation, the log line, then ``_end_epoch`` (keep the best state,
checkpoint); ``_end_stage`` loads the best state. A stage's resume state is a :class:`StageState`.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import math
import random
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..aligner import alignment_hits
from ..config import Config
from ..data.cache import FeatureCache
from ..data.features import batches, build_features, gather, plan_batches, prefetch
from ..data.readers import load_split, pmr_ceilings
from ..device import autocast, pick_device
from ..encoders import CNNHead
from ..errors import ConfigError, IterWeGOError, ModelLoadError
from ..io import atomic_write_bytes, atomic_write_json
from ..model import create_model, loss_reduction, loss_units, pair_loss, pairwise_accuracy
from ..pretrained import save_run
from .card import evaluation_record, write_card
from .distributed import Dist
from .evaluator import Evaluator, pick


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


PRIVATE_STORE = "features"  # RUN/features: the feature store of a run that uses no shared cache


class TrainingDiverged(IterWeGOError):
    """The loss became NaN or infinite."""


STAGES = ("unimodal-image", "unimodal-text", "aligner", "iterative", "heads")  # in training order


@dataclasses.dataclass
class StageState:
    """Where one training stage stands: with the model, the generators and the log, what a checkpoint holds."""

    stage: str  # one of STAGES
    epoch: int | str = -1  # the last finished epoch (-1: none yet), or "done" once the best state is loaded
    best: float | None = None  # the best validation score so far (higher is better); None before any
    best_state: dict | None = None  # the stage module's state at ``best`` (None: no candidate kept yet)
    since: int = 0  # epochs since ``best`` last improved, for early stopping
    extra: object = None  # what is remembered with the best state (iterative learning: the chosen rounds)
    opts: dict = dataclasses.field(default_factory=dict)  # optimiser states by name, as checkpointed (resume only)


class TrainRecipe:
    """Train every part of IterWeGO on one dataset and save it as a run directory.

    Each ``fit_*`` method is one stage's loop: per epoch, a pass over the training batches (loss, backward,
    step), validation, the log line, then :meth:`_end_epoch` keeps the best state and writes the checkpoint.
    """

    def __init__(
        self,
        cfg: Config,
        data: str | Path,
        out: str | Path,
        *,
        fmt: str = "vist",
        image_dir: str | None = None,
        text_field: str = "text",
        progress: bool = True,
        log=print,
        cache=None,
        capture_time: bool = False,
    ):
        """``cache``: the feature store to read and fill (a shared :class:`FeatureCache`); ``None`` keeps
        the features in a private store, ``RUN/features``, removed once the run is saved."""
        self.cfg, self.data, self.out = cfg, Path(data), Path(out)
        self.private_store = cache is None
        self.cache = FeatureCache(self.out / PRIVATE_STORE) if cache is None else cache
        # validation also scores the orders bound by photo EXIF times; never used for the loss or model choice
        self.capture_time = capture_time
        self.fmt, self.image_dir, self.text_field = fmt, image_dir, text_field
        self.progress, self.log = progress, log
        self.history: list[dict] = []  # every log line so far (checkpointed: a resumed run's log equals a whole one's)
        # wall and CPU seconds of feature building and of each epoch's training and validation (not logged:
        # the log must not depend on the machine, so a resumed run's log equals an uninterrupted one's)
        self.timings: dict = {"features": {}, "epochs": []}
        self._tick: dict = {}  # this epoch's seconds so far, by part (see _clock)
        self.dist = Dist()  # the process group (joined in setup; a no-op with one process)
        self.main = self.dist.is_main  # only rank 0 writes files
        # set up by setup():
        self.device: torch.device | None = None
        self._tb = None  # the TensorBoard writer (rank 0, with the optional extra)
        self.train_stories: list = []
        self.val_stories: list = []
        self.model = None  # the IterWeGO model being trained
        self.feats: dict | None = None  # feature banks by name (see data.features.build_features)
        self.train_set = self.val_set = None  # the splits' story sets over the feature banks
        self.truncated = 0  # distinct sentences longer than the text backbone keeps
        self.val_ceilings: dict | None = None  # the validation split's PMR ceilings (synthetic data), for the card
        self.val_eval: Evaluator | None = None  # validation, as every stage selects on it
        self.rng: np.random.Generator | None = None  # draws every training batch plan (checkpointed)
        # set by load_state() and the stages:
        self.resumed: StageState | None = None  # the checkpoint this run continues from, if any
        self.chosen: dict | None = None  # the guided round per modality, chosen on validation
        self.capture_chosen: dict | None = None  # the same with capture times (``capture_time`` runs)
        self.val_result = None  # the kept model's validation evaluation, for the model card
        self.train_seconds = 0.0

    # ------------------------------------------------------------------ setup
    def setup(self) -> "TrainRecipe":
        c = self.cfg
        c.validate()  # a config edited in Python after it was built is checked here, before any work
        seed_everything(c.train.seed)
        if c.train.num_threads:  # also pins the thread count, so a resumed run repeats the same arithmetic
            torch.set_num_threads(c.train.num_threads)
        self.device = self.dist.setup(pick_device(c.train.device))
        if not self.main:
            self.progress, self.log = False, (lambda *a, **k: None)
        if self.main:
            self._write_train_args()
            self._tb = _tensorboard(self.out / "tb")
        t0 = time.time()
        read = dict(fmt=self.fmt, image_dir=self.image_dir, text_field=self.text_field)
        self.train_stories = load_split(self.data, "train", **read)
        self.val_stories = load_split(self.data, "val", **read)
        self.val_ceilings = pmr_ceilings(self.data, "val")
        self.model = create_model(c).to(self.device)
        if c.train.compile:
            for part in (self.model.image, self.model.text, self.model.aligner, self.model.fuser):
                if part is not None:
                    part.compile()
        with self._clock("features"):
            sets, self.feats = build_features(
                self.model.encoders(),
                {"train": self.train_stories, "val": self.val_stories},
                where=str(self.data),
                progress=self.progress,
                cache=self.cache,
                dtype=c.encoder.feature_dtype,
                share=(self.dist.rank, self.dist.world),
                sync=self.dist.barrier,
            )
        self.timings["features"] = self._tick.pop("features")
        self.train_set, self.val_set = sets["train"], sets["val"]
        self.truncated = _truncated(self.model.text_encoder, self.train_stories + self.val_stories)
        if self.truncated:
            self.log(
                f"note: {self.truncated} sentence(s) longer than {c.encoder.text_max_length} tokens were truncated"
            )
        self.log(
            f"data: {len(self.train_stories)} train / {len(self.val_stories)} val stories; "
            f"features ready in {time.time() - t0:.1f}s"
        )
        self.val_eval = Evaluator(
            self.val_set,
            self.feats,
            decoder=c.train.decoder,
            seed=c.train.seed + 1,
            device=self.device,
            amp=c.train.amp,
            dist_ctx=self.dist,
            batch_size=c.train.eval_batch_size,
            capture_time=self.capture_time,
        )
        self.rng = np.random.default_rng(c.train.seed)
        return self

    def _write_train_args(self) -> None:
        """A fresh log, and what ``--resume`` needs to start this run again (``train_args.json``)."""
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "log.jsonl").write_text("")
        atomic_write_json(
            self.out / "train_args.json",
            {
                "data": str(self.data),
                "format": self.fmt,
                "image_dir": self.image_dir,
                "text_field": self.text_field,
                "capture_time": self.capture_time,
                "cache_dir": None if self.private_store else str(Path(self.cache.root).absolute()),
                "config": self.cfg.to_dict(),
            },
        )

    # ------------------------------------------------------------------ stages
    def train(self) -> "TrainRecipe":
        t0 = time.time()
        self.val_eval.positions = False  # untrained rank heads must not steer validation decoding
        self.fit_unimodal("image")
        self.fit_unimodal("text")
        self.fit_aligner()
        self.fit_iterative()
        self.fit_heads()
        self.val_eval.positions = True
        res = self.val_eval(self.model)  # the kept model on validation, for the model card
        if len(self.model.heads()):  # decoding now reads the heads: the inference rounds are chosen again
            self.chosen = res.choose_rounds()
            self.log(f"with the rank heads and fusion, inference rounds chosen on validation: {self.chosen}")
        if self.capture_time:  # the guided image round to use with times, chosen on validation with times
            self.capture_chosen = res.choose_capture_rounds()
            self.log(f"with capture times, inference rounds chosen on validation: {self.capture_chosen}")
        self.train_seconds = time.time() - t0
        self.val_result = res
        return self

    def fit_unimodal(self, mod: str) -> None:
        """Stage 1: one orderer alone (its "round 0" model), kept at its best validation pair loss."""
        t, stage = self.cfg.train, f"unimodal-{mod}"
        orderer = self.model.orderer(mod)
        opt = self._optimizer(orderer, _pretrained_head(orderer))
        state = self._stage_state(stage, {"opt": opt})
        if state is None:  # the resumed checkpoint is past this stage
            return
        for epoch in self._epochs_left(state, t.unimodal_epochs):
            self._set_lr(opt, epoch, t.unimodal_epochs)
            orderer.train()
            losses = []
            with self._clock("train"):
                for plan, b in self._train_batches((mod,)):
                    # a process without stories in this batch still steps: gradients are summed across processes
                    units, loss = loss_units(plan.valid(mod), t.loss_average), None
                    if b is not None:
                        with autocast(self.device, t.amp):
                            logits = orderer(b.feats[mod], b.index[mod])
                        loss = pair_loss(logits, b.pos[mod], b.valid(mod), loss_reduction(t.loss_average))
                        loss = loss / max(units, 1)
                    where = f"unimodal {mod} epoch {epoch} step {len(losses)}"
                    losses.append(self._step(opt, loss, orderer.parameters(), where, sharded=True))
            with self._clock("val"):
                val = pick(self.val_eval(self.model, only=mod).rounds[mod][0])
                val["loss"] = self.val_loss(mod)
            lr = opt.param_groups[0]["lr"]
            self._record({"stage": stage, "epoch": epoch, "loss": float(np.mean(losses)), "lr": lr, "val": val})
            # selection on the pairwise validation loss: far less noisy than PMR on a few hundred stories
            self._end_epoch(state, epoch, -val["loss"], orderer, {"opt": opt})
        self._end_stage(state, orderer)

    def fit_aligner(self) -> None:
        """Stage 2: the learned aligner (symmetric InfoNCE), kept at its best validation alignment accuracy."""
        a, t = self.cfg.aligner, self.cfg.train
        if a.kind != "learned":
            return
        al = self.model.aligner
        opt = torch.optim.Adam([p for p in al.parameters() if p.requires_grad], lr=a.lr, weight_decay=t.weight_decay)
        state = self._stage_state("aligner", {"opt": opt})
        if state is None:
            return
        for epoch in self._epochs_left(state, a.epochs):
            al.train()
            losses = []
            with self._clock("train"):
                # unshuffled items: row k of the image features and of the text features is the same item
                for _, b in self._train_batches(tuple(self.feats), shuffle_items=False, shard=False):
                    loss = al.loss(b.feats["image"], b.feats["text"])
                    losses.append(self._step(opt, loss, al.parameters(), f"aligner epoch {epoch} step {len(losses)}"))
            with self._clock("val"):
                acc = self.alignment_accuracy(self.val_set)
            self._record(
                {"stage": "aligner", "epoch": epoch, "loss": float(np.mean(losses)), "lr": a.lr,
                 "val": {"alignment_accuracy": acc}}
            )  # fmt: skip
            self._end_epoch(state, epoch, acc, al, {"opt": opt})
        self._end_stage(state, al)

    def fit_iterative(self) -> None:
        """Stage 3: per epoch, the image orderer learns under text guidance, then the text orderer under image
        guidance (each phase with its own optimiser); the model is kept at its best validation selection score
        (``train.select``), and the inference round per modality is chosen with it."""
        t, m = self.cfg.train, self.model
        opts = {mod: self._optimizer(m.orderer(mod), _pretrained_head(m.orderer(mod))) for mod in ("image", "text")}
        pairwise = t.select == "pairwise"
        state = self._stage_state("iterative", opts)
        if state is None:  # the resumed checkpoint is past this stage, and holds its chosen rounds
            self.log(f"inference rounds chosen on validation: {self.chosen}")
            return
        if state.epoch == -1:
            # before any guided update: the models as they are are a candidate too, except under the
            # authors' selection, whose first guided epoch always becomes the best so far
            res = self.val_eval(m)
            authors = self.authors_val_score() if pairwise else None
            self._record({"stage": "iterative", "epoch": -1, "val": self._val_entry(res, authors)})
            if not pairwise:
                state.best, state.best_state = res.selection_score(), copy.deepcopy(m.state_dict())
            state.extra = res.choose_rounds()
        for epoch in self._epochs_left(state, t.iterative_epochs):
            for o in opts.values():
                self._set_lr(o, epoch, t.iterative_epochs)
            entry = {"stage": "iterative", "epoch": epoch}
            with self._clock("train"):
                for tgt in ("image", "text"):  # the other modality's orderer and the aligner stay fixed
                    m.orderer(tgt).train()
                    losses = []
                    for plan, b in self._train_batches(tuple(self.feats)):
                        units, loss = loss_units(plan.valid(tgt), t.loss_average), None
                        if b is not None:
                            with autocast(self.device, t.amp):
                                loss = m.guided_loss(b, tgt, normalizer=units)
                        where = f"iterative epoch {epoch} {tgt} phase step {len(losses)}"
                        losses.append(self._step(opts[tgt], loss, m.orderer(tgt).parameters(), where, sharded=True))
                    entry[f"loss_{tgt}"] = float(np.mean(losses))
            entry["loss"] = (entry["loss_image"] + entry["loss_text"]) / 2
            with self._clock("val"):
                res = self.val_eval(m)
                authors = self.authors_val_score() if pairwise else None
            entry["val"] = self._val_entry(res, authors)
            self._record(entry)
            score = res.selection_score() if authors is None else authors
            self._end_epoch(state, epoch, score, m, opts, extra=res.choose_rounds())
        self.chosen = state.extra  # the rounds chosen with the kept model
        self._end_stage(state, m)
        self.log(f"inference rounds chosen on validation: {self.chosen}")

    def fit_heads(self) -> None:
        """Stage 4: the rank heads and the fused orderer learn to read the orderers' item states.

        Everything before is fixed, so the states are read once per split; batches and their order come
        from generators of their own (seed, stage, epoch), so a resumed stage repeats exactly.
        """
        m, t, f = self.model, self.cfg.train, self.cfg.fusion
        heads = m.heads()
        if not len(heads):
            return
        opt = torch.optim.Adam(heads.parameters(), lr=f.lr, weight_decay=t.weight_decay)
        state = self._stage_state("heads", {"opt": opt})
        if state is None:
            return
        stage_rng = np.random.default_rng([t.seed, 5])
        train = self._frozen((len(p.ids), b) for p, b in self._train_batches(tuple(self.feats), rng=stage_rng))
        val = self._frozen((len(b.ids), b) for _, b in self.val_eval.loaded(mine=False))
        for epoch in self._epochs_left(state, f.epochs):
            self._set_lr(opt, epoch, f.epochs)
            heads.train()
            losses = []
            with self._clock("train"):
                for k in np.random.default_rng([t.seed, 5, epoch]).permutation(len(train)):
                    stories, states, pos, valid = train[k]
                    loss = None if states is None else m.heads_loss(states, pos, valid) / max(stories, 1)
                    losses.append(self._step(opt, loss, heads.parameters(), f"heads epoch {epoch}", sharded=True))
            heads.eval()
            with self._clock("val"), torch.no_grad():
                vl = sum(float(m.heads_loss(s, p, v)) for _, s, p, v in val) / max(sum(n for n, *_ in val), 1)
            self._record(
                {"stage": "heads", "epoch": epoch, "loss": float(np.mean(losses)), "lr": opt.param_groups[0]["lr"],
                 "val": {"loss": vl}}
            )  # fmt: skip
            self._end_epoch(state, epoch, -vl, heads, {"opt": opt})
        self._end_stage(state, heads)

    # ------------------------------------------------------------------ the loops' shared pieces
    def _stage_state(self, stage: str, opts: dict) -> StageState | None:
        """``stage``'s state: fresh, or the resumed checkpoint's when it was taken inside ``stage`` (its
        optimiser states then loaded into ``opts``); None when the resumed checkpoint is past ``stage``."""
        r = self.resumed
        if r is None or STAGES.index(stage) > STAGES.index(r.stage):  # not resumed, or resumed before this stage
            return StageState(stage)
        if STAGES.index(stage) < STAGES.index(r.stage) or r.epoch == "done":
            return None
        for k, o in opts.items():
            o.load_state_dict(r.opts[k])
        return r

    def _epochs_left(self, state: StageState, n: int):
        """The epochs after ``state``'s last one, up to ``n``, until ``train.early_stop`` epochs pass without a
        better validation score."""
        start, patience = int(state.epoch) + 1, self.cfg.train.early_stop
        for epoch in tqdm(range(start, n), desc=state.stage, disable=not self.progress, initial=start, total=n):
            if patience and state.since >= patience:
                return
            self._tick = {}
            yield epoch

    def _end_epoch(self, state: StageState, epoch: int, score: float, module, opts: dict, extra=None) -> None:
        """Keep ``module``'s state when ``score`` (higher is better) beats the best so far, then write the
        checkpoint: everything needed to continue bit-identically after this epoch."""
        self.timings["epochs"].append({"stage": state.stage, "epoch": epoch, **self._tick})
        if state.best is None or score > state.best:
            state.best, state.best_state, state.since, state.extra = score, copy.deepcopy(module.state_dict()), 0, extra
        else:
            state.since += 1
        state.epoch = epoch
        self._save_state(state, opts)

    def _end_stage(self, state: StageState, module) -> None:
        """Load the best state into ``module`` and checkpoint the stage as done."""
        if state.best_state is not None:
            module.load_state_dict(state.best_state)
        self._save_state(StageState(state.stage, "done", state.best, None, 0, state.extra), {})
        self.log(f"{state.stage}: best validation {state.best}")

    def _optimizer(self, module: torch.nn.Module, pretrained_head: torch.nn.Module | None) -> torch.optim.Optimizer:
        t = self.cfg.train
        head_ids = {id(p) for p in pretrained_head.parameters()} if pretrained_head is not None else set()
        # the rank heads learn in the last stage only: an optimiser that holds them would decay them meanwhile
        # under data parallelism, where gradients are synchronised as zeros rather than left unset
        last = {id(p) for p in self.model.heads().parameters()}
        own = [p for p in module.parameters() if p.requires_grad and id(p) not in last]
        slow = [p for p in own if id(p) in head_ids]
        fast = [p for p in own if id(p) not in head_ids]
        groups = [{"params": fast, "lr": t.lr * t.head_lr_mult}]
        if slow:
            groups.append({"params": slow, "lr": t.lr * t.backbone_lr_mult})
        return torch.optim.Adam(groups, lr=t.lr, weight_decay=t.weight_decay)

    def _step(self, opt, loss, params, where: str, *, sharded: bool = False) -> float:
        """One optimiser step. ``sharded``: ``loss`` is this process's share of the global mean."""
        params = [p for p in params if p.requires_grad]
        total = loss.detach().clone() if loss is not None else torch.zeros((), device=self.device)
        if sharded:
            self.dist.sum_(total)
        v = float(total)
        if not math.isfinite(v):
            raise TrainingDiverged(
                f"loss became {v} at {where}; the last good checkpoint in {self.out} is kept (lower train.lr?)"
            )
        opt.zero_grad(set_to_none=True)
        if loss is not None:
            loss.backward()
        if sharded:
            self.dist.sync_grads(params)
        if self.cfg.train.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, self.cfg.train.grad_clip)
        opt.step()
        return v

    def _local(self, plan):
        """This process's stories of a global batch plan (the whole plan with one process)."""
        if not self.dist.enabled:
            return plan
        keep = self.dist.shard_rows(len(plan.ids))
        return plan.select(keep) if keep else None

    def _train_batches(self, names: tuple[str, ...], *, shuffle_items: bool = True, shard: bool = True, rng=None):
        """``(global plan, this process's batch on the device or None)`` for one pass over the training set.

        Plans come from the recipe's generator (or ``rng``), all at once; each process reads only its own
        stories' rows (``shard``), from the store, a couple of batches ahead of the compute.
        """
        feats = {k: self.feats[k] for k in names}
        mods = tuple(m for m in ("image", "text") if m in feats)
        plans = plan_batches(
            self.train_set,
            self.cfg.train.batch_size,
            self.rng if rng is None else rng,
            mods,
            shuffle_stories=True,
            shuffle_items=shuffle_items,
        )
        pin = self.device.type == "cuda"

        def load(plan):
            mine = self._local(plan) if shard else plan
            return plan, None if mine is None else gather(mine, feats, pin=pin)

        for plan, b in prefetch(load, plans):
            yield plan, None if b is None else b.to(self.device)

    @contextmanager
    def _clock(self, part: str):
        w, c = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            t = self._tick.setdefault(part, {"wall_s": 0.0, "cpu_s": 0.0})
            t["wall_s"] += time.perf_counter() - w
            t["cpu_s"] += time.process_time() - c

    def _record(self, entry: dict) -> None:
        self.history.append(entry)
        if not self.main:
            return
        with open(self.out / "log.jsonl", "a") as f:
            f.write(json.dumps(entry) + "\n")
        if self._tb is not None:
            step = len(self.history)
            for k in ("loss", "lr"):
                if k in entry:
                    self._tb.add_scalar(f"{entry['stage']}/{k}", entry[k], step)
            for k, v in (entry.get("val") or {}).items():
                if isinstance(v, (int, float)):
                    self._tb.add_scalar(f"{entry['stage']}/val_{k}", v, step)

    # ------------------------------------------------------------------ checkpoints
    def _save_state(self, state: StageState, opts: dict) -> None:
        """``state`` with the model, the optimisers in ``opts``, the generators and the log, written atomically."""
        if not self.main:
            return
        ckpt = {
            "stage": state.stage,
            "epoch": state.epoch,
            "since": state.since,
            "best": state.best,
            "model": self.model.state_dict(),
            "best_state": state.best_state,
            "opts": {k: o.state_dict() for k, o in opts.items()},
            "rng_numpy": json.dumps(self.rng.bit_generator.state),
            "rng_torch": torch.get_rng_state(),
            "rng_python": json.dumps(random.getstate()),
            "history": json.dumps(self.history),
            "chosen": json.dumps(self.chosen),
            "extra": json.dumps(state.extra),
            "config": self.cfg.to_json(),
        }
        buf = io.BytesIO()
        torch.save(ckpt, buf)
        atomic_write_bytes(self.out / "train_state.pt", buf.getvalue())

    def load_state(self) -> None:
        """Resume from ``RUN/train_state.pt`` (call after :meth:`setup`)."""
        path = self.out / "train_state.pt"
        if not path.is_file():
            if (self.out / "model.safetensors").is_file():
                raise ModelLoadError(f"{path}: missing, but the run holds a trained model: nothing to resume")
            # killed before the first epoch ended (e.g. while extracting features): start over; setup() has
            # already reused every stored feature, and nothing else had happened yet
            self.log(f"{self.out}: no epoch had finished; training starts from the beginning with the stored features")
            return
        try:
            st = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # corrupt or foreign file
            first = (str(err).strip().splitlines() or [""])[0][:200]  # torch's unpickling errors span many lines
            raise ModelLoadError(f"{path}: unreadable training state ({type(err).__name__}: {first})") from None
        # read through Config so that a state saved before a section existed (0.2: no `inference`) gets its defaults
        if Config.from_dict(json.loads(st["config"])).to_dict() != self.cfg.to_dict():
            raise ModelLoadError(f"{path}: the saved training state was made with a different config")
        self.model.load_state_dict(st["model"])
        self.rng.bit_generator.state = json.loads(st["rng_numpy"])
        torch.set_rng_state(st["rng_torch"])
        r = json.loads(st["rng_python"])
        random.setstate((r[0], tuple(r[1]), r[2]))
        self.history = json.loads(st["history"])
        with open(self.out / "log.jsonl", "w") as f:
            f.writelines(json.dumps(e) + "\n" for e in self.history)
        self.resumed = StageState(
            st["stage"],
            st["epoch"],
            st["best"],
            st["best_state"],
            int(st["since"]),
            json.loads(st["extra"]),
            st["opts"],
        )
        # iterative learning's chosen rounds are its best state's extra (its "done" checkpoint was written before
        # 0.3 with no "chosen" yet); later checkpoints carry them as "chosen"
        self.chosen = self.resumed.extra if st["stage"] == "iterative" else json.loads(st["chosen"])

    def _set_lr(self, opt, epoch: int, n: int) -> None:
        """Cosine decay over the stage, a pure function of the epoch (so resuming needs no scheduler state)."""
        f = 0.5 * (1 + math.cos(math.pi * epoch / max(n, 1))) if self.cfg.train.cosine else 1.0
        for g in opt.param_groups:
            g.setdefault("base_lr", g["lr"])
            g["lr"] = g["base_lr"] * (0.05 + 0.95 * f)

    @torch.no_grad()
    def val_loss(self, mod: str) -> float:
        """Mean pairwise cross-entropy of one orderer on the (fixed) validation presentation."""
        o = self.model.orderer(mod)
        was = o.training
        o.eval()
        tot = cnt = 0.0
        for _, b in self.val_eval.loaded(mine=False):
            n_pairs = float((b.valid(mod).sum(1) * (b.valid(mod).sum(1) - 1)).sum())
            tot += float(pair_loss(o(b.feats[mod], b.index[mod]), b.pos[mod], b.valid(mod))) * n_pairs
            cnt += n_pairs
        o.train(was)
        return tot / max(cnt, 1.0)

    @torch.no_grad()
    def alignment_accuracy(self, ss) -> float:
        self.model.eval()
        hits = total = 0
        for b in batches(ss, 64, np.random.default_rng(0), self.feats, shuffle_stories=False):
            b = b.to(self.device)
            h, n = alignment_hits(self.model.alignment_scores(b), b)
            hits, total = hits + h, total + n
        return hits / max(total, 1)

    @torch.no_grad()
    def authors_val_score(self) -> float:
        """The authors' validation score: per story, the mean of the image and the text pairwise accuracy
        after one guided round at the *training* thresholds and rule; averaged over stories.

        Every process computes it over the whole validation split (it is cheap), so all agree.
        """
        m, g = self.model, self.cfg.guidance
        at_training = dataclasses.replace(
            g, eval_threshold_t2i=g.threshold_t2i, eval_threshold_i2t=g.threshold_i2t, eval_rule=g.train_rule
        )
        was = m.training
        m.eval()
        scores = []
        for _, b in self.val_eval.loaded(mine=False):
            with autocast(self.device, self.cfg.train.amp):
                fw = m(b, 1, guidance=at_training, fuse=False)
            acc = [pairwise_accuracy(fw.logits(mod, 1), b.pos[mod], b.valid(mod)) for mod in ("image", "text")]
            scores.append(((acc[0] + acc[1]) / 2).cpu())
        m.train(was)
        s = torch.cat(scores)
        return float(s[~s.isnan()].mean()) if (~s.isnan()).any() else 0.0

    def _val_entry(self, res, authors: float | None = None) -> dict:
        chosen = res.choose_rounds()
        out = {
            "selection": res.selection_score() if authors is None else authors,
            "chosen_rounds": chosen,
            **{f"{k}_guided_pmr": res.rounds[k][r]["pmr"] for k, r in chosen.items()},
        }
        if res.fused is not None:
            out["fused_pmr"] = res.fused["pmr"]
        if res.timed is not None:
            r = res.choose_capture_rounds().get("image", 0)
            out["capture_time"] = {"image_round": r, "image_pmr": res.timed["image"][r]["pmr"]}
            if res.timed.get("fused") is not None:
                out["capture_time"]["fused_pmr"] = res.timed["fused"]["pmr"]
        return out

    def _frozen(self, batches) -> list:
        """``(global story count, states, positions, valid)`` per ``(global story count, batch)``, states read once
        from the fixed orderers (``None`` in place of the rest for a batch with none of this process's stories)."""
        out = []
        for stories, b in batches:
            if b is None:
                out.append((stories, None, None, None))
                continue
            with autocast(self.device, self.cfg.train.amp):
                states = {k: v.float() for k, v in self.model.frozen_states(b).items()}
            out.append((stories, states, b.pos, {m: b.valid(m) for m in ("image", "text")}))
        return out

    def save(self) -> Path:
        """Write the run: config, weights, metadata (with the validation evaluation) and the model card."""
        self.dist.barrier()  # every process is done reading the store before a private one is removed
        if not self.main:
            return self.out
        val = self.val_result
        save_run(
            self.out,
            self.model,
            {
                "chosen_rounds": self.chosen,
                "train_seconds": round(self.train_seconds, 1),
                "data": str(self.data),
                "format": self.fmt,
                "text_field": self.text_field,
                "truncated_sentences": self.truncated,
                "splits": {"train": len(self.train_stories), "val": len(self.val_stories)},
                "evaluation": {
                    "val": evaluation_record(
                        val.report(self.chosen),
                        len(self.val_stories),
                        self.cfg.train.decoder,
                        (val.fused or {}).get("text"),
                        self.val_ceilings,
                    )
                },
                **({"capture_time": {"chosen_rounds": self.capture_chosen}} if self.capture_time else {}),
            },
        )
        self.model.card_text = write_card(self.out)
        if self.private_store:  # the run is complete: nothing will resume from these features
            shutil.rmtree(self.out / PRIVATE_STORE, ignore_errors=True)
        return self.out

    def cleanup(self) -> None:
        """Close the TensorBoard writer and leave the process group (safe after a failed or partial setup)."""
        if self._tb is not None:
            self._tb.close()
        self.model = self.feats = None  # drop tensors before leaving the process group
        self.dist.teardown()


def _pretrained_head(orderer) -> torch.nn.Module | None:
    """The orderer's head when it is a pretrained backbone's (it learns at ``train.backbone_lr_mult``), else None."""
    return None if isinstance(orderer.head, CNNHead) else orderer.head


def _truncated(text_encoder, stories) -> int:
    """Distinct sentences longer than the text backbone keeps; counted from the tokenizer, so the note is the
    same whether the features came from the cache or were computed now."""
    bb = getattr(text_encoder, "backbone", None)
    if text_encoder is None or not hasattr(bb, "token_lengths"):
        return 0
    sentences = sorted({it.sentence for s in stories for it in s.items if it.sentence is not None})
    return sum(n > bb.max_length for n in bb.token_lengths(sentences)) if sentences else 0


def _tensorboard(path: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # optional extra
        return None
    return SummaryWriter(str(path))


RECORDED = "recorded"  # resume_recipe(cache=RECORDED): the feature store the run was started with


def resume_recipe(run: str | Path, *, progress: bool = True, log=print, cache=RECORDED) -> TrainRecipe:
    """A recipe continuing the interrupted training in ``run`` (set up, state loaded).

    ``cache``: the feature store to read, by default the one recorded in ``train_args.json`` (the shared
    cache directory the run used, or its private ``RUN/features``), so no stored feature is computed twice.
    A run killed before its first checkpoint starts over from the beginning, reusing the stored features.
    """
    args_path = Path(run) / "train_args.json"
    if not args_path.is_file():
        raise ModelLoadError(f"{args_path}: missing; --resume needs a run directory started by `iterwego train`")
    try:
        a = json.loads(args_path.read_text())
        cfg = Config.from_dict(a["config"])
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ModelLoadError, ConfigError) as err:
        raise ModelLoadError(f"{args_path}: unusable ({type(err).__name__}: {err})") from None
    for tmp in Path(run).glob(".*.tmp"):  # atomic writes cut short by the kill that interrupted the run
        tmp.unlink(missing_ok=True)
    if cache == RECORDED:
        cache = FeatureCache(a["cache_dir"]) if a.get("cache_dir") else None
    r = TrainRecipe(
        cfg,
        a["data"],
        run,
        fmt=a["format"],
        image_dir=a["image_dir"],
        text_field=a["text_field"],
        progress=progress,
        log=log,
        cache=cache,
        capture_time=bool(a.get("capture_time", False)),
    )
    r.setup()
    r.load_state()
    return r
