"""The reading room and the admin desk in real headless Chromium (as tests/test_web_page.py): the
heatmap still works after Claim, the viewer link, a new STAT study raises a notice and changes the
tab title, the admin's Events and All received views with their filters, the history in plain
words.  Each test saves screenshots under pytest's tmp_path (and, with PACSBRIDGE_SCREENSHOT_DIR, to
that folder for docs/screenshots/)."""

from __future__ import annotations

import functools
import os
import shutil
import time
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from test_web_page import PATIENTS, _rows, browser  # noqa: F401 - the browser fixture and its checks

from pacsbridge.api.app import create_app
from pacsbridge.api.server import HttpServer
from pacsbridge.auth.users import create_user
from pacsbridge.config import DEFAULT_MODEL
from pacsbridge.model.artifact import load_model
from pacsbridge.store.models import (Instance, InstanceState, Prediction, Study, WorklistItem,
                                     utcnow)
from pacsbridge.store.reasons import Reason, join_reasons, reasons_json
from pacsbridge.store.records import record_event
from pacsbridge.worklist import lifecycle
from pacsbridge.worklist.items import WorklistUpdater
from pipeline_support import add_instance, sqlite_sessions, synthetic_chest

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as EC  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

VIEWER = "https://pacs.example.org/viewer?StudyInstanceUIDs={study_instance_uid}"


def _study(sessions, spool: Path, tmp_path: Path, i: int, name: str, age: str, p: float | None, prio: str | None,
           desc: str, at, *, reason: str | None = None, ae: str = "CR_ROOM2") -> int:
    uid = f"1.2.826.0.1.78.{i}"
    src = tmp_path / f"syn{i}.dcm"
    synthetic_chest(i, study_uid=uid).save_as(src, enforce_file_format=True)
    iid = add_instance(sessions, spool, src, sop_uid=uid + ".1", study_uid=uid, received_at=at, requested_priority=prio)
    with sessions.begin() as s:
        inst = s.get(Instance, iid)
        inst.calling_ae = ae
        study = s.scalars(select(Study).where(Study.study_instance_uid == uid)).one()
        study.patient_name, study.patient_age, study.study_description = name, age, desc
        study.accession_number, study.patient_id = f"ACC{2000 + i}", f"SYN{i:04d}"
        if reason is not None:
            inst.state, inst.state_reason, inst.updated_at = InstanceState.NOT_ANALYSED.value, reason, at
        else:
            inst.state = InstanceState.PREDICTED.value
            s.add(Prediction(instance_id=iid, probability=p, positive=p >= 0.5, threshold=0.5, model_id="test-model",
                             weights_sha256="0" * 64, created_at=at + timedelta(seconds=2)))
    return iid


@pytest.fixture
def room(tmp_path: Path):
    sessions = sqlite_sessions(tmp_path)
    spool = tmp_path / "spool"
    now = utcnow()
    for i, (name, age, p, prio, desc) in enumerate(PATIENTS):
        _study(sessions, spool, tmp_path, i, name, age, p, prio, desc, now - timedelta(minutes=7 + 23 * i))
    _study(sessions, spool, tmp_path, 9, "Test^Hand", "025Y", None, None, "HAND", now - timedelta(days=3),
           reason="body part HAND is not chest", ae="ORTHO1")
    WorklistUpdater(sessions, 240).refresh()
    with sessions.begin() as s:
        token = create_user(s, "dr.night", "radiologist")[1]
        admin = create_user(s, "root", "admin")[1]
        dmitri = s.scalars(select(WorklistItem.id).join(Study).where(Study.patient_name == "Test^Dmitri")).one()
        lifecycle.claim(s, dmitri, lifecycle.Actor("dr.day", "radiologist"), now=now, claim_timeout_s=1800)
    record_event(sessions, "association_rejected", "calling AE title not in allowed_calling_aes", level="warning",
                 peer="ROGUE@127.0.0.1:50000")
    record_event(sessions, "store_rejected", "status 0xA900: SOP Class UID and data set disagree", level="warning",
                 peer="CR_ROOM2@127.0.0.1:50001")
    model = functools.partial(load_model, DEFAULT_MODEL, "cpu")  # the shipped model, for real heatmaps
    server = HttpServer(create_app(sessions, spool_dir=spool, claim_timeout_s=1800, model=model, viewer_url=VIEWER),
                        "127.0.0.1", 0)
    server.start()
    yield sessions, f"http://127.0.0.1:{server.port}", token, admin, spool
    server.stop()


def _sign_in(driver, url: str, token: str) -> WebDriverWait:
    wait = WebDriverWait(driver, 60)
    driver.get(url + "/")
    wait.until(EC.visibility_of_element_located((By.ID, "token"))).send_keys(token)
    driver.find_element(By.ID, "signin").click()
    wait.until(EC.visibility_of_element_located((By.ID, "worklist-view")))
    wait.until(lambda d: len(_rows(d)) >= 4)
    return wait


def _shot(driver, tmp_path: Path, name: str, sizes=((1366, 768), (800, 600)), scroll_to: str | None = None) -> None:
    """Screenshots at each size under tmp_path (and PACSBRIDGE_SCREENSHOT_DIR when set)."""
    for w, h in sizes:
        driver.set_window_size(w, h)
        time.sleep(0.4)
        if scroll_to:
            driver.execute_script(f"document.getElementById('{scroll_to}').scrollIntoView({{block: 'end'}})")
            time.sleep(0.2)
        out = tmp_path / f"{name}-{w}x{h}.png"
        driver.save_screenshot(str(out))
        if os.environ.get("PACSBRIDGE_SCREENSHOT_DIR"):
            shutil.copy(out, Path(os.environ["PACSBRIDGE_SCREENSHOT_DIR"]) / out.name)
    driver.set_window_size(1400, 900)


def _colour_share(driver) -> float:
    """Share of clearly coloured pixels in the item image, between the yellow label bands at the top
    and bottom (0 for the grey preview)."""
    return driver.execute_script("""
        const img = document.getElementById('image');
        const c = document.createElement('canvas'); c.width = img.naturalWidth; c.height = img.naturalHeight;
        const g = c.getContext('2d'); g.drawImage(img, 0, 0);
        const top = Math.round(c.height * 0.1);
        const d = g.getImageData(0, top, c.width, c.height - 2 * top).data; let n = 0;
        for (let i = 0; i < d.length; i += 4) {
          if (Math.max(d[i], d[i+1], d[i+2]) - Math.min(d[i], d[i+1], d[i+2]) > 40) n++; }
        return n / (d.length / 4);""")


def _image_loaded(driver) -> bool:
    return driver.execute_script("const i = document.getElementById('image'); return i.complete && i.naturalWidth > 0")


def test_heatmap_after_claim_viewer_link_and_history(room, browser, tmp_path: Path) -> None:  # noqa: F811
    sessions, url, token, _, _ = room
    wait = _sign_in(browser, url, token)
    with sessions() as s:
        alice = s.scalars(select(WorklistItem).join(Study).where(Study.patient_name == "Test^Alice")).one()
        alice_id, alice_uid = alice.id, alice.study.study_instance_uid
    # The worklist links each study to the viewer, with the UID filled in (URL-encoded).
    link = browser.find_element(By.CSS_SELECTOR, f"#worklist tr[data-id='{alice_id}'] a.viewer-link")
    assert link.get_attribute("href") == VIEWER.format(study_instance_uid=alice_uid)
    assert link.get_attribute("target") == "_blank" and "noopener" in link.get_attribute("rel")

    browser.find_element(By.CSS_SELECTOR, f"#worklist tr[data-id='{alice_id}'] td.patient").click()
    wait.until(EC.visibility_of_element_located((By.ID, "item-view")))
    wait.until(_image_loaded)
    heat = browser.find_element(By.ID, "heatmap")
    assert heat.is_enabled()
    assert browser.find_element(By.ID, "open-viewer").get_attribute("href") == VIEWER.format(study_instance_uid=alice_uid)

    browser.find_element(By.ID, "claim").click()
    wait.until(EC.text_to_be_present_in_element((By.ID, "claim-state"), "You are reading"))
    # After the claim the page shows the claim's answer: the heatmap must still be offered ...
    assert heat.is_enabled(), "heatmap disabled after claim"
    assert browser.find_element(By.ID, "heatmap-note").text == ""
    assert _colour_share(browser) < 0.01  # the grey preview
    # ... and turning it on draws the model's attention map over the image (the shipped model, on CPU).
    before = browser.execute_script("return document.getElementById('image').src")
    heat.click()
    wait.until(lambda d: d.execute_script("return document.getElementById('image').src") != before and _image_loaded(d))
    assert _colour_share(browser) > 0.05, "no coloured overlay after turning the heatmap on"
    legend = browser.find_element(By.ID, "heatmap-legend")
    assert legend.is_displayed() and "raised the AI score" in legend.text and "not a segmentation" in legend.text
    # The legend is in view, unscrolled, at the common screen sizes whenever the overlay is on.
    for w, h in ((1366, 768), (800, 600)):
        browser.set_window_size(w, h)
        time.sleep(0.4)
        browser.execute_script("window.scrollTo(0, 0)")
        box = browser.execute_script("const r = document.getElementById('heatmap-legend').getBoundingClientRect();"
                                     "return [r.top, r.bottom, r.height, window.innerHeight]")
        assert box[2] > 0 and 0 <= box[0] and box[1] <= box[3], (w, h, box)
    browser.set_window_size(1400, 900)

    # History in plain words, oldest first: received from the AE, scored, put on the list, claimed.
    items = [li.text for li in browser.find_elements(By.CSS_SELECTOR, "#history li")]
    texts = " | ".join(items)
    assert "Image 1 received from CR_ROOM2" in items[0]
    assert "scored 97% by test-model (threshold 50%): flagged" in texts
    assert "Put on the worklist at AI score 97%" in texts
    assert items[-1].endswith("Claimed by dr.night")
    assert "->" not in texts and "in_progress" not in texts  # no developer text
    _shot(browser, tmp_path, "item-heatmap")
    _shot(browser, tmp_path, "item-history", sizes=((1366, 768),), scroll_to="history-box")


def _refused_twice(sessions, spool: Path, tmp_path: Path, patient: str) -> list[str]:
    """A second image in ``patient``'s study, refused for two reasons (as the worker records them)."""
    with sessions() as s:
        uid = s.scalars(select(Study.study_instance_uid).where(Study.patient_name == patient)).one()
    src = tmp_path / "lateral.dcm"
    synthetic_chest(41, study_uid=uid).save_as(src, enforce_file_format=True)
    iid = add_instance(sessions, spool, src, sop_uid=uid + ".2", study_uid=uid, series_uid=uid + ".2")
    reasons = [Reason("view", "lateral view (View Position LL); the model reads frontal views"),
               Reason("age", "patient age 42 y is outside this model's intended use (0-17 y) [Patient's Age 042Y]")]
    with sessions.begin() as s:
        inst = s.get(Instance, iid)
        inst.state = InstanceState.NOT_ANALYSED.value
        inst.state_reason, inst.state_reasons = join_reasons(reasons), reasons_json(reasons)
    return [r.text for r in reasons]


def test_every_reason_of_a_refused_image_on_its_own_line(room, browser, tmp_path: Path) -> None:  # noqa: F811
    sessions, url, token, admin, spool = room
    texts = _refused_twice(sessions, spool, tmp_path, "Test^Chloe")
    wait = _sign_in(browser, url, token)
    with sessions() as s:
        chloe = s.scalars(select(WorklistItem.id).join(Study).where(Study.patient_name == "Test^Chloe")).one()
    browser.find_element(By.CSS_SELECTOR, f"#worklist tr[data-id='{chloe}'] td.patient").click()
    wait.until(EC.visibility_of_element_located((By.ID, "item-view")))
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#instance-reasons li"))
    lines = [li.text for li in browser.find_elements(By.CSS_SELECTOR, "#instance-reasons li")]
    assert lines == texts
    assert "Image 2 not analysed" in browser.find_element(By.ID, "instance-reasons").text
    tops = browser.execute_script("return [...document.querySelectorAll('#instance-reasons li')]"
                                  ".map(li => li.getBoundingClientRect().top)")
    assert tops[1] > tops[0]  # one line each, not run together
    _shot(browser, tmp_path, "item-reasons", sizes=((1366, 768),), scroll_to="instance-reasons")
    browser.find_element(By.ID, "signout").click()

    wait = _sign_in(browser, url, admin)
    browser.find_element(By.ID, "nav-received").click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#received tbody tr")) == 7)
    cells = browser.execute_script("return [...document.querySelectorAll('#received td.outcome')]"
                                   ".map(td => [...td.querySelectorAll('li')].map(li => li.textContent))")
    assert texts in cells and ["body part HAND is not chest"] in cells
    _shot(browser, tmp_path, "received-reasons", sizes=((1366, 768),))


def test_new_stat_raises_a_notice_and_changes_the_title(room, browser, tmp_path: Path) -> None:  # noqa: F811
    sessions, url, token, _, spool = room
    wait = _sign_in(browser, url, token)
    # One STAT study (Bruno) waits already: the title counts it and the notice names it.
    wait.until(lambda d: d.title.startswith("(1) urgent"))
    assert "STAT study waiting" in browser.find_element(By.ID, "alert-text").text
    browser.find_element(By.ID, "alert-dismiss").click()
    assert not browser.find_element(By.ID, "alert").is_displayed()
    # Desktop notifications: the permission is granted by a stand-in in the page (headless Chromium has
    # no notification service); it records what the page would show.
    browser.execute_script("""
        window.shown = [];
        window.Notification = class { constructor(t, o) { window.shown.push([t, o.body]); }
                                      static get permission() { return 'granted'; } };""")

    now = utcnow()
    _study(sessions, spool, tmp_path, 7, "Test^Farid", "071Y", 0.64, "STAT", "CHEST AP", now)
    WorklistUpdater(sessions, 240).refresh()
    wait.until(lambda d: d.title.startswith("(2) urgent"))
    notice = wait.until(EC.visibility_of_element_located((By.ID, "alert")))
    assert "New STAT study: Test Farid · ACC2007" in notice.text
    shown = browser.execute_script("return window.shown")
    assert shown and shown[0][0] == "pacsbridge: new STAT study" and "ACC2007" in shown[0][1]
    assert "Farid" not in shown[0][1]  # no patient name on a desktop notification
    _shot(browser, tmp_path, "alert")

    # Muted: a further STAT updates the title and the notice but raises no notification.
    browser.find_element(By.ID, "mute").click()
    assert browser.execute_script("return localStorage.getItem('pacsbridge.mute')") == "1"
    _study(sessions, spool, tmp_path, 8, "Test^Greta", "049Y", 0.61, "HIGH", "CHEST PA", utcnow())
    WorklistUpdater(sessions, 240).refresh()
    wait.until(lambda d: d.title.startswith("(3) urgent"))
    wait.until(EC.text_to_be_present_in_element((By.ID, "alert-text"), "New HIGH study"))
    assert len(browser.execute_script("return window.shown")) == 1

    # Open from the notice: the item view of that study.
    browser.find_element(By.ID, "alert-open").click()
    wait.until(EC.text_to_be_present_in_element((By.ID, "item-title"), "Test Greta"))


def test_admin_events_and_all_received_views(room, browser, tmp_path: Path) -> None:  # noqa: F811
    sessions, url, token, admin, _ = room
    # A radiologist sees neither admin view.
    wait = _sign_in(browser, url, token)
    assert not browser.find_element(By.ID, "nav-events").is_displayed()
    assert not browser.find_element(By.ID, "nav-received").is_displayed()
    browser.find_element(By.ID, "signout").click()

    wait = _sign_in(browser, url, admin)
    browser.find_element(By.ID, "nav-events").click()
    wait.until(lambda d: "association_rejected" in d.find_element(By.ID, "events-table").text)
    text = browser.find_element(By.ID, "events-table").text
    assert "store_rejected" in text and "0xA900" in text and "worklist_claim" in text and "dr.day" in text
    browser.find_element(By.CSS_SELECTOR, "#events-kind option[value='']")  # the "all" choice exists
    browser.execute_script("const k = document.getElementById('events-kind'); k.value = 'store_rejected';"
                           "k.dispatchEvent(new Event('change'));")
    wait.until(lambda d: "worklist_claim" not in d.find_element(By.ID, "events-table").text)
    rows = browser.find_elements(By.CSS_SELECTOR, "#events-table tbody tr")
    assert len(rows) == 1 and "store_rejected" in rows[0].text
    browser.execute_script("const k = document.getElementById('events-kind'); k.value = '';"
                           "k.dispatchEvent(new Event('change'));")
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#events-table tbody tr")) > 3)
    _shot(browser, tmp_path, "events")

    browser.find_element(By.ID, "nav-received").click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#received tbody tr")) == 6)
    text = browser.find_element(By.ID, "received").text
    assert "body part HAND is not chest" in text and "ORTHO1" in text and "97% flagged" in text
    assert "12% not flagged" in text  # the negative: visible here, not on the worklist
    # Filter by state: only the refused one.
    browser.execute_script("const k = document.getElementById('received-state'); k.value = 'not_analysed';"
                           "k.dispatchEvent(new Event('change'));")
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#received tbody tr")) == 1)
    # Filter by date: from two days ago to today hides the refused one (received three days ago).
    today = browser.execute_script("const d = new Date(); return d.getFullYear() + '-' + "
                                   "String(d.getMonth() + 1).padStart(2, '0') + '-' + String(d.getDate()).padStart(2, '0')")
    two_ago = browser.execute_script("const d = new Date(Date.now() - 2 * 86400e3); return d.getFullYear() + '-' + "
                                     "String(d.getMonth() + 1).padStart(2, '0') + '-' + String(d.getDate()).padStart(2, '0')")
    browser.execute_script("for (const [id, v] of [['received-from', arguments[0]], ['received-to', arguments[1]]]) {"
                           "const e = document.getElementById(id); e.value = v; e.dispatchEvent(new Event('change')); }",
                           two_ago, today)
    wait.until(lambda d: d.find_element(By.ID, "received-empty").is_displayed())
    browser.execute_script("const k = document.getElementById('received-state'); k.value = '';"
                           "k.dispatchEvent(new Event('change'));")
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#received tbody tr")) == 5)
    assert "HAND" not in browser.find_element(By.ID, "received").text
    # A row opens its image.
    browser.find_elements(By.CSS_SELECTOR, "#received tbody tr")[0].click()
    wait.until(lambda d: d.execute_script("const i = document.getElementById('received-image'); "
                                          "return i.complete && i.naturalWidth > 0"))
    _shot(browser, tmp_path, "received")


def test_layout_at_800px_has_no_word_per_line_wrapping(room, browser, tmp_path: Path) -> None:  # noqa: F811
    sessions, url, token, _, _ = room
    _sign_in(browser, url, token)
    browser.set_window_size(800, 600)
    time.sleep(0.5)
    browser.save_screenshot(str(tmp_path / "worklist-800-checked.png"))  # what the checks below saw
    # Every cell's text fits on one or two lines (one word per line would be many more): count the
    # distinct line boxes of each visible cell's text.
    lines = browser.execute_script("""
        return [...document.querySelectorAll('#worklist tbody td')].filter(td => td.offsetWidth > 0).map(td => {
          const r = document.createRange(); r.selectNodeContents(td);
          const tops = [...r.getClientRects()].filter(b => b.width > 0).map(b => b.top).sort((a, b) => a - b);
          let n = tops.length ? 1 : 0;
          for (let i = 1; i < tops.length; i++) if (tops[i] - tops[i - 1] > 12) n++;  // a new line box
          return n + " " + td.innerText; });""")
    assert max(int(x.split()[0]) for x in lines) <= 2, [x for x in lines if int(x.split()[0]) > 2]
    # ... and the list fits the width (no sideways scrolling to see the status).
    widths = browser.execute_script("return [document.documentElement.clientWidth, ...[...document.querySelectorAll('#worklist tbody tr:first-child td')].map(t => t.offsetWidth)]")
    assert browser.execute_script("return document.getElementById('worklist').getBoundingClientRect().right "
                                  "<= document.documentElement.clientWidth + 1"), str(widths)
    header = browser.execute_script("return document.querySelector('header').getBoundingClientRect().height")
    assert header < 130
    assert browser.execute_script("return document.querySelector('link[rel=icon]').href").endswith("/static/favicon.svg")
    _shot(browser, tmp_path, "worklist", sizes=((1366, 768), (800, 600)))
