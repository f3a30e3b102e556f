"""Image-loading throughput of each paper job's training pipeline, per training worker.

    python benchmarks/loading.py                          # the three datasets, 0 and 1 DataLoader processes
    python benchmarks/loading.py --datasets voc --images 400 --processes 0

What is measured: images per second out of a DataLoader over the job's own training dataset,
`build_dataset(job.data, "train")` of jobs/<dataset>_dl101_to_dl18.yaml (read the image and the mask with PIL,
map the labels, random scale 0.5-2.0, crop, flip, CIRKD's BGR mean subtraction), batched by the engine's
IterationBatchSampler at 2 images per batch (the papers' batch per GPU). `0` processes: the training process
loads (torch limited to 1 thread); `1`: one loader process does, the number to multiply by `data.loader_workers`.
The first batch (process start-up) is not timed.

The data is fabricated in a temporary directory, a few distinct files per dataset read in turn, at the papers'
sizes: Cityscapes 1024x2048 RGB PNG (crop 512x1024), VOC 500x375 JPEG at quality 90 (crop 512x512), CamVid
360x480 RGB PNG (crop 360x360); masks are grey PNGs of large label regions. Images are smooth gradients with
texture and noise, so that the PNGs and JPEGs compress about as real photographs do (the file sizes are printed).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from kdray.config import load_job  # noqa: E402
from kdray.data import IterationBatchSampler, build_dataset  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FILES = 4
BATCH = 2
# dataset -> (image height, width, image suffix, default number of timed images)
SOURCES = {"cityscapes": (1024, 2048, ".png", 24), "voc": (375, 500, ".jpg", 160), "camvid": (360, 480, ".png", 160)}


def photo(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([np.sin(xx / rng.uniform(40, 200) + c) * 60 + np.cos(yy / rng.uniform(30, 150)) * 50
                     for c in range(3)], -1) + 120
    blocks = rng.uniform(-40, 40, size=(h // 4 + 1, w // 4 + 1, 3)).repeat(4, 0).repeat(4, 1)[:h, :w]
    return np.clip(base + blocks + rng.normal(0, 1, size=(h, w, 3)), 0, 255).astype(np.uint8)


def labels(rng: np.random.Generator, h: int, w: int, k: int) -> np.ndarray:
    out = np.zeros((h, w), np.uint8)
    for _ in range(30):
        y, x = rng.integers(0, h), rng.integers(0, w)
        out[y:y + rng.integers(h // 20, h // 3), x:x + rng.integers(w // 20, w // 3)] = rng.integers(0, k)
    return out


def fabricate(dataset: str, root: Path) -> tuple[int, int]:
    """A tree of FILES training pairs; returns the mean image and mask file sizes in bytes."""
    h, w, suffix, _ = SOURCES[dataset]
    rng = np.random.default_rng(0)
    images, masks = [], []
    for i in range(FILES):
        if dataset == "cityscapes":
            image = root / "leftImg8bit/train/city" / f"city_{i:06d}_000019_leftImg8bit.png"
            mask, k = root / "gtFine/train/city" / f"city_{i:06d}_000019_gtFine_labelIds.png", 34
        elif dataset == "voc":
            image, k = root / "JPEGImages" / f"2007_{i:06d}.jpg", 21
            mask = root / "SegmentationClassAug" / f"2007_{i:06d}.png"
        else:
            image, mask, k = root / "train" / f"0001TP_{i:06d}.png", root / "trainannot" / f"0001TP_{i:06d}.png", 12
        for path in (image, mask):
            path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(photo(rng, h, w)).save(image, **({"quality": 90} if suffix == ".jpg" else {}))
        Image.fromarray(labels(rng, h, w, k)).save(mask)
        images.append(image.stat().st_size)
        masks.append(mask.stat().st_size)
    if dataset == "voc":
        lists = root / "ImageSets/Segmentation"
        lists.mkdir(parents=True)
        (lists / "train_aug.txt").write_text("".join(f"2007_{i:06d}\n" for i in range(FILES)))
    return int(np.mean(images)), int(np.mean(masks))


def throughput(dataset: str, root: Path, processes: int, images: int) -> float:
    job = load_job(REPO / "jobs" / f"{dataset}_dl101_to_dl18.yaml", [f"data.root={root}"])
    train_set = build_dataset(job.data, "train")
    batches = images // BATCH + 1  # one more: the first is not timed
    sampler = IterationBatchSampler(len(train_set), BATCH, 0, 1, seed=0, start=0, stop=batches)
    loader = DataLoader(train_set, batch_sampler=sampler, num_workers=processes)
    it = iter(loader)
    next(it)
    t0 = time.perf_counter()
    n = sum(batch[0].shape[0] for batch in it)
    return n / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=list(SOURCES), choices=list(SOURCES))
    parser.add_argument("--processes", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--images", type=int, default=None, help="timed images per run (default: per dataset)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # one training worker's share; DataLoader processes use 1 thread too
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for dataset in args.datasets:
            root = Path(tmp) / dataset
            image_bytes, mask_bytes = fabricate(dataset, root)
            h, w, suffix, default = SOURCES[dataset]
            crop = load_job(REPO / "jobs" / f"{dataset}_dl101_to_dl18.yaml", [f"data.root={root}"]).data.crop
            for processes in args.processes:
                rate = throughput(dataset, root, processes, args.images or default)
                rows.append((dataset, f"{h}x{w} {suffix[1:].upper()} ({image_bytes / 1024:.0f} KB), mask "
                             f"{mask_bytes / 1024:.0f} KB", f"{crop[0]}x{crop[1]}", processes, rate))
                print(f"{dataset}: {processes} loader process(es): {rate:.1f} images/s", flush=True)
    print()
    print("| dataset | source image | train crop | DataLoader processes | images/s | ms/image |")
    print("|---|---|---|---:|---:|---:|")
    for dataset, source, crop, processes, rate in rows:
        print(f"| {dataset} | {source} | {crop} | {processes} | {rate:.1f} | {1000 / rate:.0f} |")


if __name__ == "__main__":
    main()
