"""kdray.engine.cost: parameter and FLOP counts against hand formulas, latency's contract, and the training-cost
accumulator's arithmetic with fake clocks (nothing sleeps)."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from torch import nn

from kdray import contract
from kdray.engine.cost import (
    Latency,
    TrainingCost,
    forward_flops,
    inference_latency,
    parameter_count,
    student_cost,
)
from kdray.models import build_model


class ConvThenLinear(nn.Module):
    """Conv2d(3->5, k=3, stride 1, padding 1) on 8x8, flatten, Linear(5*8*8 -> 7)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 5, kernel_size=3, padding=1)
        self.fc = nn.Linear(5 * 8 * 8, 7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.conv(x), 1))


def test_parameter_count_is_the_hand_sum():
    model = ConvThenLinear()
    conv = 5 * 3 * 3 * 3 + 5  # weight Cout*Cin*k*k, bias Cout
    linear = 7 * 320 + 7
    assert parameter_count(model) == conv + linear


def test_parameter_count_counts_a_shared_parameter_once_and_no_buffers():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.BatchNorm1d(4), shared)
    assert parameter_count(model) == (16 + 4) + (4 + 4)  # the linear once; BN weight+bias, not its statistics


def test_flops_of_conv_and_linear_match_the_hand_formula():
    model = ConvThenLinear()
    # conv: 2 * Cin * Cout * k * k * Hout * Wout; linear: 2 * in * out (one image; biases not counted)
    expected = 2 * 3 * 5 * 3 * 3 * 8 * 8 + 2 * 320 * 7
    assert forward_flops(model, 8, 8) == expected
    assert forward_flops(model, 8, 8, meta=False) == expected


def test_flops_of_a_strided_conv_sequential():
    model = nn.Sequential(nn.Conv2d(4, 6, kernel_size=3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(6 * 5 * 4, 3))
    # 10x7 input, stride 2, padding 1, k 3: Hout = (10 + 2 - 3) // 2 + 1 = 5, Wout = (7 + 2 - 3) // 2 + 1 = 4
    expected = 2 * 4 * 6 * 3 * 3 * 5 * 4 + 2 * 120 * 3
    assert forward_flops(model, 10, 7, channels=4) == expected


def test_meta_count_equals_a_real_cpu_run_on_a_segmenter_and_leaves_it_alone():
    torch.manual_seed(0)
    model = build_model("deeplabv3_resnet18", 4, width=0.125).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    on_meta = forward_flops(model, 32, 32)
    on_cpu = forward_flops(model, 32, 32, meta=False)
    assert on_meta == on_cpu > 0
    assert model.training and all(m.training for m in model.modules())
    assert all(p.device.type == "cpu" for p in model.parameters())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN statistics untouched (eval mode)


def test_flops_scale_with_pixels_and_skip_the_auxiliary_head():
    with_aux = build_model("pspnet_resnet18", 4, width=0.125, aux=True)
    without = build_model("pspnet_resnet18", 4, width=0.125, aux=False)
    without.load_state_dict({k: v for k, v in with_aux.state_dict().items() if not k.startswith("auxlayer.")})
    assert forward_flops(with_aux, 32, 32) == forward_flops(without, 32, 32)  # eval: no aux head
    # convolutions dominate and scale with the pixel count; the pyramid's pooled branches do not, hence approx
    assert forward_flops(without, 64, 64) == pytest.approx(4 * forward_flops(without, 32, 32), rel=0.05)


@pytest.mark.parametrize("kwargs", [{"height": 0}, {"width": -1}, {"channels": 0}, {"height": 2.5},
                                    {"height": True}])
def test_flops_refuse_bad_sizes(kwargs):
    args = {"height": 8, "width": 8, "channels": 3, **kwargs}
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=name):
        forward_flops(ConvThenLinear(), **args)


def test_latency_is_positive_ordered_and_restores_training_flags():
    model = ConvThenLinear().train()
    model.conv.eval()  # a mixed state must come back as it was
    latency = inference_latency(model, 8, 8, "cpu", warmup=1, repeats=5)
    assert isinstance(latency, Latency) and latency.repeats == 5
    assert 0 < latency.min_ms <= latency.median_ms <= latency.max_ms
    assert model.training and not model.conv.training and model.fc.training


def test_latency_runs_inside_the_given_autocast_context():
    entered = []

    @contextlib.contextmanager
    def counting():
        entered.append(1)
        yield

    inference_latency(ConvThenLinear(), 8, 8, "cpu", autocast=counting, warmup=2, repeats=3)
    assert len(entered) == 5  # a factory: called for every run, warm-up included
    reusable = contextlib.nullcontext()
    assert inference_latency(ConvThenLinear(), 8, 8, "cpu", autocast=reusable, warmup=0, repeats=2).repeats == 2


def test_latency_restores_flags_when_the_forward_raises():
    class Broken(nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    model = Broken().train()
    with pytest.raises(RuntimeError, match="boom"):
        inference_latency(model, 8, 8, "cpu", warmup=0, repeats=1)
    assert model.training


@pytest.mark.parametrize("kwargs, name", [
    ({"repeats": 0}, "repeats"), ({"warmup": -1}, "warmup"), ({"height": 0}, "height"),
    ({"width": 1.5}, "width"), ({"repeats": True}, "repeats"), ({"device": "meta"}, "device"),
    ({"autocast": 3}, "autocast"),
])
def test_latency_refuses_bad_arguments(kwargs, name):
    args = {"height": 8, "width": 8, "device": "cpu", **kwargs}
    with pytest.raises(ValueError, match=name):
        inference_latency(ConvThenLinear(), args.pop("height"), args.pop("width"), args.pop("device"), **args)


def test_student_cost_gives_the_three_contract_metrics():
    model = ConvThenLinear()
    cost = student_cost(model, 8, 8, "cpu", contextlib.nullcontext(), warmup=0, repeats=1)
    assert set(cost) == {contract.STUDENT_PARAMS, contract.STUDENT_GFLOPS, contract.STUDENT_LATENCY_MS}
    assert cost[contract.STUDENT_PARAMS] == parameter_count(model)
    assert cost[contract.STUDENT_GFLOPS] == forward_flops(model, 8, 8) / 1e9
    assert cost[contract.STUDENT_LATENCY_MS] > 0


class FakeClock:
    """A clock that moves only when told."""

    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_cost(device="cpu", **kwargs):
    wall, cpu, syncs = FakeClock(), FakeClock(50.0), []
    cost = TrainingCost(device, wall_clock=wall, cpu_clock=cpu, synchronize=lambda: syncs.append(wall.now),
                        **kwargs)
    return cost, wall, cpu, syncs


def test_training_cost_sums_steps_and_cpu_seconds():
    cost, wall, cpu, _ = make_cost()
    assert cost.s_per_iteration is None and cost.teacher_share is None
    for seconds, teacher in [(2.0, 0.5), (4.0, 1.0)]:
        with cost.iteration():
            wall.now += seconds - teacher
            with cost.teacher():
                wall.now += teacher
        cpu.now += 3.0  # each iteration: 3 CPU-seconds (two busy threads for 1.5 s, say)
    assert cost.iterations == 2
    assert cost.s_per_iteration == pytest.approx(3.0)
    assert cost.teacher_share == pytest.approx(1.5 / 6.0)
    assert cost.device_seconds == pytest.approx(6.0)  # CPU time, not wall
    metrics = cost.as_metrics()
    assert metrics[contract.TRAIN_S_PER_ITERATION] == pytest.approx(3.0)
    assert metrics[contract.TRAIN_DEVICE_SECONDS] == pytest.approx(6.0)
    assert metrics[contract.TRAIN_TEACHER_SHARE] == pytest.approx(0.25)
    assert metrics[contract.TRAIN_PEAK_MEMORY_MIB] > 0  # the test process's resident set
    assert set(metrics) <= set(contract.COST_METRICS)


def test_training_cost_on_cuda_counts_gpu_seconds_and_times_the_teacher_every_kth_iteration():
    cost, wall, _, syncs = make_cost("cuda", gpus=2, teacher_every=3)
    for _ in range(6):
        with cost.iteration():
            wall.now += 1.0
            with cost.teacher():
                wall.now += 1.0  # the teacher: half of each 2-second step
    assert cost.iterations == 6 and cost.s_per_iteration == pytest.approx(2.0)
    assert len(syncs) == 2 * 4  # iterations 0 and 3: step start and end, teacher start and end
    assert cost.timed_step_seconds == pytest.approx(4.0) and cost.teacher_share == pytest.approx(0.5)
    assert cost.device_seconds == pytest.approx(12.0 * 2)  # wall x GPUs


def test_teacher_share_stays_in_the_unit_interval_with_real_clocks():
    cost = TrainingCost("cpu")
    for _ in range(3):
        with cost.iteration():
            with cost.teacher():
                sum(range(1000))
            sum(range(1000))
    assert 0.0 <= cost.teacher_share <= 1.0


def test_training_cost_step_records_externally_timed_iterations():
    cost, _, _, _ = make_cost()
    cost.step(1.0)
    cost.step(3.0, teacher_seconds=0.6)
    assert cost.s_per_iteration == pytest.approx(2.0)
    assert cost.teacher_share == pytest.approx(0.2)  # only the iteration where the teacher was timed
    with pytest.raises(ValueError, match="seconds"):
        cost.step(-1.0)
    with pytest.raises(ValueError, match="teacher_seconds"):
        cost.step(1.0, teacher_seconds=math.nan)


def test_a_failed_iteration_is_not_recorded_and_iterations_do_not_nest():
    cost, wall, _, _ = make_cost()
    with pytest.raises(RuntimeError, match="boom"), cost.iteration():
        wall.now += 5.0
        raise RuntimeError("boom")
    assert cost.iterations == 0
    with cost.iteration(), pytest.raises(RuntimeError, match="already"), cost.iteration():
        pass


def test_teacher_outside_an_iteration_is_a_no_op():
    cost, wall, _, syncs = make_cost("cuda")
    with cost.teacher():
        wall.now += 1.0
    assert cost.teacher_share is None and syncs == []


def test_state_dict_round_trip_continues_the_sums():
    first, wall, cpu, _ = make_cost()
    for _ in range(4):
        with first.iteration():
            wall.now += 0.5
            with first.teacher():
                wall.now += 0.5
        cpu.now += 2.0
    state = first.state_dict()
    assert state["device_seconds"] == pytest.approx(8.0)

    resumed, wall2, cpu2, _ = make_cost()  # a new process: its clocks start anywhere
    resumed.load_state_dict(state)
    assert resumed.device_seconds == pytest.approx(8.0)  # continues, does not restart
    with resumed.iteration():
        wall2.now += 2.0
        with resumed.teacher():
            wall2.now += 1.0
    cpu2.now += 4.0
    assert resumed.iterations == 5
    assert resumed.s_per_iteration == pytest.approx((4 * 1.0 + 3.0) / 5)
    assert resumed.device_seconds == pytest.approx(12.0)
    assert resumed.teacher_share == pytest.approx(3.0 / 7.0)  # (4 x 0.5 + 1) teacher over 4 + 3 step seconds
    assert resumed.peak_memory_mb() >= state["peak_memory_mb"]


def test_loaded_peak_memory_is_a_floor():
    cost, _, _, _ = make_cost()
    cost.load_state_dict({**cost.state_dict(), "peak_memory_mb": 1e9})
    assert cost.peak_memory_mb() == 1e9


@pytest.mark.parametrize("kwargs, name", [({"gpus": 0}, "gpus"), ({"teacher_every": 0}, "teacher_every")])
def test_training_cost_refuses_bad_settings(kwargs, name):
    with pytest.raises(ValueError, match=name):
        TrainingCost("cpu", **kwargs)

