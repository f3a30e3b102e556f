"""Synthetic dataset, joint transforms and the per-iteration sampler."""

from __future__ import annotations

import pytest
import torch
from torchvision import tv_tensors

from kdray.config import DataConfig
from kdray.data import IterationBatchSampler, build_dataset, train_transforms
from kdray.data.synthetic import SyntheticSegmentation
from kdray.errors import DataError


def test_synthetic_is_deterministic_and_well_formed():
    a, b = SyntheticSegmentation("train", 16, 48, seed=3), SyntheticSegmentation("train", 16, 48, seed=3)
    image, mask = a[5]
    assert isinstance(image, tv_tensors.Image) and isinstance(mask, tv_tensors.Mask)
    assert image.shape == (3, 48, 48) and image.dtype == torch.uint8
    assert mask.shape == (48, 48) and mask.dtype == torch.int64
    assert torch.equal(image, b[5][0]) and torch.equal(mask, b[5][1])
    assert not torch.equal(image, a[6][0])
    assert not torch.equal(image, SyntheticSegmentation("val", 16, 48, seed=3)[5][0])  # splits differ
    with pytest.raises(IndexError):
        a[16]


def test_synthetic_class_statistics():
    ds = SyntheticSegmentation("train", 200, 64)
    counts = torch.zeros(ds.num_classes)
    for i in range(len(ds)):
        counts += torch.bincount(ds[i][1].flatten(), minlength=ds.num_classes)
    share = counts / counts.sum()
    assert (share > 0).all()  # every class occurs
    assert share[7] < share[2] and share[6] < share[2]  # triangles and boats are rarer than discs
    assert share[0] > 0.3  # background dominates, as in real scenes


@pytest.mark.parametrize("seed", range(4))
def test_train_transform_crops_pads_with_ignore_and_flips_jointly(seed):
    torch.manual_seed(seed)
    labels = torch.arange(80).reshape(8, 10) % 5
    image = tv_tensors.Image((labels * 40).byte().expand(3, 8, 10).clone())  # each pixel encodes its label
    t = train_transforms((16, 16), (1.0, 1.0), True, (0, 0, 0), (1, 1, 1), ignore_index=255)
    out_image, out_mask = t(image, tv_tensors.Mask(labels))
    assert out_image.shape == (3, 16, 16) and out_image.dtype == torch.float32
    assert out_mask.shape == (16, 16) and out_mask.dtype == torch.int64
    assert type(out_image) is torch.Tensor and type(out_mask) is torch.Tensor
    padded = out_mask == 255
    assert int(padded.sum()) == 16 * 16 - 8 * 10  # the crop is larger than the image: padded, never invented
    assert (out_image[:, padded] == 0).all()
    decoded = (out_image[0] * 255 / 40).round().long()
    assert torch.equal(decoded[~padded], out_mask[~padded])  # flipped or not, image and mask stay aligned


def test_random_scale_range_and_nearest_mask():
    torch.manual_seed(1)
    ds = SyntheticSegmentation("train", 4, 32)
    t = train_transforms((64, 64), (2.0, 2.0), False, (0, 0, 0), (1, 1, 1))
    image, mask = t(*ds[0])
    assert image.shape == (3, 64, 64)
    assert set(mask.unique().tolist()) <= set(range(8))  # nearest: no blended label values, no padding at 2x


def test_normalisation_and_bgr_order():
    image = tv_tensors.Image(torch.stack([torch.full((2, 2), 255), torch.zeros(2, 2), torch.zeros(2, 2)]).byte())
    mask = tv_tensors.Mask(torch.zeros(2, 2, dtype=torch.long))
    from kdray.data import eval_transforms

    rgb, _ = eval_transforms((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "rgb")(image, mask)
    bgr, _ = eval_transforms((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bgr")(image, mask)
    assert rgb[0].eq(1).all() and rgb[2].eq(-1).all()
    assert bgr[2].eq(1).all() and bgr[0].eq(-1).all()


def test_seeded_items_do_not_depend_on_the_process_rng():
    ds = build_dataset(DataConfig(), "train")
    torch.manual_seed(0)
    a = ds[(3, 42)]
    torch.manual_seed(99)
    b = ds[(3, 42)]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    state = torch.get_rng_state()
    ds[(4, 7)]
    assert torch.equal(state, torch.get_rng_state())  # the training RNG is left untouched


def test_sampler_shards_each_global_batch_across_ranks():
    n, batch, world = 20, 8, 2
    samplers = [IterationBatchSampler(n, batch, r, world, seed=0, start=0, stop=6) for r in range(world)]
    per_rank = [list(s) for s in samplers]
    assert all(len(batches) == 6 and all(len(b) == 4 for b in batches) for batches in per_rank)
    for i in range(6):
        indices = [idx for r in range(world) for idx, _ in per_rank[r][i]]
        assert len(set(indices)) == batch  # ranks never share a sample within a step
        seeds = [s for r in range(world) for _, s in per_rank[r][i]]
        assert len(set(seeds)) == batch
    epoch0 = [idx for i in range(2) for r in range(world) for idx, _ in per_rank[r][i]]
    assert len(set(epoch0)) == 16  # 2 batches per epoch (last partial batch dropped), no repeats


def test_sampler_resumes_at_any_iteration():
    full = list(IterationBatchSampler(30, 4, 0, 1, seed=5, start=0, stop=20))
    tail = list(IterationBatchSampler(30, 4, 0, 1, seed=5, start=13, stop=20))
    assert tail == full[13:]


def test_sampler_needs_one_global_batch():
    with pytest.raises(DataError, match="fewer than one global batch"):
        IterationBatchSampler(3, 4, 0, 1, seed=0, start=0, stop=1)
