"""The CUDA paths, skipped where no GPU is present (CI has none; a GPU machine runs `pytest tests/test_gpu.py`).

Every loss gives on the GPU the value and gradients it gives on the CPU; under bf16/fp16 autocast every loss
stays finite and float32 and near its float32 value; the objective replayed as CUDA graphs gives what it gives
eagerly; the engine trains, evaluates and resumes on the GPU in float32, bf16 and fp16 (channels-last and CUDA
graphs too), and inside an nccl process group.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from test_engine import _free_port, tiny_job

from kdray.config import job_from_dict
from kdray.engine import RankContext, load_checkpoint, train
from kdray.losses.labels import downsample_labels
from kdray.losses.objective import DistillationObjective
from kdray.models import SegmenterOutput

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# Every loss on, with options that take their less common paths (CWD on logits and features, ACE's average
# rule, the adversarial loss conditioned on the image). CE stays on next to ACE on purpose: both are compared.
EVERY_LOSS = ["losses.kd.enabled=true", "losses.kd.temperature=2", "losses.kd.mask_ignore=true",
              "losses.cwd.enabled=true", "losses.cwd.on=both", "losses.ace.enabled=true", "losses.ace.rule=average",
              "losses.pairwise.enabled=true", "losses.adversarial.enabled=true",
              "losses.adversarial.conditioning=logits+image", "losses.ifvd.enabled=true",
              "losses.csc.enabled=true", "losses.i2ckd.enabled=true"]
K, C_S, C_T = 5, 8, 16


@pytest.fixture
def full_precision():
    """cuDNN's TF32 convolutions (torch's default) would put the adapters 1e-3 off the CPU."""
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def _objective():
    job = job_from_dict({"data": {"num_classes": K}}, EVERY_LOSS)
    torch.manual_seed(0)
    return DistillationObjective(job.losses, num_classes=K, student_channels=C_S, teacher_channels=C_T)


def _inputs(seed=0):
    """Student/teacher outputs on 9x13 maps, labels 72x104 with ignored pixels and class K-1 absent. Features
    are non-negative like a ReLU's, without all-zero pixels: there IFVD's cosine has its exact gradient 1/eps
    (as `F.normalize`'s), which is beyond float16's range by design, not by accident."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, K - 1, (2, 72, 104), generator=g)
    labels[torch.rand(2, 72, 104, generator=g) < 0.2] = 255
    return {
        "zs": torch.randn(2, K, 9, 13, generator=g), "fs": torch.rand(2, C_S, 9, 13, generator=g),
        "aux": torch.randn(2, K, 9, 13, generator=g), "zt": torch.randn(2, K, 9, 13, generator=g),
        "ft": torch.rand(2, C_T, 9, 13, generator=g), "labels": labels,
        "images": torch.randn(2, 3, 72, 104, generator=g),
    }


def _step_tensors(objective, x, device, autocast=None):
    """(fresh leaves on `device`, the objective's StepTensors); under `autocast`, the networks' outputs come in
    reduced precision, as autocast hands them to the losses."""
    x = {k: v.detach().to(device) for k, v in x.items()}
    student = [x["zs"].requires_grad_(), x["fs"].requires_grad_(), x["aux"].requires_grad_()]
    teacher = [x["zt"], x["ft"]]
    if autocast:
        student, teacher = [s.to(autocast) for s in student], [t.to(autocast) for t in teacher]
    tensors = objective.step_tensors(SegmenterOutput(*student), SegmenterOutput(*teacher, None), x["labels"],
                                     x["images"])
    return x, tensors


def _evaluate(objective, x, device, autocast=None):
    """Each term's value and the gradients of the total w.r.t. the student's tensors and every parameter."""
    with torch.autocast("cuda", dtype=autocast) if autocast else torch.enable_grad():
        x, tensors = _step_tensors(objective, x, device, autocast)
        total, parts = objective(tensors)
        d_loss = objective.owned_loss("adversarial", tensors)
    total.backward()
    d_loss.backward()
    grads = {name: x[name].grad for name in ("zs", "fs", "aux")}
    grads.update({name: p.grad for name, p in objective.named_parameters()})
    return {**parts, "discriminator": d_loss}, grads


def test_every_loss_gives_the_cpu_value_and_gradients_on_cuda(full_precision):
    cpu = _objective()
    gpu = copy.deepcopy(cpu).cuda()
    x = _inputs()
    parts_cpu, grads_cpu = _evaluate(cpu, x, "cpu")
    parts_gpu, grads_gpu = _evaluate(gpu, x, "cuda")
    assert set(parts_gpu) == set(parts_cpu) == {"ce", "kd", "cwd", "ace", "pairwise", "adversarial", "ifvd",
                                                "csc", "i2ckd", "discriminator"}
    for name, value in parts_cpu.items():
        assert parts_gpu[name].device.type == "cuda"
        assert _relative_error(parts_gpu[name], value) < 1e-5, name
    assert set(grads_gpu) == set(grads_cpu)
    for name, grad in grads_cpu.items():
        assert grad is not None and grads_gpu[name] is not None, name
        # relative to the whole gradient: a weight's gradient sums thousands of products, in another order on
        # each device, so elements near 0 carry the rounding of the large ones
        error = _relative_error(grads_gpu[name], grad)
        assert error < 1e-4, f"{name}: |gpu - cpu| / |cpu| = {error:.2e}"


def _relative_error(actual, expected):
    actual, expected = actual.detach().cpu().double(), expected.detach().cpu().double()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_loss_stays_float32_and_finite_under_autocast(full_precision, dtype):
    reference = _objective().cuda()
    x = _inputs(seed=1)
    parts_ref, _ = _evaluate(copy.deepcopy(reference), x, "cuda")
    parts, grads = _evaluate(reference, x, "cuda", autocast=dtype)
    for name, value in parts.items():
        assert value.dtype == torch.float32 and torch.isfinite(value), name
        # the inputs themselves were rounded to 8 (bf16) or 11 (fp16) significant bits
        torch.testing.assert_close(value, parts_ref[name], rtol=3e-2, atol=1e-3, msg=name)
    for name, grad in grads.items():
        assert grad is not None and torch.isfinite(grad).all(), name


def _graph_step(losses, objective, x):
    """One step of `losses` (the objective, or its graphed form): the terms and every gradient, copied."""
    objective.zero_grad(set_to_none=True)
    x, tensors = _step_tensors(objective, x, "cuda")
    total, parts = losses(tensors)
    total.backward()
    values = {name: value.detach().clone() for name, value in {**parts, "total": total}.items()}
    grads = {name: x[name].grad for name in ("zs", "fs", "aux")}
    grads.update({name: None if p.grad is None else p.grad.clone() for name, p in objective.named_parameters()})
    return values, grads


def test_graphed_objective_replays_what_the_eager_one_computes(full_precision):
    from kdray.engine.graphs import GraphedObjective

    eager = _objective().cuda()
    graphed_objective = copy.deepcopy(eager)
    graphed = GraphedObjective(graphed_objective)
    for seed in range(3):  # the capture, then two replays on new inputs
        x = _inputs(seed)
        want_values, want_grads = _graph_step(eager, eager, x)
        values, grads = _graph_step(graphed, graphed_objective, x)
        for name, value in want_values.items():
            assert _relative_error(values[name], value) < 1e-6, (seed, name)
        for name, grad in want_grads.items():
            assert (grads[name] is None) == (grad is None), (seed, name)
            if grad is not None:
                assert _relative_error(grads[name], grad) < 1e-5, (seed, name)
    # the capture's warm-up runs left no trace: the discriminator's buffers moved as the eager ones did
    for (name, buffer), (_, want) in zip(graphed_objective.named_buffers(), eager.named_buffers(), strict=True):
        torch.testing.assert_close(buffer, want, rtol=1e-6, atol=0, msg=name)
    # another shape is computed eagerly, with the same result
    x = {k: v[:1] for k, v in _inputs(seed=7).items()}
    want_values, _ = _graph_step(eager, eager, x)
    values, _ = _graph_step(graphed, graphed_objective, x)
    assert all(_relative_error(values[name], value) < 1e-6 for name, value in want_values.items())


@pytest.mark.parametrize("conditioning", ["logits", "logits+image"])
def test_graphed_owned_loss_replays_what_the_eager_one_computes(full_precision, conditioning):
    """The discriminator's loss (the adversarial loss's OwnedStep, hinge) replayed as a graph."""
    from kdray.config import job_from_dict
    from kdray.engine.graphs import GraphedOwnedLoss
    from kdray.losses import StepTensors

    torch.manual_seed(0)
    losses = job_from_dict({}, ["losses.adversarial.enabled=true",
                                f"losses.adversarial.conditioning={conditioning}"]).losses
    eager = DistillationObjective(losses, num_classes=K, student_channels=C_S, teacher_channels=C_T).cuda()
    twin = copy.deepcopy(eager)
    graphed = GraphedOwnedLoss(twin, "adversarial")

    def tensors(x):
        return StepTensors({"teacher.logits": x["zt"], "student.logits": x["zs"], "images": x["images"]})

    for seed in range(3):  # the capture, then two replays on new inputs
        x = {k: v.cuda() for k, v in _inputs(seed).items()}
        losses = []
        for module, call in ((eager, lambda t: eager.owned_loss("adversarial", t)), (twin, graphed)):
            module.zero_grad(set_to_none=True)
            loss = call(tensors(x))
            loss.backward()
            losses.append((loss.detach().clone(), {n: p.grad.clone() for n, p in module.named_parameters()
                                                   if p.grad is not None}))
        (want, want_grads), (got, grads) = losses
        assert _relative_error(got, want) < 1e-6, seed
        assert set(grads) == set(want_grads) and want_grads
        for name, grad in want_grads.items():
            assert _relative_error(grads[name], grad) < 1e-5, (seed, name)
    for (name, buffer), (_, want) in zip(twin.named_buffers(), eager.named_buffers(), strict=True):
        torch.testing.assert_close(buffer, want, rtol=1e-6, atol=0, msg=name)
    x = {k: v[:1].cuda() for k, v in _inputs(seed=7).items()}  # another shape: eager, same number
    assert _relative_error(graphed(tensors(x)), eager.owned_loss("adversarial", tensors(x))) < 1e-6


def _job(tmp_path, teacher_file, *overrides):
    """test_engine's tiny job (6 iterations, evaluations at 3 and 6) on one GPU, every loss but CE on."""
    pairs = (o.split("=", 1) for o in [*EVERY_LOSS, "losses.ce.enabled=false", "run.gpus_per_worker=1", *overrides])
    return tiny_job(tmp_path, teacher_file, **{key: yaml.safe_load(value) for key, value in pairs})


@pytest.mark.parametrize("amp,extra", [("none", []), ("bf16", []), ("fp16", []), ("bf16", ["run.channels_last=true"]),
                                       ("none", ["losses.adversarial.objective=wgan_gp"]),
                                       ("none", ["run.cuda_graphs=true"]), ("bf16", ["run.cuda_graphs=true"])])
def test_engine_trains_evaluates_and_resumes_on_cuda(tmp_path, teacher_file, amp, extra):
    job = _job(tmp_path, teacher_file, f"run.amp={amp}", *extra)
    ctx = RankContext(device=torch.device("cuda", 0))
    logs = []
    result = train(job, tmp_path / "full", ctx=ctx, log=logs.append, progress=False)
    assert result.iterations == 6 and [h["iteration"] for h in result.history] == [3, 6]
    assert all(0.0 <= h["val/miou"] <= 1.0 for h in result.history)
    assert {"train/loss/ace", "train/loss/i2ckd", "train/loss/discriminator"} <= set(logs[0])
    state = load_checkpoint(tmp_path / "full" / "checkpoint")
    assert state["iteration"] == 6 and state["rng"][0]["cuda"] is not None
    assert all(v.device.type == "cpu" or v.is_cuda for v in state["model"].values())
    if amp == "fp16":
        assert state["scaler"]["scale"] > 0  # the grad scaler is live and saved

    # an interrupted run resumes from its iteration-3 checkpoint and finishes the schedule
    train(job, tmp_path / "cut", ctx=ctx, progress=False, stop_after=3)
    again = train(job, tmp_path / "cut", ctx=ctx, resume=tmp_path / "cut" / "checkpoint", progress=False)
    assert [h["iteration"] for h in again.history] == [3, 6]


def test_engine_trains_inside_an_nccl_process_group(tmp_path, teacher_file):
    """What a Ray Train worker with one GPU runs: the loop inside an initialised nccl group (of one rank: nccl
    refuses two ranks on one GPU, and the lent machines have one)."""
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1,
                            device_id=torch.device("cuda", 0))
    try:
        ctx = RankContext.current(torch.device("cuda", 0))
        assert ctx.world_size == 1 and dist.get_backend() == "nccl"
        job = _job(tmp_path, teacher_file, "run.amp=bf16")
        result = train(job, tmp_path / "nccl", ctx=ctx, progress=False)
        assert [h["iteration"] for h in result.history] == [3, 6]
        grad = torch.full((3,), 2.0, device="cuda")
        dist.all_reduce(grad)  # nccl itself moves the data
        assert grad.tolist() == [2.0, 2.0, 2.0]
    finally:
        dist.destroy_process_group()


def _gloo_rank_on_the_gpu(rank, port, job, out_dir, results):
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.deterministic = True  # graphed and eager runs then differ only by what graphs change
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        result = train(job, out_dir, ctx=RankContext.current(torch.device("cuda", 0)), progress=False)
        if rank == 0:
            state = load_checkpoint(f"{out_dir}/checkpoint")
            results[out_dir] = {"history": result.history,
                                "weights": {k: v.cpu() for k, v in state["model"].items()},
                                "objective": {k: v.cpu() for k, v in state["objective"].items()}}
    finally:
        dist.destroy_process_group()


def test_cuda_graphs_on_two_ranks_train_what_eager_ranks_train(tmp_path, teacher_file):
    """`run.cuda_graphs` under data parallelism: two ranks (gloo, both on the one GPU: nccl refuses two ranks
    on one device) with DDP, SyncBatchNorm, and the adapters' and discriminator's all-reduces, graphed and
    eager, reach the same weights and the same evaluations."""
    results = mp.Manager().dict()
    for graphs in ("false", "true"):
        job = _job(tmp_path, teacher_file, "run.workers=2", f"run.cuda_graphs={graphs}")
        out_dir = str(tmp_path / f"graphs-{graphs}")
        mp.spawn(_gloo_rank_on_the_gpu, args=(_free_port(), job, out_dir, results), nprocs=2, join=True)
    eager, graphed = results[str(tmp_path / "graphs-false")], results[str(tmp_path / "graphs-true")]
    assert [h["iteration"] for h in graphed["history"]] == [3, 6]
    for want, got in zip(eager["history"], graphed["history"], strict=True):
        assert got["val/miou"] == pytest.approx(want["val/miou"], abs=1e-6)
    for part in ("weights", "objective"):
        assert set(graphed[part]) == set(eager[part])
        for name, want in eager[part].items():
            if want.is_floating_point():
                assert _relative_error(graphed[part][name], want) < 1e-4, (part, name)
            else:
                assert torch.equal(graphed[part][name], want), (part, name)


@pytest.mark.parametrize("extra", [["run.amp=bf16"], ["run.cuda_graphs=true"],
                                   ["run.amp=bf16", "run.cuda_graphs=true"]])
def test_a_loss_on_backbone_layers_trains_on_cuda(tmp_path, teacher_file, layer_hint, extra):
    """Feature taps on the GPU: the hooked layers' maps (bf16 under autocast) reach a loss that reads
    `backbone.layer3` of both models, eagerly and by graph replay, and the run trains and resumes."""
    job = tiny_job(tmp_path, teacher_file, **{f"losses.{layer_hint}.enabled": True, "run.gpus_per_worker": 1,
                                              **{k: yaml.safe_load(v) for k, v in (e.split("=") for e in extra)}})
    ctx = RankContext(device=torch.device("cuda", 0))
    logs = []
    result = train(job, tmp_path / "full", ctx=ctx, log=logs.append, progress=False)
    assert [h["iteration"] for h in result.history] == [3, 6]
    assert all(torch.isfinite(torch.tensor(m[f"train/loss/{layer_hint}"])) for m in logs)
    train(job, tmp_path / "cut", ctx=ctx, progress=False, stop_after=3)
    again = train(job, tmp_path / "cut", ctx=ctx, resume=tmp_path / "cut" / "checkpoint", progress=False)
    assert [h["iteration"] for h in again.history] == [3, 6]


def test_cirkd_on_cuda_keeps_the_cpu_values_queues_and_draws(full_precision):
    """CIRKD's memory on the GPU: over three calls, the same losses, queues, pointers and generator state as on
    the CPU (the draws come from a CPU generator either way), and the same gradients for the projection head."""
    from kdray.losses.cirkd import CIRKD

    torch.manual_seed(0)
    cpu = CIRKD(K, C_S, C_T, pixel_memory_size=40, region_memory_size=6, pixel_contrast_size=12,
                region_contrast_size=6, seed=3)
    gpu = copy.deepcopy(cpu).cuda()
    for seed in range(3):
        x = _inputs(seed)
        labels = downsample_labels(x["labels"], x["fs"].shape[-2:])
        fs_cpu, fs_gpu = x["fs"].clone().requires_grad_(), x["fs"].cuda().requires_grad_()
        value_cpu = cpu(fs_cpu, x["ft"], labels)
        value_gpu = gpu(fs_gpu, x["ft"].cuda(), labels.cuda())
        assert _relative_error(value_gpu, value_cpu) < 1e-5, seed
        value_cpu.backward()
        value_gpu.backward()
        assert _relative_error(fs_gpu.grad, fs_cpu.grad) < 1e-4, seed
    for (name, want), (_, got) in zip(cpu.state_dict().items(), gpu.state_dict().items(), strict=True):
        if want.is_floating_point():
            torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-6, msg=name)
        else:
            assert torch.equal(got.cpu(), want), name  # pointers, generator state
    for (name, p_cpu), (_, p_gpu) in zip(cpu.named_parameters(), gpu.named_parameters(), strict=True):
        assert _relative_error(p_gpu.grad, p_cpu.grad) < 1e-4, name


@pytest.mark.parametrize("extra", [["run.cuda_graphs=true"], ["run.amp=bf16", "run.cuda_graphs=true"]])
def test_cirkd_trains_and_resumes_on_cuda_with_graphs_asked_for(tmp_path, teacher_file, extra):
    """A run with CIRKD's memory on computes its losses eagerly even under `run.cuda_graphs` (the enqueue draws
    and loops on the host), trains, keeps its queues on the GPU and resumes from its checkpoint."""
    overrides = {"losses.kd.enabled": True, "losses.cirkd.enabled": True, "losses.cirkd.pixel_memory_size": 64,
                 "losses.cirkd.region_memory_size": 8, "losses.cirkd.pixel_contrast_size": 32,
                 "losses.cirkd.region_contrast_size": 8, "run.gpus_per_worker": 1,
                 **{k: yaml.safe_load(v) for k, v in (e.split("=") for e in extra)}}
    job = tiny_job(tmp_path, teacher_file, **overrides)
    ctx = RankContext(device=torch.device("cuda", 0))
    result = train(job, tmp_path / "full", ctx=ctx, progress=False)
    assert [h["iteration"] for h in result.history] == [3, 6]
    state = load_checkpoint(tmp_path / "full" / "checkpoint")
    assert int(state["objective"]["terms.cirkd.memory.pixel_ptr"].sum()) > 0
    train(job, tmp_path / "cut", ctx=ctx, progress=False, stop_after=3)
    again = train(job, tmp_path / "cut", ctx=ctx, resume=tmp_path / "cut" / "checkpoint", progress=False)
    assert [h["iteration"] for h in again.history] == [3, 6]
