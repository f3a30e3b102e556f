"""The command line: options and overrides in any order, the `kdray` dispatcher, the demo defaults, tracking
URIs, and float values in scientific notation. Fast: nothing is trained and Ray is not started."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import kdray.teacher
import kdray.train
from kdray import __main__ as dispatcher
from kdray.cli import default_job, job_parser
from kdray.config import load_job
from kdray.config.loading import float_literal
from kdray.contract import resolve_tracking_uri
from kdray.errors import ConfigError
from kdray.sweep import default_space

REPO = Path(__file__).resolve().parents[1]


class Parsed(Exception):
    """Raised by a stand-in for what a command calls right after parsing: stops it there."""


def _stop(*args, **kwargs):
    raise Parsed(args, kwargs)


# --- 1. overrides may stand before, between and after the options


def test_job_parser_takes_overrides_on_both_sides_of_options():
    parser = job_parser("test", "")
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(["a.b=1", "--job", "J", "c=2", "--dry-run", "d.e=[1, 2]"])
    assert args.job == "J" and args.dry_run and args.overrides == ["a.b=1", "c=2", "d.e=[1, 2]"]
    assert parser.parse_args([]).overrides == []


@pytest.mark.parametrize("command", [kdray.train, kdray.teacher])
def test_train_and_teacher_take_overrides_after_an_option(command, monkeypatch):
    monkeypatch.setattr(command, "load_job", _stop)
    flag = "--dry-run" if command is kdray.train else "--force"
    with pytest.raises(Parsed) as stopped:
        command.main(["--job", "J", "optim.lr=0.1", flag, "optim.iterations=10"])
    assert stopped.value.args[0] == ("J", ["optim.lr=0.1", "optim.iterations=10"])


def test_sweep_takes_overrides_after_an_option(monkeypatch):
    import kdray.orchestration.sweep as orchestration
    import kdray.sweep

    monkeypatch.setattr(orchestration, "dry_run", _stop)
    with pytest.raises(Parsed) as stopped:
        kdray.sweep.main(["optim.lr=0.1", "--dry-run", "optim.iterations=10", "--smoke-test", "x=y"])
    request = stopped.value.args[0][0]
    assert request.overrides == ["optim.lr=0.1", "optim.iterations=10", "x=y"]
    assert request.dry_run and request.smoke_test and request.job_path == default_job()


def test_unknown_option_is_still_refused(capsys):
    with pytest.raises(SystemExit) as exited:
        kdray.train.main(["optim.lr=0.1", "--dry-rn"])
    assert exited.value.code == 2 and "unrecognized arguments: --dry-rn" in capsys.readouterr().err


# --- 3. the `kdray` command


def test_kdray_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as exited:
        dispatcher.main(["--help"])
    out = capsys.readouterr().out
    assert exited.value.code == 0
    for name in ("sweep", "train", "teacher", "report", "evaluate"):
        assert f"\n  {name} " in out


@pytest.mark.parametrize("argv", [["swep"], ["--job", "x.yaml"], []])
def test_kdray_unknown_or_missing_command_exits_2(argv, capsys):
    with pytest.raises(SystemExit) as exited:
        dispatcher.main(argv)
    err = capsys.readouterr().err
    assert exited.value.code == 2
    if argv:
        assert err.strip().splitlines() == [f"kdray: error: unknown command {argv[0]!r}; valid commands: sweep, "
                                            "train, teacher, report, evaluate (see kdray --help)"]
    else:
        assert err.startswith("usage: kdray {sweep,train,teacher,report,evaluate}")


@pytest.mark.parametrize("name", ["sweep", "train", "teacher", "report", "evaluate"])
def test_kdray_subcommand_help_shows_the_module_form(name, capsys):
    with pytest.raises(SystemExit) as exited:
        dispatcher.main([name, "--help"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: python -m kdray.{name} ")


def test_python_m_kdray_runs_a_command_and_maps_errors_to_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "kdray", "train", "--dry-run", "optim.lr=-1"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: optim.lr: got -1.0; must be > 0"]


# --- 4. the demo job and space come with the package


def test_demo_defaults_are_package_files_and_the_source_tree_links_to_them(monkeypatch, tmp_path):
    package = Path(kdray.__file__).resolve().parent / "demo"
    assert Path(default_job()) == package / "job.yaml" and Path(default_space()) == package / "space.yaml"
    assert (REPO / "jobs" / "demo.yaml").samefile(default_job())
    assert (REPO / "search_spaces" / "demo.yaml").samefile(default_space())
    monkeypatch.chdir(tmp_path)  # any directory: nothing is read from the working directory
    assert load_job(default_job()).name == "demo"
    assert yaml.safe_load(Path(default_space()).read_text())["name"] == "demo"


# --- 2. tracking URIs: a bare path is a SQLite file or a one-line error, never MLflow's traceback


def test_bare_db_path_and_relative_sqlite_become_absolute_sqlite_uris(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri("runs.db") == f"sqlite:///{tmp_path.resolve() / 'runs.db'}"
    assert resolve_tracking_uri("sqlite:///m.db") == f"sqlite:///{tmp_path.resolve() / 'm.db'}"
    assert resolve_tracking_uri(None) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert resolve_tracking_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "env.db")
    assert resolve_tracking_uri(None) == f"sqlite:///{tmp_path.resolve() / 'env.db'}"


def test_bare_db_path_makes_a_working_store(tmp_path):
    from kdray.orchestration.tracking import Tracker

    tracker = Tracker(resolve_tracking_uri(str(tmp_path / "store.db")), "x")
    run = tracker.start_run("r", {})
    tracker.client.log_metric(run, "m", 1.0)
    assert (tmp_path / "store.db").is_file()


@pytest.mark.parametrize("uri", ["./mlruns", "mlruns", "file:./mlruns"])
def test_file_store_is_a_one_line_config_error(uri, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    with pytest.raises(ConfigError) as err:
        resolve_tracking_uri(uri)
    message = str(err.value)
    assert "\n" not in message and repr(uri) in message and "MLflow 3" in message
    assert f"sqlite:///{tmp_path.resolve() / 'mlruns' / 'mlflow.db'}" in message


def test_file_store_from_the_environment_is_a_config_error(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", str(tmp_path / "mlruns"))
    with pytest.raises(ConfigError, match=r"\$MLFLOW_TRACKING_URI"):
        resolve_tracking_uri(None)


def test_file_store_opted_in_is_passed_on_as_a_file_uri(monkeypatch, tmp_path):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = resolve_tracking_uri(str(tmp_path / "mlruns"))
    assert uri == (tmp_path / "mlruns").resolve().as_uri()
    MlflowClient(tracking_uri=uri).create_experiment("x")  # MLflow accepts it with the opt-in


def test_report_reads_the_same_default_store_as_the_sweep(monkeypatch, tmp_path):
    from kdray.reporting import default_tracking_uri

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert default_tracking_uri() == resolve_tracking_uri(None)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///rel.db")
    assert default_tracking_uri() == resolve_tracking_uri(None) == f"sqlite:///{tmp_path.resolve() / 'rel.db'}"


def test_report_with_a_bare_directory_exits_2_with_one_error_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "kdray", "report", "--experiment", "demo", "--tracking-uri",
                           "./mlruns", "--no-plots"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**_env_without("MLFLOW_ALLOW_FILE_STORE")})
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    error = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and error[0].startswith("error: tracking URI './mlruns'") and "sqlite:///" in error[0]


def _env_without(name: str) -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k != name}


# --- 6. scientific notation (a string in YAML 1.1) for float keys


@pytest.mark.parametrize("text, value", [("1e-4", 1e-4), ("1E5", 1e5), ("-2e-3", -2e-3), ("+1.5e3", 1.5e3),
                                         (".5e1", 5.0), ("2.e-1", 0.2)])
def test_float_literal(text, value):
    assert float_literal(text) == value


@pytest.mark.parametrize("text", ["abc", "1e", "e5", "inf", "nan", "1_000e1", "0.5", "1e-4x", ""])
def test_float_literal_refuses_anything_else(text):
    assert float_literal(text) is None


def test_float_key_takes_scientific_notation_from_overrides_and_files(tmp_path):
    job = load_job(default_job(), ["optim.lr=1e-4", "optim.weight_decay=5E-4",
                                   "data.normalize.mean=[1e-1, 2e-1, 3e-1]"])
    assert job.optim.lr == 1e-4 and job.optim.weight_decay == 5e-4 and job.data.normalize.mean == (0.1, 0.2, 0.3)
    data = yaml.safe_load(Path(default_job()).read_text())
    data["optim"]["lr"] = "1e-4"  # what PyYAML makes of `lr: 1e-4`
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(data).replace("'1e-4'", "1e-4"))
    assert "lr: 1e-4\n" in path.read_text() and isinstance(yaml.safe_load(path.read_text())["optim"]["lr"], str)
    assert load_job(path).optim.lr == 1e-4


def test_scientific_notation_stays_refused_for_integer_keys_and_a_string_for_string_keys():
    with pytest.raises(ConfigError, match=r"^optim.iterations: got '1e3'; expected an integer$"):
        load_job(default_job(), ["optim.iterations=1e3"])
    with pytest.raises(ConfigError, match=r"^optim.lr: got 'fast'; expected a number$"):
        load_job(default_job(), ["optim.lr=fast"])
    assert load_job(default_job(), ["name=1e-4"]).name == "1e-4"
