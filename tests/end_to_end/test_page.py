"""The server's inspection page in a real browser: Playwright driving Debian's Chromium.

Uploads a broken and a good bottle through the page's file input, checks each card against the
server's own JSON for the same files, moves the threshold slider and watches the page re-cut the
results (without touching the model on the server), and takes a screenshot: the README's
``docs/serve-page.png`` when run with ``PATCHCORE_SCREENSHOT=docs/serve-page.png``, else under
the test's temporary folder (tests leave the checkout as it was). With ``--api-key-file`` the page
asks for a key once a tab and sends it as a header; its CSV export neutralises formulas.
"""

from __future__ import annotations

import base64
import csv
import io
import math
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Iterator

import httpx
from PIL import Image
import pytest
from playwright.sync_api import Page, expect, sync_playwright

from browser import launch

import serving
from serving import RunningServer

SCREENSHOT = os.environ.get("PATCHCORE_SCREENSHOT")
KEY_STORE = "patchcore-api-key"  # page.js: the key's name in sessionStorage
#: a plain number as JavaScript's String(number) writes it: no quote, no formula guard
PLAIN_NUMBER = re.compile(r"^-?\d+(\.\d+)?(e[-+]\d+)?$")


def _percent(flagged: int, total: int) -> str:
    """The page's "would flag" figure, formatted as page.js formats it."""
    return f"would flag {100 * flagged / total:.1f}% of the good training images ({flagged} of {total})"


@pytest.fixture(scope="module")
def open_server(bottle_model_file, tmp_path_factory) -> Iterator[RunningServer]:
    """``patchcore serve`` without API keys, shared by this module's tests (the page never changes
    the server's state): one start (~15 s) instead of one a test."""
    server = RunningServer(bottle_model_file, log=tmp_path_factory.mktemp("open_server") / "server.log")
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def _watch(page: Page, problems: list[str]) -> None:
    """Collect the page's script errors and console errors, less the browser's own line for each
    401 (expected where a key is refused)."""
    def console(message) -> None:
        if message.type == "error" and "status of 401" not in message.text:
            problems.append(f"console {message.type}: {message.text}")

    page.on("console", console)
    page.on("pageerror", lambda error: problems.append(f"page error: {error}"))


def _stored(page: Page) -> dict:
    """Where a key could be kept: this tab's sessionStorage, localStorage, cookies."""
    return page.evaluate(f"({{session: sessionStorage.getItem('{KEY_STORE}'), local: localStorage.length, cookie: document.cookie}})")


@pytest.fixture
def images(data_root, tmp_path) -> dict[str, Path]:
    """Test images under distinct names (MVTec's files are all 000.png, 001.png, ...), and a text file posing as an image."""
    bottle = data_root / "mvtec_ad" / "bottle" / "test"
    folder = tmp_path / "upload"
    folder.mkdir()
    chosen = {"broken": ("broken_large", "000"), "good": ("good", "000"), "good2": ("good", "001")}
    paths = {}
    for key, (kind, stem) in chosen.items():
        paths[key] = folder / f"{kind}_{stem}.png"
        shutil.copyfile(bottle / kind / f"{stem}.png", paths[key])
    paths["text"] = folder / "notes.png"
    paths["text"].write_text("inspection notes, not a picture\n")
    return paths


def test_page_uploads_scores_and_recuts(bottle_model_file, open_server, images, tmp_path):
    server = open_server
    name = httpx.get(f"{server.url}/v2").json()["models"][0]
    model = httpx.get(f"{server.url}/v2/models/{name}").json()["patchcore"]
    threshold, good_scores = model["image_threshold"], model["good_scores"]
    # what the server answers for the same files, asked directly
    files = [("file", (images[k].name, images[k].read_bytes(), "image/png")) for k in ("broken", "good", "good2", "text")]
    reply = httpx.post(f"{server.url}/v2/models/{name}/predict", files=files, timeout=60)
    assert reply.status_code == 200
    broken, good, good2, text = reply.json()["results"]
    assert broken["is_anomalous"] and not good["is_anomalous"] and not good2["is_anomalous"]
    assert len(broken["regions"]) >= 1 and good["regions"] == [] and good2["regions"] == []
    assert "not an accepted image format" in text["error"]
    assert broken["score"] > threshold > good["score"]

    problems: list[str] = []
    posts: list[str] = []
    with sync_playwright() as playwright:
        browser = launch(playwright)
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
            page = context.new_page()
            page.on("console", lambda message: problems.append(f"console {message.type}: {message.text}") if message.type == "error" else None)
            page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
            page.on("request", lambda request: posts.append(request.url) if request.method != "GET" else None)
            page.goto(f"{server.url}/")

            # the model panel describes the served model
            panel = page.locator("#model-panel")
            expect(panel.locator('dd[data-fact="backbone"]')).to_have_text("mobilenet_v2")
            expect(panel.locator('dd[data-fact="images-fitted"]')).to_have_text(str(model["num_fit_images"]))
            expect(panel.locator('dd[data-fact="checksum"]')).to_have_text(model["file_sha256"][:12])
            expect(panel.locator('dd[data-fact="model-file"]')).to_have_text(bottle_model_file.name)
            expect(panel.locator('dd[data-fact="input"]')).to_have_text(model["input"]["description"])
            expect(panel).to_contain_text(model["decision_rule"])
            # and lists the training images its fit set aside, so that someone can clean the folder
            expect(panel.locator("#model-aside-text")).to_have_text(model["contamination"]["description"])
            expect(panel.locator("#model-aside-list li")).to_have_text(["132.png"])
            expect(panel.locator("#model-aside-list li").first).to_have_attribute("title", model["contamination"]["suspects"][0]["reason"])
            expect(page.locator("#threshold-value")).to_have_value(f"{threshold:.3f}")
            expect(page.locator("#key-panel")).to_be_hidden()  # no API keys: no key form

            # upload a broken and a good bottle through the file input
            page.set_input_files("#file-input", [str(images["broken"]), str(images["good"])])
            expect(page.locator("#progress-text")).to_have_text("2 of 2 done")
            cards = page.locator(".result-card")
            expect(cards).to_have_count(2)
            broken_card = cards.filter(has_text=images["broken"].name)
            good_card = cards.filter(has_text=images["good"].name)
            expect(page.locator(".result-card .badge.fail")).to_have_count(1)
            expect(page.locator(".result-card .badge.pass")).to_have_count(1)
            expect(broken_card.locator(".badge")).to_have_text("FAIL")
            expect(broken_card.locator(".badge")).to_have_class("badge fail")
            expect(good_card.locator(".badge")).to_have_text("PASS")
            expect(good_card.locator(".badge")).to_have_class("badge pass")
            expect(broken_card.locator(".score")).to_have_text(f"score {broken['score']:.2f} / threshold {threshold:.2f}")
            expect(good_card.locator(".score")).to_have_text(f"score {good['score']:.2f} / threshold {threshold:.2f}")
            expect(broken_card.locator(".normalized")).to_have_text(f"normalized {broken['normalized_score']:.2f}")
            expect(good_card.locator(".normalized")).to_have_text(f"normalized {good['normalized_score']:.2f}")

            # regions: one outline per region, at the server's coordinates, over the picture less its caption band
            outlines = broken_card.locator(".region-outline")
            expect(outlines).to_have_count(len(broken["regions"]))
            expect(good_card.locator(".region-outline")).to_have_count(0)
            expect(good_card.locator(".regions-count")).to_have_text("no regions over the pixel threshold")
            expect(broken_card.locator(".regions-count")).to_have_text(f"{len(broken['regions'])} region" + ("s" if len(broken["regions"]) > 1 else ""))
            first = broken["regions"][0]
            assert outlines.first.get_attribute("points") == " ".join(f"{x},{y}" for x, y in first["polygon"])
            x, y, w, h = first["box"]
            expect(broken_card.locator(".regions-list li").first).to_have_text(
                f"box {x}, {y}, {w} × {h} px · area {first['area']:,} px · peak {first['peak_normalized_score']:.2f}"
            )
            width, height = broken["image_size"]
            assert broken_card.locator(".regions-layer").get_attribute("viewBox") == f"0 0 {width} {height}"
            page.wait_for_function("[...document.querySelectorAll('.result-card img.picture')].every(i => i.complete && i.naturalWidth > 0)")
            natural = broken_card.locator("img.picture").evaluate("i => [i.naturalWidth, i.naturalHeight]")
            assert natural == [width, height + 24]  # predict_picture: the image's own size, a 24 px caption on top
            frame = broken_card.locator(".picture-frame").bounding_box()
            picture = broken_card.locator("img.picture").bounding_box()
            layer = broken_card.locator(".regions-layer").bounding_box()
            scale = frame["width"] / width
            assert abs(frame["height"] - height * scale) < 1.0  # the frame shows the image, not the caption
            assert abs((picture["y"] - frame["y"]) + 24 * scale) < 1.0  # the caption is scrolled out of the frame
            assert layer == frame

            # the summary at the model's threshold
            flagged = sum(score >= threshold for score in good_scores)
            expect(page.locator("#pass-count")).to_have_text("1")
            expect(page.locator("#fail-count")).to_have_text("1")
            expect(page.locator("#good-rate")).to_have_text(_percent(flagged, len(good_scores)))

            # the README's screenshot: both results, at the model's threshold
            page.evaluate("window.scrollTo(0, 0)")
            screenshot = Path(SCREENSHOT) if SCREENSHOT else tmp_path / "serve-page.png"
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(screenshot), full_page=True)
            assert Image.open(screenshot).size[0] == 1280

            # slider above the broken bottle's score: both pass
            slider = page.locator("#threshold-slider")
            above = math.ceil((broken["score"] + 0.05) * 100) / 100
            assert float(slider.get_attribute("max")) >= above
            slider.evaluate(
                "(s, v) => { s.value = String(v); s.dispatchEvent(new Event('input', {bubbles: true})); s.dispatchEvent(new Event('change', {bubbles: true})); }",
                above,
            )
            expect(page.locator("#pass-count")).to_have_text("2")
            expect(page.locator("#fail-count")).to_have_text("0")
            expect(page.locator("#threshold-value")).to_have_value(f"{above:.3f}")
            expect(broken_card.locator(".badge")).to_have_text("PASS")
            expect(broken_card.locator(".score")).to_have_text(f"score {broken['score']:.2f} / threshold {above:.2f}")
            expect(page.locator("#good-rate")).to_have_text(_percent(sum(s >= above for s in good_scores), len(good_scores)))

            # keyboard: Home takes the slider below every score: both fail
            slider.focus()
            page.keyboard.press("Home")
            lowest = float(slider.get_attribute("min"))
            assert lowest < min(good["score"], *good_scores)
            expect(page.locator("#pass-count")).to_have_text("0")
            expect(page.locator("#fail-count")).to_have_text("2")
            expect(good_card.locator(".badge")).to_have_text("FAIL")
            expect(page.locator("#good-rate")).to_have_text(_percent(len(good_scores), len(good_scores)))

            # back to the model's threshold; the model on the server was never touched
            page.click("#threshold-reset")
            expect(page.locator("#threshold-value")).to_have_value(f"{threshold:.3f}")
            expect(page.locator("#pass-count")).to_have_text("1")
            expect(page.locator("#fail-count")).to_have_text("1")
            assert httpx.get(f"{server.url}/v2/models/{name}").json()["patchcore"]["image_threshold"] == threshold

            # the session table: failed-only filter, sorting, a row shows its card
            rows = page.locator("#results-table tbody tr")
            broken_row = rows.filter(has_text=images["broken"].name)
            good_row = rows.filter(has_text=images["good"].name)
            expect(rows).to_have_count(2)
            expect(broken_row.locator(".decision")).to_have_text("FAIL")
            expect(good_row.locator(".decision")).to_have_text("PASS")
            expect(good_row.locator("td").nth(2)).to_have_text(f"{good['score']:.2f}")
            page.check("#failed-only")
            expect(good_row).to_be_hidden()
            expect(good_card).to_be_hidden()
            expect(broken_row).to_be_visible()
            expect(broken_card).to_be_visible()
            page.uncheck("#failed-only")
            expect(good_row).to_be_visible()
            expect(good_card).to_be_visible()
            page.click('th[data-sort="score"] button')  # worst first
            expect(rows.nth(0)).to_contain_text(images["broken"].name)
            expect(cards.nth(0)).to_contain_text(images["broken"].name)
            page.click('th[data-sort="score"] button')
            expect(rows.nth(0)).to_contain_text(images["good"].name)
            page.click('th[data-sort="name"] button')
            expect(rows.nth(0)).to_contain_text(images["broken"].name)
            expect(page.locator('th[data-sort="name"]')).to_have_attribute("aria-sort", "ascending")
            good_row.click()
            expect(good_card).to_have_class("result-card is-pass selected")
            assert page.evaluate("document.activeElement.id") == good_card.get_attribute("id")

            # export: the table as CSV, built in the browser
            with page.expect_download() as download:
                page.click("#export-csv")
            exported = list(csv.DictReader(io.StringIO(Path(download.value.path()).read_text())))
            assert [row["file"] for row in exported] == [images["broken"].name, images["good"].name]
            assert [float(row["score"]) for row in exported] == [broken["score"], good["score"]]
            assert [row["decision"] for row in exported] == ["FAIL", "PASS"]
            assert [int(row["regions"]) for row in exported] == [len(broken["regions"]), 0]
            assert {float(row["threshold"]) for row in exported} == {threshold}

            # dropped on the drop zone: an unreadable file is listed with its error; the image beside it is still scored
            dropped = [{"name": images[k].name, "data": base64.b64encode(images[k].read_bytes()).decode("ascii")} for k in ("good2", "text")]
            page.locator("#drop-zone").evaluate(
                """(zone, files) => {
                    const transfer = new DataTransfer();
                    for (const f of files) {
                        const bytes = Uint8Array.from(atob(f.data), (c) => c.charCodeAt(0));
                        transfer.items.add(new File([bytes], f.name, {type: "image/png"}));
                    }
                    zone.dispatchEvent(new DragEvent("drop", {dataTransfer: transfer, bubbles: true, cancelable: true}));
                }""",
                dropped,
            )
            expect(page.locator("#progress-text")).to_have_text("4 of 4 done")
            expect(cards).to_have_count(4)
            expect(page.locator(".result-card.error-card")).to_have_count(1)
            expect(page.locator(".result-card.error-card .error-message")).to_have_text(text["error"])
            expect(rows.filter(has_text=images["text"].name).locator(".decision")).to_have_text("ERROR")
            expect(cards.filter(has_text=images["good2"].name).locator(".badge")).to_have_text("PASS")
            expect(page.locator("#pass-count")).to_have_text("2")
            expect(page.locator("#fail-count")).to_have_text("1")
            expect(page.locator("#error-count")).to_have_text("1")
        finally:
            browser.close()

    assert problems == []
    assert posts and all(url.startswith(f"{server.url}/v2/models/{name}/predict?") for url in posts), posts


def test_page_asks_for_the_api_key_once_a_tab(bottle_model_file, start_server, images, tmp_path, monkeypatch, browser):
    """With --api-key-file: the page asks for a key, shows the server's refusal, keeps the accepted
    key in the tab's sessionStorage (a reload keeps it, a new tab asks again) and sends it as a
    header; when the key stops working (here: the server restarted with another key file), the
    form comes back and the upload waiting meanwhile is scored once a key is accepted."""
    key, new_key = secrets.token_hex(16), secrets.token_hex(16)
    (tmp_path / "keys.txt").write_text(f"# name key\ninspector {key}\n")
    (tmp_path / "new_keys.txt").write_text(f"inspector {new_key}\n")
    server = start_server(bottle_model_file, "--api-key-file", str(tmp_path / "keys.txt"))
    assert httpx.get(f"{server.url}/v2").json()["api_key_required"] is True

    problems: list[str] = []
    keyed: list[tuple[str, str, str | None]] = []  # the page's requests to /v2/models/...: method, URL, Authorization
    urls: list[str] = []
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    _watch(page, problems)
    page.on("request", lambda request: urls.append(request.url))
    page.on("request", lambda request: keyed.append((request.method, request.url, request.headers.get("authorization"))) if "/v2/models/" in request.url else None)
    form, error, key_input = page.locator("#key-panel"), page.locator("#key-error"), page.get_by_role("textbox", name="API key")
    backbone = page.locator('#model-panel dd[data-fact="backbone"]')
    cards, progress = page.locator(".result-card"), page.locator("#progress-text")
    page.goto(f"{server.url}/")

    # the form, before anything is asked of the keyed routes
    expect(form).to_be_visible()
    expect(key_input).to_have_attribute("type", "password")
    expect(page.get_by_role("button", name="Use key")).to_be_visible()
    expect(error).to_be_hidden()
    expect(page.locator("#server-status")).to_have_text("API key needed")
    expect(page.locator("#model-loading")).to_be_visible()
    assert keyed == []
    # an image chosen before the key waits for it
    page.set_input_files("#file-input", str(images["broken"]))
    expect(progress).to_have_text("0 of 1 done")

    # a wrong key: the server's message, the form stays, nothing kept
    key_input.fill("not-the-key-0123456789")
    page.get_by_role("button", name="Use key").click()
    expect(error).to_have_text("unknown API key")
    expect(form).to_be_visible()
    expect(page.locator("#model-loading")).to_be_visible()
    assert _stored(page) == {"session": None, "local": 0, "cookie": ""}

    # the right key: the model's description, and the waiting upload scored
    key_input.fill(key)
    key_input.press("Enter")
    expect(form).to_be_hidden()
    expect(backbone).to_have_text("mobilenet_v2")
    expect(progress).to_have_text("1 of 1 done")
    expect(cards.filter(has_text=images["broken"].name).locator(".badge")).to_have_text("FAIL")
    assert _stored(page) == {"session": key, "local": 0, "cookie": ""}

    # a reload of the tab keeps the key: no form, scoring works
    page.reload()
    expect(backbone).to_have_text("mobilenet_v2")
    expect(form).to_be_hidden()
    page.set_input_files("#file-input", str(images["good"]))
    expect(cards.filter(has_text=images["good"].name).locator(".badge")).to_have_text("PASS")

    # a new tab asks again
    other = context.new_page()
    _watch(other, problems)
    other.goto(f"{server.url}/")
    expect(other.locator("#key-panel")).to_be_visible()
    expect(other.locator("#model-loading")).to_be_visible()
    assert _stored(other)["session"] is None
    other.close()

    # the key stops working: the same address, now with another key file
    server.stop()
    monkeypatch.setattr(serving, "free_port", lambda: server.port)
    start_server(bottle_model_file, "--api-key-file", str(tmp_path / "new_keys.txt"))
    page.set_input_files("#file-input", str(images["good2"]))
    expect(error).to_have_text("unknown API key")
    expect(form).to_be_visible()
    expect(progress).to_have_text("1 of 2 done")  # waiting, not failed
    assert _stored(page)["session"] is None
    expect(cards).to_have_count(1)
    key_input.fill(new_key)
    page.get_by_role("button", name="Use key").click()
    expect(form).to_be_hidden()
    expect(progress).to_have_text("2 of 2 done")
    expect(cards.filter(has_text=images["good2"].name).locator(".badge")).to_have_text("PASS")
    expect(page.locator(".result-card.error-card")).to_have_count(0)
    assert _stored(page) == {"session": new_key, "local": 0, "cookie": ""}
    context.close()

    assert problems == []
    # every request to the keyed routes carried a key as a header; no key ever went into a URL
    assert keyed and all(auth is not None and auth.startswith("Bearer ") for _, _, auth in keyed), keyed
    assert ("POST", f"{server.url}/v2/models/bottle/predict?picture=true", f"Bearer {new_key}") in keyed
    assert ("GET", f"{server.url}/v2/models/bottle", f"Bearer {key}") in keyed
    assert not [url for url in urls if key in url or new_key in url]


def test_page_csv_export_neutralises_formulas(open_server, browser, data_root):
    """File names that a spreadsheet would run as formulas (= + - @ tab first) are exported with a
    ' in front, inside the CSV's usual quoting; the page's numbers, a negative normalized score
    among them, stay plain numbers. Without keys the page shows no key form."""
    good = (data_root / "mvtec_ad" / "bottle" / "test" / "good" / "004.png").read_bytes()  # scores below the good mean
    reply = httpx.post(f"{open_server.url}/v2/models/bottle/predict", files=[("file", ("004.png", good, "image/png"))], timeout=60)
    expected = reply.json()["results"][0]
    assert expected["normalized_score"] < 0
    names = ['=HYPERLINK("http://x")&A1.png', "@SUM(A1).png", "+cmd.png", "-2+3.png", "\tTAB.png", "plain, quoted.png"]
    exported = {'=HYPERLINK("http://x")&A1.png': "'=HYPERLINK(\"http://x\")&A1.png", "@SUM(A1).png": "'@SUM(A1).png", "+cmd.png": "'+cmd.png",
                "-2+3.png": "'-2+3.png", "\tTAB.png": "'\tTAB.png", "plain, quoted.png": "plain, quoted.png"}

    problems: list[str] = []
    page = browser.new_page(accept_downloads=True)
    _watch(page, problems)
    page.goto(f"{open_server.url}/")
    expect(page.locator('#model-panel dd[data-fact="backbone"]')).to_have_text("mobilenet_v2")
    expect(page.locator("#key-panel")).to_be_hidden()
    page.set_input_files("#file-input", [{"name": name, "mimeType": "image/png", "buffer": good} for name in names])
    expect(page.locator("#progress-text")).to_have_text(f"{len(names)} of {len(names)} done")
    expect(page.locator(".result-card .badge.pass")).to_have_count(len(names))
    with page.expect_download() as download:
        page.click("#export-csv")
    text = Path(download.value.path()).read_bytes().decode("utf-8")
    page.close()
    assert problems == []

    lines = text.split("\r\n")
    # the formula, guarded inside the CSV's quoting: quotes doubled, the cell quoted
    assert lines[1].startswith('1,"\'=HYPERLINK(""http://x"")&A1.png",'), lines[1]
    rows = list(csv.DictReader(io.StringIO(text, newline="")))
    assert [row["file"] for row in rows] == [exported[name] for name in names]
    for row in rows:
        for column in ("order", "score", "normalized_score", "threshold", "regions"):
            assert PLAIN_NUMBER.match(row[column]), (column, row[column])
        assert float(row["score"]) == expected["score"]
        assert float(row["normalized_score"]) == expected["normalized_score"]
        assert row["normalized_score"].startswith("-")  # a negative number, not a guarded formula
        assert row["decision"] == "PASS" and row["error"] == ""
