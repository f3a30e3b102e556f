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


LOSS_HEADER = ("from dataclasses import dataclass\nfrom torch import nn\n"
               "from kdray.losses import STUDENT_LOGITS, TEACHER_LOGITS, StepInput, LossConfig, register_loss\n")


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("@dataclass\nclass C(LossConfig):\n    pass\n"
         "@register_loss('typo_in', config=C, label='T1', reads={'z': StepInput('teacher.logit')})\n"
         "class L(nn.Module):\n    def forward(self, z):\n        return z.mean()\n",
         r"step input 'teacher.logit': not a tensor of the step \(did you mean teacher.logits\?\); valid: "),
        ("@dataclass\nclass C(LossConfig):\n    pass\n"
         "@register_loss('wrong_arg', config=C, label='T2', reads={'teacher': TEACHER_LOGITS})\n"
         "class L(nn.Module):\n    def forward(self, student_logits, teacher_logits):\n        return 0\n",
         r"losses.wrong_arg: reads names the argument 'teacher', but L.forward takes student_logits, "
         r"teacher_logits"),
        ("class C(LossConfig):\n    temperature: float = 2.0\n"
         "@register_loss('no_dc', config=C, label='T3', reads={'z': STUDENT_LOGITS})\n"
         "class L(nn.Module):\n    def forward(self, z):\n        return z.mean()\n",
         r"register_loss\('no_dc'\): C needs @dataclass"),
        ("@dataclass\nclass C(LossConfig):\n    pass\n"
         "@register_loss('mykd', config=C, label='KD', reads={'z': STUDENT_LOGITS})\n"
         "class L(nn.Module):\n    def forward(self, z):\n        return z.mean()\n",
         r"register_loss\('mykd'\): the label 'KD' is taken by the loss 'kd'"),
        ("x = 1\n", r"registered no loss and no dataset"),
    ],
)
def test_a_plugin_that_breaks_the_loss_contract_is_refused_when_imported(tmp_path, body, message):
    bad = tmp_path / "bad_loss.py"
    bad.write_text(LOSS_HEADER + body)
    with pytest.raises(ConfigError, match=message) as err:
        job_from_dict({"plugins": [str(bad)]})
    assert "\n" not in str(err.value)
    for name in ("typo_in", "wrong_arg", "no_dc", "mykd"):
        assert name not in LOSSES


def test_a_folder_given_as_a_plugin_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"plugins: .*: a folder; name the Python file"):
        job_from_dict({"plugins": [str(tmp_path) + "/"]})


def test_an_unknown_loss_key_points_at_plugins():
    with pytest.raises(ConfigError, match=r"losses.hint: unknown key; valid keys here: ce, kd, .*; a loss of your "
                                          r"own comes in by naming its file under `plugins`"):
        job_from_dict({}, ["losses.hint.enabled=true"])


def test_a_loss_whose_forward_fails_stops_the_dry_run(tmp_path, teacher_file):
    """The pre-flight check runs in --dry-run (and before a sweep starts Ray), on stand-in outputs."""
    bad = tmp_path / "boom.py"
    bad.write_text(LOSS_HEADER + "import torch\n\n@dataclass\nclass C(LossConfig):\n    pass\n"
                   "@register_loss('boom', config=C, label='BOOM', reads={'z': STUDENT_LOGITS})\n"
                   "class L(nn.Module):\n    def __init__(self):\n        super().__init__()\n"
                   "        self.conv = nn.Conv2d(7, 9, 1)\n"
                   "    def forward(self, z):\n        return self.conv(z).mean()\n")
    proc = subprocess.run([sys.executable, "-m", "kdray.train", "--job", str(REPO / "jobs/demo.yaml"), "--dry-run",
                           f"plugins=[{bad}]", "losses.boom.enabled=true", f"teacher.checkpoint={teacher_file}",
                           "teacher.width=0.125"], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: losses.boom: cannot run on student.logits (16, 8, 8, 8)")
    assert "expected input[16, 8, 8, 8] to have 7 channels" in proc.stderr


def test_a_dataset_plugin_leaves_the_teacher_and_job_keys_of_other_datasets_alone(tmp_path):
    from kdray.config import job_hash
    from kdray.config.cache import teacher_key

    plugin = tmp_path / "only_data.py"
    plugin.write_text(
        "from dataclasses import dataclass\nimport torch\nfrom torch.utils.data import Dataset\n"
        "from kdray.config.options import option\nfrom kdray.data import register_dataset\n\n"
        "@dataclass\nclass O:\n    length: int = option(20, at_least=1)\n\n"
        "@register_dataset('keys_only_ds', class_names=('a', 'b'), paper_splits=('train', 'val'), "
        "splits=('train', 'val'), options=O, needs_root=False, image_size=(32, 32), build=lambda r: D())\n"
        "class D(Dataset):\n    def __len__(self):\n        return 4\n"
        "    def __getitem__(self, i):\n        return torch.zeros(3, 32, 32), torch.zeros(32, 32)\n")
    data = {"data": {"dataset": "synthetic"}, "losses": {"kd": {"enabled": True}}}
    before = job_from_dict(data)
    try:
        after = job_from_dict({**data, "plugins": [str(plugin)]})
        assert hasattr(after.data, "keys_only_ds")
        assert (teacher_key(after), job_hash(after)) == (teacher_key(before), job_hash(before))
    finally:
        from kdray.data.registry import DATASETS

        DATASETS.pop("keys_only_ds", None)


def test_check_data_reads_every_mask_of_a_plugin_dataset(tmp_path):
    plugin = tmp_path / "bad_masks.py"
    plugin.write_text(
        "from dataclasses import dataclass\nimport torch\nfrom torch.utils.data import Dataset\n"
        "from kdray.data import register_dataset\n\n"
        "@register_dataset('bad_mask_ds', class_names=('a', 'b'), paper_splits=('train', 'val'), "
        "splits=('train', 'val'), needs_root=False, image_size=(32, 32), build=lambda r: D())\n"
        "class D(Dataset):\n    def __len__(self):\n        return 20\n"
        "    def __getitem__(self, i):\n"
        "        return torch.zeros(3, 32, 32, dtype=torch.uint8), torch.full((32, 32), 5 if i == 7 else 1)\n")
    proc = subprocess.run([sys.executable, "-m", "kdray.train", "--dry-run", "--check-data", f"plugins=[{plugin}]",
                           "data.dataset=bad_mask_ds", "data.num_classes=2", "data.crop=[32,32]",
                           "data.batch_size=4"], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == ("error: bad_mask_ds train item 7: mask value 5 is outside 0..1 "
                                                    "(K = 2) and is not data.ignore_index=255")


def test_a_space_key_of_an_unloaded_plugin_points_at_plugins(tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("name: x\nseeds: [0]\nrows:\n  - name: a\n    set: {losses.hint.enabled: true}\n")
    proc = subprocess.run([sys.executable, "-m", "kdray.sweep", "--space", str(space), "--dry-run"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().endswith("(a loss or dataset of your own: name its file under the job's plugins)")
