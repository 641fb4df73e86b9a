"""Training as a recipe object: ``setup()`` / ``train()`` / ``save()`` / ``cleanup()``.

Stages, all selected on the validation split (never test):

1. unimodal pre-training of each orderer alone (the "round 0" models);
2. the learned aligner (symmetric InfoNCE on the training stories' image-sentence pairs);
3. iterative learning: each epoch updates the image orderer under text->image
   guidance, then the text orderer under image->text guidance, each phase
   with its own optimiser. The guidance step is :func:`iterwego.guidance.guide`,
   the same function inference uses.

Finally the inference round per modality is chosen on validation and saved.
"""

from __future__ import annotations

import copy
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .config import Config
from .data import load_split
from .encoders import CNNHead, build_encoder
from .errors import IterWeGOError
from .evaluate import Evaluator, alignment_scores, pick
from .features import FeatureBank, batches, index_stories, make_batch
from .guidance import align, guide
from .model import IterWeGO, pair_loss
from .run import atomic_write_json, save_run


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class TrainingDiverged(IterWeGOError):
    """The loss became NaN or infinite."""


class TrainRecipe:
    """Train every part of IterWeGO on one dataset and save it as a run directory."""

    def __init__(self, cfg: Config, data: str | Path, out: str | Path, *, fmt: str = "vist", image_dir: str | None = None, text_field: str = "text", progress: bool = True, log=print):
        self.cfg, self.data, self.out = cfg, Path(data), Path(out)
        self.fmt, self.image_dir, self.text_field = fmt, image_dir, text_field
        self.progress, self.log = progress, log
        self.history: list[dict] = []

    # ------------------------------------------------------------------ setup
    def setup(self) -> "TrainRecipe":
        c = self.cfg
        seed_everything(c.train.seed)
        if c.train.num_threads:
            torch.set_num_threads(c.train.num_threads)
        self.device = pick_device(c.train.device)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "log.jsonl").write_text("")
        self._tb = _tensorboard(self.out / "tb")
        t0 = time.time()
        read = dict(fmt=self.fmt, image_dir=self.image_dir, text_field=self.text_field)
        self.train_stories = load_split(self.data, "train", **read)
        self.val_stories = load_split(self.data, "val", **read)
        self.image_encoder = build_encoder("image", c.encoder, c.orderer.d_model)
        self.text_encoder = build_encoder("text", c.encoder, c.orderer.d_model)
        banks = {"image": FeatureBank(self.image_encoder), "text": FeatureBank(self.text_encoder)}
        self.train_set = index_stories(self.train_stories, banks["image"], banks["text"], cross_modal=True, where=str(self.data / "train"))
        self.val_set = index_stories(self.val_stories, banks["image"], banks["text"], cross_modal=True, where=str(self.data / "val"))
        self.feats = {m: b.build(progress=self.progress) for m, b in banks.items()}
        truncated = getattr(self.text_encoder.backbone, "truncated", 0)
        if truncated:
            self.log(f"note: {truncated} sentence(s) longer than {c.encoder.text_max_length} tokens were truncated")
        self.truncated = truncated
        self.log(f"data: {len(self.train_stories)} train / {len(self.val_stories)} val stories; features ready in {time.time() - t0:.1f}s")
        self.model = IterWeGO(c, self.image_encoder, self.text_encoder).to(self.device)
        self.val_eval = Evaluator(self.val_set, self.feats, c.guidance, mapping=c.aligner.mapping, decoder=c.train.decoder, seed=c.train.seed + 1, device=self.device)
        self.rng = np.random.default_rng(c.train.seed)
        return self

    def _optimizer(self, module: torch.nn.Module, pretrained_head: torch.nn.Module | None) -> torch.optim.Optimizer:
        t = self.cfg.train
        head_ids = {id(p) for p in pretrained_head.parameters()} if pretrained_head is not None else set()
        slow = [p for p in module.parameters() if id(p) in head_ids and p.requires_grad]
        fast = [p for p in module.parameters() if id(p) not in head_ids and p.requires_grad]
        groups = [{"params": fast, "lr": t.lr * t.head_lr_mult}]
        if slow:
            groups.append({"params": slow, "lr": t.lr * t.backbone_lr_mult})
        return torch.optim.Adam(groups, lr=t.lr, weight_decay=t.weight_decay)

    def _step(self, opt, loss, params, where: str) -> float:
        v = float(loss.detach())
        if not math.isfinite(v):
            raise TrainingDiverged(f"loss became {v} at {where}; the last good checkpoint in {self.out} is kept (lower train.lr?)")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.train.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, self.cfg.train.grad_clip)
        opt.step()
        return v

    def _record(self, entry: dict) -> None:
        self.history.append(entry)
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

    # ------------------------------------------------------------------ stages
    def _pretrained_head(self, orderer) -> torch.nn.Module | None:
        return None if isinstance(orderer.head, CNNHead) else orderer.head

    def fit_unimodal(self, mod: str) -> None:
        t = self.cfg.train
        orderer = self.model.orderer(mod)
        opt = self._optimizer(orderer, self._pretrained_head(orderer))
        best, best_state, since = None, None, 0
        bar = tqdm(range(t.unimodal_epochs), desc=f"unimodal {mod}", disable=not self.progress)
        for epoch in bar:
            orderer.train()
            losses = []
            for b in batches(self.train_set, t.batch_size, self.rng, {mod: self.feats[mod]}, shuffle_stories=True):
                b = b.to(self.device)
                loss = pair_loss(orderer(b.feats[mod], b.index[mod]), b.pos[mod], b.valid(mod))
                losses.append(self._step(opt, loss, orderer.parameters(), f"unimodal {mod} epoch {epoch}"))
            val = pick(self.val_eval(self.model, only=mod).rounds[mod][0])
            self._record({"stage": f"unimodal-{mod}", "epoch": epoch, "loss": float(np.mean(losses)), "lr": opt.param_groups[0]["lr"], "val": val})
            bar.set_postfix(loss=f"{np.mean(losses):.3f}", val_pmr=f"{val['pmr']:.3f}")
            key = (val["pmr"], val["tau"])
            if best is None or key > best:
                best, best_state, since = key, copy.deepcopy(orderer.state_dict()), 0
            else:
                since += 1
                if t.early_stop and since >= t.early_stop:
                    break
        orderer.load_state_dict(best_state)
        self.log(f"unimodal {mod}: best val PMR {best[0]:.3f}")

    def fit_aligner(self) -> None:
        a, t = self.cfg.aligner, self.cfg.train
        if a.kind != "learned":
            return
        al = self.model.aligner
        opt = torch.optim.Adam([p for p in al.parameters() if p.requires_grad], lr=a.lr, weight_decay=t.weight_decay)
        best, best_state, since = None, None, 0
        bar = tqdm(range(a.epochs), desc="aligner", disable=not self.progress)
        for epoch in bar:
            al.train()
            losses = []
            # unshuffled batches: row k of the image features and of the text features is the same item
            for b in batches(self.train_set, t.batch_size, self.rng, self.feats, shuffle_stories=True, shuffle_items=False):
                b = b.to(self.device)
                loss = al.loss(b.feats["image"], b.feats["text"])
                losses.append(self._step(opt, loss, al.parameters(), f"aligner epoch {epoch}"))
            acc = self.alignment_accuracy(self.val_set)
            self._record({"stage": "aligner", "epoch": epoch, "loss": float(np.mean(losses)), "lr": a.lr, "val": {"alignment_accuracy": acc}})
            bar.set_postfix(loss=f"{np.mean(losses):.3f}", val_acc=f"{acc:.3f}")
            if best is None or acc > best:
                best, best_state, since = acc, copy.deepcopy(al.state_dict()), 0
            else:
                since += 1
                if t.early_stop and since >= t.early_stop:
                    break
        al.load_state_dict(best_state)
        self.log(f"aligner: best val alignment accuracy {best:.3f}")

    @torch.no_grad()
    def alignment_accuracy(self, ss) -> float:
        self.model.eval()
        hits = total = 0
        rng = np.random.default_rng(0)
        for b in batches(ss, 64, rng, self.feats, shuffle_stories=False):
            b = b.to(self.device)
            iv, tv = b.valid("image"), b.valid("text")
            am = align(alignment_scores(self.model, b), "argmax", iv, tv)
            hits += int(((b.pos["text"].gather(1, am.clamp(min=0)) == b.pos["image"]) & iv).sum())
            total += int(iv.sum())
        return hits / max(total, 1)

    def fit_iterative(self) -> None:
        c, t, g = self.cfg, self.cfg.train, self.cfg.guidance
        m = self.model
        opts = {mod: self._optimizer(m.orderer(mod), self._pretrained_head(m.orderer(mod))) for mod in ("image", "text")}
        res = self.val_eval(m)
        best, best_state, since = res.selection_score(), copy.deepcopy(m.state_dict()), 0
        self.chosen = res.choose_rounds()
        self._record({"stage": "iterative", "epoch": -1, "val": {"selection": best, "chosen_rounds": self.chosen, **{f"{k}_guided_pmr": res.rounds[k][r]["pmr"] for k, r in self.chosen.items()}}})
        bar = tqdm(range(t.iterative_epochs), desc="iterative", disable=not self.progress)
        for epoch in bar:
            entry = {"stage": "iterative", "epoch": epoch}
            for tgt, src, thr, lam in (("image", "text", g.threshold_t2i, g.weight_t2i), ("text", "image", g.threshold_i2t, g.weight_i2t)):
                losses = []
                for b in batches(self.train_set, t.batch_size, self.rng, self.feats, shuffle_stories=True):
                    b = b.to(self.device)
                    with torch.no_grad():  # the guiding modality and the aligner are fixed in this phase
                        m.orderer(src).eval()
                        src_logits = m.orderer(src)(b.feats[src], b.index[src])
                        scores = alignment_scores(m, b)
                        if src == "text":
                            mapping = align(scores.transpose(1, 2), c.aligner.mapping, b.valid("text"), b.valid("image"))
                        else:
                            mapping = align(scores, c.aligner.mapping, b.valid("image"), b.valid("text"))
                    m.orderer(tgt).train()
                    logits = m.orderer(tgt)(b.feats[tgt], b.index[tgt])
                    guided = guide(logits, src_logits, mapping, threshold=thr, weight=lam, rule=g.train_rule, valid=b.valid(src))
                    loss = pair_loss(guided, b.pos[tgt], b.valid(tgt))
                    losses.append(self._step(opts[tgt], loss, m.orderer(tgt).parameters(), f"iterative epoch {epoch} {tgt} phase"))
                entry[f"loss_{tgt}"] = float(np.mean(losses))
            res = self.val_eval(m)
            score, chosen = res.selection_score(), res.choose_rounds()
            entry["val"] = {"selection": score, "chosen_rounds": chosen, **{f"{k}_guided_pmr": res.rounds[k][r]["pmr"] for k, r in chosen.items()}, "fused_pmr": res.fused["pmr"]}
            entry["loss"] = (entry["loss_image"] + entry["loss_text"]) / 2
            self._record(entry)
            bar.set_postfix(val=f"{score:.3f}")
            if score > best:
                best, best_state, since, self.chosen = score, copy.deepcopy(m.state_dict()), 0, chosen
            else:
                since += 1
                if t.early_stop and since >= t.early_stop:
                    break
        m.load_state_dict(best_state)
        self.log(f"iterative: best val selection score {best:.3f}; inference rounds chosen on val: {self.chosen}")

    def train(self) -> "TrainRecipe":
        t0 = time.time()
        self.fit_unimodal("image")
        self.fit_unimodal("text")
        self.fit_aligner()
        self.fit_iterative()
        self.train_seconds = time.time() - t0
        return self

    def save(self) -> Path:
        save_run(self.out, self.model, {"chosen_rounds": self.chosen, "train_seconds": round(self.train_seconds, 1), "data": str(self.data), "format": self.fmt, "text_field": self.text_field, "truncated_sentences": self.truncated})
        return self.out

    def cleanup(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _tensorboard(path: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # optional extra
        return None
    return SummaryWriter(str(path))
