"""Model sub-commands: ``train``, ``evaluate``, ``demo``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ..config import PRESETS
from ..errors import IterWeGOError

#: ``iterwego.data.synth.FAMILIES``'s names, kept here so building the parser does not import numpy and PIL
SYNTH_FAMILIES = ("tank", "sky")


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


def add_run_args(s, what: str = "the run") -> None:
    """``--run`` (a run directory or a Hub id), ``--revision`` and load-time ``--set`` overrides."""
    s.add_argument(
        "--run", required=True, help=f"{what}: a run directory, or a Hugging Face Hub id ORG/NAME (fetched and cached)"
    )
    s.add_argument("--revision", default=None, help="Hub branch, tag or commit of --run (default: main)")
    add_set_arg(s, "override a config field at load time, e.g. a local backbone copy: --set encoder.image=clip:DIR")


def add_set_arg(s, help: str) -> None:
    """``--set SECTION.KEY=VALUE``, repeatable: every command's config overrides (``Config.override`` checks them)."""
    s.add_argument(
        "--set", action="append", metavar="SECTION.KEY=VALUE", help=f"{help} (repeatable; docs/config.md lists fields)"
    )


def run_load_args(a: argparse.Namespace) -> dict:
    """The keyword arguments of ``load_run`` that ``add_run_args`` collected."""
    return {"revision": getattr(a, "revision", None), "overrides": getattr(a, "set", None)}


def _ceilings(data: Path, split: str) -> dict | None:
    """The synthetic split's Bayes-optimal PMRs for the table, or None (real data, or an unreadable file)."""
    from ..data.synth import pmr_ceilings

    return pmr_ceilings(data, split)


def cmd_train(a: argparse.Namespace) -> int:
    from ..config import preset
    from ..training.recipe import TrainRecipe, resume_recipe

    if a.resume:
        from ..training.recipe import RECORDED

        if a.set or a.print_config:
            raise IterWeGOError("--resume continues with the run's own config: drop --set and --print-config")
        cache = _cache(a) if a.cache_dir or a.no_cache else RECORDED
        recipe = resume_recipe(a.resume, progress=not a.quiet, cache=cache)
        out = a.resume
    else:
        cfg = preset(a.preset).override(a.set)  # checked before any data is read or directory created
        if a.print_config:
            print(cfg.to_json())
            return 0
        if not a.data or not a.out:
            raise IterWeGOError("--data and --out are required (or --resume RUN)")
        recipe = TrainRecipe(
            cfg,
            a.data,
            a.out,
            fmt=a.fmt,
            image_dir=a.image_dir,
            text_field=a.text_field,
            progress=not a.quiet,
            cache=_cache(a),
            capture_time=a.capture_time == "on",
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
    from ..decode import MAX_EXACT
    from ..tables import format_table, metrics_json
    from ..training.evaluator import evaluate_run

    t0 = time.time()
    if a.update_card:
        _check_card_update(a)
    ev = evaluate_run(
        a.run,
        Path(a.data),
        a.split,
        fmt=a.fmt,
        image_dir=a.image_dir,
        text_field=a.text_field,
        decoder=a.decoder,
        progress=not a.quiet,
        keep_orders=bool(a.html),
        cache=_cache(a),
        load_kw=run_load_args(a),
        authors=a.authors_protocol,
        capture_time=a.capture_time == "on",
    )
    result, report = ev.result, ev.report()
    title = f"{a.split} split, decoder {result.decoder}, {len(result.story_ids)} stories"
    if a.capture_time == "on":
        title += ", capture times on (rows marked '+ capture times')"
    ceilings = _ceilings(a.data, a.split)
    print(format_table(report, ceilings, title=title))
    if a.update_card:
        _record(a.run, a.split, report, result, result.decoder, ceilings)
        print(
            f"recorded the {a.split} evaluation in {Path(a.run) / 'meta.json'} and the card {Path(a.run) / 'README.md'}"
        )
    if a.html:
        from .report import evaluation_report

        title = f"iterwego evaluate: {title}"
        evaluation_report(
            a.html, report=report, result=result, stories=ev.stories.stories, title=title, ceilings=ceilings
        )
        print(f"wrote {a.html}")
    if result.decoder_fallbacks:
        print(f"note: {result.decoder_fallbacks} story decode(s) longer than {MAX_EXACT} items used the beam decoder")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(metrics_json(report, ceilings), indent=2) + "\n")
        print(f"wrote {a.json}")
    print(f"evaluated in {time.time() - t0:.1f}s")
    return 0


def _check_card_update(a: argparse.Namespace) -> None:
    """``--update-card`` writes into the run, and records the run as saved: only where a backbone moved may differ."""
    if not Path(a.run).is_dir():
        raise IterWeGOError(
            f"{a.run}: --update-card writes into the run, so it needs a local run directory "
            f"(copy a Hub run with `hf download {a.run} --local-dir DIR` first)"
        )
    where = {"encoder.image", "encoder.text", "aligner.clip_model", "encoder.local_files_only"}
    changed = [x.split("=", 1)[0].strip() for x in a.set or [] if x.split("=", 1)[0].strip() not in where]
    if changed:
        raise IterWeGOError(f"--update-card records the run as it was saved, but --set {changed[0]} changes it")


def _record(run, split: str, report: dict, result, decoder: str, ceilings: dict | None) -> None:
    """Keep an evaluation in the run (``meta.json``) and show it in its model card."""
    from ..training.card import record_evaluation

    n = len(result.story_ids)
    record_evaluation(
        run, split, report, stories=n, decoder=decoder, fused_text=(result.fused or {}).get("text"), ceilings=ceilings
    )


#: ``synth --narrate`` and ``demo --narrate``: how weak the alignment of the synthetic stories is.
NARRATE_HELP = (
    "share of sentences that narrate, naming nothing pictured (no object, no colour; the time cue stays): "
    "weakens what an aligner can match, e.g. 0.5 (default 0)"
)

#: Share of the demo's photos that carry an EXIF capture time (for its "+ capture times" rows).
DEMO_EXIF_RATE = 0.5
#: The demo's last table: its test split again with this share of the sentences narrating (weak alignment).
DEMO_NARRATE = 0.5


def cmd_demo(a: argparse.Namespace) -> int:
    """synth -> train --preset tiny -> evaluate on the synthetic test split (the last rows with capture times)."""
    from ..config import preset
    from ..data.synth import SynthConfig, synthesize
    from ..errors import ConfigError
    from ..tables import format_table, metrics_json
    from ..training.evaluator import evaluate_run
    from ..training.recipe import TrainRecipe

    t0 = time.time()
    out = Path(a.out)
    data, run = out / "data", out / "run"
    cfg = preset("tiny").override([f"train.seed={a.seed}"] + (a.set or []))  # a typo stops here, before any work
    try:
        synth = SynthConfig.for_family(
            a.family, stories=a.stories, seed=a.seed, exif_rate=DEMO_EXIF_RATE, narrate=a.narrate
        )
    except ValueError as err:  # a bad option value: one line, before any work
        raise ConfigError(f"demo: {err}") from None
    weak = a.narrate < DEMO_NARRATE  # the demo's own data is already as weak: no second table
    steps = 4 if weak else 3
    print(f"[1/{steps}] synthesising {a.stories} stories of the {a.family} family into {data}", flush=True)
    synthesize(data, synth, progress=not a.quiet)
    print(f"[2/{steps}] training the tiny preset (unimodal orderers, aligner, iterative guidance, heads)", flush=True)
    recipe = TrainRecipe(cfg, data, run, progress=not a.quiet, cache=_cache(a))
    try:
        recipe.setup().train().save()
    finally:
        recipe.cleanup()
    print(f"[3/{steps}] evaluating on the test split (inference round chosen on validation)", flush=True)
    ev = evaluate_run(run, data, "test", progress=False, keep_orders=True, cache=_cache(a), capture_time=True)
    result, report, ceilings = ev.result, ev.report(), _ceilings(data, "test")
    (out / "test_metrics.json").write_text(json.dumps(metrics_json(report, ceilings), indent=2) + "\n")
    _record(run, "test", report, result, "exact", ceilings)
    try:
        from .report import evaluation_report

        title = "iterwego demo: synthetic test split"
        evaluation_report(
            out / "report.html",
            report=report,
            result=result,
            stories=ev.stories.stories,
            title=title,
            ceilings=ceilings,
        )
        report_note = f"; HTML report {out / 'report.html'}"
    except ImportError:
        report_note = ""
    print()
    title = f"iterwego demo: synthetic test split ({a.family} family), {len(result.story_ids)} stories, exact decoder"
    print(format_table(report, ceilings, title=title))
    if weak:
        print(
            f"\n[4/{steps}] the same run on the test split again, {DEMO_NARRATE:.0%} of its sentences narrating",
            flush=True,
        )
        print(_weak_alignment_table(a, run, out, synth, report))
    print(
        f"\nrun saved in {run} (model card {run / 'README.md'}); metrics in {out / 'test_metrics.json'}{report_note}; "
        f"total {time.time() - t0:.0f}s"
    )
    return 0


def _weak_alignment_table(a: argparse.Namespace, run: Path, out: Path, synth, report: dict) -> str:
    """The demo's test stories again, :data:`DEMO_NARRATE` of their sentences narrating (naming nothing pictured:
    the aligner can match them only by elimination), ordered by the same run; its table beside the first one.
    Only the test split is written (``synthesize(splits=)``); the run's metrics JSON is left as it is."""
    import dataclasses

    from ..data.synth import synthesize
    from ..tables import format_side_by_side, metrics_json
    from ..training.evaluator import evaluate_run

    weak_data = out / "data-narrating"
    synthesize(weak_data, dataclasses.replace(synth, narrate=DEMO_NARRATE), splits=("test",))
    weak = evaluate_run(run, weak_data, "test", progress=False, cache=_cache(a)).report()
    (out / "test_metrics_narrating.json").write_text(
        json.dumps(metrics_json(weak, _ceilings(weak_data, "test")), indent=2) + "\n"
    )
    title = (
        f"the same test stories as synthesised, and with {DEMO_NARRATE:.0%} of the sentences narrating "
        "(a run trained on the first; metrics in test_metrics_narrating.json)"
    )
    half = f"{DEMO_NARRATE:.0%} narrating"
    return format_side_by_side({"as synthesised": report, half: weak}, title=title)


def _add_capture_arg(s, *, evaluation: bool) -> None:
    if evaluation:
        s.add_argument(
            "--capture-time",
            default="off",
            choices=["on", "off"],
            help="also score orders bound by the photos' EXIF capture times, in rows marked '+ capture times' "
            "(default off: times can leak the gold order)",
        )
    else:
        s.add_argument(
            "--capture-time",
            default="auto",
            choices=["auto", "on", "off"],
            help="order photos by their EXIF capture times where two can be compared "
            "(default auto: on when at least two photos carry one)",
        )


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
    add_set_arg(s, "override a config field, e.g. --set train.unimodal_epochs=5")
    s.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    _add_capture_arg(s, evaluation=True)
    _add_cache_args(s)
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("evaluate", help="Acc / PMR / tau per round, the validation-chosen round and fused decoding")
    add_data_args(s)
    s.add_argument("--split", default="test")
    add_run_args(s, "the run to evaluate")
    s.add_argument(
        "--decoder",
        default=None,
        choices=["exact", "tsort", "beam"],
        help="default: the run's train.decoder (exact; tsort for the paper preset)",
    )
    s.add_argument(
        "--authors-protocol",
        action="store_true",
        help="also print the authors' released evaluation (round picked on this split by best Acc among 1-3, "
        "tsort), labelled, beside the validation-chosen result; for comparison with their published numbers",
    )
    s.add_argument("--json", default=None, help="write the metrics JSON here")
    s.add_argument(
        "--update-card",
        action="store_true",
        help="record this evaluation in the run (meta.json) and its model card README.md (a local run only)",
    )
    s.add_argument(
        "--html",
        default=None,
        help="write an HTML report (tables, plots per round, confidence histograms, sample stories)",
    )
    _add_capture_arg(s, evaluation=True)
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
        "--family",
        default="tank",
        choices=SYNTH_FAMILIES,
        help="synthetic family (iterwego synth --family; default tank)",
    )
    s.add_argument("--narrate", type=float, default=0.0, metavar="P", help=NARRATE_HELP)
    add_set_arg(s, "override a tiny-preset config field")
    _add_cache_args(s)
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=cmd_demo)
    register_order(sub)
    register_push(sub)


def cmd_order(a: argparse.Namespace) -> int:
    from ..data.readers import read_jsonl
    from ..device import pick_device
    from ..model import load_run
    from .order import order_stories, stories_from_args

    if sum(map(bool, (a.jsonl, a.albums, a.images or a.sentences))) > 1:
        raise IterWeGOError("give one of --albums, --jsonl or --images/--sentences")
    if a.albums:
        from .albums import order_albums, read_albums, timing_line

        stories = read_albums(a.albums)
    else:
        stories = read_jsonl(a.jsonl) if a.jsonl else stories_from_args(a.images, a.sentences)
    t0 = time.perf_counter()
    model, _ = load_run(a.run, pick_device(), **run_load_args(a))
    load_s = time.perf_counter() - t0
    kw = dict(decoder=a.decoder, capture_time=a.capture_time)  # the run's own inference settings apply
    results, seconds = order_albums(model, stories, **kw) if a.albums else (order_stories(model, stories, **kw), [])
    for k, r in enumerate(results):
        print(format_order(r, has_gold=bool(a.jsonl)) + (f"\n  ordered in {seconds[k]:.3f}s" if seconds else ""))
    if seconds:
        print(timing_line(seconds, load_s))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        payload = results[0] if len(results) == 1 and not (a.jsonl or a.albums) else results
        Path(a.json).write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {a.json}")
    if a.html:
        from .report import order_report

        order_report(stories, results, a.html, gold=bool(a.jsonl))
        print(f"wrote {a.html}")
    return 0


def format_order(r: dict, has_gold: bool = False) -> str:
    from .order import capture_line, placed_tags

    lines = [f"story {r['id']} ({r['mode']}{'; ' + r['note'] if r.get('note') else ''})"]
    v = r["variants"]
    placed = [f"   [{t}]" if t else "" for t in placed_tags(r)]
    if r["mode"] == "fused":
        conf = v["fused"]["confidence"]
        lines.append("  recovered order (fused; image <-> sentence):")
        for k, i in enumerate(r["image_order"]):
            t = r["sentence_order"][k]
            c = f"   P(next after this) = {conf[k]:.2f}" if k < len(conf) else ""
            lines.append(f"  {k + 1:>3}. {Path(r['images'][i]).name}  <->  {_short(r['sentences'][t])!r}{c}{placed[i]}")
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
                    name, tag = (_short(names[i]), "") if mod == "text" else (Path(names[i]).name, placed[i])
                    lines.append(f"  {k + 1:>3}. {name}{c}{tag}")
    if r.get("capture_time"):
        lines.append("  " + capture_line(r))
    return "\n".join(lines)


def _short(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def register_order(sub) -> None:
    s = sub.add_parser("order", help="order a new album (images and/or sentences) with a trained run")
    add_run_args(s)
    s.add_argument("--images", nargs="+", help="image files, in any order")
    s.add_argument("--sentences", nargs="+", help="sentences, in any order")
    s.add_argument(
        "--jsonl",
        help="stories as JSONL ({'id', 'images', 'sentences'}; listed order is treated as gold for the report)",
    )
    s.add_argument(
        "--albums",
        help="many albums in one process: a JSONL file of albums (as --jsonl, no gold) or a folder of album folders "
        "(photos, and their sentences one a line in captions.txt); prints each album's time",
    )
    s.add_argument(
        "--decoder", default=None, choices=["exact", "tsort", "beam"], help="default: the run's train.decoder"
    )
    _add_capture_arg(s, evaluation=False)
    s.add_argument("--json", help="write the result as JSON")
    s.add_argument("--html", help="write a self-contained HTML report")
    s.set_defaults(func=cmd_order)


def cmd_push(a: argparse.Namespace) -> int:
    """Refresh the run's model card for ``REPO_ID`` (unless ``--keep-card``), then upload the run directory."""
    from ..pretrained import push_run, read_config
    from ..training.card import write_card

    if a.repo_id.count("/") != 1:  # the card names the id others load, so it must be complete
        raise IterWeGOError(f"{a.repo_id}: give the full Hub id ORG/NAME (your user name or an organisation)")
    read_config(a.run)  # a complete run, before anything is rewritten or uploaded
    if not a.keep_card:
        write_card(a.run, a.repo_id)
    url = push_run(a.run, a.repo_id, private=a.private or None, commit_message=a.commit_message)
    print(f"pushed {a.run} to https://huggingface.co/{a.repo_id} ({url})")
    print(f'load it with: iterwego order --run {a.repo_id} ...  or  IterWeGO.from_pretrained("{a.repo_id}")')
    return 0


def register_push(sub) -> None:
    s = sub.add_parser(
        "push",
        help="upload a run directory to the Hugging Face Hub as a model repository (model card included)",
        description="Create REPO_ID if needed and upload RUN (config, weights, metadata, model card, training log; "
        "not the resume state). The token comes from HF_TOKEN or `hf auth login`.",
    )
    s.add_argument("run", metavar="RUN", help="run directory")
    s.add_argument("repo_id", metavar="REPO_ID", help="Hub repository ORG/NAME (your user name or an organisation)")
    s.add_argument("--private", action="store_true", help="create the repository as private")
    s.add_argument("--commit-message", default=None, help="commit message (default: Upload iterwego run NAME)")
    s.add_argument(
        "--keep-card",
        action="store_true",
        help="upload RUN/README.md as it is (default: regenerate it from the run's files, naming REPO_ID)",
    )
    s.set_defaults(func=cmd_push)


def cmd_serve(a: argparse.Namespace) -> int:
    """``iterwego serve``: load the run once, then serve the page until Ctrl-C."""
    from .serve import OrderService, make_server, run_server

    t0 = time.time()
    service = OrderService.load(a.run, load_kw=run_load_args(a), capture_time=getattr(a, "capture_time", "auto"))
    print(f"loaded run {a.run} in {time.time() - t0:.1f}s", flush=True)
    server = make_server(service, a.host, a.port, log=None if a.quiet else sys.stderr)
    try:
        run_server(server)
    except KeyboardInterrupt:
        print("stopped")
    return 0


def register_serve(sub) -> None:
    """Add the ``serve`` sub-command (the web app in :mod:`iterwego.apps.serve`) to the CLI's sub-parsers."""
    from .serve import CAPTURE_MODES, DEFAULT_HOST, DEFAULT_PORT

    s = sub.add_parser("serve", help="local web page: upload images / paste sentences and see the recovered order")
    add_run_args(s, "the run to serve")
    s.add_argument(
        "--host", default=DEFAULT_HOST, help=f"address to listen on (default {DEFAULT_HOST}: this machine only)"
    )
    s.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0 picks a free one)")
    s.add_argument(
        "--capture-time",
        default="auto",
        choices=list(CAPTURE_MODES),
        help="the page's default for ordering photos by their EXIF capture times "
        "(default auto: on when at least two photos carry one)",
    )
    s.add_argument("--quiet", action="store_true", help="do not log requests on stderr")
    s.set_defaults(func=cmd_serve)
