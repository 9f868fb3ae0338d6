"""The UI in a real browser: Debian's chromium, driven by playwright through `executable_path`, against `make up`
(`tagflow.local.stack.up`: `airflow standalone`, the local S3 server and the endpoint, in a TAGFLOW_HOME of this
module's own, brought up once for the module).

What a person does: open a report's link (`/tagflow/s3/BUCKET/KEY`, plugins/tagflow_ops/s3_view.py) without being
logged in, land on Airflow's login page, log in, and get back to the report and see its table and its PNG; a
missing key says 404 with its URI; the S3 server down says 502. The helpers (`login`, `trigger_from_form`,
`wait_for_run`, `shot`) are the steps the whole-run browser test builds on.

`make test` installs chromium with apt (`make browser`) when it is missing; playwright never downloads a browser.
"""

from __future__ import annotations

import io
import os
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from airflow_procs import fresh_stack
from tagflow.local import s3server, stack

if TYPE_CHECKING:
    from collections.abc import Iterator

    from playwright.sync_api import Browser, Page

pytestmark = [pytest.mark.slow, pytest.mark.mxnet, pytest.mark.timeout(900)]

os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")
SHOTS = Path("/tmp")
UI_TIMEOUT_MS = 60_000
RUN_TIMEOUT_S = 900
TERMINAL_RUN = {"success", "failed"}
BUCKET = "tagflow-data"  # `up` creates it: the trigger form's default dataset bucket


@pytest.fixture(scope="module")
def ui(tmp_path_factory, mxnet_python) -> Iterator[stack.Stack]:
    """`make up` in a fresh TAGFLOW_HOME, with no AWS_* variables from the session's S3 server; `make down` after."""
    with pytest.MonkeyPatch.context() as mp, fresh_stack(tmp_path_factory.mktemp("browser") / "home", mp) as up:
        yield up


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium")
    if not chromium:
        pytest.fail("Debian's chromium is not installed: `make browser` (make test runs it) installs it with apt")
    with sync_playwright() as pw:
        # --no-sandbox: CI runs as root, where chromium's sandbox refuses to start
        launched = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def page(browser) -> Iterator[Page]:
    """A fresh browser context (no cookie: not logged in)."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(UI_TIMEOUT_MS)
    try:
        yield context.new_page()
    finally:
        context.close()


# --- steps a person takes in the UI ------------------------------------------------------------------------------


def login(page: Page, af: stack.AirflowInfo, *, then: str | None = None) -> None:
    """Log in as admin through Airflow's login page (opening `then`, or the UI's home, first: either sends an
    anonymous browser there), and wait to be sent back."""
    target = af.url + (then or "/")
    page.goto(target)
    page.wait_for_url("**/auth/login**")
    page.locator("input[name=username]").fill(stack.ADMIN_USER)
    page.locator("input[name=password]").fill(stack.admin_password(af))
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(lambda url: "/auth/login" not in url)


def trigger_from_form(
    page: Page, af: stack.AirflowInfo, fields: dict[tuple[str, str], str | bool] | None = None
) -> str:
    """Open the tagflow DAG, press Trigger, set `fields` ((form section, param name) → text, or True/False for a
    switch, e.g. ("Deployment", "deploy"): False), keep "Unpause tagflow on trigger" ticked (shown while the DAG is
    paused) and trigger; returns the new run's id, from the run page the UI opens."""
    page.goto(f"{af.url}/dags/{stack.DAG_ID}")
    page.get_by_role("button", name="Trigger").first.click()
    dialog = page.get_by_role("dialog")
    unpause = dialog.locator("label", has_text="Unpause").locator("input[type=checkbox]")
    if unpause.count():
        unpause.check()
    opened = set()
    for (section, param), value in (fields or {}).items():
        if section not in opened:
            dialog.get_by_role("button", name=section, exact=True).click()
            opened.add(section)
        field = dialog.locator(f"[name=element_{param}]")  # the form names each param's input element_NAME
        if isinstance(value, bool):
            if field.is_checked() != value:
                dialog.locator(f"label[id='switch:element_{param}']").click()
            assert field.is_checked() == value, (section, param)
        else:
            field.fill(value)
    dialog.get_by_role("button", name="Trigger").last.click()
    page.wait_for_url(f"**/dags/{stack.DAG_ID}/runs/**")
    return urllib.parse.unquote(page.url.split("/runs/", 1)[1].split("/", 1)[0].split("?", 1)[0])


def runs(af: stack.AirflowInfo) -> list[dict]:
    code, body = stack._request("GET", f"{af.url}/api/v2/dags/{stack.DAG_ID}/dagRuns", token=stack.api_token(af))
    assert code == 200, body
    return body["dag_runs"]


def wait_for_run(af: stack.AirflowInfo, run_id: str, timeout: float = RUN_TIMEOUT_S) -> dict:
    """The run once it has succeeded or failed (fails the test after `timeout`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        code, run = stack._request(
            "GET", f"{af.url}/api/v2/dags/{stack.DAG_ID}/dagRuns/{run_id}", token=stack.api_token(af)
        )
        assert code == 200, run
        if run["state"] in TERMINAL_RUN:
            return run
        time.sleep(3)
    pytest.fail(f"run {run_id} did not end within {timeout:.0f}s")


def shot(page: Page, name: str) -> Path:
    """A full-page screenshot in /tmp, for a person to look at."""
    path = SHOTS / f"tagflow-browser-{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


# --- the report behind the login ---------------------------------------------------------------------------------

REPORT = """<!doctype html><html><head><meta charset="utf-8"><title>tagflow evaluation</title>
<style>table {{ border-collapse: collapse }} td, th {{ border: 1px solid #999; padding: 4px 10px }}</style></head>
<body><h1>Evaluation of {job}</h1>
<table id="comparison"><tr><th>model</th><th>macro mAP</th><th>label-frequency baseline</th></tr>
<tr><td>challenger</td><td>0.4210</td><td>0.1460</td></tr>
<tr><td>champion</td><td>0.3990</td><td>0.1460</td></tr></table>
<p><img id="ap" src="per-label-ap.png" alt="per-label AP"></p>
<p id="script-check">scripts blocked</p>
<script>document.getElementById("script-check").textContent = "a script ran";</script>
</body></html>
"""


def png(width: int = 60, height: int = 30) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (width, height), (1, 124, 238)).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def report(ui) -> str:
    """A small report and its PNG where the evaluation puts them; returns the report's key. The report is stored
    without a Content-Type (the server guesses from the key), its PNG with one."""
    job = f"browser-{uuid.uuid4().hex[:8]}"
    folder = f"browser-test/output/{job}/evaluation"
    client = ui.s3.client()
    client.put_object(Bucket=BUCKET, Key=f"{folder}/report.html", Body=REPORT.format(job=job).encode())
    client.put_object(Bucket=BUCKET, Key=f"{folder}/per-label-ap.png", Body=png(), ContentType="image/png")
    return f"{folder}/report.html"


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body of a GET without following redirects."""

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):
            return None

    opener = urllib.request.build_opener(NoRedirect)
    try:
        with opener.open(urllib.request.Request(url, headers=headers or {}), timeout=30) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def test_anonymous_requests_are_refused(ui, report):
    url = f"{ui.airflow.url}/tagflow/s3/{BUCKET}/{report}"
    code, _, body = get(url)
    assert code == 401, body
    assert body.decode().strip() == f"/tagflow/s3/{BUCKET}/{report}: Not authenticated; log in to Airflow first"
    # A browser is sent to the login page, which will send it back.
    code, headers, _ = get(url, {"Accept": "text/html"})
    assert code == 303
    assert headers["location"].startswith("/auth/login?next=")
    assert urllib.parse.unquote(headers["location"].split("next=", 1)[1]) == url
    code, _, body = get(url, {"Cookie": "_token=not-a-token"})
    assert code in (401, 403), body


def test_a_logged_in_user_sees_the_report(ui, report, page):
    path = f"/tagflow/s3/{BUCKET}/{report}"
    login(page, ui.airflow, then=path)  # the report's link, anonymous: the login page, then back to the report
    assert page.url == ui.airflow.url + path
    table = page.locator("#comparison")
    assert table.locator("tr").count() == 3
    assert table.locator("tr").nth(1).locator("td").all_inner_texts() == ["challenger", "0.4210", "0.1460"]
    # the PNG beside it loaded (img-src 'self'), and the report's script did not run (default-src 'none')
    page.wait_for_function("document.getElementById('ap').complete")
    assert page.eval_on_selector("#ap", "img => img.naturalWidth") == 60
    assert page.locator("#script-check").inner_text() == "scripts blocked"
    response = page.request.get(ui.airflow.url + path)
    assert response.status == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"  # guessed: stored without a type
    assert response.headers["x-content-type-options"] == "nosniff"
    assert "default-src 'none'" in response.headers["content-security-policy"]
    image = page.request.get(ui.airflow.url + path.replace("report.html", "per-label-ap.png"))
    assert (image.status, image.headers["content-type"], image.body()) == (200, "image/png", png())
    shot(page, "report")

    # the evaluation folder lists its two files, each a link that opens it
    page.goto(ui.airflow.url + path.rsplit("/", 1)[0] + "/")
    assert sorted(page.locator("td a").all_inner_texts()) == ["per-label-ap.png", "report.html"]
    page.get_by_role("link", name="report.html").click()
    assert page.locator("#comparison tr").count() == 3


def test_missing_and_unserved_keys(ui, report, page):
    login(page, ui.airflow)
    missing = report.replace("report.html", "no-such-report.html")
    response = page.goto(f"{ui.airflow.url}/tagflow/s3/{BUCKET}/{missing}")
    assert response.status == 404
    assert page.locator("body").inner_text().strip() == f"s3://{BUCKET}/{missing}: no such object"
    shot(page, "missing")
    response = page.goto(f"{ui.airflow.url}/tagflow/s3/no-such-bucket-{uuid.uuid4().hex[:8]}/x/output/report.html")
    assert response.status == 404
    assert "no such bucket" in page.locator("body").inner_text()
    # staging bundles (and anything outside tagflow's output, training and validation folders) are not served
    response = page.goto(f"{ui.airflow.url}/tagflow/s3/{BUCKET}/browser-test/staging/bundle.tar")
    assert response.status == 400
    assert "only tagflow's" in page.locator("body").inner_text()


def test_s3_down_is_a_502(ui, report, page):
    """Last in the module: the S3 server is stopped, then started again on its ports."""
    login(page, ui.airflow)
    state = Path(ui.s3.state_dir)
    s3server.stop(state)
    try:
        response = page.goto(f"{ui.airflow.url}/tagflow/s3/{BUCKET}/{report}")
        assert response.status == 502
        text = page.locator("body").inner_text().strip()
        assert text.startswith(f"s3://{BUCKET}/{report}: S3 did not answer")
        assert "\n" not in text
    finally:
        again = s3server.start(state)
    assert again.endpoint == ui.s3.endpoint
    assert page.goto(f"{ui.airflow.url}/tagflow/s3/{BUCKET}/{report}").status == 200
