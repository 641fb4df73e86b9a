"""The training recipe's shape: its state is declared in ``__init__``, each stage is a loop of its own.

A reader learns what a ``TrainRecipe`` holds from ``__init__`` alone, and follows a stage in its ``fit_*`` method;
these checks read the source (a training run would cost the suite seconds for what the syntax already shows).
"""

from __future__ import annotations

import ast
import inspect
import textwrap

import iterwego.training.recipe as recipe


def _methods() -> dict[str, ast.FunctionDef]:
    cls = ast.parse(textwrap.dedent(inspect.getsource(recipe.TrainRecipe))).body[0]
    return {f.name: f for f in cls.body if isinstance(f, ast.FunctionDef)}


def _self_targets(fn: ast.FunctionDef) -> set[str]:
    """Attributes of ``self`` that ``fn`` assigns (plain, tuple, augmented and annotated assignments)."""
    out = set()
    for node in ast.walk(fn):
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        if not isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
            continue
        for t in targets:
            for a in ast.walk(t):
                if isinstance(a, ast.Attribute) and isinstance(a.value, ast.Name) and a.value.id == "self":
                    out.add(a.attr)
    return out


def test_every_attribute_is_created_in_init():
    methods = _methods()
    declared = _self_targets(methods["__init__"])
    assert {"model", "val_eval", "resumed", "chosen", "capture_chosen", "val_result"} <= declared
    for name, fn in methods.items():
        late = _self_targets(fn) - declared
        assert not late, f"TrainRecipe.{name} creates {sorted(late)} outside __init__"


def test_no_attribute_is_probed():
    """No ``getattr(self, ...)`` / ``hasattr(self, ...)`` / ``setattr(self, ...)``: every attribute always exists."""
    for name, fn in _methods().items():
        for node in ast.walk(fn):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.args:
                first = node.args[0]
                probed = isinstance(first, ast.Name) and first.id == "self"
                assert not (probed and node.func.id in ("getattr", "hasattr", "setattr")), f"{name}: {node.func.id}"


def test_each_stage_runs_its_own_epoch_and_batch_loops():
    """A stage reads top to bottom: its method holds the loop over epochs and, inside, the loop over batches
    with the optimiser step, then the checkpoint; no stage hands a closure to a shared driver."""
    methods = _methods()
    for name in ("fit_unimodal", "fit_aligner", "fit_iterative", "fit_heads"):
        fn = methods[name]
        assert not [n for n in ast.walk(fn) if isinstance(n, (ast.FunctionDef, ast.Lambda)) and n is not fn], name
        epochs = [n for n in ast.walk(fn) if isinstance(n, ast.For) and "_epochs_left" in ast.unparse(n.iter)]
        assert len(epochs) == 1, name
        inner = ast.unparse(epochs[0])
        assert "self._step(" in inner and "self._end_epoch(" in inner and "self._record(" in inner, name
        assert any(isinstance(n, ast.For) for n in ast.walk(epochs[0]) if n is not epochs[0]), name
        assert "self._end_stage(" in ast.unparse(fn), name


def test_stage_state_is_a_small_dataclass_of_what_a_checkpoint_holds():
    import dataclasses

    fields = {f.name for f in dataclasses.fields(recipe.StageState)}
    assert fields == {"stage", "epoch", "best", "best_state", "since", "extra", "opts"}
    s = recipe.StageState("aligner")
    assert (s.epoch, s.best, s.best_state, s.since, s.extra, s.opts) == (-1, None, None, 0, None, {})


def test_training_reads_ceilings_with_the_data_not_from_the_generator():
    """The synthetic generator is a tool that writes a dataset; training reads what lies beside the splits."""
    from pathlib import Path

    for path in (Path(recipe.__file__).parent).glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert "synth" not in (node.module or "") and all(a.name != "synth" for a in node.names), path.name
