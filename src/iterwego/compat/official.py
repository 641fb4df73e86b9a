"""Import the authors' released IterWeGO checkpoint and reproduce their evaluation numerics.

The authors save ``torch.save({'model': state_dict, 'args': Namespace, 'best_score': float})``
for their ``natorderNet``, whose state dict holds three parts:

* ``img_flow.*``: a Hugging Face ``CLIPModel`` (``img_flow.clip.*``) whose projected,
  L2-normalised image features feed a set transformer and a pair head;
* ``txt_flow.*``: a ``BertModel`` (``txt_flow.bert.*``) whose last hidden state,
  averaged over *all* token positions (padding included), feeds the same kind of
  set transformer and pair head;
* ``clip_align.*``: a second full ``CLIPModel`` used only to align sentences and
  images (argmax per row of its ``logits_per_text`` / ``logits_per_image``).

The set transformer and pair head keep the authors' parameter names in
:mod:`iterwego.model`, so :class:`OfficialModel` loads their state dict verbatim
(``strict``), after every tensor shape has been checked against the architecture
configs. :meth:`OfficialModel.official_logits` computes, for one story, what
their evaluation script computes; :func:`save_as_run` turns the import into an
ordinary iterwego run directory.

Round convention: ``rounds=r`` applies r guidance steps (image from text, then
text from the updated image). The authors' evaluation loop index ``k`` applies
``k + 1`` steps, i.e. their three reported rounds are ``rounds=1, 2, 3`` here.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from ..aligner import align
from ..batch import Batch
from ..config import AlignerConfig, Config, EncoderConfig, GuidanceConfig, OrdererConfig, preset
from ..errors import ModelLoadError
from ..guidance import iterate
from ..model import IterWeGO, PairHead, SetTransformer

__all__ = [
    "EVAL_GUIDANCE",
    "OfficialCheckpoint",
    "OfficialModel",
    "clip_align_encoders",
    "iterwego_state_dict",
    "load_official",
    "official_guidance",
    "read_checkpoint",
    "official_run_config",
    "save_as_run",
]

HEADS = 4  # the authors hard-code 4 attention heads (their --n_heads flag is never read)
TEXT_MAX_LENGTH = 40  # both tokenisers: padding to the longest sentence, truncated at 40 tokens
FLOWS = {"image": "img_flow", "text": "txt_flow"}
BACKBONE_DIRS = {"image": "backbones/clip", "text": "backbones/bert", "aligner": "backbones/clip_align"}

# theta / lambda of the authors' evaluation script (eval.py defaults; both thresholds 0.8 there,
# unlike training's 0.8 / 0.9)
EVAL_GUIDANCE = {"threshold_t2i": 0.8, "threshold_i2t": 0.8, "weight_t2i": 1.0, "weight_i2t": 0.25}

# Older transformers saved these position/token-type buffers; newer ones register them as
# non-persistent. They are constants (arange / zeros), so a checkpoint carrying them loses nothing.
_LEGACY_BUFFER = re.compile(r"\.embeddings\.(position_ids|token_type_ids)$")

_DEFAULT_CONFIGS = {"clip": "clip-vit-large-patch14.json", "bert": "bert-base-uncased.json"}


# --------------------------------------------------------------------------- reading
@dataclass
class OfficialCheckpoint:
    """The contents of an authors' checkpoint file, read without executing any pickled code."""

    path: Path
    state: dict[str, Tensor]
    args: dict[str, Any]  # the training Namespace, as JSON-safe values
    best_score: float | None


def _json_safe(v: Any) -> Any:
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        return v if v == v and abs(v) != float("inf") else repr(v)  # JSON has no NaN / inf
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _json_safe(x) for k, x in v.items()}
    return repr(v)


def _torch_load(path: Path):
    # Only argparse.Namespace joins torch's allow-list of plain containers and tensors: any other
    # global in the pickle (os.system, a custom __reduce__ ...) makes the load fail before it runs.
    with torch.serialization.safe_globals([argparse.Namespace]):
        try:
            # mmap avoids holding the ~4 GB file twice in memory while the model is built
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format


def read_checkpoint(path: str | Path) -> OfficialCheckpoint:
    """Read the authors' ``{'model', 'args', 'best_score'}`` checkpoint safely.

    Raises :class:`ModelLoadError` (one line, naming the file) when the file is
    missing, is not a torch checkpoint, would need anything beyond tensors,
    plain containers and ``argparse.Namespace`` to unpickle, or lacks ``'model'``.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"{path}: checkpoint file not found")
    try:
        obj = _torch_load(path)
    except Exception as err:  # noqa: BLE001 - every unpickling failure means the same thing to the user
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise ModelLoadError(
            f"{path}: refused to load: not a plain torch checkpoint of tensors and argparse.Namespace "
            f"({type(err).__name__}: {first}); iterwego never unpickles arbitrary objects"
        ) from None
    if not isinstance(obj, Mapping) or "model" not in obj:
        keys = sorted(map(str, obj)) if isinstance(obj, Mapping) else type(obj).__name__
        raise ModelLoadError(
            f"{path}: not an IterWeGO checkpoint: expected a dict with a 'model' state dict, found {keys}"
        )
    state = obj["model"]
    if not isinstance(state, Mapping) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise ModelLoadError(f"{path}: 'model' is not a non-empty state dict of tensors")
    args = obj.get("args")
    args_d = vars(args) if isinstance(args, argparse.Namespace) else (dict(args) if isinstance(args, Mapping) else {})
    best = obj.get("best_score")
    try:
        best_f = float(best) if best is not None else None
    except (TypeError, ValueError):
        best_f = None
    return OfficialCheckpoint(path, {str(k): v for k, v in state.items()}, _json_safe(args_d), best_f)


# --------------------------------------------------------------------------- configs
def _hf_config(kind: str, value: str | Path | Mapping | None):
    """A ``CLIPConfig`` / ``BertConfig`` from the shipped default, a config.json path, a model dir or a dict."""
    from transformers import BertConfig, CLIPConfig

    cls = CLIPConfig if kind == "clip" else BertConfig
    if value is None:
        where = f"iterwego/configs/{_DEFAULT_CONFIGS[kind]}"
        d = json.loads(resources.files("iterwego").joinpath("configs", _DEFAULT_CONFIGS[kind]).read_text())
    elif isinstance(value, Mapping):
        where, d = f"the {kind} config dict", dict(value)
    else:
        p = Path(value)
        p = p / "config.json" if p.is_dir() else p
        where = str(p)
        if not p.is_file():
            raise ModelLoadError(f"{p}: {kind} config not found")
        try:
            d = json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ModelLoadError(f"{p}: not valid JSON ({err})") from None
    if not isinstance(d, dict):
        raise ModelLoadError(f"{where}: a {kind} config must be a JSON object")
    want = "clip" if kind == "clip" else "bert"
    if d.get("model_type", want) != want:
        raise ModelLoadError(f"{where}: model_type is {d.get('model_type')!r}, expected {want!r}")
    try:
        return cls.from_dict(d)
    except (TypeError, ValueError, KeyError) as err:
        raise ModelLoadError(f"{where}: not a valid {cls.__name__} ({err})") from None


def _no_init():
    """Skip random initialisation of backbones that the checkpoint overwrites anyway (seconds for ViT-L)."""
    for mod in ("transformers.initialization", "transformers.modeling_utils"):
        try:
            return __import__(mod, fromlist=["no_init_weights"]).no_init_weights()
        except (ImportError, AttributeError):
            continue
    return contextlib.nullcontext()  # pragma: no cover - every supported transformers has one


def _orderer_config(state: Mapping[str, Tensor], flow: str, path: Path) -> OrdererConfig:
    """Set-transformer depth and widths of one flow, read off the checkpoint's tensors."""
    pre = f"{flow}.encoder.layers."
    layer_ids = {
        int(k[len(pre) :].split(".", 1)[0])
        for k in state
        if k.startswith(pre) and k[len(pre) :].split(".", 1)[0].isdigit()
    }
    if not layer_ids:
        raise ModelLoadError(f"{path}: no set-transformer layers under '{pre}*': not a natorderNet checkpoint?")
    if layer_ids != set(range(len(layer_ids))):
        raise ModelLoadError(
            f"{path}: set-transformer layers under '{pre}*' are not numbered "
            f"0..{len(layer_ids) - 1}: {sorted(layer_ids)}"
        )
    need = [f"{pre}0.self_attn.linears.0.weight", f"{pre}0.feed_forward.w_1.weight", f"{flow}.classifier.linear.weight"]
    for k in need:
        if k not in state:
            raise ModelLoadError(f"{path}: missing key {k}")
    d = state[need[0]].shape[0]
    ffn = state[need[1]].shape[0]
    lin = tuple(state[need[2]].shape)
    if lin != (d, 2 * d):
        raise ModelLoadError(
            f"{path}: {need[2]} has shape {lin}, but iterwego's pair head needs ({d}, {2 * d}) "
            f"(classifier width d_mlp must equal the set-transformer width d_rnn = {d})"
        )
    if d % HEADS:
        raise ModelLoadError(f"{path}: set-transformer width {d} is not divisible by the authors' {HEADS} heads")
    return OrdererConfig(d_model=d, layers=len(layer_ids), heads=HEADS, ffn=ffn, dropout=0.0, input_dropout=0.0)


# --------------------------------------------------------------------------- model
class _Flow(nn.Module):
    """One modality flow with the authors' submodule names: backbone, ``encoder`` and ``classifier``."""

    def __init__(self, backbone_name: str, backbone: nn.Module, cfg: OrdererConfig):
        super().__init__()
        self.backbone_name = backbone_name
        self.add_module(backbone_name, backbone)
        self.encoder = SetTransformer(cfg)
        self.classifier = PairHead(cfg.d_model, cfg.dropout)
        self.cfg = cfg

    @property
    def backbone(self) -> nn.Module:
        return getattr(self, self.backbone_name)

    def pair_logits(self, items: Tensor) -> Tensor:
        """``(n, n, 2)`` pair logits of one story's ``(n, d)`` item vectors, all items attending to all."""
        valid = torch.ones(1, items.shape[0], dtype=torch.bool, device=items.device)
        return self.classifier(self.encoder(items[None], valid))[0]


class OfficialModel(nn.Module):
    """The authors' natorderNet, rebuilt from iterwego parts; its state dict keys are theirs.

    Attributes ``args`` (training Namespace as a dict), ``best_score`` and
    ``source`` (checkpoint path) describe where the weights came from;
    ``guidance`` holds the evaluation theta / lambda (:data:`EVAL_GUIDANCE`).
    """

    def __init__(self, clip_config, bert_config, image_cfg: OrdererConfig, text_cfg: OrdererConfig):
        super().__init__()
        from transformers import BertModel, CLIPModel

        for name, need, have in (
            ("CLIP projection_dim", image_cfg.d_model, clip_config.projection_dim),
            ("BERT hidden_size", text_cfg.d_model, bert_config.hidden_size),
        ):
            if need != have:
                raise ModelLoadError(
                    f"the {name} is {have} but the checkpoint's set transformer is {need} wide; "
                    "wrong --clip-config/--bert-config?"
                )
        with _no_init():
            self.img_flow = _Flow("clip", CLIPModel(clip_config), image_cfg)
            self.txt_flow = _Flow("bert", BertModel(bert_config), text_cfg)
            self.clip_align = CLIPModel(clip_config)
        self.guidance = dict(EVAL_GUIDANCE)
        self.args: dict[str, Any] = {}
        self.best_score: float | None = None
        self.source: str | None = None

    # -- features, exactly as the authors compute them
    def image_features(self, pixel_values: Tensor) -> Tensor:
        """CLIP's projected image embedding divided by its L2 norm, ``(n, projection_dim)``."""
        clip = self.img_flow.clip
        e = clip.visual_projection(clip.vision_model(pixel_values=pixel_values).pooler_output)
        return e / e.norm(p=2, dim=-1, keepdim=True)

    def text_features(self, bert_inputs: Mapping[str, Tensor]) -> Tensor:
        """Mean of BERT's last hidden state over all token positions, padding included, ``(n, hidden)``."""
        kw = {k: bert_inputs[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in bert_inputs}
        return self.txt_flow.bert(**kw).last_hidden_state.mean(1)

    def alignment(self, pixel_values: Tensor, clip_inputs: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """``(t2i, i2t)``: per sentence the argmax image, per image the argmax sentence, from ``clip_align``."""
        out = self.clip_align(
            pixel_values=pixel_values,
            input_ids=clip_inputs["input_ids"],
            attention_mask=clip_inputs.get("attention_mask"),
        )
        t2i = align(out.logits_per_text[None], "argmax")[0]
        i2t = align(out.logits_per_image[None], "argmax")[0]
        return t2i, i2t

    @torch.no_grad()
    def official_logits(
        self, pixel_values: Tensor, bert_inputs: Mapping[str, Tensor], clip_inputs: Mapping[str, Tensor], rounds: int
    ) -> tuple[Tensor, Tensor]:
        """The authors' evaluation logits of ONE story after ``rounds`` guidance steps.

        Args:
            pixel_values: ``(n_img, 3, H, W)`` CLIP-processed images, in the (shuffled) input order.
            bert_inputs: BERT tokenizer output for the sentences (``padding='longest'``, ``max_length=40``).
            clip_inputs: CLIP tokenizer output for the same sentences, same settings.
            rounds: guidance steps; 0 gives the unimodal logits.

        Returns ``(image_logits, text_logits)``, each ``(n, n, 2)``; class 1 of ``(i, j)`` is "i before j".
        """
        if rounds < 0:
            raise ValueError(f"rounds must be >= 0, got {rounds}")
        dev = next(self.parameters()).device
        pv = pixel_values.to(dev)
        clip = self.img_flow.clip
        al = self.clip_align(
            pixel_values=pv,
            input_ids=clip_inputs["input_ids"].to(dev),
            attention_mask=_to(clip_inputs.get("attention_mask"), dev),
        )
        feats = {
            "image": clip.vision_model(pixel_values=pv).pooler_output,  # the run's image head projects and normalises
            "text": self.text_features({k: v.to(dev) for k, v in bert_inputs.items()}),
            "align_image": al.image_embeds,
            "align_text": al.text_embeds,
        }
        n_img, n_txt = len(pv), len(feats["text"])
        index = {"image": torch.arange(n_img, device=dev)[None], "text": torch.arange(n_txt, device=dev)[None]}
        batch = Batch([0], index, {k: v.clone() for k, v in index.items()}, feats)
        guidance = GuidanceConfig(**self.guidance, eval_rule="any")
        out = self.as_iterwego()(batch, rounds, guidance=guidance, mapping="argmax", fuse=False)
        return out.image[-1][0], out.text[-1][0]

    def as_iterwego(self, *, bert_tokenizer=None, clip_tokenizer=None, run_dir: Path | None = None) -> IterWeGO:
        """This model as an :class:`~iterwego.model.IterWeGO`: backbones shared, orderer weights copied.

        Built once per device and dtype and then reused, so it reflects the
        weights as they were at that first call (an imported model is not trained further).
        """
        p = next(self.parameters())
        key = (p.device, p.dtype, bert_tokenizer is not None, clip_tokenizer is not None, run_dir)
        cache = self.__dict__.setdefault("_iterwego", {})
        if key not in cache:
            cache[key] = _build_iterwego(self, bert_tokenizer, clip_tokenizer, run_dir).to(p.device, p.dtype).eval()
        return cache[key]


def _to(x: Tensor | None, dev) -> Tensor | None:
    return None if x is None else x.to(dev)


def _build_iterwego(model: "OfficialModel", bert_tokenizer, clip_tokenizer, run_dir: Path | None) -> IterWeGO:
    from ..encoders import build_encoder

    cfg = official_run_config(model)
    enc_cfg = cfg.encoder
    where = run_dir if run_dir is not None else Path(model.source or ".")
    grad_flags = [(p, p.requires_grad) for p in model.parameters()]  # backbone wrappers freeze what they wrap
    image_enc = build_encoder("image", enc_cfg, preloaded={enc_cfg.image: model.img_flow.clip})
    text_tok = bert_tokenizer if bert_tokenizer is not None else _MissingTokenizer(where, *_MISSING["bert"])
    text_enc = build_encoder("text", enc_cfg, preloaded={enc_cfg.text: (model.txt_flow.bert, text_tok)})
    align_enc = clip_align_encoders(BACKBONE_DIRS["aligner"], model.clip_align, clip_tokenizer, run_dir=where)
    net = IterWeGO(cfg, image_enc, text_enc, align_encoders=align_enc)
    state = iterwego_state_dict(model)
    state["aligner.logit_scale"] = model.clip_align.logit_scale.detach().exp().reshape(())
    net.load_state_dict(state, strict=True)
    for p, flag in grad_flags:
        p.requires_grad_(flag)
    return net


def official_guidance(
    image_logits: Tensor,
    text_logits: Tensor,
    t2i: Tensor,
    i2t: Tensor,
    rounds: int,
    *,
    threshold_t2i: float = EVAL_GUIDANCE["threshold_t2i"],
    threshold_i2t: float = EVAL_GUIDANCE["threshold_i2t"],
    weight_t2i: float = EVAL_GUIDANCE["weight_t2i"],
    weight_i2t: float = EVAL_GUIDANCE["weight_i2t"],
) -> tuple[Tensor, Tensor]:
    """The authors' evaluation guidance for one story's ``(n, n, 2)`` logits: rule ``any``, ``rounds`` steps.

    A thin wrapper over :func:`iterwego.guidance.iterate`, whose ``index_add``
    equals the authors' one-pair-at-a-time additions (repeated targets accumulate).
    """
    g = GuidanceConfig(
        threshold_t2i=threshold_t2i, threshold_i2t=threshold_i2t, weight_t2i=weight_t2i, weight_i2t=weight_i2t
    )
    steps = iterate(image_logits[None], text_logits[None], t2i[None], i2t[None], rounds, g, rule="any")
    img, txt = steps[-1]
    return img[0], txt[0]


def _check_state(model: nn.Module, state: Mapping[str, Tensor], path: Path) -> dict[str, Tensor]:
    """The checkpoint tensors the model takes, after checking names and shapes; raises on the first problem."""
    own = model.state_dict()
    keep: dict[str, Tensor] = {}

    def which(key: str) -> str:
        if key.startswith(("img_flow.clip.", "clip_align.")):
            return "; the CLIP config (--clip-config) does not match the checkpoint"
        if key.startswith("txt_flow.bert."):
            return "; the BERT config (--bert-config) does not match the checkpoint"
        return ""

    for k, v in state.items():
        if k not in own:
            if _LEGACY_BUFFER.search(k):
                continue
            raise ModelLoadError(
                f"{path}: unexpected key {k} (shape {tuple(v.shape)}) "
                f"that the model built from the configs does not have{which(k)}"
            )
        if tuple(v.shape) != tuple(own[k].shape):
            raise ModelLoadError(
                f"{path}: shape mismatch for {k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}{which(k)}"
            )
        keep[k] = v
    missing = [k for k in own if k not in keep]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise ModelLoadError(
            f"{path}: missing key {missing[0]} (model shape {tuple(own[missing[0]].shape)}){more}{which(missing[0])}"
        )
    return keep


def load_official(
    path: str | Path, clip_config: str | Path | Mapping | None = None, bert_config: str | Path | Mapping | None = None
) -> OfficialModel:
    """Load the authors' checkpoint into an :class:`OfficialModel` (eval mode, CPU, float32).

    ``clip_config`` / ``bert_config`` default to the shipped ViT-L/14 and
    bert-base-uncased architecture configs; pass a config.json path, a model
    directory or a dict to override. Every tensor's name and shape is checked
    before loading; the first problem raises :class:`ModelLoadError`.
    """
    ckpt = read_checkpoint(path)
    clip_cfg, bert_cfg = _hf_config("clip", clip_config), _hf_config("bert", bert_config)
    img_cfg = _orderer_config(ckpt.state, FLOWS["image"], ckpt.path)
    txt_cfg = _orderer_config(ckpt.state, FLOWS["text"], ckpt.path)
    try:
        model = OfficialModel(clip_cfg, bert_cfg, img_cfg, txt_cfg)
    except ModelLoadError as err:
        raise ModelLoadError(f"{ckpt.path}: {err}") from None
    state = _check_state(model, ckpt.state, ckpt.path)
    model.load_state_dict(state, strict=False)  # strictness was checked above, legacy buffers aside
    model.args, model.best_score, model.source = ckpt.args, ckpt.best_score, str(ckpt.path)
    return model.float().eval()


# --------------------------------------------------------------------------- run directories
def iterwego_state_dict(model: OfficialModel) -> dict[str, Tensor]:
    """The orderer weights under :class:`iterwego.model.IterWeGO` names (``image.*``, ``text.*``).

    The image head is CLIP's (fine-tuned) visual projection; the text head has no parameters.
    """
    out: dict[str, Tensor] = {}
    for modality, flow_name in FLOWS.items():
        flow = getattr(model, flow_name)
        for part in ("encoder", "classifier"):
            for k, v in getattr(flow, part).state_dict().items():
                out[f"{modality}.{part}.{k}"] = v
    out["image.head.visual_projection.weight"] = model.img_flow.clip.visual_projection.weight
    return out


def official_run_config(model: OfficialModel) -> Config:
    """The iterwego config of an imported model: the paper preset with the checkpoint's sizes and numerics."""
    ic, tc = model.img_flow.cfg, model.txt_flow.cfg
    if (ic.d_model, ic.layers, ic.ffn) != (tc.d_model, tc.layers, tc.ffn):
        raise ModelLoadError(
            f"{model.source}: image and text set transformers differ ({ic.d_model}/{ic.layers}/{ic.ffn} vs "
            f"{tc.d_model}/{tc.layers}/{tc.ffn}); an iterwego run has one orderer config for both"
        )
    args = model.args
    num = lambda k, default: (
        args[k] if isinstance(args.get(k), (int, float)) and not isinstance(args.get(k), bool) else default
    )  # noqa: E731
    base = preset("paper")
    train = base.train
    train.lr = float(num("lr", train.lr))
    train.batch_size = int(num("batch_size", train.batch_size))
    train.seed = int(num("seed", train.seed))
    train.early_stop = int(num("early_stop", train.early_stop))
    train.grad_clip = float(num("grad_clip", train.grad_clip))
    return Config(
        preset="paper",
        encoder=EncoderConfig(
            image=f"clip:{BACKBONE_DIRS['image']}",
            text=f"bert:{BACKBONE_DIRS['text']}",
            image_size=model.img_flow.clip.config.vision_config.image_size,
            text_max_length=TEXT_MAX_LENGTH,
            text_train_layers=0,
            image_train_projection=True,
            local_files_only=True,
            official_text_pooling=True,
        ),
        orderer=OrdererConfig(
            d_model=ic.d_model,
            layers=ic.layers,
            heads=HEADS,
            ffn=ic.ffn,
            dropout=float(num("attdp", 0.2)),
            pair_dropout=base.orderer.pair_dropout,  # hard-coded in their classifier
            input_dropout=0.0,
        ),
        aligner=AlignerConfig(
            kind="clip",
            mapping="argmax",
            clip_model=f"clip:{BACKBONE_DIRS['aligner']}",
            clip_text_max_length=TEXT_MAX_LENGTH,
        ),
        guidance=GuidanceConfig(
            threshold_t2i=float(num("thr_thi", base.guidance.threshold_t2i)),  # training's, from the checkpoint
            threshold_i2t=float(num("thr_iht", base.guidance.threshold_i2t)),
            eval_threshold_t2i=model.guidance["threshold_t2i"],
            eval_threshold_i2t=model.guidance["threshold_i2t"],
            weight_t2i=model.guidance["weight_t2i"],
            weight_i2t=model.guidance["weight_i2t"],
            train_rule="class0",
            eval_rule="any",
            train_source_dropout=True,
            max_rounds=3,
        ),
        train=train,
    )


class _MissingTokenizer:
    """Stands in for a tokenizer the import did not have; using it raises a clear error."""

    def __init__(self, run_dir: Path, what: str, subdir: str, flag: str):
        self.message = (
            f"{run_dir}: this run was imported from the authors' checkpoint without a {what} tokenizer; "
            f"copy {what}'s tokenizer files into {run_dir / subdir} or re-import with "
            f"`iterwego import-official CKPT --out {run_dir} {flag} DIR`"
        )

    def __call__(self, *a, **kw):
        raise ModelLoadError(self.message)

    def __getattr__(self, name: str):
        if name.startswith("__"):  # keep copy/pickle/hasattr protocols working
            raise AttributeError(name)
        raise ModelLoadError(self.message)


_MISSING = {
    "bert": ("bert-base-uncased", BACKBONE_DIRS["text"], "--bert-tokenizer"),
    "clip": ("openai/clip-vit-large-patch14", BACKBONE_DIRS["aligner"], "--clip-tokenizer"),
}


def clip_align_encoders(
    name: str, model=None, tokenizer=None, *, local_files_only: bool = True, run_dir: Path | None = None
):
    """``(image, text)`` encoders of normalised CLIP embeddings for :class:`iterwego.model.CLIPAligner`.

    ``model`` / ``tokenizer`` default to loading ``name`` (a local directory or hub name). With
    ``run_dir`` set and no tokenizer, the text encoder is a stand-in that raises a clear
    :class:`ModelLoadError` when used (an imported run without a CLIP tokenizer).
    """
    from transformers import AutoTokenizer, CLIPModel

    from ..encoders import CLIPTextBackbone, CLIPVisionBackbone, Encoder, L2Head, load_pretrained

    if model is None:
        model = load_pretrained(CLIPModel, name, local_files_only, "CLIP aligner")
    if tokenizer is None:
        tokenizer = (
            _MissingTokenizer(run_dir, *_MISSING["clip"])
            if run_dir is not None
            else load_pretrained(AutoTokenizer, name, local_files_only, "CLIP tokenizer")
        )
    dim = model.config.projection_dim
    image = Encoder(
        "image",
        f"clip:{name}",
        CLIPVisionBackbone(name, local_files_only, include_projection=True, model=model),
        lambda: L2Head(dim),
        dim,
    )
    text = Encoder(
        "text",
        f"clip-text:{name}",
        CLIPTextBackbone(name, local_files_only, model=model, tokenizer=tokenizer, max_length=TEXT_MAX_LENGTH),
        lambda: L2Head(dim),
        dim,
    )
    return image, text


def tokenizer_fits(tok, vocab_size: int) -> bool:
    """A tokenizer whose ids index the embedding table and that is not nearly empty.

    The lower bound matters: some transformers versions build an empty-vocabulary
    tokenizer, without complaint, from a directory that holds no vocabulary.
    """
    try:
        return 0.9 * vocab_size <= len(tok) <= vocab_size
    except TypeError:
        return False


def save_as_run(
    model: OfficialModel, out_dir: str | Path, *, bert_tokenizer=None, clip_tokenizer=None, overwrite: bool = False
) -> Path:
    """Write ``model`` as an iterwego run directory; returns its path.

    Layout: ``backbones/{clip,bert,clip_align}`` (``save_pretrained``, plus the
    tokenizers when given), ``config.json`` (encoders ``clip:backbones/clip`` and
    ``bert:backbones/bert``, authors' pooling, aligner ``clip``),
    ``model.safetensors`` (orderer weights under IterWeGO names) and
    ``meta.json`` (``source: "official"``, ``best_score``, ``args``, which
    tokenizers were saved) and the model card ``README.md``. A run without a BERT tokenizer fails with a clear
    error when its text encoder is used.
    """
    from ..io import atomic_write_bytes, atomic_write_json
    from ..pretrained import save_run
    from ..training.card import write_card

    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not overwrite)):
        raise ModelLoadError(
            f"{out}: already exists and is not an empty directory; choose another output or overwrite it explicitly"
        )
    official_run_config(model)  # validates the model (raises ModelLoadError on a mismatch); the result is unused
    for tok, what, size in (
        (bert_tokenizer, "BERT", model.txt_flow.bert.config.vocab_size),
        (clip_tokenizer, "CLIP", model.clip_align.config.text_config.vocab_size),
    ):
        if tok is not None and not tokenizer_fits(tok, size):
            raise ModelLoadError(
                f"the {what} tokenizer has {len(tok)} tokens but the checkpoint's {what} vocabulary has {size}: "
                "wrong or empty tokenizer?"
            )
    if overwrite and out.is_dir():
        for sub in ("backbones",):
            shutil.rmtree(out / sub, ignore_errors=True)
    dirs = {k: out / v for k, v in BACKBONE_DIRS.items()}
    model.img_flow.clip.save_pretrained(dirs["image"])
    model.txt_flow.bert.save_pretrained(dirs["text"])
    model.clip_align.save_pretrained(dirs["aligner"])
    if bert_tokenizer is not None:
        bert_tokenizer.save_pretrained(dirs["text"])
    else:
        # Fail closed: some transformers versions silently build an empty-vocabulary BERT tokenizer
        # from a directory that has none, which would turn every sentence into [UNK].
        atomic_write_json(dirs["text"] / "tokenizer_config.json", {"tokenizer_class": "IterWeGOMissingBertTokenizer"})
        atomic_write_bytes(
            dirs["text"] / "TOKENIZER_MISSING.txt", (_MissingTokenizer(out, *_MISSING["bert"]).message + "\n").encode()
        )
    if clip_tokenizer is not None:
        clip_tokenizer.save_pretrained(dirs["aligner"])

    net = _build_iterwego(model, bert_tokenizer, clip_tokenizer, out)

    meta = {
        "source": "official",
        "checkpoint": model.source,
        "best_score": model.best_score,
        "args": model.args,
        "backbone_dirs": dict(BACKBONE_DIRS),
        "tokenizers": {"bert": bert_tokenizer is not None, "clip_align": clip_tokenizer is not None},
        "official_eval_guidance": dict(model.guidance),
    }
    save_run(out, net, meta)
    # save_run records backbone identities that embed the path they resolved to; these backbones live
    # inside the run, so that path changes whenever the run moves and load_run would refuse it.
    full = json.loads((out / "meta.json").read_text())
    full.pop("backbones", None)
    atomic_write_json(out / "meta.json", full)
    write_card(out)
    return out
