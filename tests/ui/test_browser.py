"""The web UI and the reports in a real headless Chromium (Debian's package), driven by Playwright,
against a real ``gradstore serve`` on loopback over the shared tiny stores.

Skipped, saying why, where Chromium or the ``playwright`` package is missing (Playwright's own
browser downloads are never used: the browser is ``/usr/bin/chromium``). Every page is
screenshotted into the test's output folder; with ``GRADSTORE_UI_SCREENSHOTS=DIR`` the
screenshots are also copied there (``docs/ui-*.png`` are made that way).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from gradstore.client import Client
from gradstore.service.process import ServiceProcess

from conftest import chat_records, copy_stores, write_jsonl

CHROMIUM = Path(os.environ.get("GRADSTORE_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
KEY = "ui-test-key"
TIMEOUT_MS = 120_000  # the first selection loads the store's model to featurise the targets

playwright_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed "
                                                                   "(pip install playwright)")
if not CHROMIUM.is_file():
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install -y chromium)", allow_module_level=True)


@pytest.fixture(scope="module")
def root(service_root, service_corpus, tiny_model_dirs, tmp_path_factory):
    """The shared stores, a damaged copy of ``pool`` (``broken``), and job inputs under ``inputs/``."""
    root = copy_stores(service_root, tmp_path_factory.mktemp("ui-root"))
    shutil.copytree(root / "pool", root / "broken")
    damaged = next((root / "broken" / "segments" / "seg-000001" / "scores" / "epoch-1").glob("*.parquet"))
    damaged.write_bytes(damaged.read_bytes()[:100])
    inputs = root / "inputs"
    inputs.mkdir()
    write_jsonl(inputs / "big.jsonl", chat_records(3000, 5, "big"))
    shutil.copytree(tiny_model_dirs["gpt2"], inputs / "model")
    return root


@pytest.fixture(scope="module")
def service(root, tmp_path_factory):
    log = tmp_path_factory.mktemp("ui-service") / "service.log"
    with ServiceProcess(root, api_key=KEY, log_file=log) as running:
        yield running


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    errors = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    yield page
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def shot(page, tmp_path, name):
    path = tmp_path / f"ui-{name}.png"
    page.screenshot(path=str(path), full_page=True)
    extra = os.environ.get("GRADSTORE_UI_SCREENSHOTS")
    if extra:
        Path(extra).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(extra) / path.name)
    return path


def enter_key(page, url, key=KEY):
    page.goto(f"{url}/ui/")
    page.fill("#api-key", key)
    page.click("form.key-form button[type=submit]")


# ------------------------------------------------------------------------------------------- key


def test_the_key_is_asked_for_kept_in_the_session_and_never_in_a_url(page, service, tmp_path):
    requests = []
    page.on("request", lambda request: requests.append(request))
    page.goto(f"{service.url}/ui/")
    page.wait_for_selector("form.key-form")
    shot(page, tmp_path, "key")
    enter_key(page, service.url)
    page.wait_for_selector("table.datastores")
    names = page.locator("table.datastores tbody tr td:first-child").all_inner_texts()
    assert names == ["pool", "pool-noindex", "targets"]
    assert "broken" in page.locator("section.card").last.inner_text()  # a store that cannot be opened
    assert page.evaluate("sessionStorage.getItem('gradstore.apiKey')") == KEY
    assert page.evaluate("localStorage.length") == 0
    v1 = [r for r in requests if "/v1/" in r.url]
    assert v1 and all(r.headers.get("x-api-key") == KEY for r in v1)
    assert not any(KEY in r.url for r in requests)
    shot(page, tmp_path, "datastores")


def test_a_wrong_key_shows_its_error(page, service, tmp_path):
    enter_key(page, service.url, "not-the-key")
    error = page.wait_for_selector("form.key-form .error")
    assert error.get_attribute("data-code") == "unauthorized"
    assert "invalid API key" in error.inner_text()
    shot(page, tmp_path, "wrong-key")


def test_without_auth_the_ui_opens_directly(browser, root, tmp_path):
    with ServiceProcess(root, api_key=None) as open_service:
        context = browser.new_context()
        page = context.new_page()
        page.goto(f"{open_service.url}/ui/")
        page.wait_for_selector("table.datastores")
        assert page.locator("form.key-form").count() == 0
        context.close()


# ------------------------------------------------------------------------------------ datastores


def test_datastore_overview(page, service, tmp_path):
    enter_key(page, service.url)
    page.click("table.datastores a:text-is('pool')")
    page.wait_for_selector("[data-view=overview]")
    text = page.inner_text("[data-view=overview]")
    for fact in ("flat", "epoch-1", "epoch-2", "toy", "more", "adam"):
        assert fact in text
    charts = page.locator("[data-view=overview] .chart")
    titles = charts.locator(".chart-title").all_inner_texts()
    assert any(t.startswith("num_tokens") for t in titles)
    assert any(t.startswith("loss · epoch-1") for t in titles) and any(t.startswith("grad_norm · epoch-2") for t in titles)
    assert page.locator("[data-view=overview] canvas").count() == charts.count()  # every histogram drawn
    shot(page, tmp_path, "overview")


def test_a_broken_store_shows_its_error(page, service, tmp_path):
    enter_key(page, service.url)
    page.wait_for_selector("table.datastores")
    page.goto(f"{service.url}/ui/#/ds/broken")
    error = page.wait_for_selector(".error")
    assert error.get_attribute("data-code") == "datastore_unavailable"
    assert "HTTP 503" in error.inner_text() and "broken" in error.inner_text()
    shot(page, tmp_path, "broken-store")


def test_example_browser_pages_and_searches(page, service, tmp_path):
    enter_key(page, service.url)
    page.wait_for_selector("table.datastores")
    page.goto(f"{service.url}/ui/#/ds/pool/examples")
    page.wait_for_selector(".example-row")
    assert page.locator(".example-row").first.get_attribute("data-id") == "ex-0"
    page.click("button.next")
    page.wait_for_selector(".example-row[data-id=ex-20]")
    page.fill("input.search", "more-1")
    page.click("form.toolbar button[type=submit]")
    page.wait_for_selector(".example-row[data-id=more-10]")
    assert page.locator(".example-row").evaluate_all("rows => rows.map(r => r.dataset.id)") == ["more-1", "more-10", "more-11"]
    page.click(".example-row[data-id=more-1] button.link")
    example = page.wait_for_selector(".example[data-id=more-1]")
    assert example.query_selector(".msg.role-user") and example.query_selector(".msg.role-assistant")
    assert "loss" in example.query_selector("table.scores").inner_text()
    shot(page, tmp_path, "examples")


# ------------------------------------------------------------------------------------- selection


def test_run_a_selection_for_target_records_and_download_the_export(page, service, service_corpus, tmp_path):
    _, records = service_corpus
    targets = records["tgt"]
    enter_key(page, service.url)
    page.wait_for_selector("table.datastores")
    page.goto(f"{service.url}/ui/#/ds/pool/select")
    page.wait_for_selector("form.select-form")
    page.fill("textarea[name=targets]", "\n".join(json.dumps(r) for r in targets))
    page.fill("input[name=subtask_field]", "task")
    page.select_option("select[name=budget-kind]", "k")
    page.fill("input[name=budget]", "8")
    page.click("form.select-form button[type=submit]")
    page.wait_for_selector("[data-view=selection]")
    with Client(service.url, api_key=KEY) as client:
        from gradstore.client.models import TargetRecords

        expected = client.select("pool", TargetRecords(records=targets, subtask_field="task"), k=8)
    ranked = page.locator("tr.ranked").evaluate_all("rows => rows.map(r => r.dataset.id)")
    assert ranked == [item.id for item in expected.items]
    text = page.inner_text("[data-view=selection]")
    assert "Selected 8 of 40" in text and "task-0" in text and "task-1" in text
    assert page.locator("[data-chart=scores] canvas").count() == 1
    assert page.locator("[data-chart=map] canvas").count() == 1
    page.click(f"tr.ranked[data-id='{ranked[0]}']")
    page.wait_for_selector(f".example[data-id='{ranked[0]}'] .chat")
    shot(page, tmp_path, "selection")
    with page.expect_download() as download:
        page.click("button.download")
    saved = tmp_path / "export.jsonl"
    download.value.save_as(saved)
    assert [json.loads(line)["id"] for line in saved.read_text().splitlines()] == ranked


def test_strategy_picker_runs_a_target_free_strategy_with_a_filter(page, service, tmp_path):
    enter_key(page, service.url)
    page.wait_for_selector("table.datastores")
    page.goto(f"{service.url}/ui/#/ds/pool/select")
    page.wait_for_selector("form.select-form")
    names = page.locator("select[name=strategy] option").all_inner_texts()
    response = page.request.get(f"{service.url}/v1/strategies", headers={"X-API-Key": KEY})
    assert names == [s["name"] for s in response.json()["strategies"]] and "quality" in names
    page.select_option("select[name=strategy]", "quality")
    assert page.locator("fieldset:has(textarea[name=targets])").is_hidden()  # quality needs no targets
    page.select_option("select[name=opt-score]", "loss")
    page.select_option("select[name=opt-order]", "low")
    page.select_option("select[name=budget-kind]", "k")
    page.fill("input[name=budget]", "5")
    page.click("text=add a filter")
    page.select_option("select[name=filter-score]", "grad_norm")
    page.fill("input[name=filter-quantile]", "0.5")
    page.click("form.select-form button[type=submit]")
    page.wait_for_selector("[data-view=selection]")
    body = {"strategy": {"name": "quality", "score": "loss", "order": "low"}, "k": 5,
            "filters": [{"score": "grad_norm", "keep": "below", "quantile": 0.5}]}
    expected = page.request.post(f"{service.url}/v1/datastores/pool/select", data=body,
                                 headers={"X-API-Key": KEY}).json()
    ranked = page.locator("tr.ranked").evaluate_all("rows => rows.map(r => r.dataset.id)")
    assert ranked == [item["id"] for item in expected["items"]] and len(ranked) == 5
    assert f"Selected 5 of {expected['pool']}" in page.inner_text("[data-view=selection]")
    assert expected["pool"] < 40  # the filter left part of the pool
    shot(page, tmp_path, "selection-quality")


def test_bad_targets_show_their_error(page, service, tmp_path):
    enter_key(page, service.url)
    page.wait_for_selector("table.datastores")
    page.goto(f"{service.url}/ui/#/ds/pool/select")
    page.wait_for_selector("form.select-form")
    page.fill("textarea[name=targets]", json.dumps({"id": "t", "messages": "not a list"}))
    page.click("form.select-form button[type=submit]")
    error = page.wait_for_selector("#results .error")
    assert error.get_attribute("data-code") == "invalid_query" and "targets.records[0]" in error.inner_text()
    page.fill("textarea[name=targets]", "{not json")
    page.click("form.select-form button[type=submit]")
    page.wait_for_selector("#results .error[data-code=invalid_targets]")
    shot(page, tmp_path, "bad-targets")


# ------------------------------------------------------------------------------------------ jobs


def test_start_and_cancel_a_job(page, service, root, tmp_path):
    enter_key(page, service.url)
    page.wait_for_selector("table.datastores")
    page.goto(f"{service.url}/ui/#/jobs")
    page.wait_for_selector("form.job-form")
    page.fill("input[name=datastore]", "from-ui")
    page.fill("textarea[name=corpus]", str(root / "inputs" / "big.jsonl"))
    page.fill("input[name=model]", str(root / "inputs" / "model"))
    page.select_option("select[name=gradient_type]", "sgd")
    page.fill("input[name=proj_dim]", "64")
    page.fill("input[name=max_length]", "64")
    page.fill("input[name=device]", "cpu")
    page.click("form.job-form button[type=submit]")
    page.wait_for_selector("table.jobs button.cancel")
    assert page.locator("table.jobs .status").first.inner_text() in ("queued", "running")
    shot(page, tmp_path, "jobs")
    page.click("table.jobs button.cancel")
    page.wait_for_selector("table.jobs .status-cancelled")
    with Client(service.url, api_key=KEY) as client:
        assert [job.status for job in client.list_jobs()] == ["cancelled"]
    shot(page, tmp_path, "jobs-cancelled")
    page.fill("input[name=datastore]", "../escape")
    page.click("form.job-form button[type=submit]")
    error = page.wait_for_selector("form.job-form .error")
    assert error.get_attribute("data-code") in ("invalid_name", "validation_error")


def test_append_a_corpus_from_the_job_form(page, service, root, tmp_path):
    shutil.copytree(root / "pool", root / "grow")
    write_jsonl(root / "inputs" / "new.jsonl", chat_records(5, 9, "new"))
    enter_key(page, service.url)
    page.wait_for_selector("table.datastores")
    page.goto(f"{service.url}/ui/#/jobs")
    page.wait_for_selector("form.job-form")
    page.check("input[name=append-corpus]")  # the store's model and settings: their fields are off
    assert page.is_disabled("input[name=model]") and page.is_disabled("input[name=proj_dim]")
    assert page.is_enabled("input[name=replace]") and page.is_visible(".append-hint")
    page.fill("input[name=datastore]", "grow")
    page.fill("textarea[name=corpus]", str(root / "inputs" / "new.jsonl"))
    page.fill("input[name=device]", "cpu")
    page.click("form.job-form button[type=submit]")
    page.wait_for_selector("table.jobs .status-succeeded", timeout=120_000)
    shot(page, tmp_path, "jobs-appended")
    with Client(service.url, api_key=KEY) as client:
        before, after = client.get_datastore("pool"), client.get_datastore("grow")
        assert (after.examples, after.version) == (before.examples + 5, before.version + 1)
        assert client.get_example("grow", "new-4").record["id"] == "new-4"


# --------------------------------------------------------------------------------------- reports


def run_cli(args, capsys):
    from gradstore.cli import main

    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


def open_offline(browser, report):
    """The report in a context with the network off: any request but the file itself fails."""
    context = browser.new_context(offline=True, viewport={"width": 1280, "height": 900})
    requests = []
    context.route("**/*", lambda route: (requests.append(route.request.url),
                                         route.continue_() if route.request.url.startswith("file:") else route.abort()))
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    page.goto(report.as_uri())
    return context, page, requests, errors


def test_selection_report_opens_offline(browser, service_root, tmp_path, capsys):
    from gradstore.datastore import Datastore
    from gradstore.selection import SelectionEngine, TargetSet

    selection, scores, report = tmp_path / "selection.jsonl", tmp_path / "scores.parquet", tmp_path / "report.html"
    # What `gradstore select --targets-store targets --subtask-field task --k 8 --json --scores` writes.
    engine = SelectionEngine(Datastore.open(service_root / "pool"))
    chosen = engine.select(TargetSet.from_datastore(Datastore.open(service_root / "targets"), "task"), {"k": 8})
    selection.write_text("".join(json.dumps(item, ensure_ascii=False) + "\n" for item in chosen.items()))
    engine.write_scores(chosen, scores)
    expected = list(chosen.ids)
    run_cli(["report", service_root / "pool", "--selection", selection, "--scores", scores, "--targets-store",
             service_root / "targets", "-o", report], capsys)
    context, page, requests, errors = open_offline(browser, report)
    page.wait_for_selector("[data-view=selection]")
    assert page.locator("tr.ranked").evaluate_all("rows => rows.map(r => r.dataset.id)") == expected
    assert "Selected 8 of 40" in page.inner_text("[data-view=selection]")
    assert page.locator("[data-chart=scores] canvas").count() == 1 and page.locator("[data-chart=map] canvas").count() == 1
    page.click(f"tr.ranked[data-id='{expected[0]}']")
    page.wait_for_selector(f".example[data-id='{expected[0]}'] .chat")
    shot(page, tmp_path, "report-selection")
    page.click("button.tab[data-tab=overview]")
    page.wait_for_selector("[data-view=overview] canvas")
    shot(page, tmp_path, "report-overview")
    page.click("button.tab[data-tab=examples]")
    page.fill("[data-view=examples] input.search", "more-1")
    page.wait_for_function("document.querySelectorAll('.example-row').length === 3")
    context.close()
    assert requests == [report.as_uri()] and not errors


def test_store_report_and_bad_selection_files(browser, service_root, tmp_path, capsys):
    report = tmp_path / "store.html"
    run_cli(["report", service_root / "pool", "-o", report], capsys)
    context, page, requests, errors = open_offline(browser, report)
    page.wait_for_selector("[data-view=overview] canvas")
    assert page.locator("[data-chart=map] canvas").count() == 1
    context.close()
    assert requests == [report.as_uri()] and not errors
    from gradstore.cli import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"rank": 1, "row": 0, "id": "ex-0", "source": "toy", "score": 0.5, "subtask_scores": {}}\n{"rank": 2}\n')
    assert main(["report", str(service_root / "pool"), "--selection", str(bad), "-o", str(report)]) == 1
    assert f"{bad}:2: not a selected example" in capsys.readouterr().err
    bad.write_text('{"rank": 1, "row": 0, "id": "more-0", "source": "toy", "score": 0.5, "subtask_scores": {}}\n')
    assert main(["report", str(service_root / "pool"), "--selection", str(bad), "-o", str(report)]) == 1
    assert "is it a selection of this store?" in capsys.readouterr().err
