"""Confusion matrix, IoU and mIoU against a naive per-pixel reference; the rank sum over 2 gloo processes."""

from __future__ import annotations

import math
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kdray.errors import DataError
from kdray.metrics import ConfusionMatrix, confusion_matrix, iou_per_class, mean_iou


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
