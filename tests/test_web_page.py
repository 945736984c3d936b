"""The web page in real headless Chromium (Debian chromium + chromium-driver, driven by selenium;
nothing is downloaded): a wrong token is refused, sign in, the worklist in priority order, open an
item with its image, claim, complete with a finding, the item leaves the list, a revoked token is
sent back to sign-in.  Screenshots go to pytest's tmp_path."""

from __future__ import annotations

import os
import shutil
import time
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from pacsbridge.api.app import create_app
from pacsbridge.api.server import HttpServer
from pacsbridge.auth.users import create_user, revoke_user
from pacsbridge.store.models import Instance, InstanceState, Prediction, Study, WorklistItem, utcnow
from pacsbridge.worklist import lifecycle
from pacsbridge.worklist.items import WorklistUpdater
from pipeline_support import add_instance, sqlite_sessions, synthetic_chest

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
    pytest.skip(f"CHROMIUM BROWSER TEST SKIPPED: {CHROMIUM} or {CHROMEDRIVER} missing "
                "(apt-get install chromium chromium-driver; scripts/test installs them)", allow_module_level=True)

from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as EC  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

# Synthetic test patients only (never real patient images in tests or screenshots).
PATIENTS = [("Test^Alice", "042Y", 0.97, None, "CHEST PA"), ("Test^Bruno", "067Y", 0.71, "STAT", "CHEST AP PORTABLE"),
            ("Test^Chloe", "008Y", 0.66, None, "CHEST PA/LAT"), ("Test^Dmitri", "055Y", 0.58, None, "CHEST PA"),
            ("Test^Eve", "030Y", 0.12, None, "CHEST PA")]


@pytest.fixture
def site(tmp_path: Path):
    sessions = sqlite_sessions(tmp_path)
    spool = tmp_path / "spool"
    now = utcnow()
    for i, (name, age, p, prio, desc) in enumerate(PATIENTS):
        src = tmp_path / f"syn{i}.dcm"
        synthetic_chest(i, study_uid=f"1.2.826.0.1.77.{i}").save_as(src, enforce_file_format=True)
        at = now - timedelta(minutes=7 + 23 * i)
        iid = add_instance(sessions, spool, src, sop_uid=f"1.2.826.0.1.77.{i}.1", study_uid=f"1.2.826.0.1.77.{i}",
                           received_at=at, requested_priority=prio)
        with sessions.begin() as s:
            s.get(Instance, iid).state = InstanceState.PREDICTED.value
            study = s.scalars(select(Study).where(Study.study_instance_uid == f"1.2.826.0.1.77.{i}")).one()
            study.patient_name, study.patient_age, study.study_description = name, age, desc
            study.accession_number, study.patient_id = f"ACC{1000 + i}", f"SYN{i:04d}"
            s.add(Prediction(instance_id=iid, probability=p, positive=p >= 0.5, threshold=0.5, model_id="test-model",
                             weights_sha256="0" * 64, created_at=at))
    WorklistUpdater(sessions, 240).refresh()
    with sessions.begin() as s:
        token = create_user(s, "dr.night", "radiologist")[1]
        dmitri = s.scalars(select(WorklistItem.id).join(Study).where(Study.patient_name == "Test^Dmitri")).one()
        lifecycle.claim(s, dmitri, lifecycle.Actor("dr.day", "radiologist"), now=now, claim_timeout_s=1800)
    server = HttpServer(create_app(sessions, spool_dir=spool, claim_timeout_s=1800), "127.0.0.1", 0)
    server.start()
    yield sessions, f"http://127.0.0.1:{server.port}", token
    server.stop()


@pytest.fixture
def browser(tmp_path: Path):
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1400,900", f"--user-data-dir={tmp_path / 'chrome'}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _rows(driver) -> list[str]:
    # Read the ids in one script: the page re-renders the table every few seconds, so element handles
    # taken one call earlier can be stale by the next call.
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('#worklist tbody tr')).map(r => r.getAttribute('data-id'));")


def test_sign_in_read_claim_complete(site, browser, tmp_path: Path) -> None:
    sessions, url, token = site
    wait = WebDriverWait(browser, 30)
    browser.get(url + "/")
    wait.until(EC.visibility_of_element_located((By.ID, "token"))).send_keys("pb_not-a-real-token")
    browser.find_element(By.ID, "signin").click()
    msg = wait.until(EC.visibility_of_element_located((By.ID, "message")))
    assert "not accepted" in msg.text
    assert "pb_not" not in browser.current_url and token not in browser.current_url

    tok = browser.find_element(By.ID, "token")
    tok.clear()
    tok.send_keys(token)
    browser.find_element(By.ID, "signin").click()
    wait.until(lambda d: len(_rows(d)) == 4)
    assert token not in browser.current_url
    with sessions() as s:
        expected = [str(i) for i in s.scalars(select(WorklistItem.id).order_by(WorklistItem.priority.desc()))]
    assert _rows(browser) == expected  # priority order: the STAT study first, then by score
    first = browser.execute_script("return document.querySelector('#worklist tbody tr').innerText")
    assert "Test Bruno" in first and "STAT" in first and "67 y" in first
    assert "Test Eve" not in browser.find_element(By.ID, "worklist").text  # negative: not on the list
    assert "being read by dr.day" in browser.find_element(By.ID, "worklist").text  # claimant visible
    widths = browser.execute_script("return [...document.querySelectorAll('.meter > i')].map(e => e.offsetWidth)")
    assert widths[1] > widths[0] > 0  # the score bars follow the score (97% vs 71%)
    time.sleep(0.3)  # kept: lets the last paint settle for the screenshot (nothing is asserted on it)
    browser.save_screenshot(str(tmp_path / "worklist.png"))
    if os.environ.get("PACSBRIDGE_SCREENSHOT_DIR"):  # to refresh docs/screenshots for the README
        shutil.copy(tmp_path / "worklist.png", Path(os.environ["PACSBRIDGE_SCREENSHOT_DIR"]) / "worklist.png")

    # Keyboard: move down to the second item and open it with Enter.
    browser.find_element(By.TAG_NAME, "body").send_keys("j")
    second = _rows(browser)[1]
    browser.switch_to.active_element.send_keys("\n")
    wait.until(EC.visibility_of_element_located((By.ID, "item-view")))
    wait.until(lambda d: d.execute_script("const i = document.getElementById('image'); "
                                          "return i.complete && i.naturalWidth > 0"))
    assert "Test Alice" in browser.find_element(By.ID, "item-title").text
    assert "97%" in browser.find_element(By.ID, "facts").text
    browser.find_element(By.ID, "claim").click()
    wait.until(EC.text_to_be_present_in_element((By.ID, "claim-state"), "You are reading"))
    with sessions() as s:
        assert s.get(WorklistItem, int(second)).claimed_by == "dr.night"
    browser.save_screenshot(str(tmp_path / "item.png"))
    if os.environ.get("PACSBRIDGE_SCREENSHOT_DIR"):
        shutil.copy(tmp_path / "item.png", Path(os.environ["PACSBRIDGE_SCREENSHOT_DIR"]) / "item.png")
    browser.find_element(By.CSS_SELECTOR, "input[name=finding][value=pneumonia]").click()
    browser.find_element(By.ID, "comment").send_keys("right lower lobe consolidation")
    browser.find_element(By.ID, "complete").click()
    wait.until(EC.visibility_of_element_located((By.ID, "worklist-view")))
    wait.until(lambda d: len(_rows(d)) == 3)
    assert second not in _rows(browser)
    with sessions() as s:
        item = s.get(WorklistItem, int(second))
        assert (item.status, item.finding, item.completed_by) == ("completed", "pneumonia", "dr.night")

    # Statistics: the completion counts for the model that flagged the study.
    browser.find_element(By.ID, "nav-stats").click()
    wait.until(lambda d: "test-model" in d.find_element(By.ID, "stats").text)
    cells = [c.text for c in browser.find_elements(By.CSS_SELECTOR, "#stats tbody tr td")]
    assert cells[:7] == ["test-model", "5", "4", "1", "0", "0", "0"]
    assert cells[7].startswith("100% (") and cells[7].endswith("n=1)")  # PPV with its Wilson interval
    assert cells[8] == "–"  # no RIS labels: no sensitivity
    browser.save_screenshot(str(tmp_path / "stats.png"))
    browser.find_element(By.ID, "nav-worklist").click()
    wait.until(lambda d: len(_rows(d)) == 3)

    # The admin revokes the user: the next automatic refresh sends the page back to sign-in.
    with sessions.begin() as s:
        revoke_user(s, "dr.night")
    wait.until(EC.visibility_of_element_located((By.ID, "signin-view")))
    assert "not accepted" in browser.find_element(By.ID, "message").text
    assert browser.execute_script("return sessionStorage.getItem('pacsbridge.token')") is None


def test_shadow_mode_and_drift_alarm_banners(tmp_path: Path, browser) -> None:
    """Shadow mode is said plainly to everyone; a drift alarm is shown to admins only."""
    from pacsbridge.store.models import Event
    from pacsbridge.validation.drift import DriftMonitor, Reference

    sessions = sqlite_sessions(tmp_path)
    with sessions.begin() as s:
        admin_token = create_user(s, "root", "admin")[1]
        reader_token = create_user(s, "dr.night", "radiologist")[1]
        s.add(Event(kind="drift_alarm", level="warning", detail="refusal_rate: window 0.6 (n 200), reference 0.0094 "
                    "(model m validation), limit 0.03"))
    drift = DriftMonitor(sessions, Reference("model m validation", 0.0094, 0.0094, 0.69))
    server = HttpServer(create_app(sessions, spool_dir=tmp_path, mode="shadow", drift=drift), "127.0.0.1", 0)
    server.start()
    try:
        wait = WebDriverWait(browser, 20)
        for token, admin in ((reader_token, False), (admin_token, True)):
            browser.get(f"http://127.0.0.1:{server.port}/")
            wait.until(EC.visibility_of_element_located((By.ID, "token"))).send_keys(token)
            browser.find_element(By.ID, "signin").click()
            wait.until(EC.visibility_of_element_located((By.ID, "mode-banner")))
            assert "Shadow mode" in browser.find_element(By.ID, "mode-banner").text
            if admin:
                wait.until(EC.visibility_of_element_located((By.ID, "drift-banner")))
                assert "refusal_rate" in browser.find_element(By.ID, "drift-banner").text
                browser.save_screenshot(str(tmp_path / "drift-banner.png"))
            else:
                # Kept: a check that something does NOT appear needs a window; the page shows the banner to
                # an admin (the next pass) as soon as /api/stats answers, well within it.
                time.sleep(1.0)
                assert not browser.find_element(By.ID, "drift-banner").is_displayed()
            browser.find_element(By.ID, "signout").click()
    finally:
        server.stop()
