"""The training loop on tiny jobs: teacher and student runs, exact resume, frozen teacher, failure modes, DDP."""

from __future__ import annotations

import math
import shutil
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kdray.config import job_from_dict
from kdray.engine import NonFiniteLossError, RankContext, load_checkpoint, train
from kdray.errors import CheckpointError, PreflightError
from kdray.losses.objective import DistillationObjective
from kdray.models import build_model

TINY = {
    "name": "tiny",
    "data": {"num_classes": 8, "crop": [32, 32], "batch_size": 4, "eval_batch_size": 8,
             "synthetic": {"image_size": 32, "train_length": 32, "val_length": 8}},
    "teacher": {"arch": "deeplabv3_resnet18", "width": 0.125},
    "student": {"arch": "deeplabv3_resnet18", "width": 0.125},
    "optim": {"iterations": 6, "eval_interval": 3, "log_interval": 2},
    "run": {"threads": 1},
}


def tiny_job(tmp_path, teacher_file=None, **overrides):
    data = {**TINY, "run": {**TINY["run"], "output_dir": str(tmp_path / "runs")}}
    if teacher_file:
        data["teacher"] = {**TINY["teacher"], "checkpoint": teacher_file}
    return job_from_dict(data, overrides)


def test_teacher_role_trains_with_ce_and_saves_best_weights(tmp_path):
    job = tiny_job(tmp_path, **{"losses.kd.enabled": True})  # the teacher ignores distillation terms
    result = train(job, tmp_path / "t", role="teacher", progress=False)
    assert [h["iteration"] for h in result.history] == [3, 6]
    assert result.best_weights is not None and result.best_weights.name == "best_teacher.pt"
    model = build_model("deeplabv3_resnet18", 8, width=0.125)
    model.load_state_dict(torch.load(result.best_weights, weights_only=True))


def test_distillation_reports_metrics_and_checkpoints(tmp_path, teacher_file):
    job = tiny_job(tmp_path, teacher_file, **{"losses.kd.enabled": True, "losses.i2ckd.enabled": True})
    reports, logs = [], []
    result = train(job, tmp_path / "s", report=lambda m, c: reports.append((m, c)), log=logs.append,
                   progress=False)
    assert [m.iteration for m, _ in reports] == [3, 6]
    metrics, ckpt = reports[-1]
    assert 0.0 <= metrics.miou <= 1.0 and "boat" in metrics.classes and 0.0 <= metrics.pixel_acc <= 1.0
    assert load_checkpoint(ckpt)["iteration"] == 6
    assert [m["iteration"] for m in logs] == [2, 4, 6]
    assert {"train/loss/ce", "train/loss/kd", "train/loss/i2ckd", "train/loss/total", "train/lr",
            "train/images_per_s"} <= set(logs[0])
    assert logs[0]["train/lr"] > logs[-1]["train/lr"]  # poly decay
    assert result.final_miou == metrics.miou


def test_teacher_stays_frozen(tmp_path, teacher_file):
    job = tiny_job(tmp_path, teacher_file, **{"losses.kd.enabled": True})
    before = torch.load(teacher_file, weights_only=True)
    train(job, tmp_path / "s", progress=False)
    after = torch.load(teacher_file, weights_only=True)
    assert all(torch.equal(before[k], after[k]) for k in before)
    from kdray.engine import load_teacher

    teacher = load_teacher(job, torch.device("cpu"))
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())


def _final_state(path):
    return load_checkpoint(path)


def test_interrupted_and_resumed_run_reaches_the_same_weights(tmp_path, teacher_file):
    job = tiny_job(tmp_path, teacher_file, **{"losses.kd.enabled": True, "losses.i2ckd.enabled": True,
                                              "losses.adversarial.enabled": True})
    saved = tmp_path / "at3"

    def keep_first(metrics, ckpt):
        if metrics.iteration == 3:
            shutil.copytree(ckpt, saved)

    train(job, tmp_path / "full", report=keep_first, progress=False)
    train(job, tmp_path / "cut", progress=False, stop_after=3)  # interrupted before iteration 4
    resumed = tmp_path / "cut"
    shutil.rmtree(resumed / "checkpoint")
    shutil.copytree(saved, resumed / "checkpoint")
    train(job, resumed, resume=resumed / "checkpoint", progress=False)

    full, again = _final_state(tmp_path / "full" / "checkpoint"), _final_state(resumed / "checkpoint")
    assert full["iteration"] == again["iteration"] == 6
    for part in ("model", "objective"):
        for key, value in full[part].items():
            assert torch.equal(value, again[part][key]), (part, key)
    assert full["history"] == again["history"]
    assert any(k.startswith("terms.adversarial.discriminator") for k in full["objective"])
    assert full["owned_optimizers"]["adversarial"] is not None


CIRKD_SMALL = {"losses.cirkd.enabled": True, "losses.cirkd.pixel_memory_size": 64,
               "losses.cirkd.region_memory_size": 8, "losses.cirkd.pixel_contrast_size": 32,
               "losses.cirkd.region_contrast_size": 8}


def test_cirkd_resumed_run_continues_its_queues_and_draws(tmp_path, teacher_file):
    """CIRKD keeps queues, pointers and a generator between steps: a run cut at iteration 3 and resumed from its
    checkpoint ends where the uninterrupted one does, queues and generator state included (the pre-flight check
    of the resumed run's first step leaves them alone)."""
    job = tiny_job(tmp_path, teacher_file, **{"losses.kd.enabled": True, **CIRKD_SMALL})
    saved = tmp_path / "at3"

    def keep_first(metrics, ckpt):
        if metrics.iteration == 3:
            shutil.copytree(ckpt, saved)

    train(job, tmp_path / "full", report=keep_first, progress=False)
    at3 = _final_state(saved)
    train(job, tmp_path / "cut", progress=False, stop_after=3)
    resumed = tmp_path / "cut"
    shutil.rmtree(resumed / "checkpoint")
    shutil.copytree(saved, resumed / "checkpoint")
    train(job, resumed, resume=resumed / "checkpoint", progress=False)

    full, again = _final_state(tmp_path / "full" / "checkpoint"), _final_state(resumed / "checkpoint")
    queue = "terms.cirkd.memory.pixel_queue"
    assert not torch.equal(full["objective"][queue], at3["objective"][queue])  # the queues moved after iteration 3
    assert int(full["objective"]["terms.cirkd.memory.pixel_ptr"].sum()) > 0
    for part in ("model", "objective"):
        assert full[part].keys() == again[part].keys()
        for key, value in full[part].items():
            assert torch.equal(value, again[part][key]), (part, key)
    assert "terms.cirkd.memory._extra_state" in full["objective"]  # the generator's state
    assert full["history"] == again["history"]


def test_resume_with_another_job_is_refused_with_both_hashes(tmp_path, teacher_file):
    job = tiny_job(tmp_path, teacher_file, **{"losses.kd.enabled": True, "optim.iterations": 3})
    train(job, tmp_path / "a", progress=False)
    other = tiny_job(tmp_path, teacher_file, **{"losses.kd.enabled": True, "optim.iterations": 3,
                                                "losses.kd.temperature": 2.0})
    with pytest.raises(CheckpointError, match=r"written for job hash \w+, this job hashes to \w+"):
        train(other, tmp_path / "a", resume=tmp_path / "a" / "checkpoint", progress=False)
    with pytest.raises(CheckpointError, match="no run checkpoint here"):
        train(job, tmp_path / "b", resume=tmp_path / "nowhere", progress=False)


def test_missing_teacher_checkpoint_is_a_clear_error(tmp_path):
    job = tiny_job(tmp_path, **{"losses.kd.enabled": True})
    with pytest.raises(CheckpointError, match="teacher.checkpoint"):
        train(job, tmp_path / "s", progress=False)
    job = tiny_job(tmp_path, str(tmp_path / "absent.pt"), **{"losses.kd.enabled": True})
    with pytest.raises(CheckpointError, match="absent.pt"):
        train(job, tmp_path / "s", progress=False)


def test_non_finite_loss_stops_at_once_naming_the_term(tmp_path):
    job = tiny_job(tmp_path, **{"optim.lr": 1e30, "optim.momentum": 0.0, "losses.ce.aux_weight": 0.0})
    with pytest.raises(NonFiniteLossError) as err:
        train(job, tmp_path / "s", progress=False)
    assert err.value.term in {"ce", "total"} and 1 <= err.value.iteration <= 6
    assert f"iteration {err.value.iteration}" in str(err.value)


def test_preflight_names_the_loss_and_both_shapes():
    from kdray.config import LossesConfig
    from kdray.losses.kd import KDConfig
    from kdray.models import SegmenterOutput

    losses = LossesConfig(kd=KDConfig(enabled=True))
    objective = DistillationObjective(losses, num_classes=8, student_channels=16, teacher_channels=32)
    s = SegmenterOutput(torch.randn(2, 8, 4, 4), torch.randn(2, 16, 4, 4), None)
    t = SegmenterOutput(torch.randn(2, 19, 4, 4), torch.randn(2, 32, 4, 4), None)
    tensors = objective.step_tensors(s, t, torch.zeros(2, 32, 32, dtype=torch.long), torch.zeros(2, 3, 32, 32))
    with pytest.raises(PreflightError, match=r"losses.kd: student logits \(2, 8, 4, 4\) and teacher logits "
                                             r"\(2, 19, 4, 4\)"):
        objective.preflight(tensors)


def test_objective_formula_and_breakdown():
    from kdray.config import job_from_dict as jd

    job = jd({}, ["losses.kd.enabled=true", "losses.i2ckd.enabled=true", "losses.i2ckd.weight=0.5"])
    objective = DistillationObjective(job.losses, num_classes=8, student_channels=16, teacher_channels=32)
    assert objective.formula() == "Loss = 1 * CE + 1 * KD + 0.5 * I2CKD"
    assert str(objective) == objective.formula()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, port, job, out_dir, results):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        reports = []
        train(job, out_dir, ctx=RankContext.current(), report=lambda m, c: reports.append(c), progress=False)
        model_state = {k: v.clone() for k, v in load_checkpoint(f"{out_dir}/checkpoint")["model"].items()} \
            if rank == 0 else None
        results[rank] = {"reports": reports, "model": model_state}
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_train_one_model(tmp_path, teacher_file):
    job = tiny_job(tmp_path, teacher_file, **{"losses.kd.enabled": True, "losses.i2ckd.enabled": True,
                                              **CIRKD_SMALL,  # its memory all-gathers the ranks' batches
                                              "run.workers": 2, "optim.iterations": 4, "optim.eval_interval": 2})
    results = mp.Manager().dict()
    mp.spawn(_ddp_worker, args=(_free_port(), job, str(tmp_path / "ddp"), results), nprocs=2, join=True)
    assert len(results[0]["reports"]) == len(results[1]["reports"]) == 2  # every rank reports alike
    assert all(c is not None for c in results[0]["reports"]) and all(c is None for c in results[1]["reports"])
    state = load_checkpoint(tmp_path / "ddp" / "checkpoint")
    assert state["iteration"] == 4 and len(state["rng"]) == 2  # each rank's RNG is kept for a resume


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_path_runs_on_cpu(tmp_path, teacher_file, amp):
    """Users may only ask for AMP on GPUs (validation); the plumbing itself runs under CPU autocast too:
    student and teacher in reduced precision, losses in float32, the fp16 grad scaler in the step."""
    job = tiny_job(tmp_path, teacher_file, **{"losses.kd.enabled": True, "losses.i2ckd.enabled": True,
                                              "optim.iterations": 2, "optim.eval_interval": 2})
    job.run.amp = amp  # past validation on purpose: there is no GPU here
    result = train(job, tmp_path / "s", progress=False)
    assert result.iterations == 2 and 0.0 <= result.final_miou <= 1.0


def _built_step(tmp_path, teacher_file, **overrides):
    """A `TrainStep` as `train` builds it (student, frozen teacher, objective, both optimizers) on the CPU."""
    from kdray.engine import load_teacher
    from kdray.engine.step import TrainStep

    job = tiny_job(tmp_path, teacher_file, **overrides)
    torch.manual_seed(0)
    student = build_model(job.student.arch, job.data.num_classes, aux=False, width=job.student.width)
    teacher = load_teacher(job, torch.device("cpu"))
    return TrainStep.build(job, student, teacher, job.losses, RankContext())


def _tiny_batch():
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(4, 3, 32, 32, generator=generator)
    labels = torch.randint(0, 8, (4, 32, 32), generator=generator)
    return images, labels


def _optimized(optimizer):
    return {id(p) for group in optimizer.param_groups for p in group["params"]}


@pytest.mark.parametrize("loss, overrides", [
    ("i2ckd", {"losses.i2ckd.enabled": True}),
    ("csc", {"losses.csc.enabled": True}),
    ("cwd", {"losses.cwd.enabled": True, "losses.cwd.on": "features"}),
], ids=["i2ckd", "csc", "cwd_features"])
def test_adapters_are_trained_with_the_student(tmp_path, teacher_file, loss, overrides):
    """A loss's 1×1 feature adapter is in the student's SGD and moves with it; the teacher does not move."""
    step = _built_step(tmp_path, teacher_file, **overrides)
    adapter = step.objective.terms[loss].adapter.conv.weight
    optimized = _optimized(step.optimizer)
    assert id(adapter) in optimized
    assert all(id(p) in optimized for p in step.objective.student_side_parameters())
    adapter_before = adapter.detach().clone()
    teacher_before = {k: v.clone() for k, v in step.teacher.state_dict().items()}
    images, labels = _tiny_batch()
    for _ in range(2):
        step(images, labels)
    assert adapter.grad is not None and adapter.grad.abs().sum() > 0  # the loss reaches the adapter
    assert not torch.equal(adapter.detach(), adapter_before)
    teacher_after = step.teacher.state_dict()
    assert all(torch.equal(value, teacher_after[key]) for key, value in teacher_before.items())


def test_dist_on_the_auxiliary_heads_trains(tmp_path, teacher_file):
    """`losses.dist.aux_weight`: the teacher (its checkpoint has the head) gives auxiliary logits in eval mode,
    the student gets its head even without CE's aux term, and two iterations train on the CPU."""
    job = tiny_job(tmp_path, teacher_file, **{"losses.dist.enabled": True, "losses.dist.aux_weight": 0.4,
                                              "losses.ce.aux_weight": 0.0, "optim.iterations": 2,
                                              "optim.eval_interval": 2, "optim.log_interval": 1})
    logs = []
    result = train(job, tmp_path / "s", log=logs.append, progress=False)
    assert result.iterations == 2 and 0.0 <= result.final_miou <= 1.0
    assert [m["iteration"] for m in logs] == [1, 2]
    assert all(math.isfinite(m["train/loss/dist"]) and m["train/loss/dist"] > 0 for m in logs)
    assert any(k.startswith("auxlayer.") for k in load_checkpoint(tmp_path / "s" / "checkpoint")["model"])


@pytest.mark.parametrize("aux_weight, calls", [(0.4, 1), (0.0, 0)])
def test_the_teacher_runs_its_auxiliary_head_only_when_a_loss_reads_it(tmp_path, teacher_file, aux_weight, calls):
    from kdray.engine.step import TrainStep

    job = tiny_job(tmp_path, teacher_file, **{"losses.dkd.enabled": True, "losses.dkd.aux_weight": aux_weight})
    torch.manual_seed(0)
    student = build_model(job.student.arch, job.data.num_classes, width=job.student.width)
    from kdray.engine import load_teacher

    step = TrainStep.build(job, student, load_teacher(job, torch.device("cpu")), job.losses, RankContext())
    assert step.teacher_aux is (aux_weight > 0) and not step.teacher.training
    seen = []
    step.teacher.auxlayer.register_forward_hook(lambda module, args, output: seen.append(output.shape))
    total, parts = step(*_tiny_batch())
    assert len(seen) == calls and math.isfinite(parts["dkd"].item())
    if calls:
        assert seen[0] == (4, 8, 4, 4)


def test_a_teacher_without_an_auxiliary_head_stops_a_run_with_aux_weight_at_its_first_step(tmp_path):
    path = tmp_path / "plain_teacher.pt"
    torch.save(build_model("deeplabv3_resnet18", 8, aux=False, width=0.125).state_dict(), path)
    job = tiny_job(tmp_path, str(path), **{"losses.dist.enabled": True, "losses.dist.aux_weight": 0.4})
    with pytest.raises(PreflightError, match="losses.dist: needs the teacher's auxiliary logits, but the teacher "
                                             "has no auxiliary head"):
        train(job, tmp_path / "s", progress=False)


def test_discriminator_has_its_own_adam_with_the_configured_lr_and_betas(tmp_path, teacher_file):
    """D is trained by Adam (lr 4e-4, betas (0.9, 0.99) unless `losses.adversarial.d_lr`/`d_betas` say
    otherwise) over exactly D's parameters; the student's SGD holds none of D's, the Adam none of the student's."""
    step = _built_step(tmp_path, teacher_file, **{"losses.adversarial.enabled": True})
    d_params = list(step.objective.terms["adversarial"].discriminator.parameters())
    d_ids = {id(p) for p in d_params}
    assert type(step.owned_optimizers["adversarial"]) is torch.optim.Adam
    in_adam = [p for group in step.owned_optimizers["adversarial"].param_groups for p in group["params"]]
    assert len(in_adam) == len(d_params) and {id(p) for p in in_adam} == d_ids
    assert not d_ids & _optimized(step.optimizer)
    assert not {id(p) for p in step.model.parameters()} & d_ids
    for group in step.owned_optimizers["adversarial"].param_groups:
        assert group["lr"] == pytest.approx(4e-4) and tuple(group["betas"]) == pytest.approx((0.9, 0.99))

    step = _built_step(tmp_path, teacher_file, **{"losses.adversarial.enabled": True,
                                                  "losses.adversarial.d_lr": 1e-3,
                                                  "losses.adversarial.d_betas": [0.5, 0.999]})
    for group in step.owned_optimizers["adversarial"].param_groups:
        assert group["lr"] == pytest.approx(1e-3) and tuple(group["betas"]) == pytest.approx((0.5, 0.999))


def test_a_checkpoint_written_before_the_loss_registry_still_resumes(tmp_path):
    """Format 1 kept the discriminator's Adam under `d_optimizer`; it is read as the adversarial loss's own."""
    from kdray.engine.checkpoint import FILENAME

    (tmp_path / "old").mkdir()
    torch.save({"format": 1, "iteration": 3, "d_optimizer": {"state": {}, "param_groups": []}},
               tmp_path / "old" / FILENAME)
    state = load_checkpoint(tmp_path / "old")
    assert state["owned_optimizers"] == {"adversarial": {"state": {}, "param_groups": []}}
    torch.save({"format": 1, "iteration": 3, "d_optimizer": None}, tmp_path / "old" / FILENAME)
    assert load_checkpoint(tmp_path / "old")["owned_optimizers"] == {}


def test_each_evaluation_carries_the_runs_costs_and_a_resume_continues_them(tmp_path, teacher_file):
    """The student's parameters, FLOPs per image (the evaluation size: 32x32 here) and latency, and what training
    spent so far: device seconds growing from one evaluation to the next and carried over a resume; the teacher's
    share of the step where a teacher runs. The scores of the history stay free of timings."""
    from kdray import contract
    from kdray.engine.cost import forward_flops, parameter_count

    job = tiny_job(tmp_path, teacher_file, **{"losses.kd.enabled": True})
    reports = []
    train(job, tmp_path / "s", report=lambda m, c: reports.append((m, c)), progress=False, stop_after=3)
    first, ckpt = reports[-1]
    student = build_model("deeplabv3_resnet18", 8, width=0.125)
    assert first.cost[contract.STUDENT_PARAMS] == parameter_count(student)
    assert first.cost[contract.STUDENT_GFLOPS] == pytest.approx(forward_flops(student, 32, 32) / 1e9)
    assert first.cost[contract.STUDENT_LATENCY_MS] > 0
    assert 0 < first.cost[contract.TRAIN_TEACHER_SHARE] < 1
    assert first.cost[contract.TRAIN_S_PER_ITERATION] > 0 and first.cost[contract.TRAIN_PEAK_MEMORY_MIB] > 0
    assert set(first.cost) <= set(first.metrics()) and set(first.cost) <= set(first.tune_metrics())
    assert not set(first.cost) & set(load_checkpoint(ckpt)["history"][-1])
    resumed = []
    train(job, tmp_path / "s", report=lambda m, c: resumed.append(m), progress=False, resume=ckpt)
    assert resumed[-1].cost[contract.TRAIN_DEVICE_SECONDS] > first.cost[contract.TRAIN_DEVICE_SECONDS]

    plain = tiny_job(tmp_path, **{"run.latency_repeats": 0})  # CE only, latency not timed: no teacher share
    costs = []
    train(plain, tmp_path / "ce", report=lambda m, c: costs.append(m.cost), progress=False, stop_after=3)
    assert contract.STUDENT_LATENCY_MS not in costs[-1] and contract.TRAIN_TEACHER_SHARE not in costs[-1]
    assert costs[-1][contract.STUDENT_PARAMS] == parameter_count(student)


class _TenSecondIterations:
    """A stand-in for the loop's TrainingCost whose iterations each take `per` seconds of training time."""

    def __init__(self, per):
        from kdray.engine.cost import TrainingCost

        class Fake(TrainingCost):
            def training_seconds(self, ongoing=0.0):
                return per * (self.iterations + (self._current is not None or ongoing > 0))

        self.cls = Fake


def _budget_worker(rank, port, job, out_dir, results):
    import kdray.engine.loop as loop

    loop.TrainingCost = _TenSecondIterations(10.0 if rank == 0 else 30.0).cls  # the ranks' clocks disagree
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        reports = []
        result = train(job, out_dir, ctx=RankContext.current(), report=lambda m, c: reports.append(m.iteration),
                       progress=False)
        results[rank] = {"reports": reports, "iterations": result.iterations, "reached": result.time_budget_reached}
    finally:
        dist.destroy_process_group()


def test_a_time_budget_ends_the_run_with_an_evaluation_where_it_runs_out_and_a_resume_stays_there(
        tmp_path, teacher_file, monkeypatch):
    """Training seconds 10 per iteration, a budget of 15: the run stops after iteration 2 (of 6, evaluations at 3
    and 6), evaluates there, and reports it as the end; resumed, it has nothing left to run."""
    import kdray.engine.loop as loop

    monkeypatch.setattr(loop, "TrainingCost", _TenSecondIterations(10.0).cls)
    job = tiny_job(tmp_path, teacher_file, **{"losses.kd.enabled": True, "optim.time_budget_s": 15})
    reports = []
    result = train(job, tmp_path / "b", report=lambda m, c: reports.append((m, c)), progress=False)
    assert [(m.iteration, m.time_budget_reached) for m, _ in reports] == [(2, True)]
    assert (result.iterations, result.time_budget_reached) == (2, True)
    assert [h["iteration"] for h in result.history] == [2]
    checkpoint = reports[-1][1]
    assert load_checkpoint(checkpoint)["time_budget_reached"] and load_checkpoint(checkpoint)["iteration"] == 2
    again = []
    resumed = train(job, tmp_path / "b", report=lambda m, c: again.append(m), progress=False, resume=checkpoint)
    assert again == [] and (resumed.iterations, resumed.time_budget_reached) == (2, True)
    # a budget the run never reaches changes nothing; the teacher's training ignores it
    assert train(tiny_job(tmp_path, **{"optim.time_budget_s": 1e6}), tmp_path / "n", progress=False).iterations == 6
    teacher = train(job, tmp_path / "t", role="teacher", progress=False)
    assert (teacher.iterations, teacher.time_budget_reached) == (6, False)


def test_ranks_whose_clocks_disagree_stop_at_the_same_iteration_on_their_mean(tmp_path, teacher_file):
    """Rank 0 counts 10 s an iteration, rank 1 30 s: on their mean (20 s) a budget of 35 s ends both after
    iteration 2 (rank 0 alone would go to 4): no rank is left waiting in a collective."""
    job = tiny_job(tmp_path, teacher_file, **{"losses.kd.enabled": True, "run.workers": 2, "data.batch_size": 4,
                                              "optim.time_budget_s": 35})
    results = mp.Manager().dict()
    mp.spawn(_budget_worker, args=(_free_port(), job, str(tmp_path / "ddp"), results), nprocs=2, join=True)
    assert results[0] == results[1] == {"reports": [2], "iterations": 2, "reached": True}


def test_an_iteration_is_timed_on_the_jobs_own_loop_after_its_warm_up(tmp_path, teacher_file):
    from kdray.engine import measure_iteration_seconds

    job = tiny_job(tmp_path, teacher_file, **{"losses.kd.enabled": True, "run.workers": 2, "data.batch_size": 8})
    timing = measure_iteration_seconds(job, iterations=3, warmup=2)
    assert len(timing.samples) == 3 and timing.warmup == 2 and timing.median_s > 0
    assert timing.median_s == sorted(timing.samples)[1]
    assert str(timing).endswith("s/iteration (median of 3, after 2 warm-up)")
    assert not (tmp_path / "runs").exists()  # nothing written: no evaluation, no checkpoint, a scratch folder
    with pytest.raises(ValueError, match="iterations must be >= 1"):
        measure_iteration_seconds(job, iterations=0)
