"""Model sub-commands: ``train``, ``evaluate``, ``demo``."""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

from ..config import PRESETS
from ..errors import IterWeGOError


def _cache(a: argparse.Namespace):
    """The shared feature cache the user asked for (default: $ITERWEGO_CACHE or ~/.cache/iterwego); None for a
    private store (``--no-cache``)."""
    if getattr(a, "no_cache", False):
        return None
    from ..data.cache import FeatureCache

    return FeatureCache(getattr(a, "cache_dir", None) or FeatureCache.default_root())


def _add_cache_args(s) -> None:
    s.add_argument(
        "--cache-dir",
        default=None,
        help="feature store shared across runs (default: $ITERWEGO_CACHE or ~/.cache/iterwego; "
        "with --resume: the one the run started with)",
    )
    s.add_argument(
        "--no-cache",
        action="store_true",
        help="neither read nor fill the shared store: features go to a private one, removed when done",
    )


def _eval_run(
    run: Path,
    data: Path,
    split: str,
    *,
    fmt="vist",
    image_dir=None,
    text_field="text",
    decoder="exact",
    progress=True,
    keep_orders=False,
    cache=None,
):
    """Evaluate a run on ``split``; the inference round comes from validation (saved at training, or computed here)."""
    from ..data.features import build_features
    from ..data.readers import load_split
    from ..device import pick_device
    from ..model import load_run
    from ..training.evaluator import Evaluator

    model, meta = load_run(run, pick_device())
    cfg = model.cfg
    read = dict(fmt=fmt, image_dir=image_dir, text_field=text_field)
    splits = list(dict.fromkeys([split] + ([] if meta.get("chosen_rounds") else ["val"])))
    stories = {sp: load_split(data, sp, **read) for sp in splits}
    with _store(cache) as store:
        sets, feats = build_features(
            model.encoders(),
            stories,
            where=str(data),
            progress=progress,
            cache=store,
            dtype=cfg.encoder.feature_dtype,
        )
        device = next(model.parameters()).device
        ev = lambda ss: Evaluator(ss, feats, decoder=decoder, seed=cfg.train.seed + 2, device=device)  # noqa: E731
        chosen = meta.get("chosen_rounds") or ev(sets["val"])(model).choose_rounds()
        result = ev(sets[split])(model, keep_orders=keep_orders)
    return result, chosen, sets[split], meta


@contextlib.contextmanager
def _store(cache):
    """The shared cache, or a private store in a temporary directory removed afterwards (``--no-cache``)."""
    if cache is not None:
        yield cache
        return
    import tempfile

    from ..data.cache import FeatureCache

    with tempfile.TemporaryDirectory(prefix="iterwego-features-") as d:
        yield FeatureCache(d)


def _ceilings(data: Path, split: str) -> dict | None:
    """The synthetic split's Bayes-optimal PMRs for the table, or None (real data, or an unreadable file)."""
    from ..data.synth import load_ceilings

    try:
        c = (load_ceilings(data) or {}).get(split) or {}
    except IterWeGOError:
        return None
    out = {k: float(c[f"{k}_pmr"]) for k in ("image", "text", "fused") if isinstance(c.get(f"{k}_pmr"), (int, float))}
    return out if len(out) == 3 else None


def cmd_train(a: argparse.Namespace) -> int:
    from ..config import preset
    from ..training.recipe import TrainRecipe, resume_recipe

    if a.resume:
        from ..training.recipe import RECORDED

        cache = _cache(a) if a.cache_dir or a.no_cache else RECORDED
        recipe = resume_recipe(a.resume, progress=not a.quiet, cache=cache)
        out = a.resume
    else:
        if not a.data or not a.out:
            raise IterWeGOError("--data and --out are required (or --resume RUN)")
        cfg = preset(a.preset).override(a.set)
        if a.print_config:
            print(cfg.to_json())
            return 0
        recipe = TrainRecipe(
            cfg,
            a.data,
            a.out,
            fmt=a.fmt,
            image_dir=a.image_dir,
            text_field=a.text_field,
            progress=not a.quiet,
            cache=_cache(a),
        )
        recipe.setup()
        out = a.out
    try:
        recipe.train().save()
    finally:
        recipe.cleanup()
    print(f"saved run to {out}")
    return 0


def cmd_evaluate(a: argparse.Namespace) -> int:
    from ..training.evaluator import format_table

    t0 = time.time()
    result, chosen, ss, _ = _eval_run(
        Path(a.run),
        Path(a.data),
        a.split,
        fmt=a.fmt,
        image_dir=a.image_dir,
        text_field=a.text_field,
        decoder=a.decoder,
        progress=not a.quiet,
        keep_orders=bool(a.html),
        cache=_cache(a),
    )
    report = result.report(chosen)
    title = f"{a.split} split, decoder {a.decoder}, {len(result.story_ids)} stories"
    ceilings = _ceilings(a.data, a.split)
    print(format_table(report, ceilings, title=title, fused_text=(result.fused or {}).get("text")))
    if a.html:
        from .report import evaluation_report

        evaluation_report(
            a.html,
            report=report,
            result=result,
            stories=ss.stories,
            title=f"iterwego evaluate: {title}",
            ceilings=ceilings,
            fused_text=(result.fused or {}).get("text"),
        )
        print(f"wrote {a.html}")
    if result.decoder_fallbacks:
        print(f"note: {result.decoder_fallbacks} story decode(s) longer than 12 items used the beam decoder")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {a.json}")
    print(f"evaluated in {time.time() - t0:.1f}s")
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    """synth -> train --preset tiny -> evaluate on the synthetic test split."""
    from ..config import preset
    from ..data.synth import SynthConfig, synthesize
    from ..training.evaluator import format_table
    from ..training.recipe import TrainRecipe

    t0 = time.time()
    out = Path(a.out)
    data, run = out / "data", out / "run"
    print(f"[1/3] synthesising {a.stories} stories into {data}", flush=True)
    synthesize(data, SynthConfig(stories=a.stories, seed=a.seed), progress=not a.quiet)
    print("[2/3] training the tiny preset (unimodal orderers, aligner, iterative guidance)", flush=True)
    cfg = preset("tiny").override([f"train.seed={a.seed}"] + (a.set or []))
    recipe = TrainRecipe(cfg, data, run, progress=not a.quiet, cache=_cache(a))
    try:
        recipe.setup().train().save()
    finally:
        recipe.cleanup()
    print("[3/3] evaluating on the test split (inference round chosen on validation)", flush=True)
    result, chosen, ss, _ = _eval_run(run, data, "test", progress=False, keep_orders=True, cache=_cache(a))
    report = result.report(chosen)
    (out / "test_metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    try:
        from .report import evaluation_report

        evaluation_report(
            out / "report.html",
            report=report,
            result=result,
            stories=ss.stories,
            title="iterwego demo: synthetic test split",
            ceilings=_ceilings(data, "test"),
            fused_text=(result.fused or {}).get("text"),
        )
        report_note = f"; HTML report {out / 'report.html'}"
    except ImportError:
        report_note = ""
    print()
    print(
        format_table(
            report,
            _ceilings(data, "test"),
            title=f"iterwego demo: synthetic test split, {len(result.story_ids)} stories, exact decoder",
            fused_text=(result.fused or {}).get("text"),
        )
    )
    print(f"\nrun saved in {run}; metrics in {out / 'test_metrics.json'}{report_note}; total {time.time() - t0:.0f}s")
    return 0


def register(sub, add_data_args) -> None:
    s = sub.add_parser(
        "train", help="train everything (unimodal orderers, aligner, iterative guidance) into a run directory"
    )
    add_data_args(s, required=False)
    s.add_argument("--out", help="run directory to write")
    s.add_argument(
        "--resume", metavar="RUN", help="continue an interrupted training in RUN (same config, data and seed)"
    )
    s.add_argument("--preset", default="tiny", choices=PRESETS, help="named config preset (default tiny)")
    s.add_argument(
        "--set",
        action="append",
        metavar="SECTION.KEY=VALUE",
        help="override a config field, e.g. --set train.unimodal_epochs=5 (repeatable)",
    )
    s.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    _add_cache_args(s)
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("evaluate", help="Acc / PMR / tau per round, the validation-chosen round and fused decoding")
    add_data_args(s)
    s.add_argument("--split", default="test")
    s.add_argument("--run", required=True, help="run directory from `iterwego train`")
    s.add_argument("--decoder", default="exact", choices=["exact", "tsort", "beam"])
    s.add_argument("--json", default=None, help="write the metrics JSON here")
    s.add_argument(
        "--html",
        default=None,
        help="write an HTML report (tables, plots per round, confidence histograms, sample stories)",
    )
    _add_cache_args(s)
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=cmd_evaluate)

    s = sub.add_parser(
        "demo", help="synth -> train (tiny) -> evaluate on embedded synthetic data, in a few minutes on a CPU"
    )
    s.add_argument("--out", default="demo-out", help="working directory (default ./demo-out)")
    s.add_argument("--stories", type=int, default=2000, help="synthetic stories over train/val/test (default 2000)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument(
        "--set", action="append", metavar="SECTION.KEY=VALUE", help="override a tiny-preset config field (repeatable)"
    )
    _add_cache_args(s)
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=cmd_demo)
    register_order(sub)


def cmd_order(a: argparse.Namespace) -> int:
    from ..data.readers import read_jsonl
    from ..device import pick_device
    from ..model import load_run
    from .order import order_stories, stories_from_args

    if a.jsonl and (a.images or a.sentences):
        raise IterWeGOError("give either --jsonl or --images/--sentences, not both")
    stories = read_jsonl(a.jsonl) if a.jsonl else stories_from_args(a.images, a.sentences)
    model, meta = load_run(a.run, pick_device())
    results = order_stories(model, stories, chosen_rounds=meta.get("chosen_rounds"), decoder=a.decoder)
    for story, r in zip(stories, results):
        print(format_order(r, has_gold=bool(a.jsonl)))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        payload = results[0] if len(results) == 1 and not a.jsonl else results
        Path(a.json).write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {a.json}")
    if a.html:
        from .report import order_report

        order_report(stories, results, a.html, gold=bool(a.jsonl))
        print(f"wrote {a.html}")
    return 0


def format_order(r: dict, has_gold: bool = False) -> str:
    lines = [f"story {r['id']} ({r['mode']}{'; ' + r['note'] if r.get('note') else ''})"]
    v = r["variants"]
    if r["mode"] == "fused":
        conf = v["fused"]["confidence"]
        lines.append("  recovered order (fused; image <-> sentence):")
        for k, i in enumerate(r["image_order"]):
            t = r["sentence_order"][k]
            c = f"   P(next after this) = {conf[k]:.2f}" if k < len(conf) else ""
            lines.append(f"  {k + 1:>3}. {Path(r['images'][i]).name}  <->  {_short(r['sentences'][t])!r}{c}")
        g = v["guided"]
        lines.append(f"  guided image order:    {g['image_order']}  (rounds {g['rounds']['image']})")
        lines.append(f"  guided sentence order: {g['sentence_order']}  (rounds {g['rounds']['text']})")
    else:
        for mod, key, names in (("image", "image_only", r["images"]), ("text", "text_only", r["sentences"])):
            if key in v:
                lines.append(f"  {mod} order:")
                conf = v[key]["confidence"]
                for k, i in enumerate(v[key]["order"]):
                    c = f"   P(next after this) = {conf[k]:.2f}" if k < len(conf) else ""
                    lines.append(f"  {k + 1:>3}. {_short(names[i]) if mod == 'text' else Path(names[i]).name}{c}")
    return "\n".join(lines)


def _short(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def register_order(sub) -> None:
    s = sub.add_parser("order", help="order a new album (images and/or sentences) with a trained run")
    s.add_argument("--run", required=True, help="run directory")
    s.add_argument("--images", nargs="+", help="image files, in any order")
    s.add_argument("--sentences", nargs="+", help="sentences, in any order")
    s.add_argument(
        "--jsonl",
        help="stories as JSONL ({'id', 'images', 'sentences'}; listed order is treated as gold for the report)",
    )
    s.add_argument("--decoder", default="exact", choices=["exact", "tsort", "beam"])
    s.add_argument("--json", help="write the result as JSON")
    s.add_argument("--html", help="write a self-contained HTML report")
    s.set_defaults(func=cmd_order)
