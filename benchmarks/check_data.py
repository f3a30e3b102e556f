"""How long `python -m kdray.train --check-data` takes to scan every mask of a Cityscapes-sized split.

    python benchmarks/check_data.py                  # 500 label PNGs of 1024x2048, 1 thread and the CLI's count
    python benchmarks/check_data.py --count 100 --threads 1 4

What is measured: `Cityscapes(root, "train").check(workers=T)`, the call `--check-data` makes per split, over a
fabricated tree of `--count` images with `gtFine_labelIds` files of 1024x2048 (8-bit grey PNGs of large
regions of label ids 0..33, like real Cityscapes labels). Per mask: PIL decodes it, the value histogram is
checked against the 34 label ids, the image header is read to compare sizes. The images are flat-colour PNGs
of 1024x2048: only their header is read, so their content does not matter. The files are fresh in the page
cache; a scan from a cold disk or a network mount adds the time to read each file.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from kdray.data.cityscapes import Cityscapes  # noqa: E402
from kdray.engine.inputs import SCAN_THREADS  # noqa: E402

H, W = 1024, 2048
TEMPLATES = 8


def label_map(rng: np.random.Generator) -> np.ndarray:
    """A street-scene-like labelIds map: sky, buildings, road and a few dozen objects as filled boxes/ellipses."""
    labels = np.full((H, W), 23, np.uint8)  # sky
    labels[int(H * rng.uniform(0.2, 0.35)):] = 11  # building
    labels[int(H * rng.uniform(0.55, 0.65)):] = 7  # road
    labels[-int(H * 0.04):] = 1  # ego vehicle
    yy, xx = np.ogrid[:H, :W]
    for _ in range(40):
        cy, cx = rng.integers(0, H), rng.integers(0, W)
        ry, rx = rng.integers(8, 120), rng.integers(8, 200)
        value = rng.choice([8, 17, 20, 21, 24, 26, 33, 0, 4])
        if rng.random() < 0.5:
            labels[max(0, cy - ry):cy + ry, max(0, cx - rx):cx + rx] = value
        else:
            labels[((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1] = value
    return labels


def fabricate(root: Path, count: int) -> int:
    """The tree with `count` image/label pairs; returns the mean label file size in bytes."""
    rng = np.random.default_rng(0)
    templates = root / "templates"
    templates.mkdir(parents=True)
    for t in range(TEMPLATES):
        Image.fromarray(label_map(rng)).save(templates / f"{t}.png")
    Image.new("RGB", (W, H), (90, 110, 120)).save(templates / "image.png")
    for i in range(count):
        city, stem = f"city{i % 18:02d}", f"city{i % 18:02d}_{i:06d}_000019"
        for kind, source, name in (("leftImg8bit", "image.png", f"{stem}_leftImg8bit.png"),
                                   ("gtFine", f"{i % TEMPLATES}.png", f"{stem}_gtFine_labelIds.png")):
            target = root / kind / "train" / city / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(templates / source, target)
    return int(np.mean([(templates / f"{t}.png").stat().st_size for t in range(TEMPLATES)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--threads", type=int, nargs="+", default=sorted({1, SCAN_THREADS}))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "cityscapes"
        t0 = time.perf_counter()
        size = fabricate(root, args.count)
        print(f"fabricated {args.count} Cityscapes pairs in {time.perf_counter() - t0:.1f} s "
              f"(label PNGs {H}x{W} uint8, {size / 1024:.0f} KB each on average)")
        dataset = Cityscapes(root, "train", sample_check=0)
        dataset.check(range(4))  # warm up imports and the page cache of the first files
        rows = []
        for threads in args.threads:
            t0 = time.perf_counter()
            checked = dataset.check(workers=threads)
            seconds = time.perf_counter() - t0
            rows.append((checked, threads, seconds))
    print()
    print("| masks | mask shape | threads | scan s | ms / mask | masks / s | Cityscapes train+val (3475) s |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for checked, threads, seconds in rows:
        print(f"| {checked} | {H}x{W} uint8 PNG (labelIds) | {threads} | {seconds:.1f} | "
              f"{1000 * seconds / checked:.1f} | {checked / seconds:.0f} | {3475 * seconds / checked:.0f} |")


if __name__ == "__main__":
    main()
