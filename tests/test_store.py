"""The MLflow store a command is given, checked before use (`kdray.store.check_store`): each wrong store is one
ConfigError naming it, at once; `kdray report` turns it into one line and exit code 2.

The server case connects to a closed port on 127.0.0.1 (loopback only)."""

from __future__ import annotations

import socket
import sqlite3
import time

import pytest

from kdray.errors import ConfigError
from kdray.store import TIMEOUT_S, check_store


def closed_port() -> int:
    with socket.socket() as s:  # bound, then closed: nothing listens there
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_good_stores_pass(tmp_path):
    db = tmp_path / "mlflow.db"
    check_store(f"sqlite:///{db}")  # a sweep creates it
    sqlite3.connect(db).execute("create table t (x)").connection.commit()
    check_store(f"sqlite:///{db}", must_exist=True)
    (tmp_path / "empty.db").touch()  # an empty file: SQLite makes a database of it
    check_store(f"sqlite:///{tmp_path / 'empty.db'}", must_exist=True)
    check_store(tmp_path.as_uri())


@pytest.mark.parametrize("uri, message", [
    ("foo://bar", "tracking URI foo://bar: not a store MLflow can open; expected sqlite:///PATH"),
    ("just-a-name", "tracking URI just-a-name: not a store MLflow can open"),
    ("sqlite://relative.db", "a SQLite store is sqlite:///PATH"),
    ("mysql+nosuchdriver://u@127.0.0.1/x", "its database driver is not installed (Python module nosuchdriver)"),
])
def test_each_wrong_store_is_one_config_error(uri, message):
    with pytest.raises(ConfigError) as err:
        check_store(uri)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_sqlite_paths_that_are_not_stores(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not a database")
    with pytest.raises(ConfigError, match=f"{text} is not a SQLite database"):
        check_store(f"sqlite:///{text}")
    with pytest.raises(ConfigError, match="is a directory; a SQLite store is a file"):
        check_store(f"sqlite:///{tmp_path}")
    with pytest.raises(ConfigError, match=f"no MLflow store at {tmp_path / 'missing.db'}"):
        check_store(f"sqlite:///{tmp_path / 'missing.db'}", must_exist=True)


def test_a_database_url_without_its_driver_says_which_module(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec  # the PostgreSQL drivers hidden, whether or not this machine has one
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("psycopg2", "psycopg") else real(name, *a))
    with pytest.raises(ConfigError, match=r"driver is not installed \(Python module psycopg2 or psycopg\)"):
        check_store("postgresql://u@127.0.0.1:1/x")


def test_a_server_that_does_not_answer_fails_within_the_timeout():
    uri = f"http://127.0.0.1:{closed_port()}"
    start = time.monotonic()
    with pytest.raises(ConfigError, match=f"tracking URI {uri}: no MLflow server answers there"):
        check_store(uri)
    assert time.monotonic() - start < TIMEOUT_S + 5


@pytest.mark.parametrize("uri", ["foo://bar", "sqlite:///{tmp}/notes.txt", "http://127.0.0.1:{port}"])
def test_kdray_report_says_a_wrong_store_in_one_line(uri, tmp_path, capsys):
    from kdray.cli import run_main
    from kdray.report import main

    (tmp_path / "notes.txt").write_text("not a database")
    uri = uri.format(tmp=tmp_path, port=closed_port())
    with pytest.raises(SystemExit) as exit_info:
        run_main(main, ["--experiment", "demo", "--tracking-uri", uri])
    err = capsys.readouterr().err.splitlines()
    assert exit_info.value.code == 2 and err[-1].startswith("error: ") and "Traceback" not in "\n".join(err)
    assert len(err) <= 2  # the store it reads, then the error
