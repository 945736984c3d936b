"""The Statistics page's weekly charts in real headless Chromium (as tests/test_web_page.py): the
SVG charts are drawn with a point per week that has data, a gap where a week has none, PPV error
bars, a table of the same figures for screen readers, and they fit at 1366 and 800 px wide.
Screenshots go to pytest's tmp_path (and PACSBRIDGE_SCREENSHOT_DIR when set)."""

from __future__ import annotations

import os
import shutil
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from test_web_page import browser  # noqa: F401 - the browser fixture (skips loudly without Chromium)
from test_stats_weekly import _image

from pacsbridge.api.app import create_app
from pacsbridge.api.server import HttpServer
from pacsbridge.auth.users import create_user
from pacsbridge.store.models import WorklistItem, utcnow
from pacsbridge.worklist import lifecycle
from pacsbridge.worklist.items import WorklistUpdater
from pipeline_support import sqlite_sessions

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as EC  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


@pytest.fixture
def site(tmp_path: Path):
    """Images in weeks 0, 1, 3 and 4 back from now (week 2 back is empty); flagged studies read."""
    sessions = sqlite_sessions(tmp_path)
    now = utcnow()
    monday = (now - timedelta(days=now.weekday())).replace(hour=1, minute=0, second=0, microsecond=0)
    for back in (0, 1, 3, 4):
        at = monday - timedelta(weeks=back)
        for i in range(10):
            _image(sessions, f"3.{back}.{i}", at + timedelta(minutes=i), 0.9 if i < 2 + back else 0.1)
        _image(sessions, f"3.{back}.99", at, None, refused="not a chest image (BodyPartExamined HAND)")
    WorklistUpdater(sessions, 240).refresh()
    reader = lifecycle.Actor("anna", "radiologist")
    with sessions.begin() as s:
        for n, item_id in enumerate(s.scalars(select(WorklistItem.id).order_by(WorklistItem.id))):
            lifecycle.claim(s, item_id, reader, now=now, claim_timeout_s=1800)
            lifecycle.complete(s, item_id, reader, finding="pneumonia" if n % 3 else "no_pneumonia", now=now)
        token = create_user(s, "watcher", "monitor")[1]
    server = HttpServer(create_app(sessions), "127.0.0.1", 0)
    server.start()
    yield f"http://127.0.0.1:{server.port}", token
    server.stop()


def _charts(driver) -> dict:
    return driver.execute_script("""
        const box = document.getElementById('stats-weekly');
        const svgs = [...box.querySelectorAll('svg.chart')];
        const flag = svgs.length ? svgs[0].querySelector('path.s-flag') : null;
        return {svgs: svgs.length, points: svgs.map((s) => s.querySelectorAll('circle').length),
                errorBars: svgs.length > 1 ? svgs[1].querySelectorAll('line.err').length : 0,
                flagPath: flag ? flag.getAttribute('d') : null,
                rows: box.querySelectorAll('table.sr-only tbody tr').length,
                titles: svgs.map((s) => s.querySelector('title').textContent),
                widest: Math.max(0, ...svgs.map((s) => s.getBoundingClientRect().right)),
                viewport: window.innerWidth};""")


def test_statistics_page_draws_weekly_charts(site, browser, tmp_path: Path) -> None:  # noqa: F811
    url, token = site
    wait = WebDriverWait(browser, 60)
    browser.get(url + "/")
    wait.until(EC.visibility_of_element_located((By.ID, "token"))).send_keys(token)
    browser.find_element(By.ID, "signin").click()
    wait.until(EC.visibility_of_element_located((By.ID, "stats-view")))  # a monitor lands on Statistics
    got = wait.until(lambda d: (c := _charts(d))["svgs"] == 3 and c)
    # 12 weeks, 4 with data: flag rate and refusal rate have 4 points each, PPV and sensitivity
    # only where something was read / labelled (no RIS labels here: no sensitivity points).
    assert got["points"] == [8, 4, 0], got
    assert got["errorBars"] == 4 * 3  # one bar and two caps per PPV point
    assert got["flagPath"].count("M") == 2, got["flagPath"]  # broken at the empty week
    assert got["rows"] == 12
    assert got["titles"][0].startswith("Flag rate and refusal rate per ISO week")
    for w, h in ((1366, 768), (800, 600)):
        browser.set_window_size(w, h)
        got = wait.until(lambda d: (c := _charts(d))["viewport"] <= w and c)
        assert got["widest"] <= got["viewport"] + 1, got
        browser.execute_script("document.getElementById('stats-weekly').scrollIntoView({block: 'start'})")
        out = tmp_path / f"stats-weekly-{w}x{h}.png"
        browser.save_screenshot(str(out))
        assert out.stat().st_size > 10_000
        if os.environ.get("PACSBRIDGE_SCREENSHOT_DIR"):
            shutil.copy(out, Path(os.environ["PACSBRIDGE_SCREENSHOT_DIR"]) / out.name)
