"""The review round trip in a real browser (Playwright driving Debian's Chromium): a server that
records its decisions (SQLite, flagged images kept), a batch scored through the page, the page's
history view, a flagged decision marked a false alarm with a note, and the review found stored:
through the HTTP route and in the SQLite record itself, and on the page after a reload. With API
keys the reviewer is the key's name, not one the page asks for."""

from __future__ import annotations

import io
import secrets
from pathlib import Path

import httpx
import pytest
import sqlalchemy
from PIL import Image, ImageEnhance
from playwright.sync_api import Browser, Page, expect

REVIEWER_STORE = "patchcore-reviewer"  # page.js: the reviewer's name in localStorage
#: a file name a careless page would run as HTML (names come from the network)
HOSTILE = "<img src=x onerror=window.__pwned=1>.png"  # (no " in it: Chromium sends a " in a file name as %22)
#: decisions a station's drift watch holds before it tests (record/drift.py DEFAULT_MIN_DECISIONS)
DRIFT_TESTS_FROM = 50
#: the station whose lamp dims, named in HTML too
DIMMED_STATION = "line <b>2</b>"
#: decisions on one page of the history (page.js HISTORY_PAGE)
HISTORY_PAGE = 50


@pytest.fixture
def batch(data_root) -> list[dict]:
    """Bottle test images under distinct names (MVTec's are all 000.png, ...): three broken, three
    good, and a broken one under a name that is HTML."""
    test = data_root / "mvtec_ad" / "bottle" / "test"
    chosen = [("broken_large", "000"), ("broken_large", "001"), ("broken_large", "002"), ("good", "000"), ("good", "001"), ("good", "002")]
    files = [{"name": f"{kind}_{stem}.png", "mimeType": "image/png", "buffer": (test / kind / f"{stem}.png").read_bytes()} for kind, stem in chosen]
    files.append({"name": HOSTILE, "mimeType": "image/png", "buffer": (test / "broken_large" / "003.png").read_bytes()})
    return files


def _watch(page: Page, problems: list[str]) -> None:
    """The page's script errors, console errors (less the browser's line for an expected 401) and dialogs."""
    page.on("console", lambda message: problems.append(f"console: {message.text}") if message.type == "error" and "status of 401" not in message.text else None)
    page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    page.on("dialog", lambda dialog: (problems.append(f"dialog: {dialog.message}"), dialog.dismiss()))


def _reviews(record: Path, decision_id: str) -> list[dict]:
    """The decision's reviews as the SQLite record holds them, oldest first."""
    engine = sqlalchemy.create_engine(f"sqlite:///{record}")
    try:
        with engine.connect() as connection:
            rows = connection.execute(sqlalchemy.text("SELECT reviewer, verdict, note, time FROM reviews WHERE decision_id = :id ORDER BY id"), {"id": decision_id})
            return [dict(row._mapping) for row in rows]
    finally:
        engine.dispose()


def _dimmed(data_root: Path, count: int) -> list[bytes]:
    """Bottle's good test images under a lamp 20% dimmer, as PNG (300 px: quick requests). Measured with
    this model: all ten dimmed ones are flagged, the same ten undimmed at 300 px all pass."""
    images = []
    for path in sorted((data_root / "mvtec_ad" / "bottle" / "test" / "good").glob("*.png"))[:count]:
        dimmed = ImageEnhance.Brightness(Image.open(path).convert("RGB").resize((300, 300))).enhance(0.8)
        buffer = io.BytesIO()
        dimmed.save(buffer, format="PNG")
        images.append(buffer.getvalue())
    return images


def _score(page: Page, batch: list[dict]) -> None:
    page.set_input_files("#file-input", batch)
    expect(page.locator("#progress-text")).to_have_text(f"{len(batch)} of {len(batch)} done")
    expect(page.locator(".result-card")).to_have_count(len(batch))


def test_review_round_trip(bottle_model_file, start_server, batch, browser, data_root, tmp_path):
    record = tmp_path / "record.sqlite"
    server = start_server(bottle_model_file, "--record", f"sqlite:///{record}", "--keep-images", "flagged", "--station", "line-1")
    api = f"{server.url}/v2/models/bottle"
    problems: list[str] = []
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    _watch(page, problems)
    page.goto(f"{server.url}/")
    expect(page.locator('#model-panel dd[data-fact="backbone"]')).to_have_text("mobilenet_v2")
    expect(page.locator("#key-panel")).to_be_hidden()

    # score the batch through the page; every result links to its entry in the record
    _score(page, batch)
    recorded = httpx.get(f"{api}/decisions", params={"limit": 100}).json()
    assert recorded["total"] == len(batch)
    by_name = {row["file_name"]: row for row in recorded["decisions"]}
    assert set(by_name) == {file["name"] for file in batch}
    assert all(row["station"] == "line-1" for row in by_name.values())
    flagged = [row for row in recorded["decisions"] if row["decision"] == "anomalous"]
    assert {row["file_name"] for row in flagged} >= {"broken_large_000.png", HOSTILE}
    for name, row in by_name.items():
        card = page.locator(".result-card").filter(has=page.locator(".file-name", has_text=name))
        expect(card.locator("a.history-link")).to_have_attribute("href", f"#decision/{row['id']}")

    # the history: every decision, newest first, the file name shown as text
    page.get_by_role("link", name="History", exact=True).click()
    rows = page.locator("#history-table tbody tr")
    expect(rows).to_have_count(len(batch))
    expect(page.locator("#history-range")).to_have_text(f"1–{len(batch)} of {len(batch)}")
    assert rows.evaluate_all("rows => rows.map(r => r.dataset.id)") == [row["id"] for row in recorded["decisions"]]
    hostile_row = rows.filter(has_text=HOSTILE)
    expect(hostile_row).to_have_count(1)
    expect(hostile_row.locator("td.name")).to_have_text(HOSTILE)
    expect(hostile_row.locator("td.station")).to_have_text("line-1")
    expect(hostile_row.locator(".decision")).to_have_text("FAIL")
    expect(hostile_row.locator("td.review")).to_have_text("–")
    assert page.locator("img[src='x']").count() == 0 and page.evaluate("window.__pwned") is None

    # filters: the flagged ones only
    page.select_option("#filter-decision", "anomalous")
    expect(rows).to_have_count(len(flagged))
    expect(page.locator("#history-table .decision.pass")).to_have_count(0)

    # a good decision: its picture was not kept
    page.select_option("#filter-decision", "")
    expect(rows).to_have_count(len(batch))
    rows.filter(has_text="good_000.png").click()
    panel = page.locator("#decision-panel")
    expect(panel.locator("#decision-file")).to_have_text("good_000.png")
    expect(panel.locator("#decision-badge")).to_have_text("PASS")
    expect(panel.locator("#decision-no-picture")).to_have_text("image not kept")
    expect(panel.locator("#decision-frame")).to_be_hidden()

    # a flagged decision, opened from its result card: the kept picture, its regions outlined
    page.get_by_role("link", name="Inspect", exact=True).click()
    expect(page.locator("#inspect-view")).to_be_visible()
    broken = by_name["broken_large_000.png"]
    decision_id = broken["id"]
    page.locator(".result-card").filter(has=page.locator(".file-name", has_text="broken_large_000.png")).locator("a.history-link").click()
    expect(page).to_have_url(f"{server.url}/#decision/{decision_id}")
    expect(page.locator("#history-view")).to_be_visible()
    expect(page.locator("#inspect-view")).to_be_hidden()
    expect(panel.locator("#decision-file")).to_have_text("broken_large_000.png")
    expect(panel.locator("#decision-badge")).to_have_text("FAIL")
    expect(panel.locator("#decision-no-picture")).to_be_hidden()
    page.wait_for_function("document.querySelector('#decision-picture').complete && document.querySelector('#decision-picture').naturalWidth > 0")
    assert panel.locator("#decision-picture").get_attribute("src").startswith("data:image/")
    expect(panel.locator("#decision-regions polygon")).to_have_count(len(broken["regions"]))
    assert len(broken["regions"]) >= 1
    assert panel.locator("#decision-regions").get_attribute("viewBox") == f"0 0 {broken['width']} {broken['height']}"
    expect(panel.locator('dd[data-fact="station"]')).to_have_text("line-1")
    expect(panel.locator('dd[data-fact="decision-id"]')).to_have_text(decision_id)
    expect(panel.locator("#decision-no-reviews")).to_be_visible()
    expect(page.locator(f'#history-table tbody tr[data-id="{decision_id}"]')).to_have_class("selected")

    # mark it a false alarm: the page asks for a name first (an input, not a prompt)
    note = "lamp glare <b>on the rim</b>, not a crack"
    page.get_by_label("Note (optional)").fill(note)
    page.get_by_role("button", name="False alarm").click()
    expect(page.locator("#review-error")).to_have_text("Enter your name first: each review is signed.")
    assert _reviews(record, decision_id) == []
    page.get_by_label("Your name").fill("Dana Operator")
    page.get_by_role("button", name="False alarm").click()
    reviews = panel.locator("#decision-reviews li")
    expect(reviews).to_have_count(1)
    expect(reviews.first.locator(".verdict")).to_have_text("False alarm")
    expect(reviews.first).to_contain_text("by Dana Operator")
    expect(reviews.first.locator(".note")).to_have_text(note)
    expect(panel.locator("#decision-no-reviews")).to_be_hidden()
    expect(page.locator(f'#history-table tbody tr[data-id="{decision_id}"] td.review')).to_have_text("False alarm · Dana Operator")
    expect(page.locator("#reviewer-name")).to_have_text("Dana Operator")  # asked once
    expect(page.locator("#reviewer-input")).to_be_hidden()
    expect(page.locator("#review-note")).to_have_value("")

    # stored: through the route, and in the SQLite record itself
    stored = httpx.get(f"{api}/decisions/{decision_id}").json()
    assert stored["review"]["verdict"] == "false_alarm"
    assert [(r["verdict"], r["reviewer"], r["note"]) for r in stored["reviews"]] == [("false_alarm", "Dana Operator", note)]
    in_file = _reviews(record, decision_id)
    assert [(r["verdict"], r["reviewer"], r["note"]) for r in in_file] == [("false_alarm", "Dana Operator", note)]
    assert in_file[0]["time"].endswith("Z")
    assert page.evaluate(f"localStorage.getItem('{REVIEWER_STORE}')") == "Dana Operator"

    # a reload: the same decision, its review shown, the name remembered
    page.reload()
    expect(panel.locator("#decision-file")).to_have_text("broken_large_000.png")
    expect(reviews).to_have_count(1)
    expect(reviews.first.locator(".note")).to_have_text(note)
    expect(page.locator(f'#history-table tbody tr[data-id="{decision_id}"] td.review')).to_have_text("False alarm · Dana Operator")
    expect(page.locator("#reviewer-name")).to_have_text("Dana Operator")

    # a second opinion supersedes the first, which stays (append-only)
    page.get_by_role("button", name="Confirmed defect").click()
    expect(reviews).to_have_count(2)
    expect(reviews.nth(1)).to_have_class("review verdict-confirmed_defect current")
    expect(reviews.nth(0).locator(".verdict")).to_have_text("False alarm")
    expect(page.locator(f'#history-table tbody tr[data-id="{decision_id}"] td.review')).to_have_text("Confirmed defect · Dana Operator")
    assert [(r["verdict"], r["note"]) for r in _reviews(record, decision_id)] == [("false_alarm", note), ("confirmed_defect", "")]
    page.select_option("#filter-reviewed", "confirmed_defect")
    expect(page.locator("#history-table tbody tr")).to_have_count(1)
    page.select_option("#filter-reviewed", "false_alarm")
    expect(page.locator("#history-table tbody tr")).to_have_count(0)
    expect(page.locator("#history-empty")).to_have_text("No decisions match these filters.")

    # drift: another camera's lamp dims by 20%; its good bottles now score above the threshold, and
    # once its watch tests (50 decisions) the page's banner names that station with the watch's own
    # reason, as text (the station's name is HTML)
    expect(page.locator("#drift-banner")).to_be_hidden()
    assert httpx.get(f"{api}/drift").json()["alarm"] is False
    dimmed = _dimmed(data_root, DRIFT_TESTS_FROM // 5)
    for first in range(0, DRIFT_TESTS_FROM, 10):  # (10 a request: within the server's memory budget for one)
        files = [("file", (f"dim_{i:03d}.png", dimmed[i % len(dimmed)], "image/png")) for i in range(first, first + 10)]
        reply = httpx.post(f"{api}/predict", params={"station": DIMMED_STATION}, files=files, timeout=120)
        assert reply.status_code == 200, reply.text
        assert all(result["is_anomalous"] for result in reply.json()["results"])
    drift = httpx.get(f"{api}/drift").json()
    assert drift["alarm"] is True and drift["stations"][DIMMED_STATION]["alarm"] is True and drift["stations"]["line-1"]["alarm"] is False
    reason = drift["stations"][DIMMED_STATION]["reason"]
    assert reason.startswith(f"drift: flag rate 100.0% over the last {DRIFT_TESTS_FROM} decisions")
    page.reload()  # (else the next poll, within 30 s)
    banner = page.locator("#drift-banner")
    expect(banner).to_be_visible()
    expect(banner).to_have_attribute("role", "alert")
    expect(banner.locator("li")).to_have_count(1)
    expect(banner.locator("li")).to_have_text(f"{DIMMED_STATION}: {reason}")
    assert page.locator("#drift-banner b, #drift-banner i").count() == 0

    # paging and the station filter over the 7 + 50 decisions now recorded
    total = len(batch) + DRIFT_TESTS_FROM
    page.get_by_role("link", name="History", exact=True).click()
    page.get_by_role("button", name="Clear filters").click()
    expect(page.locator("#history-range")).to_have_text(f"1–{HISTORY_PAGE} of {total}")
    expect(rows).to_have_count(HISTORY_PAGE)
    expect(page.get_by_role("button", name="← Newer")).to_be_disabled()
    page.get_by_role("button", name="Older →").click()
    expect(page.locator("#history-range")).to_have_text(f"{HISTORY_PAGE + 1}–{total} of {total}")
    expect(rows).to_have_count(total - HISTORY_PAGE)
    expect(page.get_by_role("button", name="Older →")).to_be_disabled()
    oldest = httpx.get(f"{api}/decisions", params={"limit": total - HISTORY_PAGE, "offset": HISTORY_PAGE}).json()["decisions"]
    assert rows.evaluate_all("rows => rows.map(r => r.dataset.id)") == [row["id"] for row in oldest]
    page.get_by_label("Station").fill(DIMMED_STATION)
    page.get_by_label("Station").press("Enter")
    expect(page.locator("#history-range")).to_have_text(f"1–{DRIFT_TESTS_FROM} of {DRIFT_TESTS_FROM}")
    assert set(rows.locator("td.station").all_inner_texts()) == {DIMMED_STATION}
    page.get_by_label("Since").fill("2099-01-01T00:00:00")  # (the page sends the browser's local time as UTC)
    expect(page.locator("#history-range")).to_have_text("0 of 0")
    page.get_by_label("Since").fill("2000-01-01T00:00:00")
    expect(page.locator("#history-range")).to_have_text(f"1–{DRIFT_TESTS_FROM} of {DRIFT_TESTS_FROM}")

    # the keyboard: each row's file name is a link; the HTML-named flagged decision, opened with
    # Enter, shows its name as text and its kept picture
    page.get_by_role("button", name="Clear filters").click()
    page.select_option("#filter-decision", "anomalous")
    page.get_by_label("Station").fill("line-1")
    page.get_by_label("Station").press("Enter")
    expect(rows).to_have_count(len(flagged))
    hostile_link = rows.filter(has_text=HOSTILE).get_by_role("link", name=HOSTILE)
    hostile_link.focus()
    page.keyboard.press("Enter")
    expect(page).to_have_url(f"{server.url}/#decision/{by_name[HOSTILE]['id']}")
    expect(panel.locator("#decision-file")).to_have_text(HOSTILE)
    expect(hostile_link).to_have_attribute("aria-current", "true")
    expect(panel.locator("#decision-no-picture")).to_be_hidden()
    page.wait_for_function("document.querySelector('#decision-picture').naturalWidth > 0")
    assert page.locator("img[src='x']").count() == 0 and page.evaluate("window.__pwned") is None
    page.close()
    assert problems == []


def test_review_with_api_keys_is_signed_by_the_key(bottle_model_file, start_server, batch, browser, tmp_path):
    key = secrets.token_hex(16)
    (tmp_path / "keys.txt").write_text(f"inspector {key}\n")
    record = tmp_path / "record.sqlite"
    server = start_server(bottle_model_file, "--api-key-file", str(tmp_path / "keys.txt"), "--record", f"sqlite:///{record}", "--keep-images", "flagged")
    api = f"{server.url}/v2/models/bottle"
    assert httpx.get(f"{api}/decisions").status_code == 401  # the record needs a key too
    problems: list[str] = []
    unkeyed: list[str] = []
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    _watch(page, problems)
    page.on("request", lambda request: unkeyed.append(request.url) if "/v2/models/" in request.url and not request.headers.get("authorization") else None)
    page.goto(f"{server.url}/#history")
    page.get_by_role("textbox", name="API key").fill(key)
    page.get_by_role("button", name="Use key").click()
    expect(page.locator("#key-panel")).to_be_hidden()
    expect(page.locator("#history-view")).to_be_visible()
    expect(page.locator("#history-empty")).to_have_text("No decisions match these filters.")

    page.get_by_role("link", name="Inspect", exact=True).click()
    _score(page, batch[:1] + batch[3:4])  # a broken and a good bottle
    page.get_by_role("link", name="History", exact=True).click()
    rows = page.locator("#history-table tbody tr")
    expect(rows).to_have_count(2)
    rows.filter(has_text="broken_large_000.png").click()
    panel = page.locator("#decision-panel")
    expect(panel.locator("#decision-file")).to_have_text("broken_large_000.png")
    expect(page.locator("#reviewer-key")).to_be_visible()  # no name asked: the key signs
    expect(page.locator("#reviewer-input")).to_be_hidden()
    page.get_by_label("Note (optional)").fill("reflection")
    page.get_by_role("button", name="False alarm").click()
    expect(panel.locator("#decision-reviews li")).to_have_count(1)
    expect(panel.locator("#decision-reviews li").first).to_contain_text("by inspector")
    decision_id = panel.get_attribute("data-id")

    headers = {"Authorization": f"Bearer {key}"}
    stored = httpx.get(f"{api}/decisions/{decision_id}", headers=headers).json()
    assert [(r["verdict"], r["reviewer"], r["note"]) for r in stored["reviews"]] == [("false_alarm", "inspector", "reflection")]
    assert [(r["verdict"], r["reviewer"], r["note"]) for r in _reviews(record, decision_id)] == [("false_alarm", "inspector", "reflection")]
    assert page.evaluate("localStorage.length") == 0  # nothing kept beyond the tab's key
    page.close()
    assert problems == []
    assert unkeyed == []
