"""Search spaces: parsing, every validation error, conditional sampling, ablation expansion (no Ray started)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml

from kdray.config import job_from_dict, read_yaml
from kdray.errors import ConfigError
from kdray.space import ROW_KEY, SEED_KEY, load_space, sample_config

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "jobs" / "demo.yaml"


def space_file(tmp_path, data) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def load(tmp_path, data):
    job_data = read_yaml(DEMO)
    return load_space(space_file(tmp_path, data), job_from_dict(job_data))


SEARCH = {
    "name": "s", "num_samples": 4,
    "space": {
        "losses.kd.enabled": True,
        "losses.kd.weight": {"loguniform": [0.1, 10.0]},
        "losses.i2ckd.enabled": {"choice": [True, False]},
        "losses.i2ckd.margin": {"uniform": [0.1, 2.0], "if": "losses.i2ckd.enabled"},
        "losses.i2ckd.scope": {"choice": ["batch", "image"], "if": {"losses.i2ckd.enabled": True}},
        "optim.iterations": {"int": [10, 20], "step": 5},
    },
}


def test_every_shipped_space_validates_against_the_demo_job():
    job_data = read_yaml(DEMO)
    spaces = sorted((REPO / "search_spaces").glob("*.yaml"))
    assert {p.stem for p in spaces} >= {"demo", "i2ckd_weights", "i2ckd_ablation", "methods", "kd_temperature",
                                        "loss_variants"}
    for path in spaces:
        space = load_space(path, job_from_dict(job_data))
        assert space.trial_count >= 1


def _row_weights(space_file: str) -> dict[str, dict[str, float]]:
    """Each row's enabled losses and their weights in the objective, as the demo job with the row's keys."""
    job_data = read_yaml(DEMO)
    rows = read_yaml(REPO / "search_spaces" / space_file)["rows"]
    weights = {}
    for row in rows:
        losses = job_from_dict(job_data, row.get("set", {})).losses
        weights[row["name"]] = {name: cfg.term_weight() for name, cfg in losses.enabled().items()}
    return weights


def test_the_methods_table_runs_the_published_cirkd_weights():
    """KD 1, pair-wise 10, IFVD 20, CWD 3 at T = 4, adversarial 0.001 with the discriminator at 0.1, CSC 10,
    I2CKD 1 at m = 0.5 (shared/kd-losses.md), written out in the file rather than taken from defaults."""
    assert _row_weights("methods.yaml") == {
        "Student (CE)": {"ce": 1.0},
        "KD": {"ce": 1.0, "kd": 1.0},
        "SKD": {"ce": 1.0, "kd": 1.0, "pairwise": 10.0, "adversarial": 0.001},
        "IFVD": {"ce": 1.0, "kd": 1.0, "ifvd": 20.0, "adversarial": 0.001},
        "CWD": {"ce": 1.0, "cwd": 3.0},
        "CSC+ACE": {"ace": 1.0, "csc": 10.0},
        "I2CKD": {"ce": 1.0, "kd": 1.0, "i2ckd": 1.0},
        "FitNet": {"ce": 1.0, "kd": 1.0, "fitnet": 10.0},
        "AT": {"ce": 1.0, "kd": 1.0, "at": 10000.0},
        "DIST": {"ce": 1.0, "dist": 1.0},
        "DKD": {"ce": 1.0, "dkd": 1.0},
        "CIRKD": {"ce": 1.0, "kd": 1.0, "cirkd": 1.0},
    }
    rows = {row["name"]: row.get("set", {}) for row in read_yaml(REPO / "search_spaces" / "methods.yaml")["rows"]}
    for name in ("SKD", "IFVD"):
        assert rows[name]["losses.adversarial.d_weight"] == 0.1 and rows[name]["losses.adversarial.weight"] == 0.001
    assert rows["CWD"]["losses.cwd.temperature"] == 4.0 and rows["I2CKD"]["losses.i2ckd.margin"] == 0.5
    assert rows["FitNet"]["losses.fitnet.tap"] == "head" and rows["AT"]["losses.at.taps"] == ["head"]
    assert (rows["DKD"]["losses.dkd.alpha"], rows["DKD"]["losses.dkd.beta"]) == (1.0, 2.0)
    assert rows["DIST"]["losses.dist.aux_weight"] == rows["DKD"]["losses.dkd.aux_weight"] == 0.4  # the recipes' aux
    cirkd = rows["CIRKD"]
    assert (cirkd["losses.cirkd.weight_batch"], cirkd["losses.cirkd.weight_pixel"],
            cirkd["losses.cirkd.weight_region"]) == (1.0, 0.1, 0.1)


def test_the_loss_variants_carry_the_spec_weights():
    weights = _row_weights("loss_variants.yaml")
    assert weights["KD (element mean)"]["kd"] == 10.0
    assert weights["CWD (features)"]["cwd"] == 50.0
    assert weights["SKD holistic (WGAN-GP)"]["adversarial"] == 0.1  # the student's term takes w_d
    assert weights["SKD holistic (logits + image)"]["adversarial"] == 0.001
    assert weights["KD (standardized, T=2)"]["kd"] == 9.0  # the logit-standardization code's KD weight
    assert weights["AT (stages, original)"]["at"] == 500.0  # beta / 2, beta = 1000


def test_conditional_knobs_are_never_sampled_when_their_toggle_is_off(tmp_path):
    space = load(tmp_path, SEARCH)
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0, n_startup_trials=5))
    seen_off = seen_on = 0
    for _ in range(40):
        trial = study.ask()
        fixed = sample_config(trial, space.dimensions)
        params = {**trial.params, **fixed}
        assert fixed == {"losses.kd.enabled": True}
        if params["losses.i2ckd.enabled"]:
            seen_on += 1
            assert {"losses.i2ckd.margin", "losses.i2ckd.scope"} <= set(params)
        else:
            seen_off += 1
            assert "losses.i2ckd.margin" not in params and "losses.i2ckd.scope" not in params
        assert params["optim.iterations"] in (10, 15, 20)
        study.tell(trial, params["losses.kd.weight"])
    assert seen_on and seen_off


def test_ray_optuna_search_passes_dotted_keys_through(tmp_path):
    from ray.tune.search.optuna import OptunaSearch

    space = load(tmp_path, SEARCH)
    search = OptunaSearch(space=space.define_by_run(), metric="val/miou", mode="max", seed=1)
    for i in range(10):
        config = search.suggest(f"t{i}")
        job = job_from_dict(read_yaml(DEMO), space.trial_overrides(config))  # every config is a valid job
        assert job.losses.kd.enabled
        if not config["losses.i2ckd.enabled"]:
            assert "losses.i2ckd.margin" not in config


def test_points_to_evaluate_are_checked(tmp_path):
    good = {**SEARCH, "points_to_evaluate": [
        {"losses.kd.weight": 1.0, "losses.i2ckd.enabled": False, "optim.iterations": 10}]}
    assert load(tmp_path, good).points_to_evaluate
    bad = {**SEARCH, "points_to_evaluate": [
        {"losses.kd.weight": 100.0, "losses.i2ckd.enabled": False, "optim.iterations": 10}]}
    with pytest.raises(ConfigError, match="losses.kd.weight=100.0 lies outside"):
        load(tmp_path, bad)
    missing = {**SEARCH, "points_to_evaluate": [{"losses.kd.weight": 1.0, "losses.i2ckd.enabled": True,
                                                 "optim.iterations": 10}]}
    with pytest.raises(ConfigError, match="missing losses.i2ckd.margin"):
        load(tmp_path, missing)


def test_ablation_expands_to_rows_times_seeds(tmp_path):
    space = load(tmp_path, {"rows": [{"name": "Student (CE)"}, {"name": "+KD", "set": {"losses.kd.enabled": True}},
                                     {"name": "+KD+I2CKD", "set": {"losses.kd.enabled": True,
                                                                   "losses.i2ckd.enabled": True}}],
                            "seeds": [0, 1, 2]})
    assert space.kind == "ablation" and space.trial_count == 9
    overrides = space.trial_overrides({ROW_KEY: "+KD+I2CKD", SEED_KEY: 2})
    assert overrides == {"losses.kd.enabled": True, "losses.i2ckd.enabled": True, "run.seed": 2}


@pytest.mark.parametrize(
    ("data", "fragments"),
    [
        ({**SEARCH, "space": {"losses.kd.weight": {"loguniform": [0.0, 1.0]}}},
         ["space.losses.kd.weight", "loguniform: low 0.0 must be > 0"]),
        ({**SEARCH, "space": {"losses.kd.weight": {"uniform": [2.0, 1.0]}}},
         ["space.losses.kd.weight", "low 2.0 must be < high 1.0"]),
        ({**SEARCH, "space": {"losses.kd.weight": {"uniform": [1.0]}}}, ["expected [low, high]"]),
        ({**SEARCH, "space": {"losses.kd.weight": {"choice": []}}}, ["choice", "non-empty list"]),
        ({**SEARCH, "space": {"losses.kd.wieght": {"uniform": [0.1, 1.0]}}},
         ["space.losses.kd.wieght", "no key", "did you mean losses.kd.weight"]),
        ({**SEARCH, "space": {"losses.kd.weight": {"uniform": [-1.0, 1.0]}}},
         ["space.losses.kd.weight = -1.0", "must be >= 0"]),
        ({**SEARCH, "space": {"losses.kd.reduction": {"choice": ["pixel_mean", "sum"]}}},
         ["losses.kd.reduction = 'sum'", "pixel_mean"]),
        ({**SEARCH, "space": {"losses.i2ckd.margin": {"uniform": [0.1, 1.0], "if": "losses.i2ckd.enabled"}}},
         ["if: 'losses.i2ckd.enabled' must name a key listed earlier"]),
        ({**SEARCH, "space": {"losses.i2ckd.enabled": {"choice": [False]},
                              "losses.i2ckd.margin": {"uniform": [0.1, 1.0], "if": "losses.i2ckd.enabled"}}},
         ["can never hold"]),
        ({**SEARCH, "space": {"losses.kd.weight": {"normal": [0, 1]}}}, ["expected exactly one of uniform"]),
        ({**SEARCH, "space": {"optim.iterations": {"int": [1.5, 3]}}}, ["integer bounds"]),
        ({**SEARCH, "space": {"losses.kd.enabled": True}}, ["nothing to search"]),
        ({**SEARCH, "space": {}}, ["space", "non-empty mapping"]),
        ({**SEARCH, "num_samples": 0}, ["num_samples", "integer >= 1"]),
        ({**SEARCH, "mode": "maximize"}, ["mode", "max or min"]),
        ({**SEARCH, "scheduler": {"kind": "asha", "reduction_factor": 1}}, ["reduction_factor", "must be > 1"]),
        ({**SEARCH, "scheduler": {"kind": "hyperband"}}, ["scheduler.kind", "asha or none"]),
        ({**SEARCH, "samples": 3}, ["samples", "unknown key"]),
        ({**SEARCH, "overrides": {"optim.lr": -1}}, ["overrides", "optim.lr", "> 0"]),
        ({"rows": []}, ["rows", "non-empty list"]),
        ({"rows": [{"name": "a"}], "seeds": []}, ["seeds", "non-empty list of integers"]),
        ({"rows": [{"name": "a"}, {"name": "a"}]}, ["row names must be unique"]),
        ({"rows": [{"name": "a", "set": {"losses.nope.enabled": True}}]},
         ["rows[0].set.losses.nope.enabled", "no key"]),
        ({"rows": [{"name": "none", "set": {"losses.ce.enabled": False}}]}, ["rows[0] (none)", "enable at least one"]),
    ],
)
def test_space_errors_name_the_key_and_the_rule(tmp_path, data, fragments):
    with pytest.raises(ConfigError) as err:
        load(tmp_path, data)
    message = str(err.value)
    assert "\n" not in message and message.startswith("space.yaml")
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_sweep_command_rejects_a_bad_space_with_exit_code_2(tmp_path):
    path = space_file(tmp_path, {**SEARCH, "space": {"losses.kd.weight": {"loguniform": [-1.0, 1.0]}}})
    proc = subprocess.run([sys.executable, "-m", "kdray.sweep", "--job", str(DEMO), "--space", str(path), "--dry-run"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == "error: space.yaml: space.losses.kd.weight: loguniform: low -1.0 must be > 0 " \
                                  "(a log scale has no zero)"


def test_dry_run_prints_the_plan(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "kdray.sweep", "--dry-run"], capture_output=True, text=True,
                          timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "space demo (search)" in proc.stdout and "scheduler: synchronous halving" in proc.stdout
    assert "trial(s) at once" in proc.stdout
    assert "then: confirmation of the top 2 distinct configuration(s) and the CE-only student, seeds [0, 1, 2]: " \
           "9 full-length trials" in proc.stdout


def test_the_dry_run_plan_prints_each_rows_loss_formula():
    """`--dry-run` shows what each row trains: its keys, then the objective they make."""
    from kdray.config import load_job
    from kdray.space import plan_lines

    job = load_job(DEMO)
    lines = plan_lines(load_space(REPO / "search_spaces" / "methods.yaml", job), job)
    formulas = [line.strip() for line in lines if line.strip().startswith("Loss = ")]
    assert len(formulas) == sum(1 for line in lines if line.strip().startswith("row "))
    assert "Loss = 1 * CE" in formulas
    assert "Loss = 1 * CE + 1 * KD + 1 * CIRKD" in formulas
    assert "Loss = 1 * CE + 1 * KD + 10000 * AT" in formulas
