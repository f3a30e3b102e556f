"""A sweep's folder and its state: `<run.output_dir>/<job>/sweeps/sweep-<id>/` holds Tune's experiment state, a
copy of the space file and `kdray_sweep.json` (the job as data, the space, the MLflow ids), so `--resume` finds
everything it needs there, and refuses a sweep that ran to its end or whose space file changed since.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdray import __version__, contract
from kdray.config import job_from_dict, read_yaml, to_dict, to_yaml
from kdray.errors import ConfigError
from kdray.orchestration.confirm import planned_trials
from kdray.orchestration.outcome import reason
from kdray.orchestration.record import sweep_note
from kdray.orchestration.stages import first_stage
from kdray.orchestration.tracking import Tracker

if TYPE_CHECKING:
    from kdray.orchestration.plan import Plan, SweepRequest

STATE_FILE = "kdray_sweep.json"
SPACE_COPY = "space"  # the sweep folder's copy of its space file: what --resume runs, and checks the file against


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def latest_sweep(root: Path) -> Path:
    """The newest sweep folder under `root` that did not run to its end (interrupted, or stopped by an error)."""
    sweeps = sorted(p for p in root.glob("sweep-*") if (p / STATE_FILE).is_file())
    open_ = [p for p in sweeps if not json.loads((p / STATE_FILE).read_text()).get("ended")]
    if not open_:
        ended = f" ({len(sweeps)} sweep(s) there ran to their end)" if sweeps else ""
        raise ConfigError(f"--resume: no interrupted sweep to resume under {root}{ended}")
    return open_[-1]


def mark_ended(sweep_dir: Path, counts: str) -> None:
    """Record in the sweep's state file that it ran to its end: --resume continues only interrupted sweeps."""
    file = sweep_dir / STATE_FILE
    file.write_text(json.dumps({**json.loads(file.read_text()), "ended": counts}, indent=1))


def write_state(sweep_dir: Path, state: dict[str, Any]) -> None:
    """Replace the sweep's state file with `state`."""
    (sweep_dir / STATE_FILE).write_text(json.dumps(state, indent=1))


def save_state(sweep_dir: Path, changes: dict[str, Any]) -> None:
    """Add `changes` to the sweep's state file (e.g. the confirmation stage's rows, once chosen)."""
    file = sweep_dir / STATE_FILE
    file.write_text(json.dumps({**json.loads(file.read_text()), **changes}, indent=1))


def load_state(request: SweepRequest) -> tuple[dict[str, Any], Path]:
    """The state of the sweep `request.resume` names ("latest": the job's newest interrupted one) and its folder."""
    if request.overrides:
        raise ConfigError(f"--resume continues a sweep exactly as it started; overrides are refused here (got "
                          f"{' '.join(request.overrides)}): start a new sweep to change the job")
    if request.resume == "latest":
        data = read_yaml(request.job_path)
        data.setdefault("name", Path(request.job_path).stem)
        job = job_from_dict(data)
        sweep_dir = latest_sweep(Path(job.run.output_dir) / job.name / "sweeps")
    else:
        sweep_dir = Path(request.resume).resolve()
    file = sweep_dir / STATE_FILE
    if not file.is_file():
        raise ConfigError(f"--resume: {sweep_dir} is not a kdray sweep folder (no {STATE_FILE})")
    state = json.loads(file.read_text())
    if state.get("ended") and request.extend is None:
        raise ConfigError(f"--resume: sweep {state['sweep_id']} ran to its end ({state['ended']}); --resume "
                          "continues an interrupted sweep: add --extend N to search N more trials, or start a new "
                          "sweep to run trials again")
    if request.extend is not None:
        extend_state(state, sweep_dir, request.extend)
    return state, sweep_dir


def extend_state(state: dict[str, Any], sweep_dir: Path, n: int) -> None:
    """`--extend N`: the sweep's stages gain N more search trials (from the same Optuna study, the sampler
    seeded anew) and then their confirmation; the state it returns is the one the sweep continues from.
    ConfigError for an ablation (no study) or an N below 1. Only `state` changes here (a dry run writes nothing):
    the sweep writes it to the folder when it starts (`write_state`)."""
    from kdray.orchestration.stages import extension_stage, sweep_stages
    from kdray.space import parse_space

    copy = state.get("space_file")
    space = parse_space(Path(copy).read_text()) if copy and Path(copy).is_file() else None
    if space is not None and space.kind != "search":
        raise ConfigError(f"--extend {n}: sweep {state['sweep_id']} is an ablation (rows x seeds): it has no "
                          "search to extend; start a new sweep with more rows or seeds")
    if n < 1:
        raise ConfigError(f"--extend {n}: expected a number of trials >= 1")
    seed = space.seed if space is not None else 0
    stages = sweep_stages(state, None)
    record = extension_stage(stages, n, seed + sum(s["name"] == "search" for s in stages))
    state["stages"] = [*stages, record]
    state.pop("ended", None)


def resumed_space_file(state: dict[str, Any], sweep_dir: Path) -> str:
    """The space the sweep started with (its copy in the sweep folder); refused when the space file the sweep
    was started from has changed since, because Tune's saved trials name rows and keys of the old one."""
    original = Path(state["space_path"])
    copy = state.get("space_file")
    if not copy or not Path(copy).is_file():  # a sweep from before kdray kept a copy: the file as it is now
        return str(original)
    started = state.get("space_sha256") or sha(Path(copy).read_text())
    if original.is_file():
        now = sha(original.read_text())
        if now != started:
            raise ConfigError(f"--resume: the space file {original} changed since sweep {state['sweep_id']} started "
                              f"(sha256 {started[:12]} then, {now[:12]} now); a sweep resumes the space it started "
                              f"with: restore the file (a copy is in {copy}) or start a new sweep")
    return copy


def teacher_line(plan: Plan) -> str | None:
    """Where the sweep's teacher comes from, for its description (Markdown); None when no trial reads a
    teacher."""
    if not plan.needs_teacher:
        return None
    path = f"`{plan.teacher_job.teacher.checkpoint}`"
    return f"{path}, trained first by this sweep (a run of its own, tagged {contract.TRAINED_FOR_SWEEP})" \
        if plan.train_teacher else path


def start_sweep(request: SweepRequest, plan: Plan, tracker: Tracker) -> tuple[dict[str, Any], Path]:
    """The sweep's folder (with a copy of its space and its state file) and its MLflow run: the state."""
    job, space = plan.job, plan.space
    sweep_id = time.strftime("%Y%m%d-%H%M%S")
    sweep_dir = Path(job.run.output_dir) / job.name / "sweeps" / f"sweep-{sweep_id}"
    sweep_dir.mkdir(parents=True, exist_ok=False)
    copy = sweep_dir / SPACE_COPY / Path(plan.space_path).name
    copy.parent.mkdir()
    copy.write_text(space.source)
    tags = {contract.KIND: "sweep", contract.SWEEP_ID: sweep_id, contract.SPACE: space.name,
            contract.SPACE_KIND: space.kind, contract.METRIC: space.metric, contract.MODE: space.mode,
            contract.GIT_COMMIT: git_commit(), contract.VERSION: __version__, contract.DATASET: job.data.dataset}
    if request.smoke_test:
        tags[contract.SMOKE_TEST] = "true"
    if plan.needs_teacher:  # the report's teacher row is this file's run, no other teacher of the experiment
        tags[contract.TEACHER_CHECKPOINT] = str(plan.teacher_job.teacher.checkpoint)
    tags[contract.TRIALS_PLANNED] = str(space.trial_count + planned_trials(space))
    if space.kind == "search":
        from kdray.orchestration.sampler import sampler_description

        tags.update(sampler_description(space.seed, space.sampler, constant_liar=space.pack_size > 1))
    tags[contract.NOTE] = sweep_note(job, space, sweep_id, str(sweep_dir / "report"),
                                     int(tags[contract.TRIALS_PLANNED]), teacher_line(plan))
    parent = tracker.start_run(f"sweep-{sweep_id}", tags)
    state = {"sweep_id": sweep_id, "parent_run_id": parent, "tracking_uri": plan.uri, "experiment": plan.experiment,
             "job_data": to_dict(plan.base), "space_path": str(Path(plan.space_path).resolve()),
             "space_file": str(copy), "space_sha256": sha(space.source), "num_samples": space.num_samples,
             "confirm_settings": ({"top_k": space.confirm.top_k, "seeds": list(space.confirm.seeds)}
                                  if space.confirm is not None else None),
             "train_teacher": plan.train_teacher, "stages": [first_stage(space)]}
    if space.kind == "search":
        state["study_storage"] = request.study_storage or f"sqlite:///{sweep_dir / 'optuna.db'}"
    try:
        (sweep_dir / STATE_FILE).write_text(json.dumps(state, indent=1))
        tracker.log_text(parent, to_yaml(job), contract.JOB_ARTIFACT)
        tracker.log_text(parent, space.source, contract.SPACE_ARTIFACT)
    except BaseException as err:
        tracker.set_tags(parent, {contract.FAILURE: reason(err)[:5000]})
        tracker.end_run(parent, "FAILED")
        raise
    return state, sweep_dir
