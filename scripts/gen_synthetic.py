#!/usr/bin/env python3
"""Generate the synthetic retail product image set used by tests and the test model.

Writes
    testdata/synthetic/refs/<label>/<NN>.jpg     10 reference images per label
    testdata/synthetic/queries/<label>/<NN>.jpg   8 query images per label

for 12 made-up products. Each product is a flat "package" with its own recipe
(base colour, a band or stripe pattern, a logo shape of a third colour and
sometimes dark text-like bars). Some products deliberately share a base colour,
so that colour alone does not identify them.

Every image is a product crop as a detector would emit it: the package drawn on a
neutral, varied background, 80-220 px per side, aspect following the package.
References get a small jitter (scale, translation, rotation within +-8 degrees,
brightness +-10%). Queries are harder: rotation within +-20 degrees, an
off-centre crop that cuts up to 10% of the package, brightness and contrast
jitter of +-15% and Gaussian noise (sigma 6).

The output is byte-for-byte deterministic (seeded numpy Generator, JPEG quality
90, no metadata). scripts/gen_test_model.py builds the test ONNX model from the
references written here.

Usage: python3 scripts/gen_synthetic.py [--out REPO_ROOT]
"""

from __future__ import annotations

import argparse
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

REPO_ROOT = Path(__file__).resolve().parent.parent
SEED = 20240611
REFS_PER_LABEL = 10
QUERIES_PER_LABEL = 8
JPEG_QUALITY = 90
MIN_SIDE, MAX_SIDE = 80, 220
# Longer side, in pixels, of the package artwork before it is scaled into an image.
ARTWORK_SIDE = 240

RGB = tuple[int, int, int]


@dataclass(frozen=True)
class Logo:
    shape: str  # "circle", "triangle", "square" or "diamond"
    color: RGB
    center: tuple[float, float]  # (x, y) as fractions of the package size
    size: float  # diameter as a fraction of the package's shorter side


@dataclass(frozen=True)
class Pattern:
    kind: str  # "band" (one horizontal band) or "vstripes"/"hstripes"/"dstripes"
    color: RGB
    position: float = 0.5  # band: centre as a fraction of the height
    width: float = 0.2  # band: height fraction; stripes: stripe fraction of the period
    count: int = 0  # stripes: number of periods across the package


@dataclass(frozen=True)
class Product:
    label: str
    aspect: float  # package width / height
    base: RGB
    pattern: Pattern
    logo: Logo
    text_bars: tuple[tuple[float, float, float], ...] = ()  # (x0, y, width) fractions


# Pairs sharing a base colour: acme-cola / berry-jam (red), sunny-oats /
# golden-honey (yellow), green-tea / mint-gum (green), night-coffee / choco-bar
# (brown).
PRODUCTS = (
    Product("acme-cola-330ml", 0.55, (196, 28, 36),
            Pattern("band", (245, 245, 240), position=0.55, width=0.16),
            Logo("circle", (250, 250, 250), (0.5, 0.28), 0.5)),
    Product("berry-jam-370g", 0.8, (196, 28, 36),
            Pattern("vstripes", (90, 20, 80), width=0.4, count=4),
            Logo("diamond", (250, 205, 40), (0.5, 0.6), 0.55),
            text_bars=((0.2, 0.15, 0.6),)),
    Product("sunny-oats-500g", 0.75, (236, 198, 58),
            Pattern("band", (120, 70, 30), position=0.75, width=0.22),
            Logo("circle", (235, 110, 30), (0.5, 0.35), 0.45),
            text_bars=((0.2, 0.88, 0.6),)),
    Product("golden-honey-250g", 0.9, (236, 198, 58),
            Pattern("dstripes", (250, 245, 225), width=0.35, count=5),
            Logo("triangle", (150, 30, 30), (0.5, 0.5), 0.6)),
    Product("fresh-milk-1l", 0.5, (232, 238, 245),
            Pattern("band", (30, 80, 180), position=0.7, width=0.3),
            Logo("square", (30, 80, 180), (0.5, 0.3), 0.4),
            text_bars=((0.25, 0.5, 0.5),)),
    Product("arctic-water-500ml", 0.45, (140, 195, 235),
            Pattern("hstripes", (245, 250, 255), width=0.3, count=3),
            Logo("triangle", (20, 50, 120), (0.5, 0.45), 0.6)),
    Product("green-tea-20bags", 1.4, (36, 130, 66),
            Pattern("band", (225, 190, 90), position=0.3, width=0.2),
            Logo("circle", (245, 245, 235), (0.72, 0.65), 0.45),
            text_bars=((0.1, 0.62, 0.35), (0.1, 0.75, 0.3))),
    Product("mint-gum-10pk", 1.9, (36, 130, 66),
            Pattern("vstripes", (200, 240, 215), width=0.3, count=6),
            Logo("diamond", (15, 60, 35), (0.3, 0.5), 0.6)),
    Product("choco-bar-100g", 2.2, (92, 52, 30),
            Pattern("band", (200, 30, 40), position=0.5, width=0.35),
            Logo("square", (225, 180, 70), (0.2, 0.5), 0.5)),
    Product("night-coffee-200g", 0.7, (92, 52, 30),
            Pattern("hstripes", (30, 30, 36), width=0.5, count=4),
            Logo("diamond", (220, 180, 60), (0.5, 0.5), 0.55)),
    Product("tomato-soup-400g", 0.65, (222, 88, 40),
            Pattern("band", (250, 250, 245), position=0.3, width=0.25),
            Logo("circle", (60, 150, 50), (0.5, 0.65), 0.5),
            text_bars=((0.2, 0.27, 0.6),)),
    Product("lavender-soap-100g", 1.5, (130, 90, 170),
            Pattern("band", (245, 240, 250), position=0.8, width=0.2),
            Logo("circle", (210, 190, 235), (0.35, 0.42), 0.55)),
)

TEXT_COLOR: RGB = (25, 25, 30)


@dataclass(frozen=True)
class Jitter:
    """Ranges for one image set (references or queries)."""

    max_rotation: float  # degrees, uniform in [-max, +max]
    fill: tuple[float, float]  # package bounding box / image size
    max_shift: float  # translation as a fraction of the image size
    max_cut: float  # fraction of the package pushed out of the frame
    brightness: float  # +- relative
    contrast: float  # +- relative
    noise_sigma: float  # Gaussian noise, in 8-bit levels


REF_JITTER = Jitter(max_rotation=8, fill=(0.78, 0.9), max_shift=0.04, max_cut=0.0,
                    brightness=0.10, contrast=0.0, noise_sigma=0.0)
QUERY_JITTER = Jitter(max_rotation=20, fill=(0.85, 1.0), max_shift=0.0, max_cut=0.10,
                      brightness=0.15, contrast=0.15, noise_sigma=6.0)


def draw_artwork(product: Product) -> Image.Image:
    """Render the flat package artwork (RGBA, opaque) at ARTWORK_SIDE resolution."""
    if product.aspect >= 1:
        w, h = ARTWORK_SIDE, round(ARTWORK_SIDE / product.aspect)
    else:
        w, h = round(ARTWORK_SIDE * product.aspect), ARTWORK_SIDE
    img = Image.new("RGBA", (w, h), product.base + (255,))
    draw = ImageDraw.Draw(img)
    draw_pattern(draw, product.pattern, w, h)
    for x0, y, width in product.text_bars:
        bar_h = max(3, round(0.05 * h))
        top = round(y * h - bar_h / 2)
        draw.rectangle((round(x0 * w), top, round((x0 + width) * w), top + bar_h), fill=TEXT_COLOR)
    draw_logo(draw, product.logo, w, h)
    return img


def draw_pattern(draw: ImageDraw.ImageDraw, pattern: Pattern, w: int, h: int) -> None:
    if pattern.kind == "band":
        half = pattern.width * h / 2
        center = pattern.position * h
        draw.rectangle((0, round(center - half), w, round(center + half)), fill=pattern.color)
        return
    if pattern.kind == "vstripes":
        period = w / pattern.count
        for i in range(pattern.count):
            x0 = i * period + period * (1 - pattern.width) / 2
            draw.rectangle((round(x0), 0, round(x0 + period * pattern.width), h), fill=pattern.color)
    elif pattern.kind == "hstripes":
        period = h / pattern.count
        for i in range(pattern.count):
            y0 = i * period + period * (1 - pattern.width) / 2
            draw.rectangle((0, round(y0), w, round(y0 + period * pattern.width)), fill=pattern.color)
    elif pattern.kind == "dstripes":
        # 45-degree stripes; periods measured along the width, covering the
        # whole package including the parts the diagonal sweeps in from the left.
        period = w / pattern.count
        stripe = period * pattern.width
        x = -float(h)
        while x < w:
            draw.polygon([(x, 0), (x + stripe, 0), (x + stripe + h, h), (x + h, h)], fill=pattern.color)
            x += period
    else:
        raise ValueError(f"unknown pattern {pattern.kind!r}")


def draw_logo(draw: ImageDraw.ImageDraw, logo: Logo, w: int, h: int) -> None:
    r = logo.size * min(w, h) / 2
    cx, cy = logo.center[0] * w, logo.center[1] * h
    if logo.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=logo.color)
    elif logo.shape == "square":
        s = r * 0.85
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=logo.color)
    elif logo.shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r * 0.95, cy + r * 0.75), (cx - r * 0.95, cy + r * 0.75)],
                     fill=logo.color)
    elif logo.shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=logo.color)
    else:
        raise ValueError(f"unknown logo shape {logo.shape!r}")


def make_background(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """A neutral grey with a slight tint and a linear gradient (float32 HxWx3)."""
    level = rng.uniform(90, 200)
    tint = rng.uniform(-12, 12, size=3)
    start = level + tint
    end = start + rng.uniform(-35, 35)
    angle = rng.uniform(0, 2 * np.pi)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    t = (np.cos(angle) * xs / w + np.sin(angle) * ys / h + 1) / 2
    return (start[None, None, :] * (1 - t[..., None]) + end * t[..., None]).astype(np.float32)


def render(product: Product, artwork: Image.Image, jitter: Jitter, rng: np.random.Generator) -> Image.Image:
    """Draw one jittered crop of the product and return it as an RGB image."""
    angle = rng.uniform(-jitter.max_rotation, jitter.max_rotation)
    # Bounding box of the rotated package, relative to the package's own size.
    rad = np.deg2rad(abs(angle))
    pw, ph = artwork.size
    box_w = pw * np.cos(rad) + ph * np.sin(rad)
    box_h = pw * np.sin(rad) + ph * np.cos(rad)

    # A detector crop roughly follows the package box, with some aspect slack.
    long_side = rng.uniform(MIN_SIDE + 40, MAX_SIDE)
    crop_aspect = box_w / box_h * rng.uniform(0.85, 1.18)
    if crop_aspect >= 1:
        img_w, img_h = long_side, long_side / crop_aspect
    else:
        img_w, img_h = long_side * crop_aspect, long_side
    img_w = int(np.clip(round(img_w), MIN_SIDE, MAX_SIDE))
    img_h = int(np.clip(round(img_h), MIN_SIDE, MAX_SIDE))

    fill = rng.uniform(*jitter.fill)
    scale = fill / max(box_w / img_w, box_h / img_h)
    size = (max(1, round(pw * scale)), max(1, round(ph * scale)))
    package = artwork.resize(size, Image.Resampling.LANCZOS)
    package = package.rotate(angle, resample=Image.Resampling.BICUBIC, expand=True)

    # Centre, then translate. Queries push the package out of the frame on one
    # side of one axis (an off-centre crop), cutting up to max_cut of it.
    cut_axis = int(rng.integers(2)) if jitter.max_cut > 0 else -1
    offset = []
    for axis, (img_side, box_side) in enumerate(((img_w, package.width), (img_h, package.height))):
        pos = (img_side - box_side) / 2 + rng.uniform(-1, 1) * jitter.max_shift * img_side
        if axis == cut_axis:
            cut = rng.uniform(0.02, jitter.max_cut) * box_side
            pos = -cut if rng.random() < 0.5 else img_side - box_side + cut
        offset.append(round(pos))

    canvas = Image.fromarray(make_background(rng, img_w, img_h).clip(0, 255).astype(np.uint8))
    canvas.paste(package, tuple(offset), package)

    pixels = np.asarray(canvas, dtype=np.float32)
    brightness = 1 + rng.uniform(-jitter.brightness, jitter.brightness)
    contrast = 1 + rng.uniform(-jitter.contrast, jitter.contrast)
    mean = pixels.mean()
    pixels = ((pixels - mean) * contrast + mean) * brightness
    if jitter.noise_sigma > 0:
        pixels += rng.normal(0, jitter.noise_sigma, size=pixels.shape).astype(np.float32)
    return Image.fromarray(np.rint(pixels).clip(0, 255).astype(np.uint8), "RGB")


def write_set(root: Path, jitter: Jitter, count: int, rng: np.random.Generator) -> tuple[int, int]:
    """Write `count` images per product under root/<label>/; return (files, bytes)."""
    files = total = 0
    for product in PRODUCTS:
        artwork = draw_artwork(product)
        label_dir = root / product.label
        label_dir.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            path = label_dir / f"{i:02d}.jpg"
            render(product, artwork, jitter, rng).save(path, "JPEG", quality=JPEG_QUALITY, subsampling="4:2:0")
            files += 1
            total += path.stat().st_size
    return files, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT, help="repository root to write into")
    args = parser.parse_args()

    out = args.out / "testdata" / "synthetic"
    # Start clean so that renamed labels or smaller counts leave no stale files.
    for sub in ("refs", "queries"):
        shutil.rmtree(out / sub, ignore_errors=True)

    # Independent streams, so that changing one set leaves the other unchanged.
    ref_rng, query_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(SEED).spawn(2))
    ref_files, ref_bytes = write_set(out / "refs", REF_JITTER, REFS_PER_LABEL, ref_rng)
    query_files, query_bytes = write_set(out / "queries", QUERY_JITTER, QUERIES_PER_LABEL, query_rng)

    print(f"labels:  {len(PRODUCTS)} ({', '.join(p.label for p in PRODUCTS)})")
    print(f"refs:    {ref_files} images, {ref_bytes} bytes -> {out / 'refs'}")
    print(f"queries: {query_files} images, {query_bytes} bytes -> {out / 'queries'}")
    print(f"total:   {ref_bytes + query_bytes} bytes")


if __name__ == "__main__":
    main()
