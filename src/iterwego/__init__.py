"""iterwego: order unordered images and sentences of one story (IterWeGO, ACM MM 2024).

The public API, importable from here (each name loads its module on first use, so ``import iterwego`` stays light):

* the model (:mod:`iterwego.model`): ``create_model``, ``IterWeGO`` (``forward`` is the paper's figure),
  ``ForwardOutput``, ``load_run``; configs (:mod:`iterwego.config`): ``Config``, ``preset``;
* the paper's parts: ``guide`` / ``iterate`` (guidance), ``align`` (aligner mapping), ``fuse_logits`` (fusion),
  ``decode`` / ``decode_story`` / ``pair_logprobs`` (decoders), ``order_metrics`` (Acc, PMR, tau);
* capture times (:mod:`iterwego.capture_time`): ``read_capture_time``, ``CaptureTime``;
* data (:mod:`iterwego.data`): ``load_split``, ``read_vist``, ``read_jsonl``, ``Story``, ``Item``, ``Batch``;
* training and evaluation (:mod:`iterwego.training`): ``TrainRecipe``, ``Evaluator``;
* applications (:mod:`iterwego.apps`): ``order_stories``.
"""

from __future__ import annotations

import importlib

__version__ = "0.4.0"  # the one place: pyproject reads it, and so do --version, the web page and run metadata

_EXPORTS = {
    "Config": "config",
    "preset": "config",
    "IterWeGO": "model",
    "ForwardOutput": "model",
    "create_model": "model",
    "load_run": "model",
    "Batch": "batch",
    "guide": "guidance",
    "iterate": "guidance",
    "align": "aligner",
    "fuse_logits": "fusion",
    "decode": "decode",
    "decode_story": "decode",
    "CaptureTime": "capture_time",
    "read_capture_time": "capture_time",
    "pair_logprobs": "decode",
    "order_metrics": "metrics",
    "load_split": "data.readers",
    "read_vist": "data.readers",
    "read_jsonl": "data.readers",
    "Story": "data.readers",
    "Item": "data.readers",
    "TrainRecipe": "training.recipe",
    "Evaluator": "training.evaluator",
    "order_stories": "apps.order",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'iterwego' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
