"""Losses on backbone layers: the engine captures exactly the layers enabled losses read, sizes their adapters
from those layers, and refuses a layer the model does not have before any compute."""

import pytest
import torch
from test_engine import tiny_job

from kdray.engine import RankContext, train
from kdray.engine.step import TrainStep, shared_teacher_forward
from kdray.errors import ConfigError
from kdray.models import build_model


def test_only_the_layers_a_loss_reads_are_hooked_and_its_adapter_trains(tmp_path, teacher_file, layer_hint):
    job = tiny_job(tmp_path, teacher_file, **{f"losses.{layer_hint}.enabled": True,
                                              f"losses.{layer_hint}.layer": "backbone.layer2"})
    student = build_model(job.student.arch, 8, width=job.student.width)
    teacher = build_model(job.teacher.arch, 8, width=job.teacher.width).eval()
    step = TrainStep.build(job, student, teacher, job.losses, RankContext())
    assert step.student_taps.names == ("backbone.layer2",) and step.teacher_taps.names == ("backbone.layer2",)
    hooked = [name for name, m in student.named_modules() if m._forward_hooks]
    assert hooked == ["pretrained.layer2"]
    adapter = step.objective.terms[layer_hint].adapter
    assert adapter.weight.shape[:2] == (teacher.pretrained.stage_channels[1], student.pretrained.stage_channels[1])
    before = adapter.weight.detach().clone()
    images, labels = torch.randn(4, 3, 32, 32), torch.randint(0, 8, (4, 32, 32))
    total, parts = step(images, labels)
    assert set(parts) == {"ce", layer_hint} and torch.isfinite(total)
    assert not torch.equal(adapter.weight, before)


def test_no_layer_is_hooked_when_no_loss_reads_one(tmp_path, teacher_file):
    job = tiny_job(tmp_path, teacher_file, **{"losses.kd.enabled": True, "losses.i2ckd.enabled": True})
    student = build_model(job.student.arch, 8, width=job.student.width)
    teacher = build_model(job.teacher.arch, 8, width=job.teacher.width).eval()
    step = TrainStep.build(job, student, teacher, job.losses, RankContext())
    assert step.student_taps is None and step.teacher_taps is None
    assert not any(m._forward_hooks for m in [*student.modules(), *teacher.modules()])


def test_a_layer_the_model_lacks_is_refused_when_the_job_is_read(tmp_path, teacher_file, layer_hint):
    with pytest.raises(ConfigError, match=rf"losses.{layer_hint}: got 'student layer backbone.layer5'; not a layer "
                                          r"of deeplabv3_resnet18 \(did you mean backbone.layer\d\?\); valid: "
                                          r"backbone.layer1, backbone.layer2, backbone.layer3, backbone.layer4, head"):
        tiny_job(tmp_path, teacher_file, **{f"losses.{layer_hint}.enabled": True,
                                            f"losses.{layer_hint}.layer": "backbone.layer5"})


def test_a_run_with_a_layer_loss_trains_and_logs_its_term(tmp_path, teacher_file, layer_hint):
    job = tiny_job(tmp_path, teacher_file, **{f"losses.{layer_hint}.enabled": True})
    logs = []
    result = train(job, tmp_path / "s", log=logs.append, progress=False)
    assert result.iterations == 6 and f"train/loss/{layer_hint}" in logs[-1]


def test_training_the_teacher_hooks_no_layer_of_a_job_whose_losses_read_some(tmp_path, layer_hint):
    """The teacher's own training builds CE alone: the layers the job's distillation losses read stay unhooked."""
    from kdray.config import LossesConfig

    job = tiny_job(tmp_path, None, **{f"losses.{layer_hint}.enabled": True})
    model = build_model(job.teacher.arch, 8, width=job.teacher.width)
    step = TrainStep.build(job, model, None, LossesConfig(), RankContext())
    assert step.student_taps is None and not any(m._forward_hooks for m in model.modules())


def test_one_teacher_forward_serves_steps_that_tap_different_layers_as_their_own_would(tmp_path, teacher_file,
                                                                                      layer_hint):
    """The seam of a trial pack: steps sharing a teacher and a batch take their views from one forward, and each
    trains exactly as it would with its own forward."""
    jobs = [tiny_job(tmp_path, teacher_file, **{f"losses.{layer_hint}.enabled": True,
                                               f"losses.{layer_hint}.layer": layer}) for layer in
            ("backbone.layer2", "backbone.layer3")]
    jobs.append(tiny_job(tmp_path, teacher_file, **{"losses.kd.enabled": True}))  # no taps at all
    teacher = build_model(jobs[0].teacher.arch, 8, width=jobs[0].teacher.width).eval().requires_grad_(False)

    def steps():
        built = []
        for job in jobs:
            torch.manual_seed(0)
            built.append(TrainStep.build(job, build_model(job.student.arch, 8, width=job.student.width), teacher,
                                         job.losses, RankContext()))
        return built

    images, labels = torch.randn(4, 3, 32, 32), torch.randint(0, 8, (4, 32, 32))
    alone, shared = steps(), steps()
    expected = []
    for step in alone:
        torch.manual_seed(1)
        expected.append(step(images, labels)[0].item())
    views = shared_teacher_forward(shared, images)
    assert [None if taps is None else list(taps) for _, taps in views] == [["backbone.layer2"], ["backbone.layer3"],
                                                                          None]
    got = []
    for step, view in zip(shared, views):
        torch.manual_seed(1)
        got.append(step(images, labels, teacher=view)[0].item())
    assert got == expected
    for a, b in zip(alone, shared):
        assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))
    with pytest.raises(ValueError, match="different teachers"):
        other = TrainStep.build(jobs[2], build_model(jobs[2].student.arch, 8, width=jobs[2].student.width),
                                build_model(jobs[2].teacher.arch, 8, width=jobs[2].teacher.width).eval(),
                                jobs[2].losses, RankContext())
        shared_teacher_forward([shared[0], other], images)
