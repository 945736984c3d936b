"""Suite-wide policy: in CI a missing real part is a failure, not a skip.

Tests that need a real peer (DCMTK, Orthanc, PostgreSQL, Chromium, OpenSSL, pydicom-data) skip with a
reason that names it, so a developer's laptop without Orthanc still runs the rest.  With
``PACSBRIDGE_REQUIRE_REAL=1`` (set by ``.ci/run``) every such skip is turned into a failure, so CI can
never go green without them.  Skips for absent training data (``../shared``, which a user's clone does
not have) and for optional encoders stay skips.
"""

from __future__ import annotations

import os
import re

import pytest

REQUIRE_REAL = os.environ.get("PACSBRIDGE_REQUIRE_REAL", "") == "1"

#: Words in a skip reason that mean "a real part this suite must test against is missing".
REAL_PART = re.compile(
    r"dcmtk|storescu|echoscu|dsrdump|img2dcm|orthanc|postgres|chromium|chromedriver|selenium|openssl"
    r"|pydicom-data|could not import 'gdcm'",
    re.IGNORECASE,
)


def _skip_reason(report) -> str | None:
    if not report.skipped:
        return None
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2])
    return str(longrepr)


def _fail_if_real_part_missing(report) -> None:
    reason = _skip_reason(report)
    if REQUIRE_REAL and reason and REAL_PART.search(reason):
        report.outcome = "failed"
        report.longrepr = f"REAL PART MISSING (PACSBRIDGE_REQUIRE_REAL=1 turns this skip into a failure): {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_if_real_part_missing(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _fail_if_real_part_missing(outcome.get_result())


# A host with pacsbridge installed has /etc/pacsbridge/pacsbridge.toml, which every command reads when
# no --config / PACSBRIDGE_CONFIG is given: the suite must never pick up that site's settings.
# (Subprocesses inherit this; tests of the default path set it to a file of their own.)
os.environ.setdefault("PACSBRIDGE_DEFAULT_CONFIG", "/nonexistent/pacsbridge-tests/pacsbridge.toml")
