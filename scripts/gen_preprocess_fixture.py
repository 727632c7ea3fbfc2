#!/usr/bin/env python3
"""Generate the preprocessing fixtures: reference tensors values and Pillow resizes.

Writes tests/fixtures/preprocess/:
    exact_224.png, exact_224.json
        A 224x224 RGB image that needs no resize, and ~600 sampled tensor values
        per normalisation config, so that the agent's colour order, scale, mean
        and std can be checked independently of resizing:
            value = (pixel[channel] * scale - mean[c]) / std[c]   (float64)
        where c is the tensor channel and `channel` the image channel feeding it
        (for "bgr", tensor channel 0 is the image's B). Samples are [c, y, x, value].
    resize_src_<i>.png, resize_<i>_stretch.png, resize_<i>_center_crop.png, resize_cases.json
        Source images of various sizes and the expected 224x224 results of
            stretch:                  src.resize((224, 224), BILINEAR)
            resize_then_center_crop:  src.resize((255, 255), BILINEAR), then a
                                      224x224 crop at offset int(round((255 - 224) / 2.0))
        with Pillow's BILINEAR filter (a convolution whose support grows when
        shrinking, i.e. antialiased), which NVIDIA's TAO tools use and the agent's
        resizer must reproduce.

Images are smooth gradients with filled shapes and a little fine texture, so
that resizing is exercised at edges while the PNGs stay small. The output is
byte-for-byte deterministic (seeded numpy Generator, Pillow PNG without metadata).

Usage: python3 scripts/gen_preprocess_fixture.py [--out REPO_ROOT]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

REPO_ROOT = Path(__file__).resolve().parent.parent
SEED = 5113
SIZE = 224

NORMALISATIONS = (
    # DeepStream sample config of Retail Object Recognition v2.0 (CLIP mean).
    {"name": "deepstream_v2", "color_order": "rgb", "scale": 1 / 255,
     "mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26857, 0.26857, 0.26857]},
    # TAO-style mean/std with the channels swapped, to check the colour order.
    {"name": "tao_bgr_example", "color_order": "bgr", "scale": 1 / 255,
     "mean": [0.485, 0.456, 0.406], "std": [0.226, 0.226, 0.226]},
)
SAMPLES_PER_CONFIG = 600

RESIZE_SOURCES = ((37, 53), (300, 180), (640, 480), (150, 400), (96, 96), (1000, 250), (224, 224), (231, 512))
CENTER_CROP_RATIO = 1.14  # TAO: resize to 1.14 x 224 = 255, then centre-crop 224


def draw_image(width: int, height: int, rng: np.random.Generator, noise_sigma: float) -> Image.Image:
    """Smooth gradients, a few filled shapes, a patch of fine stripes and optional noise."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    u, v = xs / max(width - 1, 1), ys / max(height - 1, 1)
    phase = rng.uniform(0, 2 * np.pi, size=3)
    pixels = np.stack([
        40 + 180 * u + 20 * np.sin(2 * np.pi * v + phase[0]),
        60 + 150 * v + 20 * np.sin(2 * np.pi * u + phase[1]),
        128 + 90 * np.sin(2 * np.pi * (0.7 * u + 0.4 * v) + phase[2]),
    ], axis=2)
    img = Image.fromarray(np.rint(pixels).clip(0, 255).astype(np.uint8), "RGB")

    draw = ImageDraw.Draw(img)
    short = min(width, height)
    for shape in ("ellipse", "rectangle", "triangle", "ellipse"):
        cx, cy = rng.uniform(0.15, 0.85) * width, rng.uniform(0.15, 0.85) * height
        rx, ry = rng.uniform(0.08, 0.25) * width, rng.uniform(0.08, 0.25) * height
        color = tuple(int(c) for c in rng.integers(0, 256, size=3))
        if shape == "ellipse":
            draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=color)
        elif shape == "rectangle":
            draw.rectangle((cx - rx, cy - ry, cx + rx, cy + ry), fill=color)
        else:
            draw.polygon([(cx, cy - ry), (cx + rx, cy + ry), (cx - rx, cy + ry)], fill=color)

    # Fine texture: 1-pixel stripes alternating between two colours, the hardest
    # case for a resizer that does not antialias.
    side = max(4, short // 5)
    x0, y0 = int(rng.integers(0, width - side + 1)), int(rng.integers(0, height - side + 1))
    for i in range(0, side, 2):
        draw.line((x0, y0 + i, x0 + side - 1, y0 + i), fill=(235, 235, 220))
        if i + 1 < side:
            draw.line((x0, y0 + i + 1, x0 + side - 1, y0 + i + 1), fill=(30, 30, 60))

    if noise_sigma > 0:
        noisy = np.asarray(img, dtype=np.float64) + rng.normal(0, noise_sigma, size=(height, width, 3))
        img = Image.fromarray(np.rint(noisy).clip(0, 255).astype(np.uint8), "RGB")
    return img


def save_png(img: Image.Image, path: Path) -> None:
    img.save(path, "PNG", optimize=True)


def tensor_samples(img: Image.Image, config: dict, positions: list[tuple[int, int, int]]) -> list[list]:
    """[c, y, x, value] for each tensor position, in float64."""
    pixels = np.asarray(img, dtype=np.float64)
    source_channel = {"rgb": (0, 1, 2), "bgr": (2, 1, 0)}[config["color_order"]]
    samples = []
    for c, y, x in positions:
        pixel = pixels[y, x, source_channel[c]]
        value = (pixel * config["scale"] - config["mean"][c]) / config["std"][c]
        samples.append([c, y, x, float(value)])
    return samples


def sample_positions(rng: np.random.Generator) -> list[tuple[int, int, int]]:
    """All channels at the four corners and the centre, then distinct random positions."""
    last, mid = SIZE - 1, SIZE // 2
    fixed = [(c, y, x) for y, x in ((0, 0), (0, last), (last, 0), (last, last), (mid, mid)) for c in range(3)]
    taken = {np.ravel_multi_index(p, (3, SIZE, SIZE)) for p in fixed}
    candidates = [i for i in rng.permutation(3 * SIZE * SIZE) if i not in taken]
    chosen = sorted(candidates[:SAMPLES_PER_CONFIG - len(fixed)])
    return fixed + [tuple(int(v) for v in np.unravel_index(i, (3, SIZE, SIZE))) for i in chosen]


def to_json(value, indent: int = 0) -> str:
    """JSON with one line per list of scalars (e.g. one sample per line)."""
    pad, inner = " " * indent, " " * (indent + 2)
    if isinstance(value, dict):
        items = [f"{inner}{json.dumps(k)}: {to_json(v, indent + 2)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + f"\n{pad}}}"
    if isinstance(value, list) and any(isinstance(v, (list, dict)) for v in value):
        items = [f"{inner}{to_json(v, indent + 2)}" for v in value]
        return "[\n" + ",\n".join(items) + f"\n{pad}]"
    return json.dumps(value)


def write_exact(out: Path, rng: np.random.Generator) -> int:
    img = draw_image(SIZE, SIZE, rng, noise_sigma=2.0)
    save_png(img, out / "exact_224.png")
    positions = sample_positions(rng)
    configs = [{**config, "samples": tensor_samples(img, config, positions)} for config in NORMALISATIONS]
    (out / "exact_224.json").write_text(to_json({"image": "exact_224.png", "configs": configs}) + "\n")
    return len(positions)


def write_resize_cases(out: Path, rng: np.random.Generator) -> int:
    big = round(SIZE * CENTER_CROP_RATIO)
    offset = int(round((big - SIZE) / 2.0))
    cases = []
    for i, (width, height) in enumerate(RESIZE_SOURCES):
        src = draw_image(width, height, rng, noise_sigma=0.0)
        save_png(src, out / f"resize_src_{i}.png")
        common = {"src": f"resize_src_{i}.png", "width": width, "height": height}

        save_png(src.resize((SIZE, SIZE), Image.Resampling.BILINEAR), out / f"resize_{i}_stretch.png")
        cases.append({**common, "mode": "stretch", "resize_to": [SIZE, SIZE], "crop": None,
                      "expected": f"resize_{i}_stretch.png"})

        crop = (offset, offset, offset + SIZE, offset + SIZE)
        cropped = src.resize((big, big), Image.Resampling.BILINEAR).crop(crop)
        save_png(cropped, out / f"resize_{i}_center_crop.png")
        cases.append({**common, "mode": "resize_then_center_crop", "ratio": CENTER_CROP_RATIO,
                      "resize_to": [big, big], "crop": [offset, offset, SIZE, SIZE],
                      "expected": f"resize_{i}_center_crop.png"})
    (out / "resize_cases.json").write_text(to_json({"cases": cases}) + "\n")
    return len(cases)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT, help="repository root to write into")
    args = parser.parse_args()

    out = args.out / "tests" / "fixtures" / "preprocess"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)

    exact_rng, resize_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(SEED).spawn(2))
    samples = write_exact(out, exact_rng)
    cases = write_resize_cases(out, resize_rng)

    total = sum(p.stat().st_size for p in out.iterdir())
    print(f"exact_224: {samples} samples x {len(NORMALISATIONS)} configs "
          f"({', '.join(c['name'] for c in NORMALISATIONS)})")
    print(f"resize:    {cases} cases from {len(RESIZE_SOURCES)} sources, "
          f"centre crop {round(SIZE * CENTER_CROP_RATIO)} -> {SIZE}")
    print(f"wrote {len(list(out.iterdir()))} files, {total} bytes -> {out}")


if __name__ == "__main__":
    main()
