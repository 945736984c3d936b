"""Outbox claims with leases (several nodes): claimers get disjoint entries and one destination each
at a time, an expired lease is claimed again, a stale holder's outcome is refused; two forwarders
(two "nodes") on one PostgreSQL send every HL7 ORU once to a real MLLP listener."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from datetime import timedelta
from pathlib import Path

import pytest
from pydicom import dcmread

from dicom_support import database_url_for
from forward_support import MllpListener, add_result
from pacsbridge.config import Destination
from pacsbridge.forward import outbox
from pacsbridge.forward.forwarder import Forwarder
from pacsbridge.forward.outbox import RetryPolicy
from pacsbridge.forward.senders import ForwardContext
from pacsbridge.store import claim_rules, migrations
from pacsbridge.store.db import make_engine, make_sessionmaker
from pacsbridge.store.models import utcnow
from pipeline_support import sample_file

LEASE_S = 120.0
POLICY = RetryPolicy(initial_s=60, max_s=120, max_age=timedelta(hours=1))


def _ris(name: str, port: int = 2) -> Destination:
    return Destination(name=name, kind="hl7", host="127.0.0.1", port=port, send="all", timeout_s=5)


@pytest.fixture(params=["sqlite", "postgresql"])
def sessions(request, tmp_path):
    for url in database_url_for(request.param, tmp_path / "claims.db"):
        engine = make_engine(url)
        migrations.upgrade(engine)
        yield make_sessionmaker(engine)
        engine.dispose()


@pytest.fixture
def pg_sessions(tmp_path):
    for url in database_url_for("postgresql", tmp_path / "unused.db"):
        engine = make_engine(url)
        migrations.upgrade(engine)
        yield make_sessionmaker(engine)
        engine.dispose()


def _results(sessions, tmp_path: Path, dests: list[Destination], n: int) -> None:  # noqa: ANN001
    src = sample_file("RG1_UNCR.dcm")
    for i in range(n):
        path = tmp_path / f"src{i}.dcm"
        ds = dcmread(src)
        ds.SOPInstanceUID = f"1.2.3.4.{i + 1}"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.AccessionNumber = f"ACC{i + 1}"
        ds.save_as(path)
        add_result(sessions, tmp_path / "spool", path, dests)


def test_claims_are_exclusive_per_destination_and_leases_expire(sessions, tmp_path):
    _results(sessions, tmp_path, [_ris("a"), _ris("b")], 3)
    t0 = utcnow()
    got_a = outbox.claim_due(sessions, "node-a", LEASE_S, t0, destinations=["a"])
    assert {e.destination for e in got_a} == {"a"} and len(got_a) == 3
    assert all(e.claimed_by == "node-a" for e in got_a)
    # node-a holds live leases on "a": node-b gets nothing there (one association per destination)...
    got_b = outbox.claim_due(sessions, "node-b", LEASE_S, t0 + timedelta(seconds=1), destinations=["a", "b"])
    assert {e.destination for e in got_b} == {"b"} and len(got_b) == 3
    # ... and node-a nothing on "b" now.
    assert outbox.claim_due(sessions, "node-a", LEASE_S, t0 + timedelta(seconds=2), destinations=["b"]) == []
    with sessions() as s:
        listed = {e["id"]: e for e in outbox.list_entries(s)}
    assert {listed[e.id]["claimed_by"] for e in got_a} == {"node-a"} and listed[got_a[0].id]["lease_until"]

    # node-a dies mid-send: after the lease its entries are claimed again, by node-b.
    later = t0 + timedelta(seconds=LEASE_S + 5)
    again = outbox.claim_due(sessions, "node-b", LEASE_S, later, destinations=["a"])
    assert sorted(e.id for e in again) == sorted(e.id for e in got_a)
    stale = got_a[0].id
    # The stale holder can neither record an outcome nor renew; the new holder can.
    assert outbox.mark_sent(sessions, stale, "x", now=later, claimer="node-a") is False
    assert outbox.mark_failed(sessions, stale, "late", permanent=True, policy=POLICY, now=later,
                              claimer="node-a") is None
    assert outbox.renew(sessions, [stale], "node-a", LEASE_S, later) == set()
    assert outbox.mark_sent(sessions, stale, None, now=later) is False  # no claimer: refused under a live lease
    assert outbox.renew(sessions, [stale], "node-b", LEASE_S, later) == {stale}
    assert outbox.mark_sent(sessions, stale, "uid-1", now=later, claimer="node-b") is True
    assert outbox.mark_failed(sessions, again[1].id, "peer down", permanent=False, policy=POLICY, now=later,
                              claimer="node-b") == "pending"
    with sessions() as s:
        rows = {e["id"]: e for e in outbox.list_entries(s)}
    assert rows[stale]["state"] == "sent" and rows[stale]["claimed_by"] is None
    assert rows[again[1].id]["claimed_by"] is None and rows[again[1].id]["lease_until"] is None


def test_a_gone_process_on_this_machine_does_not_hold_its_leases(sessions, tmp_path):
    """A node killed mid-send and restarted on the same machine takes its destination back at once; a
    live holder, or one named on another machine, keeps it until its lease ends."""
    _results(sessions, tmp_path, [_ris("a"), _ris("b"), _ris("c")], 2)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    tag = claim_rules.process_name().rsplit(":", 1)[1]
    assert tag != "-"  # Linux: the machine can be told
    gone_here = f"{socket.gethostname()}:{dead.pid}:aaaaaaaa:{tag}"
    live_here = f"{socket.gethostname()}:{os.getpid()}:bbbbbbbb:{tag}"  # a live process (this one)
    elsewhere = f"{socket.gethostname()}:{dead.pid}:cccccccc:{'0' * 8 if tag != '0' * 8 else '1' * 8}"
    t0 = utcnow()
    for holder, dest in ((gone_here, "a"), (live_here, "b"), (elsewhere, "c")):
        assert len(outbox.claim_due(sessions, holder, LEASE_S, t0, destinations=[dest])) == 2
    me = claim_rules.process_name()
    got = outbox.claim_due(sessions, me, LEASE_S, t0 + timedelta(seconds=1), destinations=["a", "b", "c"])
    assert sorted({e.destination for e in got}) == ["a"] and len(got) == 2
    assert claim_rules.gone_process(gone_here, me) and not claim_rules.gone_process(elsewhere, me)
    assert not claim_rules.gone_process(me, me) and not claim_rules.gone_process("node-a", me)


def test_concurrent_claimers_get_disjoint_entries(pg_sessions, tmp_path):
    dests = [_ris(f"d{i}") for i in range(4)]
    _results(pg_sessions, tmp_path, dests, 10)
    names = [d.name for d in dests]
    claimed: dict[str, list] = {}
    start = threading.Barrier(4)

    def claim(node: str) -> None:
        start.wait()
        claimed[node] = outbox.claim_due(pg_sessions, node, LEASE_S, destinations=names)

    threads = [threading.Thread(target=claim, args=(f"node-{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    ids = [e.id for got in claimed.values() for e in got]
    assert len(ids) == len(set(ids)) == 40  # every entry claimed, none twice
    for dest in names:  # each destination went to exactly one node
        assert len({node for node, got in claimed.items() if any(e.destination == dest for e in got)}) == 1


def test_two_forwarders_send_each_oru_once(pg_sessions, tmp_path):
    with MllpListener([]) as ris:
        dests = [_ris("ris", ris.port), _ris("ris2", ris.port)]
        _results(pg_sessions, tmp_path, dests, 12)
        ctx = ForwardContext("PACSBRIDGE", tmp_path / "spool")
        nodes = [Forwarder(pg_sessions, dests, ctx, policy=POLICY, node=f"node-{i}") for i in range(2)]
        start = threading.Barrier(2)
        totals: list[dict] = []

        def run(fwd: Forwarder) -> None:
            start.wait()
            for _ in range(3):  # a few rounds each, as their ticks would
                totals.append(fwd.run_once())

        threads = [threading.Thread(target=run, args=(f,)) for f in nodes]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        for f in nodes:
            f.stop()
    control_ids = [str(m.segment("MSH")[10]) for m in ris.received]
    assert len(control_ids) == 24 and len(set(control_ids)) == 24, "each ORU exactly once"
    assert sum(t.get("sent", 0) for t in totals) == 24
    with pg_sessions() as s:
        assert outbox.state_counts(s) == {"pending": 0, "sent": 24, "dead": 0}
