"""What an operator sees when something around pacsbridge is wrong: one clear line, a non-zero exit, no
traceback; read-only commands never create a database; list settings and paths in config files."""

from __future__ import annotations

import json
import socket
import subprocess

import pytest

from dicom_support import daemon_env, free_port, make_image, pacsbridge_cmd, send_datasets, wait_for_port
from pacsbridge.config import ConfigError, load_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    import os

    for key in list(os.environ):
        if key.startswith("PACSBRIDGE_"):
            monkeypatch.delenv(key)


def run(*args: str, env: dict, cwd=None, timeout: float = 120) -> subprocess.CompletedProcess:  # noqa: ANN001
    return subprocess.run(pacsbridge_cmd(*args), env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def one_clear_line(res: subprocess.CompletedProcess, *words: str) -> str:
    assert res.returncode != 0
    assert "Traceback" not in res.stderr, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.startswith("pacsbridge")]
    assert lines, res.stderr
    for word in words:
        assert word in lines[-1], lines[-1]
    return lines[-1]


def test_busy_dicom_port(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        res = run("serve", env=daemon_env(tmp_path / "data", port))
    one_clear_line(res, "cannot start", f"127.0.0.1:{port}", "in use")
    assert res.returncode == 1


def test_busy_http_port(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        http_port = busy.getsockname()[1]
        res = run("serve", env=daemon_env(tmp_path / "data", free_port(), PACSBRIDGE_HTTP_PORT=str(http_port)))
    one_clear_line(res, "cannot start", "http", str(http_port))


def test_unreachable_database(tmp_path):
    dead = free_port()
    env = daemon_env(tmp_path / "data", free_port(),
                     PACSBRIDGE_DATABASE_URL=f"postgresql+psycopg2://postgres@127.0.0.1:{dead}/nothing")
    one_clear_line(run("serve", env=env), "cannot use the database", f"127.0.0.1:{dead}")
    one_clear_line(run("status", env=env), "cannot read the database")
    one_clear_line(run("worklist", env=env), "cannot read the database")
    one_clear_line(run("db", "upgrade", env=env), "database")
    one_clear_line(run("worker", env=env), "cannot use the database")


def test_data_dir_that_cannot_be_created_or_written(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    env = daemon_env(blocker / "data", free_port())
    one_clear_line(run("serve", env=env), "cannot start", "data_dir")
    # A data dir whose spool cannot be made (spool is a file)
    data = tmp_path / "data2"
    data.mkdir()
    (data / "spool").write_text("in the way")
    one_clear_line(run("serve", env=daemon_env(data, free_port())), "spool")


def test_status_elsewhere_creates_nothing_and_says_where_it_looked(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in daemon_env(tmp_path, 1).items() if k != "PACSBRIDGE_DATA_DIR"}
    for command in (["status"], ["worklist"], ["db", "current"]):
        line = one_clear_line(run(*command, env=env, cwd=elsewhere), "no pacsbridge database", str(elsewhere))
        assert "--config" in line
    assert list(elsewhere.iterdir()) == []  # no ./var


READ_COMMANDS = [["outbox", "list"], ["instances"], ["worklist"], ["events"], ["stats"], ["status"],
                 ["users", "list"], ["db", "current"]]


@pytest.mark.parametrize("command", READ_COMMANDS, ids=" ".join)
def test_read_commands_in_an_empty_folder_exit_1_with_one_line_and_create_nothing(tmp_path, command):
    env = {k: v for k, v in daemon_env(tmp_path, 1).items() if k != "PACSBRIDGE_DATA_DIR"}
    res = run(*command, env=env, cwd=tmp_path)
    assert res.returncode == 1, res.stderr
    assert res.stderr.count("\n") == 1 and res.stdout == "", res.stderr
    assert res.stderr.startswith(f"pacsbridge {' '.join(command)}: no pacsbridge database"), res.stderr
    assert list(tmp_path.iterdir()) == []  # no ./var, no database file


@pytest.mark.parametrize("command,words", [
    (["outbox", "retry"], "give entry IDs or --all-dead"),
    (["instances", "retry"], "give instance IDs or --all-failed"),
])
def test_retry_without_ids_is_a_usage_error(tmp_path, command, words):
    res = run(*command, env=daemon_env(tmp_path, 1), cwd=tmp_path)
    assert res.returncode == 2 and res.stderr == f"pacsbridge {' '.join(command)}: {words}\n"


def test_unmigrated_database(tmp_path):
    (tmp_path / "pacsbridge.db").write_bytes(b"")  # exists, empty: never migrated
    env = daemon_env(tmp_path, free_port())
    one_clear_line(run("status", env=env), "schema revision none", "db upgrade")
    one_clear_line(run("worklist", env=env), "schema revision none")


def test_relative_data_dir_in_a_config_file_is_relative_to_the_file(tmp_path):
    """serve started in one directory, status run from another with the same --config: same data."""
    conf_dir = tmp_path / "etc"
    conf_dir.mkdir()
    port = free_port()
    cfg = conf_dir / "pacsbridge.toml"
    cfg.write_text(f'data_dir = "data"\ndicom_port = {port}\nhttp_port = 0\ndicom_host = "127.0.0.1"\n'
                   "worker_enabled = false\n")
    env = {k: v for k, v in daemon_env(tmp_path, port).items() if not k.startswith("PACSBRIDGE_")}
    run_dir, other = tmp_path / "run", tmp_path / "other"
    run_dir.mkdir()
    other.mkdir()
    proc = subprocess.Popen(pacsbridge_cmd("--config", str(cfg), "serve"), env=env, cwd=run_dir,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, 90, proc)
        assert send_datasets(port, [make_image()]) == [0]
    finally:
        proc.terminate()
        proc.wait(60)
    assert (conf_dir / "data" / "pacsbridge.db").is_file() and not (run_dir / "data").exists()
    res = run("--config", str(cfg), "status", "--json", env=env, cwd=other)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["instances"]["received"] == 1
    assert list(other.iterdir()) == []


def test_list_settings_toml_string_is_an_error_env_list_formats(tmp_path, monkeypatch):
    cfg = tmp_path / "pb.toml"
    cfg.write_text('allowed_calling_aes = "PACS1"\n')
    with pytest.raises(ConfigError, match=r'allowed_calling_aes.*must be a TOML list.*\["PACS1", "CR_ROOM2"\]'):
        load_settings(cfg)
    monkeypatch.setenv("PACSBRIDGE_ALLOWED_CALLING_AES", '["PACS1", "CR,ROOM"]')  # JSON keeps a comma in a title
    assert load_settings().allowed_calling_aes == ["PACS1", "CR,ROOM"]
    monkeypatch.setenv("PACSBRIDGE_ALLOWED_CALLING_AES", '["PACS1", "CR_ROOM2"]')
    assert load_settings().allowed_calling_aes == ["PACS1", "CR_ROOM2"]
    monkeypatch.setenv("PACSBRIDGE_ALLOWED_CALLING_AES", "PACS1")
    assert load_settings().allowed_calling_aes == ["PACS1"]
    monkeypatch.setenv("PACSBRIDGE_ALLOWED_CALLING_AES", "[not json")
    with pytest.raises(ConfigError, match="not a JSON list"):
        load_settings()


def test_max_pdu_zero_is_refused():
    with pytest.raises(ConfigError, match="max_pdu"):
        load_settings(max_pdu=0)


def test_pydicom_warnings_go_to_debug_and_one_warning_line_per_rejected_instance(tmp_path):
    port = free_port()
    env = daemon_env(tmp_path / "data", port)
    proc = subprocess.Popen(pacsbridge_cmd("serve"), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        wait_for_port(port, 90, proc)
        bad = make_image()
        bad.StudyInstanceUID = "1.2.3.abc"  # pydicom warns about the UI value
        assert send_datasets(port, [bad]) == [0xC001]
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=60)
    warnings = [line for line in out.splitlines() if " WARNING " in line and "allowed_calling_aes" not in line
                    and "no AE title is bound" not in line]  # the start-up warnings about open access
    assert len(warnings) == 1 and "rejected C-STORE" in warnings[0], warnings
    assert "Invalid value for VR UI" not in out and "UserWarning" not in out
