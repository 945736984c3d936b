"""Canaries for the pynetdicom internals pacsbridge depends on (all in pacsbridge/dicom/compat.py).

Each entry of ``compat.INTERNALS`` has a check here against the installed pynetdicom; a release that
renames, removes or re-signs one fails with the attribute's name.  A regex over ``pacsbridge/`` checks
that no other module uses one of them, and a real association checks that the hooks take effect.
"""

from __future__ import annotations

import inspect
import re
import socket
import threading
from collections.abc import Callable
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import select

import pynetdicom
from dicom_support import running_receiver, scu_ae, send_datasets
from pacsbridge.dicom import compat
from pynetdicom import AE, _config
from pynetdicom.acse import ACSE
from pynetdicom.association import Association
from pynetdicom.dimse_messages import DIMSEMessage
from pynetdicom.dul import DULServiceProvider
from pynetdicom.transport import AssociationSocket, RequestHandler

PACKAGE = Path(__file__).resolve().parents[1] / "pacsbridge"


def _assoc() -> Association:
    """A real (unconnected) acceptor association: pynetdicom builds its DUL, ACSE and DIMSE objects."""
    return Association(AE(), "acceptor")


def _params(fn: Callable) -> list[str]:
    return list(inspect.signature(fn).parameters)


def _method(cls: type, name: str, params: list[str]) -> None:
    fn = cls.__dict__.get(name)
    assert callable(fn), f"{cls.__module__}.{cls.__qualname__}.{name} is gone"
    assert _params(fn) == params, f"{cls.__qualname__}.{name} now takes {_params(fn)}, not {params}"


def _instance_attr(obj: object, name: str, kind: type | tuple[type, ...] | None = None) -> None:
    assert hasattr(obj, name), f"{type(obj).__module__}.{type(obj).__qualname__} has no attribute {name!r}"
    if kind is not None:
        value = getattr(obj, name)
        assert isinstance(value, kind), f"{type(obj).__qualname__}.{name} is now a {type(value).__name__}"


def _ours(name: str) -> None:
    # An attribute of ours on pynetdicom's Association: pynetdicom must not use the name, nor forbid it.
    assoc = _assoc()
    assert not hasattr(assoc, name), f"pynetdicom's Association now has its own {name!r}"
    setattr(assoc, name, "x")
    assert getattr(assoc, name) == "x"


def _check_queue(name: str) -> Callable[[], None]:
    import queue

    return lambda: _instance_attr(_assoc().dul, name, queue.Queue)


def _thread_target() -> None:
    def f() -> None: ...

    t = threading.Thread(target=f)
    assert getattr(t, "_target", None) is f, "threading.Thread no longer keeps its target in _target"
    dul = _assoc().dul
    assert getattr(dul, "_target", None) is not None, "pynetdicom's DUL thread has no _target"


def _dul_socket() -> None:
    assoc = _assoc()
    _instance_attr(assoc.dul, "socket")
    with socket.socket() as raw:
        assoc.set_socket(AssociationSocket(assoc, client_socket=raw))
        assert assoc.dul.socket is not None, "Association.set_socket no longer sets dul.socket"


def _assoc_socket() -> None:
    with socket.socket() as raw:
        assert AssociationSocket(_assoc(), client_socket=raw).socket is raw, "AssociationSocket.socket changed"


#: One check per (owner, name) of compat.INTERNALS.
CHECKS: dict[tuple[str, str], Callable[[], None]] = {
    ("pynetdicom._config", "STORE_SEND_CHUNKED_DATASET"):
        lambda: _instance_attr(_config, "STORE_SEND_CHUNKED_DATASET", bool),
    ("pynetdicom._config", "STORE_RECV_CHUNKED_DATASET"):
        lambda: _instance_attr(_config, "STORE_RECV_CHUNKED_DATASET", bool),
    ("pynetdicom.ae.ApplicationEntity", "_servers"): lambda: _instance_attr(AE(), "_servers", list),
    ("pynetdicom.association.Association", "_server"): lambda: _instance_attr(_assoc(), "_server"),
    ("pynetdicom.dul.DULServiceProvider", "_read_pdu_data"):
        lambda: _method(DULServiceProvider, "_read_pdu_data", ["self"]),
    ("pynetdicom.dul.DULServiceProvider", "_decode_pdu"):
        lambda: _method(DULServiceProvider, "_decode_pdu", ["self", "bytestream"]),
    ("pynetdicom.dul.DULServiceProvider", "_recv_pdu"): _check_queue("_recv_pdu"),
    ("pynetdicom.dul.DULServiceProvider", "event_queue"): _check_queue("event_queue"),
    ("pynetdicom.dul.DULServiceProvider", "to_user_queue"): _check_queue("to_user_queue"),
    ("pynetdicom.dul.DULServiceProvider", "socket"): _dul_socket,
    ("pynetdicom.dul.DULServiceProvider", "artim_timer"):
        lambda: _instance_attr(_assoc().dul.artim_timer, "timeout"),
    ("threading.Thread", "_target"): _thread_target,
    ("pynetdicom.transport.AssociationSocket", "socket"): _assoc_socket,
    ("pynetdicom.dimse.DIMSEServiceProvider", "message"): lambda: _instance_attr(_assoc().dimse, "message"),
    ("pynetdicom.dimse_messages.DIMSEMessage", "encoded_command_set"):
        lambda: _instance_attr(DIMSEMessage(), "encoded_command_set", BytesIO),
    ("pynetdicom.dimse_messages.DIMSEMessage", "data_set"):
        lambda: _instance_attr(DIMSEMessage(), "data_set", BytesIO),
    ("pynetdicom.acse.ACSE", "_negotiate_as_acceptor"): lambda: _method(ACSE, "_negotiate_as_acceptor", ["self"]),
    ("pynetdicom.transport.RequestHandler", "_create_association"):
        lambda: _method(RequestHandler, "_create_association", ["self"]),
    ("pynetdicom.association.Association", "pb_reject_reason"): lambda: _ours("pb_reject_reason"),
    ("pynetdicom.association.Association", "pb_ups_refused"): lambda: _ours("pb_ups_refused"),
    ("pynetdicom.association.Association", "pb_log_id"): lambda: _ours("pb_log_id"),
}

#: What finds a use of each internal in source text (compat.py excepted).
PATTERNS: dict[tuple[str, str], str] = {
    ("pynetdicom._config", "STORE_SEND_CHUNKED_DATASET"): r"\b_config\b|STORE_SEND_CHUNKED_DATASET",
    ("pynetdicom._config", "STORE_RECV_CHUNKED_DATASET"): r"\b_config\b|STORE_RECV_CHUNKED_DATASET",
    ("pynetdicom.ae.ApplicationEntity", "_servers"): r"\._servers\b",
    ("pynetdicom.association.Association", "_server"): r"assoc\w*\._server\b|[\"']_server[\"']",
    ("pynetdicom.dul.DULServiceProvider", "_read_pdu_data"): r"\b_read_pdu_data\b",
    ("pynetdicom.dul.DULServiceProvider", "_decode_pdu"): r"\b_decode_pdu\b",
    ("pynetdicom.dul.DULServiceProvider", "_recv_pdu"): r"\b_recv_pdu\b",
    ("pynetdicom.dul.DULServiceProvider", "event_queue"): r"\bevent_queue\b",
    ("pynetdicom.dul.DULServiceProvider", "to_user_queue"): r"\bto_user_queue\b",
    ("pynetdicom.dul.DULServiceProvider", "socket"): r"dul\.socket\b|dul\w*, [\"']socket[\"']",
    ("pynetdicom.dul.DULServiceProvider", "artim_timer"): r"\bartim_timer\b",
    ("threading.Thread", "_target"): r"\._target\b",
    ("pynetdicom.transport.AssociationSocket", "socket"): r"\bsock\.socket\b|\.socket\.socket\b",
    ("pynetdicom.dimse.DIMSEServiceProvider", "message"): r"\bself\.message\b|dimse\.message\b",
    ("pynetdicom.dimse_messages.DIMSEMessage", "encoded_command_set"): r"\bencoded_command_set\b",
    ("pynetdicom.dimse_messages.DIMSEMessage", "data_set"): r"\bDIMSEMessage\b|\.data_set\b",
    ("pynetdicom.acse.ACSE", "_negotiate_as_acceptor"): r"\b_negotiate_as_acceptor\b",
    ("pynetdicom.transport.RequestHandler", "_create_association"): r"\b_create_association\b",
    ("pynetdicom.association.Association", "pb_reject_reason"): r"\bpb_reject_reason\b",
    ("pynetdicom.association.Association", "pb_ups_refused"): r"\bpb_ups_refused\b",
    ("pynetdicom.association.Association", "pb_log_id"): r"\bpb_log_id\b",
}


def _key(i: compat.Internal) -> tuple[str, str]:
    return (i.owner, i.name)


def test_pynetdicom_is_the_pinned_release():
    # setup.cfg pins pynetdicom==3.0.*: the internals below were checked against 3.0.
    assert pynetdicom.__version__.startswith("3.0."), f"pynetdicom {pynetdicom.__version__} is not 3.0.*"
    cfg = (PACKAGE.parent / "setup.cfg").read_text()
    assert re.search(r"^\s*pynetdicom==3\.0\.\*\s*$", cfg, re.MULTILINE), "setup.cfg no longer pins pynetdicom==3.0.*"


def test_every_internal_has_a_canary_and_a_pattern():
    listed = {_key(i) for i in compat.INTERNALS}
    assert listed == set(CHECKS), f"no canary for {listed - set(CHECKS)}; stale canaries {set(CHECKS) - listed}"
    assert listed == set(PATTERNS), f"no pattern for {listed - set(PATTERNS)}; stale {set(PATTERNS) - listed}"


@pytest.mark.parametrize("internal", compat.INTERNALS, ids=lambda i: f"{i.owner}.{i.name}")
def test_internal_is_still_there(internal: compat.Internal):
    try:
        CHECKS[_key(internal)]()
    except AssertionError as exc:
        pytest.fail(f"pynetdicom {pynetdicom.__version__}: {internal.owner}.{internal.name} ({internal.why}) "
                    f"changed: {exc}; pacsbridge/dicom/compat.py must be adapted")


@pytest.mark.parametrize("override", compat.OVERRIDES, ids=lambda o: f"{o[0]}.{o[1]}")
def test_overridden_method_keeps_its_signature(override: tuple[str, str, tuple[str, ...]]):
    import importlib

    owner, name, params = override
    module, cls_name = owner.rsplit(".", 1)
    cls = getattr(importlib.import_module(module), cls_name)
    try:
        _method(cls, name, list(params))
    except AssertionError as exc:
        pytest.fail(f"pynetdicom {pynetdicom.__version__}: {owner}.{name} changed: {exc}; "
                    "pacsbridge/dicom/fast_transport.py overrides or calls it")


def test_no_pynetdicom_internal_outside_compat():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == PACKAGE / "dicom" / "compat.py":
            continue
        text = path.read_text()
        for (owner, name), pattern in PATTERNS.items():
            for m in re.finditer(pattern, text):
                line = text.count("\n", 0, m.start()) + 1
                found.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {owner}.{name} ({m.group(0)!r})")
    assert not found, "pynetdicom internals outside pacsbridge/dicom/compat.py:\n" + "\n".join(found)


def test_the_patterns_find_what_they_are_for():
    # The grep above must be able to fail: each pattern matches the use that compat.py itself makes.
    text = (PACKAGE / "dicom" / "compat.py").read_text()
    missing = [f"{o}.{n}" for (o, n), p in PATTERNS.items() if not re.search(p, text)]
    assert not missing, f"patterns that do not even find compat.py's own use: {missing}"


def test_hooks_take_effect_on_a_real_association(tmp_path):
    from pacsbridge.dicom.fast_transport import (BoundedACSE, BoundedDIMSE, BoundedDUL, FastAssociationSocket,
                                                 TransportLimits)

    with running_receiver(tmp_path) as r:
        scp_ae = r.scp._server.ae
        assert r.scp._server in scp_ae._servers  # register_server: ae.shutdown() would see our listener
        assoc = scu_ae().associate("127.0.0.1", r.scp.port, ae_title="PACSBRIDGE")
        try:
            assert assoc.is_established
            [accepted] = [a for a in scp_ae.active_associations if a.is_acceptor]
            assert type(accepted.dul) is BoundedDUL and type(accepted.dul.socket) is FastAssociationSocket
            assert type(accepted.dimse) is BoundedDIMSE and type(accepted.acse) is BoundedACSE
            # The DUL thread runs our reactor (the target swap), which reads PDUs through read_pdu.
            assert accepted.dul._target == accepted.dul.run_reactor
            assert isinstance(compat.server_of(accepted).pb_limits, TransportLimits)
            assert isinstance(compat.raw_socket(accepted), socket.socket)
            assert assoc.send_c_echo().Status == 0x0000  # PDUs and a DIMSE message through the hooks
        finally:
            assoc.release()


def test_the_daemon_and_the_dicom_sender_set_the_process_values(tmp_path, monkeypatch):
    from pacsbridge.config import Settings
    from pacsbridge.daemon import Daemon
    from pacsbridge.forward.senders import DicomSender, ForwardContext

    expected = {"STORE_SEND_CHUNKED_DATASET": True, "STORE_RECV_CHUNKED_DATASET": False}
    for make in (lambda: Daemon(Settings(data_dir=str(tmp_path))), lambda: DicomSender(ForwardContext("X", tmp_path))):
        monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", False)
        monkeypatch.setattr(_config, "STORE_RECV_CHUNKED_DATASET", True)
        made = make()
        assert compat.process_settings() == expected, made
        engine = getattr(made, "engine", None)
        if engine is not None:
            engine.dispose()


def test_receiving_and_forwarding_in_one_process_with_the_values_set_once(tmp_path):
    """The forwarder sends an original file as its bytes and the Storage SCP of the same process keeps
    receiving (C-STOREs from another sender before and after), with pynetdicom's settings set once."""
    from forward_support import add_result, migrated_sessions
    from pacsbridge.config import Destination
    from pacsbridge.forward.forwarder import Forwarder
    from pacsbridge.forward.senders import ForwardContext
    from pacsbridge.store.models import Instance
    from pipeline_support import reuid, sample_file

    compat.configure_pynetdicom()
    before = compat.process_settings()
    src = reuid(sample_file("RG1_J2KR.dcm"), tmp_path / "in" / "a.dcm")
    other = [reuid(sample_file("RG1_UNCR.dcm"), tmp_path / "in" / f"b{i}.dcm") for i in range(2)]
    with running_receiver(tmp_path / "peer", allowed=("PACSBRIDGE", "TESTSCU")) as peer:
        assert send_datasets(peer.scp.port, [other[0]]) == [0x0000]
        sessions = migrated_sessions(tmp_path)
        dest = Destination(name="self", kind="dicom", host="127.0.0.1", port=peer.scp.port, ae_title="PACSBRIDGE",
                           objects=["images"], timeout_s=20)
        add_result(sessions, tmp_path / "spool", src, [dest])
        fwd = Forwarder(sessions, [dest], ForwardContext("PACSBRIDGE", tmp_path / "spool"))
        try:
            assert fwd.run_once() == {"sent": 1}
        finally:
            fwd.stop()
        assert send_datasets(peer.scp.port, [other[1]]) == [0x0000]
        assert compat.process_settings() == before  # nothing flipped a process-wide value while sending
        with peer.sessions() as s:
            got = {i.sop_instance_uid: i for i in s.scalars(select(Instance))}
        uids = [str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in (src, *other)]
        assert sorted(got) == sorted(uids)
        forwarded = got[uids[0]]
        assert forwarded.transfer_syntax_uid == "1.2.840.10008.1.2.4.90"  # not transcoded
        assert _dataset_bytes(peer.spool.path(forwarded.file_path)) == _dataset_bytes(src)


def _dataset_bytes(path: Path) -> bytes:
    """The data set after the file meta (what a C-STORE carries)."""
    from pydicom.filereader import _read_file_meta_info, read_preamble

    with open(path, "rb") as f:
        read_preamble(f, False)
        _read_file_meta_info(f)
        return f.read()


def test_stop_ends_a_connection_that_never_sent_a_request(tmp_path):
    # compat.end_idle (dul.socket, dul.to_user_queue): stopping does not wait out ARTIM or the grace period.
    import time

    with running_receiver(tmp_path, acse_timeout=60, stop_timeout=30) as r:
        probe = socket.create_connection(("127.0.0.1", r.port), timeout=30)
        try:
            deadline = time.monotonic() + 10
            while not r.scp._server.ae.active_associations:  # wait for its association thread
                assert time.monotonic() < deadline, "the probe's association thread never started"
                time.sleep(0.02)
            [waiting] = r.scp._server.ae.active_associations
            started = time.monotonic()
            r.scp.stop()
            took = time.monotonic() - started
            assert took < 10, f"stop took {took:.1f} s with an idle connection (ARTIM 60 s, grace 30 s)"
            waiting.join(10)
            assert not waiting.is_alive(), "the idle connection's thread still runs after stop (waits for ARTIM)"
            assert probe.recv(1) == b""  # closed on our side
        finally:
            probe.close()
