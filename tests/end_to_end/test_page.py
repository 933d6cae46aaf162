"""The server's inspection page in a real browser: Playwright driving Debian's Chromium.

Uploads a broken and a good bottle through the page's file input, checks each card against the
server's own JSON for the same files, moves the threshold slider and watches the page re-cut the
results (without touching the model on the server), and takes a screenshot: the README's
``docs/serve-page.png`` when run with ``PATCHCORE_SCREENSHOT=docs/serve-page.png``, else under
the test's temporary folder (tests leave the checkout as it was).
"""

from __future__ import annotations

import base64
import csv
import io
import math
import os
import shutil
from pathlib import Path

import httpx
from PIL import Image
import pytest
from playwright.sync_api import expect, sync_playwright

SCREENSHOT = os.environ.get("PATCHCORE_SCREENSHOT")
CHROMIUM = "/usr/bin/chromium"


def _percent(flagged: int, total: int) -> str:
    """The page's "would flag" figure, formatted as page.js formats it."""
    return f"would flag {100 * flagged / total:.1f}% of the good training images ({flagged} of {total})"


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


def test_page_uploads_scores_and_recuts(bottle_model_file, start_server, images, tmp_path):
    server = start_server(bottle_model_file)
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
    assert "not a readable image" in text["error"]
    assert broken["score"] > threshold > good["score"]

    problems: list[str] = []
    posts: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"], headless=True)
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
            expect(page.locator("#threshold-value")).to_have_value(f"{threshold:.3f}")

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
