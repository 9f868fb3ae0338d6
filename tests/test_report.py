"""The evaluation report (tagflow.report, written by tagflow.evaluate.write_evaluation): the real local S3 server,
the session's trained demo model and data set (tests/test_evaluate.py's fixtures, trained once), and the HTML read
back with html.parser.
"""

from __future__ import annotations

import base64
import io
import json
import tarfile
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from botocore.exceptions import ClientError, EndpointConnectionError

from tagflow import report, s3
from tagflow.errors import InputError, TagflowError
from tagflow.evaluate import cache_uri, evaluate, read_scores, report_uri, write_evaluation
from tagflow.recordio import RecordReader, unpack_payload
from test_evaluate import LABEL_NAMES, dataset, leaky, trained  # noqa: F401 - fixtures, built once per session

pytestmark = [pytest.mark.slow, pytest.mark.mxnet]

NASTY_NAMES = ['<script>alert("x")</script>', "a&b", '"quoted"', "<b>bold</b>", "it's", "$5 & $x_1$",
               "</td></tr>", "colour-7", "<!-- comment -->", "naïve café"]  # fmt: skip


class Page(HTMLParser):
    """What the tests read from a report: every element with its attributes, the text inside each id'd element and
    inside table cells, the thumbnails' tags."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: list[tuple[str, dict[str, str]]] = []
        self.text_of: dict[str, str] = {}
        self.rows: dict[str, list[list[tuple[dict[str, str], str]]]] = {}  # table id -> rows of (attrs, text)
        self.thumbs: list[dict] = []
        self._open: list[tuple[str, dict[str, str]]] = []
        self._table: str | None = None
        self._cell: tuple[dict[str, str], list[str]] | None = None
        self._tag: tuple[str, list[str]] | None = None
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        attrs = {k: v or "" for k, v in attrs}
        self.elements.append((tag, attrs))
        if tag in ("img", "meta", "br"):
            return
        self._open.append((tag, attrs))
        if tag == "table":
            self._table = attrs.get("id", "")
            self.rows[self._table] = []
        elif tag == "tr" and self._table is not None:
            self.rows[self._table].append([])
        elif tag in ("td", "th") and self._table is not None:
            self._cell = (attrs, [])
        elif tag == "figure" and "thumb" in attrs.get("class", ""):
            self.thumbs.append({"id": int(attrs["data-image-id"]), "tags": []})
        elif tag == "li" and self.thumbs and "tag" in attrs.get("class", "").split():
            self._tag = (attrs["class"].split()[1], [])

    def handle_endtag(self, tag):
        while self._open:
            name, _ = self._open.pop()
            if name == tag:
                break
        if tag in ("td", "th") and self._cell is not None and self._table is not None:
            self.rows[self._table][-1].append((self._cell[0], "".join(self._cell[1])))
            self._cell = None
        elif tag == "table":
            self._table = None
        elif tag == "li" and self._tag is not None:
            self.thumbs[-1]["tags"].append((self._tag[0], "".join(self._tag[1]).split(" ", 1)[1]))
            self._tag = None

    def handle_data(self, data):
        for _, attrs in self._open:
            if "id" in attrs:
                self.text_of[attrs["id"]] = self.text_of.get(attrs["id"], "") + data
        if self._cell is not None:
            self._cell[1].append(data)
        if self._tag is not None:
            self._tag[1].append(data)

    def value(self, table: str, **attrs: str) -> float:
        """The data-value of the one cell of `table` with these data- attributes."""
        want = {f"data-{k.replace('_', '-')}": v for k, v in attrs.items()}
        found = [a for row in self.rows[table] for a, _ in row if want.items() <= a.items()]
        assert len(found) == 1, (table, attrs, found)
        return float(found[0]["data-value"])


def get(s3_client, uri: str | s3.S3Uri) -> bytes:
    uri = s3.S3Uri.parse(str(uri))
    return s3_client.get_object(Bucket=uri.bucket, Key=uri.key)["Body"].read()


def exists(s3_client, uri: str | s3.S3Uri) -> bool:
    uri = s3.S3Uri.parse(str(uri))
    try:
        s3_client.head_object(Bucket=uri.bucket, Key=uri.key)
    except ClientError:
        return False
    return True


def pngs_beside(s3_client, uri: s3.S3Uri) -> dict[str, bytes]:
    folder = uri.key.rsplit("/", 1)[0] + "/"
    keys = [k for k in s3.list_objects(s3_client, s3.S3Uri(uri.bucket, folder)) if k.endswith(".png")]
    return {k.rsplit("/", 1)[1]: get(s3_client, s3.S3Uri(uri.bucket, k)) for k in keys}


def copy_dataset(s3_client, source: dict, prefix: str, *, train: bool = True, **manifest_changes) -> str:
    """The published data set copied to s3://BUCKET/PREFIX (its manifest changed as given; without its training
    records when not `train`); its URI."""
    bucket = source["bucket"]
    keys = ["validation/val.rec", "validation/val.idx"]
    for key in keys + (["training/train.rec", "training/train.idx"] if train else []):
        s3_client.copy_object(Bucket=bucket, Key=f"{prefix}/{key}", CopySource={"Bucket": bucket, "Key": f"ds/{key}"},
                              MetadataDirective="COPY")  # fmt: skip
    manifest = {**source["manifest"], **manifest_changes}
    s3_client.put_object(Bucket=bucket, Key=f"{prefix}/training/manifest.json", Body=json.dumps(manifest).encode())
    return f"s3://{bucket}/{prefix}"


def without_metrics_json(model_uri: str, s3_client, folder: Path) -> str:
    """The model as SageMaker's built-in writes it: the same files, no metrics.json."""
    with tarfile.open(fileobj=io.BytesIO(get(s3_client, model_uri))) as tar:
        tar.extractall(folder / "model", filter="data")
    (folder / "model" / "metrics.json").unlink()
    archive = folder / "model.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted((folder / "model").iterdir()):
            tar.add(path, arcname=path.name)
    return str(archive)


def true_labels(root: Path) -> dict[int, list[str]]:
    """Each validation image's true label names, read from val.rec with tagflow's reader."""
    out = {}
    with RecordReader(root / "val.rec", root / "val.idx") as reader:
        for _, payload in reader:
            header, labels, _ = unpack_payload(payload)
            out[int(header.id)] = [LABEL_NAMES[c] for c in np.flatnonzero(labels > 0.5)]
    return out


def test_the_report_is_written_beside_the_evaluation_whole_and_self_contained(dataset, trained, s3_client,  # noqa: F811
                                                                             mxnet_python):  # fmt: skip
    doc = evaluate(trained, dataset["uri"], client=s3_client, mxnet_python=mxnet_python, champion_uri=trained)
    uri = write_evaluation(doc, dataset["uri"], "report-job", client=s3_client)
    page_uri = report_uri(dataset["uri"], "report-job")
    assert str(page_uri) == uri.rsplit("/", 1)[0] + "/report.html"
    stored = json.loads(get(s3_client, uri))
    text = get(s3_client, page_uri).decode("utf-8")
    page = Page(text)

    # One self-contained file: nothing fetched from anywhere, every image a data: URI, no script.
    for tag, attrs in page.elements:
        for name in ("src", "href", "srcset", "action", "data"):
            value = attrs.get(name, "")
            assert not value or value.startswith("data:"), (tag, name, value[:80])
        assert tag not in ("script", "link", "iframe", "object", "embed"), tag
    assert "http://" not in text and "https://" not in text and "@import" not in text and "url(" not in text
    # The PNGs beside it are the ones it embeds.
    beside = pngs_beside(s3_client, page_uri)
    assert set(beside) == {"ap-per-label.png", "pr-curves.png", "training-curves.png", "label-distribution.png"}
    embedded = {
        attrs.get("id", "").removeprefix("fig-") + ".png": attrs for tag, attrs in page.elements if tag == "figure"
    }
    sources = [
        attrs["src"] for tag, attrs in page.elements if tag == "img" and attrs["src"].startswith("data:image/png")
    ]
    assert sorted(base64.b64decode(src.split(",", 1)[1]) for src in sources) == sorted(beside.values())
    assert set(beside) <= set(embedded)

    # The comparison table carries evaluation.json's figures, the baselines and the champion's.
    candidate = stored["candidate"]
    for metric in ("mAP", "micro_mAP", "micro_f1", "macro_f1", "micro_f1_at_0.5", "macro_f1_at_0.5", "accuracy"):
        assert page.value("comparison-table", model="candidate", metric=metric) == candidate[metric]
        assert page.value("comparison-table", model="champion", metric=metric) == stored["champion"][metric]
    base = stored["baselines"]
    assert page.value("comparison-table", model="label_frequency", metric="mAP") == base["label_frequency_mAP"]
    assert page.value("comparison-table", model="all_negative", metric="accuracy") == base["all_negative_accuracy"]
    decision = next(attrs for tag, attrs in page.elements if attrs.get("id") == "gate-decision")
    assert decision["data-deploy"] == str(stored["gate"]["deploy"]).lower() == "true"
    assert stored["gate"]["reason"] in page.text_of["gate-reason"]

    # The per-label table: one row per label with its AP and baseline as in evaluation.json, best AP first.
    rows = page.rows["per-label-table"][1:]
    assert sorted(row[0][1] for row in rows) == sorted(LABEL_NAMES)
    by_name = {e["name"]: e for e in candidate["per_label"]}
    for row in rows:
        entry, cells = by_name[row[0][1]], {a.get("data-col"): a for a, _ in row}
        assert float(cells["ap"]["data-value"]) == entry["ap"]
        assert float(cells["baseline_ap"]["data-value"]) == entry["baseline_ap"]
        assert float(cells["threshold"]["data-value"]) == entry["threshold"]
    aps = [float({a.get("data-col"): a for a, _ in row}["ap"]["data-value"]) for row in rows]
    assert aps == sorted(aps, reverse=True)

    # Thumbnails: 24 validation images, each with its true tags from val.rec and the tags predicted at the
    # evaluation's thresholds from the candidate's scores.
    truth = true_labels(dataset["root"])
    scored = read_scores(s3_client, cache_uri(s3.S3Uri.parse(dataset["uri"]), candidate["model"]["sha256"],
                                              stored["split"]["digest"]))  # fmt: skip
    row_of = {int(i): r for r, i in enumerate(scored["ids"])}
    thresholds = np.array([e["threshold"] for e in candidate["per_label"]])
    assert len(page.thumbs) == 24 and len({t["id"] for t in page.thumbs}) == 24
    kinds = set()
    for thumb in page.thumbs:
        tags = thumb["tags"]
        kinds |= {kind for kind, _ in tags}
        assert sorted(name for kind, name in tags if kind in ("correct", "missed")) == sorted(truth[thumb["id"]])
        predicted = [LABEL_NAMES[c] for c in np.flatnonzero(scored["scores"][row_of[thumb["id"]]] >= thresholds)]
        assert sorted(name for kind, name in tags if kind in ("correct", "extra")) == sorted(predicted)
    assert "correct" in kinds  # a model that learnt gets some right

    # The local trainer recorded its curves: drawn, not "not recorded".
    assert "training-not-recorded" not in page.text_of

    # The leakage section: this split is clean, and says so; no pair is shown.
    count = next(attrs for tag, attrs in page.elements if attrs.get("id") == "leakage-count")
    assert count["data-leaked"] == "0" == str(stored["leakage"]["leaked"]) and count["data-max-distance"] == "4"
    assert f"0 of {stored['split']['images']} validation images" in page.text_of["leakage-count"]
    assert not leak_pairs(page)


def leak_pairs(page: Page) -> list[dict]:
    """The leakage section's pairs: each figure's data- attributes and its two images (bytes, in order)."""
    pairs: list[dict] = []
    for tag, attrs in page.elements:
        if tag == "figure" and "leak-pair" in attrs.get("class", ""):
            pairs.append({**attrs, "images": [], "alts": []})
        elif tag == "img" and pairs and len(pairs[-1]["images"]) < 2:
            pairs[-1]["images"].append(base64.b64decode(attrs["src"].split(",", 1)[1]))
            pairs[-1]["alts"].append(attrs["alt"])
    return pairs


def test_the_report_shows_each_leak_beside_its_training_image(leaky, trained, s3_client, mxnet_python):  # noqa: F811
    doc = evaluate(trained, leaky["uri"], client=s3_client, mxnet_python=mxnet_python)
    write_evaluation(doc, leaky["uri"], "leaky-report", client=s3_client)
    page = Page(get(s3_client, report_uri(leaky["uri"], "leaky-report")).decode("utf-8"))
    block = doc["leakage"]
    count = next(attrs for tag, attrs in page.elements if attrs.get("id") == "leakage-count")
    assert count["data-leaked"] == str(block["leaked"]) == str(len(leaky["planted"]))
    assert float(count["data-fraction"]) == block["fraction"]
    text = page.text_of["leakage"]
    assert f"{block['leaked']} of {block['validation_images']} validation images" in text
    assert "optimistic" in text and "split_group_regex" in text and "--group-regex" in text

    # One pair per example, in the block's order: the validation image as val.rec has it beside the training image
    # as train.rec has it (the grid shows records of at most 160 px as stored).
    val_images = records(leaky["val_rec"])
    train_images = records(leaky["root"] / "train.rec")
    pairs = leak_pairs(page)
    assert [(int(p["data-val-id"]), int(p["data-train-id"]), int(p["data-distance"])) for p in pairs] == [
        (e["val_id"], e["train_id"], e["distance"]) for e in block["examples"]]  # fmt: skip
    assert {int(p["data-val-id"]): int(p["data-train-id"]) for p in pairs} == leaky["planted"]
    for pair in pairs:
        val_id, train_id = int(pair["data-val-id"]), int(pair["data-train-id"])
        assert pair["images"] == [val_images[val_id], train_images[train_id]]
        assert pair["alts"] == [f"validation image {val_id}", f"training image {train_id}"]


def records(rec: Path) -> dict[int, bytes]:
    """Each record's image bytes by image ID, read with tagflow's reader."""
    with RecordReader(rec) as reader:
        return {int(h.id): image for h, _, image in (unpack_payload(p) for _, p in reader)}


def test_a_dataset_without_its_training_records_is_named(dataset, trained, s3_client, mxnet_python):  # noqa: F811
    uri = copy_dataset(s3_client, dataset, "ds-no-train", train=False)
    with pytest.raises(InputError, match=f"{uri}: no training/train.rec beside the validation split .*{uri}/training/"
                                         "train.rec is expected"):  # fmt: skip
        evaluate(trained, uri, client=s3_client, mxnet_python=mxnet_python)


def test_the_ap_chart_draws_one_bar_per_label_or_the_best_and_worst_25(dataset, trained, s3_client,  # noqa: F811
                                                                      mxnet_python):  # fmt: skip
    doc = evaluate(trained, dataset["uri"], client=s3_client, mxnet_python=mxnet_python)
    per_label = doc["candidate"]["per_label"]
    fig = report.ap_figure(per_label)
    (ax,) = fig.axes
    with_ap = sorted((e for e in per_label if e["ap"] is not None), key=lambda e: (-e["ap"], e["name"]))
    assert len(ax.patches) == len(with_ap) == sum(e["support"] > 0 for e in per_label)
    assert [t.get_text() for t in ax.get_yticklabels()] == [e["name"] for e in with_ap]
    assert [p.get_width() for p in ax.patches] == pytest.approx([e["ap"] for e in with_ap])

    # 334 labels (the seed set's count): the best 25 and the worst 25, each in its own panel, in order.
    rng = np.random.default_rng(3)
    many = [{"name": f"label-{c}", "ap": float(rng.random()), "baseline_ap": 0.05, "support": 3} for c in range(334)]
    many[7]["ap"] = None  # no positive: no bar
    best, worst = report.ap_figure(many).axes
    ranked = sorted((e for e in many if e["ap"] is not None), key=lambda e: -e["ap"])
    assert [t.get_text() for t in best.get_yticklabels()] == [e["name"] for e in ranked[:25]]
    assert [t.get_text() for t in worst.get_yticklabels()] == [e["name"] for e in ranked[-25:]]
    assert len(best.patches) == len(worst.patches) == 25


def test_label_names_with_html_metacharacters_are_escaped(dataset, trained, s3_client, mxnet_python):  # noqa: F811
    uri = copy_dataset(s3_client, dataset, "ds-html", label_names=NASTY_NAMES,
                       label_counts={split: dict(zip(NASTY_NAMES, counts.values(), strict=True))
                                     for split, counts in dataset["manifest"]["label_counts"].items()})  # fmt: skip
    doc = evaluate(trained, uri, client=s3_client, mxnet_python=mxnet_python)
    write_evaluation(doc, uri, "html-job", client=s3_client)
    text = get(s3_client, report_uri(uri, "html-job")).decode("utf-8")
    page = Page(text)
    # No element came from a label name: the parser saw only the report's own tags.
    assert {tag for tag, _ in page.elements} <= {"html", "head", "meta", "title", "style", "body", "h1", "h2", "p",
        "strong", "section", "table", "thead", "tbody", "tr", "th", "td", "small", "br", "figure", "img",
        "figcaption", "span", "details", "summary", "div", "ul", "li"}  # fmt: skip
    assert "<script>" not in text and "<b>bold" not in text and "<!-- comment" not in text
    # ... and each name reads back as it is, in the per-label table and the thumbnails' tags.
    assert sorted(row[0][1] for row in page.rows["per-label-table"][1:]) == sorted(NASTY_NAMES)
    tagged = {name for thumb in page.thumbs for _, name in thumb["tags"]}
    assert tagged and tagged <= set(NASTY_NAMES)
    assert all(attrs.get("data-label") in NASTY_NAMES for tag, attrs in page.elements if "data-label" in attrs)


def test_a_model_without_metrics_json_says_its_curves_were_not_recorded(dataset, trained, s3_client,  # noqa: F811
                                                                       mxnet_python, tmp_path):  # fmt: skip
    job = "builtin-job"
    first = evaluate(trained, dataset["uri"], client=s3_client, mxnet_python=mxnet_python)
    write_evaluation(first, dataset["uri"], job, client=s3_client)
    page_uri = report_uri(dataset["uri"], job)
    assert "training-curves.png" in pngs_beside(s3_client, page_uri)

    builtin = without_metrics_json(trained, s3_client, tmp_path)
    doc = evaluate(builtin, dataset["uri"], client=s3_client, mxnet_python=mxnet_python)
    assert doc["candidate"]["training"] is None
    write_evaluation(doc, dataset["uri"], job, client=s3_client)  # the same job again: a retry with another model
    page = Page(get(s3_client, page_uri).decode("utf-8"))
    assert "not recorded by the built-in" in page.text_of["training-not-recorded"]
    assert "training-curves.png" not in pngs_beside(s3_client, page_uri)  # the earlier try's chart is gone
    stored = json.loads(get(s3_client, str(page_uri).replace("/report.html", "/evaluation.json")))
    assert stored["model"]["uri"] == builtin and stored["candidate"]["training"] is None


def test_a_failure_while_writing_leaves_no_report(dataset, trained, s3_client, s3_server, mxnet_python):  # noqa: F811
    job = "failing-job"
    doc = evaluate(trained, dataset["uri"], client=s3_client, mxnet_python=mxnet_python)
    write_evaluation(doc, dataset["uri"], job, client=s3_client)
    page_uri = report_uri(dataset["uri"], job)
    assert exists(s3_client, page_uri)

    # The connection drops while evaluation.json is being put (after the PNGs): a fresh client to the same real
    # server, with the failure raised where botocore would raise it.
    flaky = s3.make_client(s3_server.endpoint)

    def drop(params, **_):
        if params["Key"].endswith("/evaluation.json"):
            raise EndpointConnectionError(endpoint_url=s3_server.endpoint)

    flaky.meta.events.register("before-parameter-build.s3.PutObject", drop)
    with pytest.raises(EndpointConnectionError):
        write_evaluation(doc, dataset["uri"], job, client=flaky)
    assert not exists(s3_client, page_uri)  # no report.html rather than one beside another evaluation.json
    write_evaluation(doc, dataset["uri"], job, client=s3_client)  # the retry writes it whole
    assert exists(s3_client, page_uri)

    # The split changed between the evaluation and its writing: refused before anything is written.
    uri = copy_dataset(s3_client, dataset, "ds-changing")
    moving = evaluate(trained, uri, client=s3_client, mxnet_python=mxnet_python)
    rec = s3.S3Uri.parse(uri).join("validation", "val.rec")
    s3_client.put_object(Bucket=rec.bucket, Key=rec.key, Body=get(s3_client, rec)[:-4] + b"\0\0\0\0")
    with pytest.raises(TagflowError, match="changed since the evaluation"):
        write_evaluation(moving, uri, job, client=s3_client)
    folder = s3.S3Uri.parse(uri).join("output", job)
    assert s3.list_objects(s3_client, s3.S3Uri(folder.bucket, folder.key + "/")) == {}
