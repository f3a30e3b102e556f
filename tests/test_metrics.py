"""Confusion matrix, IoU and mIoU against a naive per-pixel reference; the rank sum over 2 gloo processes."""

from __future__ import annotations

import math
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from mlflow.utils import validation as mlflow_validation

from kdray.errors import ConfigError, DataError
from kdray.metrics import ConfusionMatrix, confusion_matrix, iou_metric_key, iou_per_class, mean_iou


def naive_miou(preds, targets, k, ignore=255):
    """Per-pixel loops in plain Python: IoU per class over all images, mean over classes seen anywhere."""
    tp, fp, fn = [0] * k, [0] * k, [0] * k
    for pred, target in zip(preds, targets):
        for p, t in zip(pred.flatten().tolist(), target.flatten().tolist()):
            if t == ignore:
                continue
            if p == t:
                tp[t] += 1
            else:
                fp[p] += 1
                fn[t] += 1
    ious = [tp[c] / (tp[c] + fp[c] + fn[c]) if tp[c] + fp[c] + fn[c] else float("nan") for c in range(k)]
    seen = [v for v in ious if not math.isnan(v)]
    return ious, (sum(seen) / len(seen) if seen else float("nan"))


def random_batch(gen, n, h, w, k, ignore_frac=0.2, absent=()):
    target = torch.randint(0, k, (n, h, w), generator=gen)
    pred = torch.randint(0, k, (n, h, w), generator=gen)
    for c in absent:
        target[target == c] = (c + 1) % k
        pred[pred == c] = (c + 1) % k
    target[torch.rand(n, h, w, generator=gen) < ignore_frac] = 255
    return pred, target


@pytest.mark.parametrize("seed", range(4))
def test_matches_naive_reference(seed):
    gen = torch.Generator().manual_seed(seed)
    k = 6
    cm = ConfusionMatrix(k)
    preds, targets = [], []
    for _ in range(3):
        pred, target = random_batch(gen, 2, 5, 7, k, absent=(4,))
        cm.update(pred, target)
        preds.append(pred)
        targets.append(target)
    ref_iou, ref_miou = naive_miou(preds, targets, k)
    out = cm.compute()
    assert math.isnan(out["iou"][4]) and math.isnan(ref_iou[4])  # absent from labels and predictions
    for a, b in zip(out["iou"], ref_iou):
        assert (math.isnan(a) and math.isnan(b)) or abs(a - b) < 1e-12
    assert abs(out["miou"] - ref_miou) < 1e-12


def test_logits_are_argmaxed():
    logits = torch.randn(2, 4, 3, 5)
    target = torch.randint(0, 4, (2, 3, 5))
    a, b = ConfusionMatrix(4), ConfusionMatrix(4)
    a.update(logits, target)
    b.update(logits.argmax(1), target)
    assert torch.equal(a.counts, b.counts)


def test_predicted_but_unlabelled_class_counts_as_zero_iou():
    target = torch.tensor([[0, 0, 1]])
    pred = torch.tensor([[0, 2, 1]])
    iou = iou_per_class(confusion_matrix(pred, target, 3))
    assert iou.tolist() == [0.5, 1.0, 0.0]
    assert mean_iou(confusion_matrix(pred, target, 3)) == pytest.approx(0.5)


def test_all_ignore_gives_nan_not_an_error():
    cm = ConfusionMatrix(3)
    cm.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.full((1, 2, 2), 255))
    out = cm.compute()
    assert math.isnan(out["miou"]) and math.isnan(out["pixel_acc"])


def test_one_pixel_per_class():
    target = torch.tensor([[0, 1, 2, 255]])
    cm = ConfusionMatrix(3)
    cm.update(target.clamp(max=2), target)
    assert cm.compute()["miou"] == 1.0


def test_label_out_of_range_is_a_clear_error():
    with pytest.raises(DataError, match="label value 7 is outside 0..3"):
        confusion_matrix(torch.zeros(4, dtype=torch.long), torch.tensor([0, 1, 7, 255]), 4)
    with pytest.raises(DataError, match="shape"):
        confusion_matrix(torch.zeros(4, dtype=torch.long), torch.zeros(5, dtype=torch.long), 4)


def _prediction_refusal(value: int, k: int) -> str:
    return (rf"prediction value {value} is outside 0\.\.{k - 1} \(K = {k}\): the model's class count must match "
            rf"data\.num_classes \({k}\)")


@pytest.mark.parametrize("bad", [3, 9, -1])
@pytest.mark.parametrize("entry", ["update", "function"])
def test_prediction_outside_the_classes_is_a_clear_error(bad, entry):
    """Before: bincount put a prediction p >= K or < 0 into the cell of another (label, prediction) pair."""
    target = torch.tensor([[0, 1, 2, 1]])
    pred = torch.tensor([[0, 1, bad, 2]])
    with pytest.raises(ConfigError, match=_prediction_refusal(bad, 3)):
        if entry == "update":
            ConfusionMatrix(3).update(pred, target)
        else:
            confusion_matrix(pred, target, 3)


def test_prediction_at_an_ignored_pixel_is_not_looked_at():
    target = torch.tensor([[0, 1, 255]])
    pred = torch.tensor([[0, 1, 7]])
    cm = ConfusionMatrix(2)
    cm.update(pred, target)
    ref_iou, _ = naive_miou([pred], [target], 2)
    assert cm.compute()["iou"] == ref_iou == [1.0, 1.0]


def test_logits_with_another_class_count_are_a_clear_error():
    with pytest.raises(ConfigError, match=r"logits \(2, 6, 3, 5\) have 6 classes on axis 1, expected K = 4: the "
                                          r"model's class count must match data\.num_classes \(4\)"):
        ConfusionMatrix(4).update(torch.randn(2, 6, 3, 5), torch.randint(0, 4, (2, 3, 5)))
    with pytest.raises(ConfigError, match="have 3 classes"):
        ConfusionMatrix(4).update(torch.randn(2, 3, 3, 5), torch.randint(0, 3, (2, 3, 5)))


@pytest.mark.parametrize("seed", range(3))
def test_valid_batches_still_match_the_reference_with_predictions_up_to_k_minus_1(seed):
    gen = torch.Generator().manual_seed(100 + seed)
    pred, target = random_batch(gen, 2, 6, 5, 3)
    pred[0, 0, 0], target[0, 0, 0] = 2, 0  # the extreme class on both sides
    cm = ConfusionMatrix(3)
    cm.update(pred, target)
    ref_iou, ref_miou = naive_miou([pred], [target], 3)
    assert all((math.isnan(a) and math.isnan(b)) or abs(a - b) < 1e-12 for a, b in zip(cm.compute()["iou"], ref_iou))
    assert abs(cm.compute()["miou"] - ref_miou) < 1e-12


# --------------------------------------------------------------------------------------------------------------
# iou_metric_key: names MLflow accepts
# --------------------------------------------------------------------------------------------------------------
AWKWARD_NAMES = ["crack (large)", "person+rider", "tv/monitor", "traffic light", "a:b", "x,y's", "", ".", "..",
                 "...", "/lead", "trail/", "a//b", "../up", "tab\there", "new\nline", "Straße", "façade-1.2_x"]


@pytest.mark.parametrize("windows", [False, True])
@pytest.mark.parametrize("name", AWKWARD_NAMES)
def test_iou_metric_key_is_accepted_by_mlflow(monkeypatch, name, windows):
    """On either platform's rule (':' is refused on Windows): a key does not depend on where it is logged."""
    monkeypatch.setattr(mlflow_validation, "is_windows", lambda: windows)
    key = iou_metric_key(name)
    assert key.startswith("val/iou/") and "/" not in key[len("val/iou/"):]
    mlflow_validation._validate_metric_name(key)
    mlflow_validation._validate_metric(key, 0.5, 0, 0)


def test_iou_metric_key_replaces_each_refused_character():
    assert iou_metric_key("crack (large)") == "val/iou/crack _large_"
    assert iou_metric_key("person+rider") == "val/iou/person_rider"
    assert iou_metric_key("tv/monitor") == "val/iou/tv_monitor"
    assert iou_metric_key("a:b") == "val/iou/a_b"
    assert [iou_metric_key(n) for n in ("", ".", "..")] == ["val/iou/_", "val/iou/_", "val/iou/__"]


@pytest.mark.parametrize("name", ["traffic light", "road", "Straße", "façade-1.2_x", "...", "class_07", "sky 2"])
def test_iou_metric_key_keeps_names_already_valid(name):
    assert iou_metric_key(name) == "val/iou/" + name


def test_iou_metric_key_of_a_key_suffix_is_itself():
    for name in AWKWARD_NAMES:
        suffix = iou_metric_key(name)[len("val/iou/"):]
        assert iou_metric_key(suffix) == iou_metric_key(name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_worker(rank, world, port, preds, targets, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        cm = ConfusionMatrix(5)
        for pred, target in zip(preds[rank::world], targets[rank::world]):
            cm.update(pred, target)
        out[rank] = cm.all_reduce().counts.clone()
    finally:
        dist.destroy_process_group()


def test_all_reduce_over_two_gloo_ranks_equals_single_process():
    gen = torch.Generator().manual_seed(0)
    batches = [random_batch(gen, 2, 4, 6, 5) for _ in range(5)]
    preds, targets = [b[0] for b in batches], [b[1] for b in batches]
    single = ConfusionMatrix(5)
    for pred, target in batches:
        single.update(pred, target)
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_rank_worker, args=(2, _free_port(), preds, targets, out), nprocs=2, join=True)
    assert torch.equal(out[0], single.counts) and torch.equal(out[1], single.counts)
