"""The evaluation report a person reads: one self-contained HTML file, and the PNG charts it embeds.

`render(doc, ...)` turns an evaluation document (tagflow.evaluate) plus what is not in it — the candidate's scores
and the split's true labels, the manifest's label counts, a sample of validation images — into files:
`report.html` and `*.png`. The HTML embeds every chart and thumbnail as a `data:` URI and loads nothing else (no
script, no CDN, no web font: the system's sans-serif), so it opens offline and from any store; the PNGs beside it
are the same charts for whoever wants them alone. Every string from the data (label names, URIs, the gate's
reason) is HTML-escaped; matplotlib's mathtext is off, so a `$` in a label name is drawn as it is.

What it shows, top to bottom: the gate's decision and reason and its rule in words; champion vs challenger with the
baselines (label-frequency mAP and micro mAP, all-negative accuracy); the leakage check (validation images within a
few bits of a training image's perceptual hash: count, share, and each listed one beside its nearest training
image, since such images make every figure above optimistic); AP per label against the label-frequency
baseline, sorted (every label with a positive when there are at most FULL_CHART_LABELS, else the best and worst
CHART_SUBSET, with the full per-label table below either way); precision-recall curves of the PR_LABELS best and
worst labels; the training curves from the model's metrics.json (the local trainer's per-epoch record; a SageMaker
built-in model has none: "not recorded by the built-in"); the label distribution in train and validation; a grid
of validation images with their true and predicted tags at the evaluation's per-label thresholds (correct,
missed, extra told apart by colour and by a mark).

Plain functions of numpy arrays and dicts: no S3 (tagflow.evaluate.write_evaluation gathers the inputs and writes
the files), no Airflow.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Sequence
from datetime import UTC, datetime
from html import escape
from typing import Any

import numpy as np

FULL_CHART_LABELS = 60  # up to this many labels, the AP chart has one bar per label; beyond, the best and worst
CHART_SUBSET = 25
PR_LABELS = 4  # precision-recall curves of this many best and this many worst labels
THUMBNAIL_PX = 160  # larger validation images are shrunk to this (longest side) for the grid
STYLE = {"text.parse_math": False, "font.size": 9, "axes.titlesize": 10, "figure.dpi": 100}
COLORS = {"ap": "#3b6fb6", "train": "#d08a2c", "val": "#3b6fb6", "baseline": "#222222"}

METRICS = (
    ("mAP", "mAP — macro, over the labels with ≥ 1 positive (the gate's metric)"),
    ("micro_mAP", "micro mAP — every (image, label) pair in one ranking"),
    ("micro_f1", "micro F1 at the per-label thresholds"),
    ("macro_f1", "macro F1 at the per-label thresholds"),
    ("micro_f1_at_0.5", "micro F1 at 0.5"),
    ("macro_f1_at_0.5", "macro F1 at 0.5"),
    ("accuracy", "Hamming accuracy at 0.5 (the built-in's multi-label accuracy)"),
)
BASELINE_OF = {  # metric -> (baseline column, key in doc["baselines"])
    "mAP": ("label_frequency", "label_frequency_mAP"),
    "micro_mAP": ("label_frequency", "label_frequency_micro_mAP"),
    "accuracy": ("all_negative", "all_negative_accuracy"),
}
CURVES = (
    ("train_accuracy", "train accuracy", "#d08a2c", "-"),
    ("validation_accuracy", "validation accuracy", "#888888", "-"),
    ("validation_mAP", "validation mAP", "#2e8b57", "-"),
    ("validation_micro_f1", "validation micro F1 at 0.5", "#3b6fb6", "--"),
    ("validation_macro_f1", "validation macro F1 at 0.5", "#8a4fb0", "--"),
)


# --- charts ------------------------------------------------------------------------------------------------------


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend; Agg draws savefig's PNG

    return Figure(figsize=(width, height), layout="constrained")


def png(fig: Any) -> bytes:
    import matplotlib

    with matplotlib.rc_context(STYLE):
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png")
    return buffer.getvalue()


def ranked_labels(per_label: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The labels with an AP (≥ 1 positive in the split), best first (ties by name)."""
    return sorted((e for e in per_label if e.get("ap") is not None), key=lambda e: (-e["ap"], e["name"]))


def ap_panels(per_label: Sequence[dict[str, Any]]) -> list[tuple[str, list[dict[str, Any]]]]:
    """What the AP chart draws: one panel of every label with a positive, or the best and worst CHART_SUBSET."""
    ranked = ranked_labels(per_label)
    if len(ranked) <= FULL_CHART_LABELS:
        return [(f"AP per label, all {len(ranked)} labels with a positive, best first", ranked)]
    return [
        (f"best {CHART_SUBSET} of {len(ranked)} labels", ranked[:CHART_SUBSET]),
        (f"worst {CHART_SUBSET} of {len(ranked)} labels", ranked[-CHART_SUBSET:]),
    ]


def ap_figure(per_label: Sequence[dict[str, Any]]) -> Any:
    """Horizontal bars of AP per label (sorted), the label-frequency baseline's AP as a black tick on each row."""
    import matplotlib

    panels = ap_panels(per_label)
    rows = max((len(entries) for _, entries in panels), default=1)
    with matplotlib.rc_context(STYLE):
        fig = _figure(5.0 * len(panels) + 2.0, 0.24 * rows + 1.4)
        for ax, (title, entries) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels, strict=True):
            y = np.arange(len(entries))
            ax.barh(y, [e["ap"] for e in entries], color=COLORS["ap"], height=0.7, label="AP")
            ax.scatter([e["baseline_ap"] or 0.0 for e in entries], y, marker="|", s=120, color=COLORS["baseline"],
                       label="label-frequency baseline", zorder=3)  # fmt: skip
            ax.set_yticks(y, [e["name"] for e in entries])
            ax.set_ylim(len(entries) - 0.5, -0.5)
            ax.set_xlim(0, 1)
            ax.set_xlabel("average precision")
            ax.set_title(title)
            ax.grid(axis="x", alpha=0.3)
        fig.axes[0].legend(loc="lower right", fontsize=8)
    return fig


def pr_labels(per_label: Sequence[dict[str, Any]]) -> tuple[list[int], list[int]]:
    """Indexes (into per_label) of the best and worst labels whose precision-recall curves are drawn."""
    index = {id(e): i for i, e in enumerate(per_label)}
    ranked = [index[id(e)] for e in ranked_labels(per_label)]
    worst = min(PR_LABELS, len(ranked) // 2)
    best = min(PR_LABELS, len(ranked) - worst)
    return ranked[:best], ranked[len(ranked) - worst :]


def pr_figure(per_label: Sequence[dict[str, Any]], scores: np.ndarray, truth: np.ndarray) -> Any:
    """Step-wise precision-recall curves (the curve AP is the area of), best labels left, worst right; each
    label's prevalence (the label-frequency predictor's precision) dashed in its colour."""
    import matplotlib

    from tagflow.evaluate import metrics_module

    curve = metrics_module()._curve  # the one PR computation, the one AP is computed from
    best, worst = pr_labels(per_label)
    groups = [(f"best {len(best)} labels by AP", best), (f"worst {len(worst)} labels by AP", worst)]
    groups = [g for g in groups if g[1]]
    with matplotlib.rc_context(STYLE):
        fig = _figure(5.2 * len(groups), 4.4)
        for ax, (title, chosen) in zip(fig.subplots(1, len(groups), squeeze=False)[0], groups, strict=True):
            for n, c in enumerate(chosen):
                entry, positives = per_label[c], truth[:, c] > 0.5
                tps, fps, _ = curve(scores[:, c].astype(np.float64), positives)
                precision, recall = tps / (tps + fps), tps / tps[-1]
                color = matplotlib.colormaps["tab10"](n % 10)
                ax.plot(np.r_[0.0, recall], np.r_[precision[0], precision], drawstyle="steps-pre", color=color,
                        label=f"{entry['name']}: AP {entry['ap']:.3f}, n={entry['support']}")  # fmt: skip
                ax.axhline(positives.mean(), color=color, linestyle=":", linewidth=1)
            ax.set_xlim(0, 1)
            ax.set_ylim(0, 1.02)
            ax.set_xlabel("recall")
            ax.set_ylabel("precision")
            ax.set_title(title)
            ax.grid(alpha=0.3)
            ax.legend(loc="lower left", fontsize=7)
    return fig


def training_figure(training: dict[str, Any]) -> Any:
    """The per-epoch curves of the model's metrics.json; a dashed line at the saved epoch."""
    import matplotlib

    history = training["history"]
    epochs = [h["epoch"] for h in history]
    with matplotlib.rc_context(STYLE):
        fig = _figure(7.5, 4.0)
        ax = fig.subplots()
        for key, name, color, style in CURVES:
            points = [(h["epoch"], h[key]) for h in history if key in h]
            if points:
                ax.plot(*zip(*points, strict=True), style, marker="o", markersize=3, color=color, label=name)
        best = training.get("best_epoch")
        if best is not None:
            by = training.get("selected_by") or "?"
            ax.axvline(best, color="#555555", linestyle="--", linewidth=1, label=f"saved: epoch {best} (by {by})")
        ax.set_xlabel("epoch, as the training log's Epoch[E]")
        ax.set_ylim(0, 1.02)
        ax.set_xticks(sorted(set(epochs))[:: max(1, len(epochs) // 20)])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    return fig


def distribution_figure(names: Sequence[str], label_counts: dict[str, Sequence[int]]) -> Any:
    """Images per label in train and validation: bars by label up to FULL_CHART_LABELS labels, else every label as
    a point, ranked by its training count (log scale; the table has the names)."""
    import matplotlib
    import matplotlib.ticker

    train = np.asarray(label_counts.get("train", [0] * len(names)), np.int64)
    val = np.asarray(label_counts.get("val", [0] * len(names)), np.int64)
    order = sorted(range(len(names)), key=lambda c: (-train[c], names[c]))
    with matplotlib.rc_context(STYLE):
        if len(names) <= FULL_CHART_LABELS:
            fig = _figure(8.0, 0.24 * len(names) + 1.4)
            ax = fig.subplots()
            y = np.arange(len(order))
            ax.barh(y - 0.2, train[order], height=0.4, color=COLORS["train"], label="train")
            ax.barh(y + 0.2, val[order], height=0.4, color=COLORS["val"], label="validation")
            ax.set_yticks(y, [names[c] for c in order])
            ax.set_ylim(len(order) - 0.5, -0.5)
            ax.set_xlabel("images with the label")
        else:
            fig = _figure(8.0, 4.0)
            ax = fig.subplots()
            rank = np.arange(1, len(order) + 1)
            ax.plot(rank, np.maximum(train[order], 0.8), color=COLORS["train"], label="train")
            ax.plot(rank, np.maximum(val[order], 0.8), ".", markersize=3, color=COLORS["val"], label="validation")
            ax.set_yscale("log")
            # plain tick labels: the default log formatter writes mathtext, which STYLE turns off for label names
            ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_xlabel(f"label, ranked by its training count (1 … {len(names)})")
            ax.set_ylabel("images with the label")
        ax.set_title("label distribution")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    return fig


# --- HTML --------------------------------------------------------------------------------------------------------


def _e(value: object) -> str:
    return escape(str(value), quote=True)


def _num(value: object, digits: int = 4) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return f"{value:.{digits}f}"
    return "—"


def _cell(value: object, **attrs: object) -> str:
    extra = "".join(f' data-{k.replace("_", "-")}="{_e(v)}"' for k, v in attrs.items())
    data = f' data-value="{_e(value)}"' if isinstance(value, (int, float)) and not isinstance(value, bool) else ""
    return f'<td class="num"{extra}{data}>{_num(value)}</td>'


def _data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _figure_html(name: str, data: bytes, alt: str, caption: str) -> str:
    return (f'<figure class="chart" id="fig-{_e(name.removesuffix(".png"))}"><img src="{_data_uri(data, "image/png")}"'
            f' alt="{_e(alt)}"><figcaption>{_e(caption)} <span class="file">({_e(name)} beside this file)</span>'
            "</figcaption></figure>")  # fmt: skip


def _thumbnail(image: bytes) -> tuple[bytes, str] | None:
    """(bytes, MIME type) of a validation image for the grid: as stored, or shrunk when larger than THUMBNAIL_PX;
    None when Pillow cannot decode it (the grid says so rather than the report failing)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(image)) as img:
            if max(img.size) <= THUMBNAIL_PX and img.format in ("JPEG", "PNG"):
                return image, f"image/{img.format.lower()}"
            img.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
            out = io.BytesIO()
            img.convert("RGB").save(out, format="JPEG", quality=85)
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    return out.getvalue(), "image/jpeg"


def _gate_html(doc: dict[str, Any]) -> str:
    gate, rule = doc["gate"], doc["gate"].get("rule", {})
    baseline = doc["baselines"].get("label_frequency_mAP")
    bar = f" (= {_num(rule.get('lift', 0) * baseline)})" if isinstance(baseline, (int, float)) else ""
    lift = f"{rule.get('lift', 0):g}"
    decision = ("deploy the candidate" if gate["deploy"]
                else "do not deploy the candidate; the endpoint is left as it is")  # fmt: skip
    return (
        f'<section id="gate"><h2>The gate\'s decision</h2>'
        f'<p id="gate-decision" class="{"deploy" if gate["deploy"] else "keep"}" data-deploy='
        f'"{str(bool(gate["deploy"])).lower()}"><strong>Decision: {_e(decision)}.</strong></p>'
        f'<p id="gate-reason">Why: {_e(str(gate["reason"]).rstrip("."))}.</p>'
        f'<p class="rule">The rule: deploy only if the candidate has the serving model\'s labels (count and names), '
        f"its {_e(rule.get('metric', 'mAP'))} is at least {_e(lift)} × the label-frequency "
        f"baseline's {_num(baseline)}{_e(bar)} and at least {_num(rule.get('threshold'))}, and it is not worse than "
        f"the serving model's on the same images by more than {_num(rule.get('tolerance'))}.</p></section>"
    )


def _comparison_html(doc: dict[str, Any]) -> str:
    candidate, champion, baselines = doc["candidate"], doc["champion"], doc["baselines"]
    if champion is None:
        serving_head = "serving model<br><small>none</small>"
    else:
        serving_head = f"serving model<br><small>{_e(champion['model'].get('uri', ''))}</small>"
    head = ('<tr><th>metric</th><th>candidate<br><small>' + _e(candidate["model"].get("uri", "")) + "</small></th>"
            f"<th>{serving_head}</th><th>label-frequency baseline</th><th>all-negative baseline</th></tr>")  # fmt: skip
    rows = []
    for key, name in METRICS:
        cells = [f'<th scope="row" data-metric="{_e(key)}">{_e(name)}</th>',
                 _cell(candidate.get(key), model="candidate", metric=key)]  # fmt: skip
        if champion is not None and champion.get("scored"):
            cells.append(_cell(champion.get(key), model="champion", metric=key))
        else:
            cells.append('<td class="na" data-model="champion">—</td>')
        column, base_key = BASELINE_OF.get(key, (None, None))
        for name_ in ("label_frequency", "all_negative"):
            if column == name_:
                cells.append(_cell(baselines.get(base_key), model=name_, metric=key))  # type: ignore[arg-type]
            else:
                cells.append(f'<td class="na" data-model="{name_}">—</td>')
        rows.append("<tr>" + "".join(cells) + "</tr>")
    note = ""
    if champion is not None and not champion.get("scored"):
        note = (f'<p class="note">The serving model was not scored on this split: '
                f'{_e(champion.get("problem") or "it does not fit this dataset")}.</p>')  # fmt: skip
    return (
        '<section id="comparison"><h2>Champion vs challenger</h2>'
        f"<p>Both scored on the same {_e(doc['split']['images'])} validation images; "
        f"{_e(candidate.get('labels_with_positives', '?'))} of {_e(candidate['labels'])} labels have a positive "
        "among them. The label-frequency predictor scores every image with each label's training frequency; the "
        "all-negative predictor predicts no label.</p>"
        f'<table id="comparison-table"><thead>{head}</thead><tbody>{"".join(rows)}</tbody></table>{note}</section>'
    )


def _per_label_table(per_label: Sequence[dict[str, Any]], label_counts: dict[str, Sequence[int]]) -> str:
    ranked = ranked_labels(per_label)
    order = [*ranked, *sorted((e for e in per_label if e.get("ap") is None), key=lambda e: e["name"])]
    position = {id(e): c for c, e in enumerate(per_label)}
    train = label_counts.get("train")
    rows = []
    for entry in order:
        c = position[id(entry)]
        ap, base = entry.get("ap"), entry.get("baseline_ap")
        lift = ap / base if isinstance(ap, (int, float)) and base else None
        rows.append(
            f'<tr data-label="{_e(entry["name"])}"><td class="name">{_e(entry["name"])}</td>'
            f"{_cell(entry.get('ap'), col='ap')}{_cell(base, col='baseline_ap')}"
            f'<td class="num">{_num(lift, 2)}</td>'
            f'<td class="num" data-col="support">{_e(entry.get("support"))}</td>'
            f'<td class="num" data-col="train">{_e(train[c]) if train is not None else "—"}</td>'
            f"{_cell(entry.get('threshold'), col='threshold')}{_cell(entry.get('f1'), col='f1')}</tr>"
        )
    opened = " open" if len(per_label) <= FULL_CHART_LABELS else ""
    return (
        f"<details{opened}><summary>Every label ({len(per_label)}), by AP</summary>"
        '<table id="per-label-table"><thead><tr><th>label</th><th>AP</th><th>baseline AP</th><th>AP ÷ baseline</th>'
        "<th>validation images</th><th>training images</th><th>threshold</th><th>F1 at it</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table></details>"
    )


NO_TAGS = '<li class="tag none">no tag, none predicted</li>'


def _thumbnails_html(
    images: Sequence[dict[str, Any]], names: Sequence[str], scores: np.ndarray, thresholds: np.ndarray
) -> str:
    cards = []
    for item in images:
        row = scores[item["position"]]
        truth = np.asarray(item["labels"]) > 0.5
        predicted = row >= thresholds
        tags = []
        for kind, mark, mask in (("correct", "✓", truth & predicted), ("missed", "✗", truth & ~predicted),
                                 ("extra", "+", ~truth & predicted)):  # fmt: skip
            for c in np.flatnonzero(mask):
                title = f"{kind}: score {row[c]:.3f}, threshold {thresholds[c]:.3f}"
                tags.append(f'<li class="tag {kind}" title="{_e(title)}"><span class="mark">{mark}</span> '
                            f'<span class="tag-name">{_e(names[c])}</span></li>')  # fmt: skip
        thumb = _thumbnail(item["image"])
        picture = (f'<img src="{_data_uri(*thumb)}" alt="validation image {_e(item["id"])}">' if thumb
                   else '<p class="undecodable">(this image cannot be decoded)</p>')  # fmt: skip
        cards.append(
            f'<figure class="thumb" data-image-id="{_e(item["id"])}">{picture}'
            f'<figcaption><span class="id">image {_e(item["id"])}</span>'
            f'<ul class="tags">{"".join(tags) or NO_TAGS}</ul>'
            "</figcaption></figure>"
        )
    return (
        f'<section id="thumbnails"><h2>Validation images ({len(images)}), true and predicted tags</h2>'
        '<p class="legend">Tags at the per-label thresholds: <span class="tag correct">✓ correct</span> true and '
        'predicted, <span class="tag missed">✗ missed</span> true, not predicted, <span class="tag extra">+ extra'
        "</span> predicted, not true. Images evenly spaced over the split, in file order.</p>"
        f'<div class="grid">{"".join(cards)}</div></section>'
    )


GROUP_KEY_ADVICE = (
    "A high count means the validation figures above are optimistic: the model is partly scored on near copies of "
    "images it was trained on (variants of one design split by image ID land on both sides). Give the split a group "
    "key that keeps each design's variants on one side: the form field split_group_regex (or split_group_file), "
    "or --group-regex on the command line."
)


def _leakage_html(block: dict[str, Any] | None, leaks: Sequence[dict[str, Any]]) -> str:
    """The leakage section: the count and share of validation images within the distance of a training image,
    what that means, and each example's validation image beside its nearest training image."""
    head = '<section id="leakage"><h2>Leakage: validation images near a training image</h2>'
    if not block:
        return (f'{head}<p id="leakage-count" class="not-recorded">Not checked: this evaluation has no leakage '
                "block.</p></section>")  # fmt: skip
    leaked, total, distance = block["leaked"], block["validation_images"], block["max_distance"]
    share = f"{100 * block['fraction']:.2f} %"
    count = (
        f'<p id="leakage-count" class="{"leaky" if leaked else "clean"}" data-leaked="{_e(leaked)}" '
        f'data-fraction="{_e(block["fraction"])}" data-max-distance="{_e(distance)}"><strong>{_e(leaked)} of '
        f"{_e(total)} validation images ({_e(share)})</strong> are within {_e(distance)} bits of a training image's "
        f"perceptual hash ({_e(block['method'])}, compared with all {_e(block['training_images'])} training "
        "images).</p>"
    )
    pairs = []
    for leak in leaks:
        sides = []
        for side, name in (("val", "validation"), ("train", "training")):
            thumb = _thumbnail(leak[f"{side}_image"])
            picture = (f'<img src="{_data_uri(*thumb)}" alt="{name} image {_e(leak[side + "_id"])}">' if thumb
                       else '<p class="undecodable">(this image cannot be decoded)</p>')  # fmt: skip
            sides.append(f'<div class="side {side}">{picture}<span class="id">{name} {_e(leak[side + "_id"])}'
                         "</span></div>")  # fmt: skip
        pairs.append(
            f'<figure class="leak-pair" data-val-id="{_e(leak["val_id"])}" data-train-id="{_e(leak["train_id"])}" '
            f'data-distance="{_e(leak["distance"])}">{"".join(sides)}'
            f"<figcaption>{_e(leak['distance'])} bits apart</figcaption></figure>"
        )
    listed = ""
    if pairs:
        more = f" (the closest {len(pairs)} of {leaked})" if len(pairs) < leaked else ""
        listed = (f"<p>Each validation image beside its nearest training image{_e(more)}:</p>"
                  f'<div class="pairs">{"".join(pairs)}</div>')  # fmt: skip
    return f'{head}{count}<p class="advice">{_e(GROUP_KEY_ADVICE)}</p>{listed}</section>'


CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; margin: 1.5em auto;
       max-width: 1200px; padding: 0 1em; color: #1a1a1a; line-height: 1.4; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.8em; border-bottom: 1px solid #ddd; }
.meta { color: #555; font-size: 0.9em; word-break: break-all; }
table { border-collapse: collapse; font-size: 0.9em; } th, td { padding: 0.25em 0.6em; border-bottom: 1px solid #eee; }
th { text-align: left; } td.num { text-align: right; font-variant-numeric: tabular-nums; } td.na { color: #999; }
small { color: #666; font-weight: normal; word-break: break-all; }
#gate-decision.deploy strong { color: #1b7a34; } #gate-decision.keep strong { color: #b3261e; }
figure.chart img { max-width: 100%; height: auto; } figcaption { font-size: 0.85em; color: #444; }
.file { color: #888; } .not-recorded { color: #8a5a00; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(170px, 1fr)); gap: 0.8em; }
figure.thumb { margin: 0; border: 1px solid #ddd; padding: 0.4em; }
figure.thumb img { width: 100%; height: auto; image-rendering: auto; }
ul.tags { list-style: none; padding: 0; margin: 0.3em 0 0; font-size: 0.8em; }
.tag { display: inline-block; border-radius: 3px; padding: 0 0.3em; margin: 0.1em; }
#leakage-count.leaky strong { color: #b3261e; } .advice { font-size: 0.9em; color: #333; }
.pairs { display: grid; grid-template-columns: repeat(auto-fill, minmax(300px, 1fr)); gap: 0.8em; }
figure.leak-pair { margin: 0; border: 1px solid #ddd; padding: 0.4em; display: flex; flex-wrap: wrap; gap: 0.4em; }
figure.leak-pair .side { flex: 1 1 45%; font-size: 0.8em; } figure.leak-pair img { width: 100%; height: auto; }
figure.leak-pair figcaption { flex-basis: 100%; }
.tag.correct { background: #d7f0dc; color: #155d27; } .tag.missed { background: #fbdcd9; color: #8c1d18;
  text-decoration: underline wavy; } .tag.extra { background: #fff1c2; color: #6b4f00; font-style: italic; }
"""


def render(
    doc: dict[str, Any],
    *,
    scores: np.ndarray,
    labels: np.ndarray,
    label_counts: dict[str, Sequence[int]],
    images: Sequence[dict[str, Any]],
    job: str,
    leaks: Sequence[dict[str, Any]] = (),
) -> dict[str, bytes]:
    """The report's files, {name: bytes}: the PNG charts and `report.html` (which embeds them).

    `scores`/`labels`: the candidate's scores and the split's true labels (images × labels, file order, as the
    evaluation's cache has them); `label_counts`: {"train": [...], "val": [...]} per label (the manifest's);
    `images`: validation images for the grid, each {"position" (row in scores), "id", "labels", "image" (bytes)};
    `leaks`: the leakage block's examples with their images, each {"val_id", "train_id", "distance", "val_image",
    "train_image"} (tagflow.evaluate.leak_images)."""
    candidate = doc["candidate"]
    per_label, names = candidate["per_label"], [e["name"] for e in candidate["per_label"]]
    truth = np.asarray(labels) > 0.5
    if np.shape(scores) != truth.shape or truth.shape[1:] != (len(per_label),):
        raise ValueError(f"scores {np.shape(scores)} and labels {truth.shape} do not fit {len(per_label)} labels")
    files: dict[str, bytes] = {}
    parts: list[str] = []

    panels = ap_panels(per_label)
    files["ap-per-label.png"] = png(ap_figure(per_label))
    shown = sum(len(entries) for _, entries in panels)
    without = len(per_label) - len(ranked_labels(per_label))
    subset = ("every label with a positive" if len(panels) == 1
              else f"the best and worst {CHART_SUBSET} labels of {len(ranked_labels(per_label))}")  # fmt: skip
    parts.append(
        '<section id="per-label-ap"><h2>AP per label against the label-frequency baseline</h2>'
        + _figure_html("ap-per-label.png", files["ap-per-label.png"], f"AP per label: {shown} bars, {subset}",
                       f"Bars: AP; black ticks: the label-frequency baseline's AP (the label's prevalence in the "
                       f"split). {shown} bars: {subset}"
                       + (f"; {without} label(s) without a positive have no AP." if without else "."))
        + _per_label_table(per_label, label_counts) + "</section>"
    )  # fmt: skip

    best, worst = pr_labels(per_label)
    if best:
        files["pr-curves.png"] = png(pr_figure(per_label, np.asarray(scores), truth))
        chosen = ", ".join(names[c] for c in [*best, *worst])
        parts.append(
            '<section id="pr-curves"><h2>Precision-recall curves, best and worst labels</h2>'
            + _figure_html("pr-curves.png", files["pr-curves.png"], f"precision-recall curves of {chosen}",
                           "Step-wise curves (AP is the area under each); dotted: the label's prevalence.")
            + "</section>"
        )  # fmt: skip

    training = candidate.get("training")
    if training and training.get("history"):
        files["training-curves.png"] = png(training_figure(training))
        body = _figure_html("training-curves.png", files["training-curves.png"], "training curves per epoch",
                            "From the model's metrics.json, as the trainer logged each epoch; validation metrics on "
                            "the validation split the model was trained with.")  # fmt: skip
    else:
        body = (
            '<p class="not-recorded" id="training-not-recorded">Training curves: not recorded by the built-in '
            "(this model.tar.gz has no metrics.json with a per-epoch history, as SageMaker's built-in "
            "image-classification writes none; its per-epoch metrics are in the training job's log).</p>"
        )
    parts.append(f'<section id="training-curves"><h2>Training curves</h2>{body}</section>')

    files["label-distribution.png"] = png(distribution_figure(names, label_counts))
    parts.append(
        '<section id="label-distribution"><h2>The dataset\'s label distribution</h2>'
        + _figure_html("label-distribution.png", files["label-distribution.png"],
                       "images per label in train and validation",
                       "Images carrying each label in the training and validation splits (the dataset's manifest); "
                       "the per-label table above has every count.")
        + "</section>"
    )  # fmt: skip

    thresholds = np.array([e["threshold"] for e in per_label], np.float64)
    parts.append(_thumbnails_html(images, names, np.asarray(scores), thresholds))

    model, split = candidate["model"], doc["split"]
    champion = doc.get("champion")
    generated = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    meta = (
        f'<p class="meta">job {_e(job)} · dataset {_e(doc["dataset"])} · validation split {_e(split["uri"])} '
        f"({_e(split['images'])} images, digest {_e(str(split['digest'])[:16])}) · candidate {_e(model.get('uri'))} "
        f"(sha256 {_e(str(model.get('sha256'))[:16])}) · serving model "
        f"{_e(champion['model'].get('uri') if champion else 'none')} · generated {generated}</p>"
    )
    html = (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>tagflow evaluation — {_e(job)}</title><style>{CSS}</style></head><body>"
        f"<h1>Evaluation of the model of job {_e(job)}</h1>{meta}"
        f"{_gate_html(doc)}{_comparison_html(doc)}{_leakage_html(doc.get('leakage'), leaks)}{''.join(parts)}"
        "</body></html>\n"
    )
    files["report.html"] = html.encode("utf-8")
    return files
