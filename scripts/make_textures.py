"""Write the generated image set of the studies' image_folder runs (conf/experiment/study_*_image_folder.yaml).

    python scripts/make_textures.py [DIR] [--per-class 150] [--size 32]     # DIR default: data/textures

Four flip-invariant textures in noise (horizontal stripes, vertical stripes, checkerboard, rings)
with random frequency and phase, one class folder each: ``DIR/<class>/<i>.png``. Kept when DIR
already holds the set.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("hstripes", "vstripes", "checker", "rings")


def wave(t: np.ndarray, freq: float, phase: float) -> np.ndarray:
    return np.sin(2 * np.pi * freq * t + phase)


def make_textures(root: Path, per_class: int = 150, size: int = 32, noise: float = 0.8, seed: int = 1234) -> Path:
    """Write the set into ``root`` (unless it is there already) and return ``root``."""
    if all(len(list((root / name).glob("*.png"))) == per_class for name in CLASSES):
        return root
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / size
    for label, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            freq, phase = rng.uniform(2.0, 5.0), rng.uniform(0, 2 * np.pi)
            if label == 3:
                cy, cx = rng.uniform(0.25, 0.75, size=2)
                pattern = wave(np.hypot(yy - cy, xx - cx), freq, phase)
            else:
                pattern = (wave(yy, freq, phase), wave(xx, freq, phase), wave(xx, freq, phase) * wave(yy, freq, phase))
                pattern = pattern[label]
            pixels = 0.5 * pattern[..., None] + noise * rng.standard_normal((size, size, 3))
            image = np.clip(127.5 + 127.5 * pixels, 0, 255).astype(np.uint8)
            Image.fromarray(image, "RGB").save(root / name / f"{index:04d}.png")
    return root


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", nargs="?", type=Path, default=Path("data/textures"))
    parser.add_argument("--per-class", type=int, default=150)
    parser.add_argument("--size", type=int, default=32)
    args = parser.parse_args()
    print(make_textures(args.dir, args.per_class, args.size))
