"""Trial packs: K students of one job trained against one teacher forward per batch (`kdray.engine.train_pack`).

The claim a pack makes is that each member trains exactly as its solo run: these tests hold it to that, bit for
bit on the CPU, for members that differ in what they read (logits, features of a backbone layer, none of the
teacher), in loss-owned optimizers (the adversarial loss's discriminator, whose gradient penalty draws from torch's
RNG) and in the student's auxiliary head; and when a member leaves (early stop, a non-finite loss), resumes, or
does not belong.
"""

from __future__ import annotations

import pytest
import torch

from kdray import contract
from kdray.config import job_from_dict
from kdray.engine import PackMember, train, train_pack
from kdray.engine.loop import NonFiniteLossError, check_pack
from kdray.errors import CheckpointError, ConfigError

TINY = {
    "name": "pack",
    "data": {"num_classes": 8, "crop": [32, 32], "batch_size": 4, "eval_batch_size": 8,
             "synthetic": {"image_size": 32, "train_length": 32, "val_length": 8}},
    "teacher": {"arch": "deeplabv3_resnet18", "width": 0.125},
    "student": {"arch": "deeplabv3_resnet18", "width": 0.125},
    "optim": {"iterations": 6, "eval_interval": 3, "log_interval": 2},
    "run": {"threads": 1, "latency_repeats": 0},
}

# Three members that differ in everything a member may: a CE student (no teacher read), logits KD with the
# adversarial loss (a discriminator with its own Adam; its gradient penalty draws from torch's RNG), and a feature
# loss on a backbone layer with CE's auxiliary head.
MEMBERS = {
    "ce": {},
    "kd+adversarial": {"losses.kd.enabled": True, "losses.adversarial.enabled": True},
    "fitnet+aux": {"losses.fitnet.enabled": True, "losses.ce.aux_weight": 0.4},
}


def member_job(tmp_path, teacher_file, changes):
    data = {**TINY, "teacher": {**TINY["teacher"], "checkpoint": teacher_file},
            "run": {**TINY["run"], "output_dir": str(tmp_path / "runs")}}
    return job_from_dict(data, changes)


def weights(path):
    return torch.load(path / "checkpoint" / "checkpoint.pt", weights_only=False)["model"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert different == [], f"{len(different)} tensors differ, e.g. {different[:3]}"


@pytest.fixture(scope="module")
def solo_runs(tmp_path_factory, teacher_file):
    """Each member's solo run: its job, result, reports and final weights."""
    root = tmp_path_factory.mktemp("solo")
    out = {}
    for name, changes in MEMBERS.items():
        job = member_job(root, teacher_file, changes)
        reports = []
        result = train(job, root / name, report=lambda e, c, r=reports: r.append(e), progress=False)
        out[name] = (job, result, reports, weights(root / name))
    return out


def test_a_pack_of_three_ends_with_each_solo_runs_weights_bit_for_bit(solo_runs, tmp_path):
    reports = {name: [] for name in MEMBERS}
    members = [PackMember(job, tmp_path / name, report=lambda e, c, r=reports[name]: r.append(e))
               for name, (job, *_) in solo_runs.items()]
    results = train_pack(members, progress=False)
    for (name, (_, solo, solo_reports, solo_weights)), result in zip(solo_runs.items(), results):
        assert_same_weights(weights(tmp_path / name), solo_weights)
        assert result.history == solo.history  # every evaluation's scores, per class
        assert [e.miou for e in reports[name]] == [e.miou for e in solo_reports]
        assert (result.iterations, result.best_iteration, result.stopped, result.failure) == (6, solo.best_iteration,
                                                                                            False, None)
        best, solo_best = (torch.load(r.best_weights, weights_only=True) for r in (result, solo))
        assert_same_weights(best, solo_best)


def test_a_member_stopped_by_its_report_leaves_and_the_others_train_on_as_alone(solo_runs, tmp_path):
    seen = {name: [] for name in MEMBERS}

    def report_for(name):
        def report(evaluation, checkpoint_dir):
            seen[name].append(evaluation.iteration)
            return name == "kd+adversarial"  # early-stopped at its first evaluation
        return report

    members = [PackMember(job, tmp_path / name, report=report_for(name)) for name, (job, *_) in solo_runs.items()]
    results = dict(zip(MEMBERS, train_pack(members, progress=False)))
    assert seen == {"ce": [3, 6], "kd+adversarial": [3], "fitnet+aux": [3, 6]}
    stopped = results["kd+adversarial"]
    assert (stopped.stopped, stopped.iterations, stopped.final_scores) == (True, 3, {})
    for name in ("ce", "fitnet+aux"):
        assert not results[name].stopped
        assert_same_weights(weights(tmp_path / name), solo_runs[name][3])


def test_decide_compares_the_members_at_each_evaluation_and_stops_whom_it_names(solo_runs, tmp_path):
    """The pack's halving: at the first evaluation every member has reported before the decision, which stops the
    worst; the others go on as alone."""
    calls = []

    def decide(evaluations):
        calls.append({index: e.iteration for index, e in evaluations.items()})
        if len(calls) > 1:
            return set()
        return {min(evaluations, key=lambda index: (evaluations[index].miou, index))}

    members = [PackMember(job, tmp_path / name) for name, (job, *_) in solo_runs.items()]
    results = train_pack(members, progress=False, decide=decide)
    worst = min(range(3), key=lambda i: (solo_runs[list(MEMBERS)[i]][1].history[0]["val/miou"], i))
    assert calls == [{0: 3, 1: 3, 2: 3}, {i: 6 for i in range(3) if i != worst}]
    assert [r.stopped for r in results] == [i == worst for i in range(3)]
    assert results[worst].iterations == 3
    for i, name in enumerate(MEMBERS):
        if i != worst:
            assert_same_weights(weights(tmp_path / name), solo_runs[name][3])


def test_a_solo_run_stopped_by_its_report_ends_there(tmp_path, teacher_file):
    job = member_job(tmp_path, teacher_file, {"losses.kd.enabled": True})
    result = train(job, tmp_path / "s", report=lambda e, c: True, progress=False)
    assert (result.stopped, result.iterations, [h["iteration"] for h in result.history]) == (True, 3, [3])


def test_a_non_finite_member_fails_alone_and_the_pack_goes_on(solo_runs, tmp_path, monkeypatch):
    from kdray.losses.kd import PixelwiseKD

    original = PixelwiseKD.forward

    def poisoned(self, *args, **kwargs):
        return original(self, *args, **kwargs) * float("nan")

    monkeypatch.setattr(PixelwiseKD, "forward", poisoned)
    members = [PackMember(job, tmp_path / name) for name, (job, *_) in solo_runs.items()]
    results = dict(zip(MEMBERS, train_pack(members, progress=False)))
    failed = results["kd+adversarial"]
    assert failed.failure is not None and "is nan at iteration 1" in failed.failure and failed.iterations == 1
    for name in ("ce", "fitnet+aux"):
        assert results[name].failure is None
        assert_same_weights(weights(tmp_path / name), solo_runs[name][3])
    with pytest.raises(NonFiniteLossError):  # alone, it raises as a run always did
        train(solo_runs["kd+adversarial"][0], tmp_path / "alone", progress=False)


def test_a_pack_resumed_from_its_members_checkpoints_ends_as_uninterrupted(solo_runs, tmp_path):
    jobs = [job for job, *_ in solo_runs.values()]
    train_pack([PackMember(job, tmp_path / name) for name, job in zip(MEMBERS, jobs)], progress=False, stop_after=3)
    resumed = [PackMember(job, tmp_path / name, resume=tmp_path / name / "checkpoint")
               for name, job in zip(MEMBERS, jobs)]
    results = train_pack(resumed, progress=False)
    for name, result in zip(MEMBERS, results):
        assert result.iterations == 6
        assert_same_weights(weights(tmp_path / name), solo_runs[name][3])
    # members at different iterations cannot continue as one pack
    train(jobs[0], tmp_path / "early", progress=False, stop_after=3)
    mixed = [PackMember(jobs[0], tmp_path / "early", resume=tmp_path / "early" / "checkpoint"),
             PackMember(jobs[1], tmp_path / "fresh")]
    with pytest.raises(CheckpointError, match="resume from different iterations"):
        train_pack(mixed, progress=False)


def test_members_must_differ_in_losses_only(tmp_path, teacher_file):
    base = member_job(tmp_path, teacher_file, {})
    check_pack([base, member_job(tmp_path, teacher_file, {"losses.kd.enabled": True, "losses.kd.weight": 3})])
    cases = {"student.width": ("student.width", 0.25), "run.seed": ("run.seed", 7),
             "optim.iterations": ("optim.iterations", 9), "data.crop": ("data.crop", [24, 24])}
    for key, (override, value) in cases.items():
        with pytest.raises(ConfigError, match=rf"pack member 1 differs from member 0 outside losses \({key}: "):
            check_pack([base, member_job(tmp_path, teacher_file, {override: value})])
    with pytest.raises(ConfigError, match="at least one member"):
        check_pack([])


def test_members_device_seconds_add_up_to_the_packs(solo_runs, tmp_path):
    """Each member is billed its own work and a share of the shared work: the bills add up to the process's CPU time
    over the pack, never more (nothing billed twice), less only what the set-up and the bookkeeping between the
    measured stretches spend (on this tiny job up to 22 % of the whole has been seen: the bound is loose)."""
    import time

    members = [PackMember(job, tmp_path / name, report=lambda e, c, r=reports: r.append(e))
               for (name, (job, *_)), reports in zip(solo_runs.items(), [[], [], []])]
    begun = time.process_time()
    train_pack(members, progress=False)
    spent = time.process_time() - begun
    billed = [m.report.__defaults__[0][-1].cost[contract.TRAIN_DEVICE_SECONDS] for m in members]
    assert all(b > 0 for b in billed)
    assert 0.6 * spent <= sum(billed) <= spent


def test_a_pack_that_would_not_fit_its_device_is_refused_with_the_figures():
    from kdray.engine.loop import pack_memory_verdict

    gib = 2 ** 30
    # 10 GiB of weights (teacher and students) before any step; the first step peaks at 22 GiB: 12 GiB a step
    assert pack_memory_verdict(4, 22 * gib, 10 * gib, 80 * gib) is None  # 10 + 4 x 12 = 58
    verdict = pack_memory_verdict(8, 22 * gib, 10 * gib, 80 * gib)  # 10 + 8 x 12 = 106
    assert verdict == ("a pack of 8 students needs up to 106.0 GiB (10.00 GiB of weights, teacher and students, + "
                       "8 x 12.00 GiB that a student's step adds, measured on the first); the device has 80.0 GiB: "
                       "set pack_size to at most 5")
    assert "at most 1" in pack_memory_verdict(2, 60 * gib, 10 * gib, 80 * gib)
