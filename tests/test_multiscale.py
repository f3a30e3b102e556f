"""Multi-scale + flip evaluation (`kdray.engine.multiscale`): the single-scale path unchanged, a mirror-symmetric
model unchanged by flips, a float64 loop reference, the config keys and their refusals, the metric names, and a
run scoring its best weights that way at its end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdray import contract
from kdray.config import job_from_dict, job_hash, load_job
from kdray.config.cache import teacher_key
from kdray.engine import RankContext, train
from kdray.engine.evaluate import evaluate, evaluation_loader
from kdray.engine.multiscale import multiscale_scores, pass_logits, scaled_size
from kdray.engine.scoring import score_best_weights
from kdray.errors import ConfigError
from kdray.metrics import ConfusionMatrix
from kdray.models import SegmenterOutput, build_model

DEMO = str(Path(__file__).resolve().parents[1] / "jobs" / "demo.yaml")
K = 5
PAPER_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class MirrorSymmetric(nn.Module):
    """A segmenter whose logits are mirror-symmetric by construction: g(x) = (f(x) + flip(f(flip x))) / 2, so
    g(flip x) = flip g(x) exactly (float addition commutes)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> SegmenterOutput:
        a = self.inner(x).logits
        b = self.inner(x.flip(-1)).logits.flip(-1)
        return SegmenterOutput((a + b) / 2, a, None)


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("deeplabv3_resnet18", K, width=0.125, aux=False).eval()


def split(n: int = 3, size: tuple[int, int] = (40, 56), seed: int = 1) -> list:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, K, (n, *size), generator=g)
    labels[:, :3] = 255  # some ignored pixels
    return list(zip(torch.randn(n, 3, *size, generator=g), labels))


def same_scores(a: dict, b: dict) -> bool:
    return a["miou"] == b["miou"] and a["pixel_acc"] == b["pixel_acc"] and np.array_equal(
        np.asarray(a["iou"]), np.asarray(b["iou"]), equal_nan=True)


# --- the single-scale path is today's evaluation ---------------------------------------------------------------


@pytest.mark.parametrize("window", [None, ((24, 32), (16, 16))])
def test_scale_one_without_flip_is_the_single_scale_evaluation_bit_for_bit(one_thread, window):
    """Scales (1.0,) and no flip: the resized logits themselves (not their softmax), so the confusion matrix is
    the one the evaluation always computed (written out here as it was before multi-scale existed)."""
    from kdray.engine.sliding import slide_logits

    model, data = tiny_model(), split()
    loader = evaluation_loader(data, 2, RankContext())
    expected = ConfusionMatrix(K, 255)
    with torch.no_grad():
        for images, labels in loader:
            forward = lambda x: model(x).logits  # noqa: E731
            logits = forward(images) if window is None else slide_logits(forward, images, window)
            logits = F.interpolate(logits.float(), size=labels.shape[-2:], mode="bilinear", align_corners=False)
            expected.update(logits, labels)
            scores = multiscale_scores(forward, images, labels.shape[-2:], (1.0,), False, window)
            assert torch.equal(scores, logits)
    result = evaluate(model, loader, K, 255, RankContext(), window=window)
    assert same_scores(result, expected.compute())
    assert same_scores(result, evaluate(model, loader, K, 255, RankContext(), window=window, scales=[1.0]))


# windows whose layout is its own mirror image at each size used: starts 0 and 24 over a width of 56 (scale 1),
# one window over the 28 columns at scale 0.5
SYMMETRIC_WINDOW = ((24, 32), (16, 24))


@pytest.mark.parametrize("scales, window", [((1.0,), None), ((0.5, 1.0, 1.5), None), ((1.0,), SYMMETRIC_WINDOW),
                                            ((0.5, 1.0), SYMMETRIC_WINDOW)])
def test_flips_leave_a_mirror_symmetric_model_unchanged(one_thread, scales, window):
    """For g(flip x) = flip g(x), each mirror pass equals its plain pass exactly: with flip, the scores are those
    without, bit for bit (with windows laid out symmetrically, to rounding); at scale 1 they are the softmax of the
    single-scale logits, and every evaluation scores the same."""
    model = MirrorSymmetric(tiny_model())
    images = torch.randn(2, 3, 40, 56)
    forward = lambda x: model(x).logits  # noqa: E731
    with torch.no_grad():
        flipped = multiscale_scores(forward, images, (40, 56), scales, True, window)
        plain = multiscale_scores(forward, images, (40, 56), scales, False, window) if scales != (1.0,) \
            else pass_logits(forward, images, (40, 56), window).softmax(1)
    if window is None:
        assert torch.equal(flipped, plain)
    else:  # each window's logits are resized, and resizing a mirror image is its mirror only up to rounding
        torch.testing.assert_close(flipped, plain, rtol=0, atol=1e-6)
        assert torch.equal(flipped.argmax(1), plain.argmax(1))
    loader = evaluation_loader(split(), 1, RankContext())
    ms_flip = evaluate(model, loader, K, 255, RankContext(), window=window, scales=scales, flip=True)
    ms = evaluate(model, loader, K, 255, RankContext(), window=window, scales=scales)
    assert same_scores(ms_flip, ms)
    if scales == (1.0,):
        assert same_scores(ms_flip, evaluate(model, loader, K, 255, RankContext(), window=window))


# --- an independent float64 reference -----------------------------------------------------------------------------


def reference_scores(conv64: nn.Module, images: torch.Tensor, size, scales, flip, window) -> torch.Tensor:
    """The protocol written out with loops, in float64: per image, scale and mirror, resize the image (antialiased
    when shrinking), run the windows one by one (or the whole image), flip the logits back, resize them to `size`,
    softmax, sum; divide by the number of passes."""
    out = []
    for image in images.double():
        total = torch.zeros(conv64.out_channels, *size, dtype=torch.float64)
        passes = 0
        for s in scales:
            h, w = max(1, round(image.shape[1] * s)), max(1, round(image.shape[2] * s))
            x = image[None]
            if (h, w) != tuple(image.shape[1:]):
                x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=s < 1)
            for mirrored in ([False, True] if flip else [False]):
                xx = x.flip(-1) if mirrored else x
                if window is None:
                    z = conv64(xx)
                else:
                    (ch, cw), (sh, sw) = window
                    ch, cw = min(ch, h), min(cw, w)
                    ys = list(range(0, h - ch, sh)) + [h - ch] if h > ch else [0]
                    xs = list(range(0, w - cw, sw)) + [w - cw] if w > cw else [0]
                    z = torch.zeros(1, conv64.out_channels, h, w, dtype=torch.float64)
                    hits = torch.zeros(1, 1, h, w, dtype=torch.float64)
                    for y0 in ys:
                        for x0 in xs:
                            part = conv64(xx[:, :, y0:y0 + ch, x0:x0 + cw])
                            z[:, :, y0:y0 + ch, x0:x0 + cw] += F.interpolate(part, size=(ch, cw), mode="bilinear",
                                                                             align_corners=False)
                            hits[:, :, y0:y0 + ch, x0:x0 + cw] += 1
                    z = z / hits
                if mirrored:
                    z = z.flip(-1)
                z = F.interpolate(z, size=size, mode="bilinear", align_corners=False)
                total += torch.exp(z[0] - z[0].max(0).values) / torch.exp(z[0] - z[0].max(0).values).sum(0)
                passes += 1
        out.append(total / passes)
    return torch.stack(out)


@pytest.mark.parametrize("scales, flip", [((1.0,), True), (PAPER_SCALES, True), ((0.5, 1.25), False),
                                          ((0.75,), False)])
@pytest.mark.parametrize("window", [None, ((16, 24), (8, 12))])
def test_multiscale_scores_match_a_float64_loop_reference(scales, flip, window):
    torch.manual_seed(3)
    conv = nn.Conv2d(3, K, 3, stride=4, padding=1)  # a stride like a segmenter's, and no mirror symmetry
    conv64 = nn.Conv2d(3, K, 3, stride=4, padding=1).double()
    conv64.load_state_dict({k: v.double() for k, v in conv.state_dict().items()})
    images = torch.randn(2, 3, 30, 44)
    with torch.no_grad():
        got = multiscale_scores(conv, images, (30, 44), scales, flip, window)
        want = reference_scores(conv64, images, (30, 44), scales, flip, window)
    assert got.dtype == torch.float32 and got.shape == (2, K, 30, 44)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-6)
    torch.testing.assert_close(got.sum(1), torch.ones(2, 30, 44), rtol=0, atol=1e-5)


def test_scaled_sizes_round_as_the_training_scale_does():
    assert scaled_size(1024, 2048, 0.75) == (768, 1536) and scaled_size(1024, 2048, 1.75) == (1792, 3584)
    assert scaled_size(3, 5, 0.1) == (1, 1) and scaled_size(64, 64, 1.0) == (64, 64)


# --- config, names and digests --------------------------------------------------------------------------------------


def test_eval_scales_and_flip_are_read_from_jobs_and_overrides():
    job = load_job(DEMO, ["data.eval_scales=[0.5, 0.75, 1.0, 1.25, 1.5, 1.75]", "data.eval_flip=true"])
    assert job.data.eval_scales == PAPER_SCALES and job.data.eval_flip is True
    default = load_job(DEMO)
    assert default.data.eval_scales == (1.0,) and default.data.eval_flip is False
    assert load_job(DEMO, ["data.eval_scales=[2]"]).data.eval_scales == (2.0,)


@pytest.mark.parametrize("override, start", [
    ("data.eval_scales=[-0.5, 1.0]", "data.eval_scales[0]: got -0.5; each scale must be > 0 and <= 4"),
    ("data.eval_scales=[1.0, 0]", "data.eval_scales[1]: got 0.0; each scale must be > 0 and <= 4"),
    ("data.eval_scales=[1.0, 8]", "data.eval_scales[1]: got 8.0; each scale must be > 0 and <= 4"),
    ("data.eval_scales=[.inf]", "data.eval_scales[0]: got inf; each scale must be > 0 and <= 4"),
    ("data.eval_scales=[]", "data.eval_scales: got []; a non-empty list of image scales"),
    ("data.eval_scales=[0.5, 1.0, 0.5]", "data.eval_scales: got [0.5, 1.0, 0.5]; each scale once (0.5 repeated"),
    ("data.eval_scales=[1, 1.0]", "data.eval_scales: got [1.0, 1.0]; each scale once"),
    ("data.eval_scales=1.5", "data.eval_scales: got 1.5; expected a list, each item a number"),
    ("data.eval_scales=[one]", "data.eval_scales[0]: got 'one'; expected a number"),
    ("data.eval_flip=sometimes", "data.eval_flip: got 'sometimes'; expected true/false"),
])
def test_bad_eval_settings_are_refused_naming_the_key(override, start):
    with pytest.raises(ConfigError) as err:
        load_job(DEMO, [override])
    assert str(err.value).startswith(start), str(err.value)


def test_the_metric_name_says_which_protocol():
    assert contract.miou_metric_key((1.0,), False) == contract.VAL_MIOU == "val/miou"
    assert contract.miou_metric_key(PAPER_SCALES, True) == contract.VAL_MIOU_MS_FLIP == "val/miou_ms_flip"
    assert contract.miou_metric_key((0.5, 1.0), False) == contract.VAL_MIOU_MS == "val/miou_ms"
    assert contract.miou_metric_key((0.75,), False) == contract.VAL_MIOU_MS  # one scale, but not the plain one
    assert contract.miou_metric_key((1.0,), True) == contract.VAL_MIOU_FLIP == "val/miou_flip"
    assert contract.protocol_iou_key("traffic light", PAPER_SCALES, True) == "val/iou_ms_flip/traffic light"
    assert contract.protocol_iou_key("tv/monitor", (1.0,), True) == "val/iou_flip/tv_monitor"
    assert contract.protocol_iou_key("car", (1.0,), False) == contract.iou_metric_key("car")


def test_evaluation_settings_change_neither_the_run_hash_nor_the_teacher():
    """They only add a score of the same weights: a resume and the cached demo teacher stay valid."""
    base = load_job(DEMO)
    multi = load_job(DEMO, ["data.eval_scales=[0.5, 1.0]", "data.eval_flip=true"])
    assert job_hash(base) == job_hash(multi) and teacher_key(base) == teacher_key(multi)
    assert base.teacher.checkpoint == multi.teacher.checkpoint


# --- a run scores its best weights at its end ---------------------------------------------------------------------

TINY = {
    "name": "tiny",
    "data": {"num_classes": 8, "crop": [32, 32], "batch_size": 4, "eval_batch_size": 4,
             "synthetic": {"image_size": 32, "train_length": 16, "val_length": 8}},
    "student": {"arch": "deeplabv3_resnet18", "width": 0.125},
    "optim": {"iterations": 4, "eval_interval": 2, "log_interval": 2},
    "run": {"threads": 1, "latency_repeats": 0},
}


def tiny_job(tmp_path, **overrides):
    return job_from_dict({**TINY, "run": {**TINY["run"], "output_dir": str(tmp_path / "runs")}}, overrides)


def test_a_run_with_eval_flip_scores_its_best_weights_once_at_the_end(tmp_path):
    job = tiny_job(tmp_path, **{"data.eval_flip": True})
    logs = []
    result = train(job, tmp_path / "s", log=logs.append, progress=False)
    names = ("background", "road", "disc", "box", "ring", "cross", "boat", "triangle")
    assert set(result.final_scores) == {"val/miou_flip", *(f"val/iou_flip/{n}" for n in names)}
    assert 0 <= result.final_scores["val/miou_flip"] <= 1
    assert logs[-1] == {**result.final_scores, "iteration": 4}  # logged once, at the last iteration's step
    assert sum("val/miou_flip" in m for m in logs) == 1
    assert all(h.keys().isdisjoint(result.final_scores) for h in result.history)  # val/miou stays single scale

    # the score is that of the best weights (not the last), with flips
    model = build_model("deeplabv3_resnet18", 8, width=0.125, aux=False)
    state = torch.load(result.best_weights, weights_only=True)
    model.load_state_dict({k: v for k, v in state.items() if not k.startswith("auxlayer.")})
    from kdray.data import build_dataset

    loader = evaluation_loader(build_dataset(job.data, "val"), 4, RankContext())
    again = evaluate(model, loader, 8, 255, RankContext(), flip=True)
    assert again["miou"] == result.final_scores["val/miou_flip"]


def test_a_single_scale_run_and_an_interrupted_one_score_nothing_more(tmp_path):
    logs = []
    result = train(tiny_job(tmp_path), tmp_path / "a", log=logs.append, progress=False)
    assert result.final_scores == {} and [m["iteration"] for m in logs] == [2, 4]
    cut = train(tiny_job(tmp_path, **{"data.eval_flip": True}), tmp_path / "b", progress=False, stop_after=2)
    assert cut.final_scores == {}


def test_without_the_best_weights_file_nothing_is_scored(tmp_path):
    """A run resumed on a fresh machine after its best evaluation has no file to score: no score, no error."""
    job = tiny_job(tmp_path, **{"data.eval_scales": [0.5, 1.0]})
    loader = evaluation_loader([], 1, RankContext())
    scores = score_best_weights(job, build_model("deeplabv3_resnet18", 8, width=0.125), tmp_path / "none.pt", loader,
                                RankContext())
    assert scores == {}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_scores(rank, port, job, folder, data, results):
    """One of two gloo ranks: only rank 0 has the best weights on its disk; each starts from other weights."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        torch.manual_seed(100 + rank)
        model = build_model("deeplabv3_resnet18", 8, width=0.125, aux=False)
        path = Path(folder) / f"rank{rank}" / "best_student.pt"
        if rank == 0:
            path.parent.mkdir(parents=True)
            torch.manual_seed(7)
            torch.save(build_model("deeplabv3_resnet18", 8, width=0.125, aux=False).state_dict(), path)
        ctx = RankContext(rank, 2)
        results[rank] = score_best_weights(job, model, path, evaluation_loader(data, 1, ctx), ctx)
    finally:
        dist.destroy_process_group()


def test_on_two_ranks_the_main_ranks_best_weights_are_scored_over_the_whole_split(tmp_path):
    """Ray gives each rank its own scratch folder: rank 0's weights reach the others, each scores its share of the
    split, and the summed confusion matrices give every rank the one-process score."""
    import torch.multiprocessing as mp

    job = tiny_job(tmp_path, **{"data.eval_scales": [0.75, 1.0], "data.eval_flip": True})
    g = torch.Generator().manual_seed(5)
    data = list(zip(torch.randn(5, 3, 24, 32, generator=g), torch.randint(0, 8, (5, 24, 32), generator=g)))
    results = mp.Manager().dict()
    mp.spawn(_rank_scores, args=(_free_port(), job, str(tmp_path), data, results), nprocs=2, join=True)

    torch.manual_seed(7)
    best = build_model("deeplabv3_resnet18", 8, width=0.125, aux=False)
    alone = evaluate(best, evaluation_loader(data, 1, RankContext()), 8, 255, RankContext(), scales=(0.75, 1.0),
                     flip=True)
    assert results[0] == results[1]
    assert results[0]["val/miou_ms_flip"] == alone["miou"]
    assert [results[0][f"val/iou_ms_flip/{n}"] for n in ("background", "road")] == pytest.approx(
        alone["iou"][:2], nan_ok=True)
