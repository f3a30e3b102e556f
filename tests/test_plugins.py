"""Plugins: a user's losses in files outside the package, imported by the jobs that name them."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kdray.config import job_from_dict, to_dict
from kdray.errors import ConfigError
from kdray.losses import LOSSES
from kdray.plugins import import_plugins, module_name, read_sources, resolve_entries

REPO = Path(__file__).resolve().parents[1]


def plugin_source(name: str, label: str = "MINE") -> str:
    return textwrap.dedent(f'''
        from dataclasses import dataclass

        from torch import nn

        from kdray.losses import STUDENT_LOGITS, TEACHER_LOGITS, LossConfig, option, register_loss


        @dataclass
        class Config(LossConfig):
            scale: float = option(1.0, above=0)


        @register_loss("{name}", config=Config, label="{label}",
                       reads={{"student_logits": STUDENT_LOGITS, "teacher_logits": TEACHER_LOGITS}})
        class Loss(nn.Module):
            def __init__(self, scale=1.0):
                super().__init__()
                self.scale = scale

            def forward(self, student_logits, teacher_logits):
                return self.scale * (student_logits - teacher_logits.detach()).square().mean()
    ''')


@pytest.fixture
def plugin_file(tmp_path, request):
    """A plugin file registering a loss with a name unique to the test; unregistered afterwards."""
    name = "plug_" + request.node.name.replace("[", "_").replace("]", "").replace("-", "_")[:40]
    path = tmp_path / "my_loss.py"
    path.write_text(plugin_source(name))
    yield path, name
    LOSSES.pop(name, None)


def test_a_plugin_loss_is_a_section_of_the_job_with_its_options_checked(plugin_file):
    path, name = plugin_file
    job = job_from_dict({"plugins": [str(path)]}, [f"losses.{name}.enabled=true", f"losses.{name}.scale=2.5"])
    assert getattr(job.losses, name).scale == 2.5 and job.distills
    assert job.plugins == (str(path.resolve()),)
    assert to_dict(job)["losses"][name] == {"enabled": True, "weight": 1.0, "scale": 2.5}
    with pytest.raises(ConfigError, match=rf"losses.{name}.scale: got -1.0; must be > 0"):
        job_from_dict({"plugins": [str(path)]}, [f"losses.{name}.scale=-1"])
    with pytest.raises(ConfigError, match=rf"losses.{name}.scal: unknown key \(did you mean 'scale'\?\)"):
        job_from_dict({"plugins": [str(path)]}, [f"losses.{name}.scal=1"])


def test_a_relative_plugin_path_is_resolved_against_the_working_directory(plugin_file, monkeypatch):
    path, name = plugin_file
    monkeypatch.chdir(path.parent)
    job = job_from_dict({}, ["plugins=[my_loss.py]", f"losses.{name}.enabled=true"])
    assert job.plugins == (str(path.resolve()),)


def test_importing_a_plugin_twice_registers_it_once(plugin_file):
    path, name = plugin_file
    entries = resolve_entries([str(path)])
    import_plugins(entries)
    spec = LOSSES[name]
    import_plugins(entries)
    assert LOSSES[name] is spec


def test_a_worker_without_the_file_imports_the_shipped_text(plugin_file, tmp_path):
    """On a cluster node the user's file is absent: the text shipped with the trial is imported, under the
    name the driver used (so the same class is registered everywhere)."""
    path, name = plugin_file
    entries = resolve_entries([str(path)])
    sources = read_sources(entries)
    assert sources == {str(path.resolve()): path.read_text()}
    code = textwrap.dedent(f"""
        import json, sys
        from kdray.plugins import import_plugins
        from kdray.losses import LOSSES
        import_plugins({list(entries)!r}, {sources!r})
        print(LOSSES[{name!r}].module.__module__)
    """)
    path.rename(tmp_path / "moved.py")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == module_name(path.resolve(), sources[str(path.resolve())])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("x = = 1\n", r"plugins: .*bad\.py: SyntaxError: invalid syntax \(line 1\)$"),
        ("import torch\n\nraise RuntimeError('no GPU here')\n",
         r"plugins: .*bad\.py: RuntimeError: no GPU here \(line 3\)$"),
        ("from kdray.losses import register_loss, LossConfig\nfrom torch import nn\n"
         "@register_loss('kd', config=LossConfig, label='X', reads={})\nclass Mine(nn.Module):\n    pass\n",
         r"plugins: .*bad\.py: ConfigError: register_loss: the loss name 'kd' is taken by kdray.losses.kd.PixelwiseKD"),
    ],
)
def test_a_broken_plugin_stops_the_command_with_one_line(tmp_path, text, message):
    bad = tmp_path / "bad.py"
    bad.write_text(text)
    with pytest.raises(ConfigError, match=message) as err:
        job_from_dict({"plugins": [str(bad)]})
    assert "\n" not in str(err.value)
    assert LOSSES["kd"].module.__name__ == "PixelwiseKD"


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        (["missing.py"], r"plugins: .*missing\.py: no such file"),
        (["no_such_kdray_plugin_module"], r"plugins: module no_such_kdray_plugin_module: ModuleNotFoundError"),
        ("my_loss.py", r"plugins: got 'my_loss.py'; expected a list"),
        ([3], r"plugins\[0\]: got 3; expected a Python file"),
    ],
)
def test_bad_plugin_entries_are_named(entries, message):
    with pytest.raises(ConfigError, match=message):
        job_from_dict({"plugins": entries})


def test_the_command_line_refuses_a_broken_plugin_before_any_compute(tmp_path):
    bad = tmp_path / "broken.py"
    bad.write_text("import torch\nundefined_name\n")
    proc = subprocess.run([sys.executable, "-m", "kdray.train", f"plugins=[{bad}]", "--dry-run"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: plugins: {bad}: NameError: name 'undefined_name' is not defined (line 2)"]


def test_the_example_plugin_runs_in_a_dry_run_sweep_plan(tmp_path):
    """The README's example: the search space over the plugin loss's options is planned from a job naming it."""
    proc = subprocess.run(
        [sys.executable, "-m", "kdray.sweep", "--job", str(REPO / "jobs/demo.yaml"),
         "--space", str(REPO / "examples/custom_loss/search_space.yaml"),
         f"plugins=[{REPO / 'examples/custom_loss/probability_mse.py'}]", "--dry-run",
         f"run.output_dir={tmp_path / 'runs'}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"],
        capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "losses.prob_mse.weight: loguniform [0.1, 10.0]" in proc.stdout
