"""What a wheel of kdray holds and declares: its dependencies, the `kdray` command, the demo files.

The slow tests build a wheel and install it outside the source tree; the installed command checks the packaged
demo sweep whole (`--dry-run`), and (`-m long`, inside ../shared/bin/loopback-only: it starts a local Ray) runs one
distillation trial of the demo job from an empty directory.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
from packaging.requirements import Requirement

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest brings tomli there
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
# import name -> distribution name, where they differ
DISTRIBUTIONS = {"PIL": "pillow", "yaml": "pyyaml"}
# the demo sweep's smoke test, smaller still (as tests/test_sweep.py's TINY)
TINY = ["data.crop=[32, 32]", "data.synthetic.image_size=32", "data.synthetic.train_length=64",
        "data.synthetic.val_length=8", "data.batch_size=4", "data.eval_batch_size=8",
        "optim.iterations=4", "optim.eval_interval=2", "optim.log_interval=2", "teacher.width=0.125",
        "teacher.arch=deeplabv3_resnet18", "teacher.iterations=2"]


def declared() -> dict[str, Requirement]:
    reqs = [Requirement(r) for r in PYPROJECT["project"]["dependencies"]]
    return {r.name.lower(): r for r in reqs}


def imported_distributions() -> set[str]:
    """Every third-party top-level module imported anywhere in kdray/, as distribution names."""
    names = set()
    for path in (REPO / "kdray").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    third_party = names - set(sys.stdlib_module_names) - {"kdray", "__future__"}
    return {DISTRIBUTIONS.get(n, n).lower() for n in third_party}


def test_every_imported_package_is_declared():
    assert imported_distributions() - set(declared()) == set()


def test_installed_versions_satisfy_the_declared_ranges():
    """The ranges' lower ends are the versions the tests run against: they must hold here."""
    for name, req in declared().items():
        assert req.specifier.contains(version(name), prereleases=True), f"{name} {version(name)} not in {req}"


@pytest.mark.parametrize("name, major", [("optuna", 6), ("mlflow", 4), ("ray", 3)])
def test_tracked_dependencies_stop_before_the_next_major(name, major):
    req = declared()[name]
    assert not req.specifier.contains(f"{major}.0") and req.specifier.contains(version(name))


def test_kdray_command_and_demo_data_are_declared():
    assert PYPROJECT["project"]["scripts"] == {"kdray": "kdray.__main__:main"}
    patterns = PYPROJECT["tool"]["setuptools"]["package-data"]["kdray"]
    demo = sorted(p.relative_to(REPO / "kdray").as_posix() for p in (REPO / "kdray" / "demo").iterdir())
    assert demo == ["demo/job.yaml", "demo/space.yaml"]
    assert all(any(Path(d).match(p) for p in patterns) for d in demo)
    assert (REPO / "jobs" / "demo.yaml").is_symlink() and (REPO / "search_spaces" / "demo.yaml").is_symlink()


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """kdray built as a wheel and installed into a folder of its own: (the installed `kdray` command, an empty
    working directory, the environment that imports the installed copy)."""
    tmp_path = tmp_path_factory.mktemp("wheel")
    # Build from a copy of the files a wheel is made of, so the build leaves nothing in the source tree.
    source = tmp_path / "source"
    source.mkdir()
    shutil.copytree(REPO / "kdray", source / "kdray", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    wheels, target, work = tmp_path / "wheels", tmp_path / "site", tmp_path / "work"
    work.mkdir()
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(source)],
                   check=True, capture_output=True, timeout=300)
    (wheel,) = wheels.glob("kdray-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], check=True,
                   capture_output=True, timeout=300)
    # PYTHONPATH comes before site-packages and before the editable install's finder (appended to
    # sys.meta_path), so the installed copy is the one imported, by this process and by Ray's workers.
    env = {**os.environ, "PYTHONPATH": str(target)}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_ADDRESS", None)
    where = subprocess.run([sys.executable, "-c", "import kdray.cli as c, kdray.sweep as s; print(c.__file__); "
                            "print(c.default_job()); print(s.default_space())"],
                           cwd=work, env=env, capture_output=True, text=True, check=True, timeout=120)
    files = [Path(p) for p in where.stdout.split()]
    assert all(p.is_relative_to(target) for p in files) and all(p.is_file() for p in files[1:]), files
    return str(target / "bin" / "kdray"), work, env


@pytest.mark.slow
def test_the_installed_command_reads_and_checks_the_packaged_demo_sweep(installed):
    kdray, work, env = installed
    dry = subprocess.run([kdray, "sweep", "--dry-run", "--smoke-test"], cwd=work, env=env, capture_output=True,
                         text=True, timeout=300)
    assert dry.returncode == 0, dry.stdout[-3000:] + dry.stderr[-3000:]
    assert "space demo (search)" in dry.stdout and "nothing was started" in dry.stdout


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.long
def test_the_installed_command_runs_a_sweep_from_an_empty_directory(installed):
    from mlflow.tracking import MlflowClient

    from kdray import contract

    kdray, work, env = installed
    # one distillation trial of the demo job on Ray, and the CE-only row the sweep adds: their workers import the
    # installed copy (the demo teacher is trained first)
    space = work / "one.yaml"
    space.write_text("name: packaged\nseeds: [0]\nrows:\n  - {name: KD, set: {losses.kd.enabled: true}}\n")
    proc = subprocess.run([kdray, "sweep", "--smoke-test", "--space", str(space), *TINY], cwd=work, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (state,) = (work / "runs" / "demo" / "sweeps").glob("sweep-*/kdray_sweep.json")
    state = json.loads(state.read_text())
    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("demo").experiment_id
    trials = client.search_runs([experiment], f"tags.`{contract.SWEEP_ID}` = '{state['sweep_id']}' and "
                                              f"tags.`{contract.KIND}` = 'trial'")
    assert sorted((r.data.tags[contract.METHOD], r.info.status) for r in trials) == [("CE", "FINISHED"),
                                                                                      ("KD", "FINISHED")]
    (kd,) = (r for r in trials if r.data.tags[contract.METHOD] == "KD")
    assert client.get_metric_history(kd.info.run_id, "train/loss/kd")
