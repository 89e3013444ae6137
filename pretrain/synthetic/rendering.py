"""Rendering: random backgrounds (gradients, smooth noise, faint stripes), clutter (segments and blobs that are no
class), per-class surface textures, anti-aliased drawing with pixel noise, the classification image of one object,
the per-image random generator (:func:`image_rng`) and reproducible JPEG encoding.
"""
from __future__ import annotations

import functools
import io
import math
from typing import Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

from .shapes import TEXTURES, Object, Size, _as_wh, _luma, _random_color, sample_object

# Drawing at 2x then box-downsampling anti-aliases edges; without it 32 px shapes are mostly staircase.
_SUPERSAMPLE = 2

# Stable integer codes for the seed sequence; never renumber (it would change every image).
_LAYOUT_CODES = {"imagefolder": 0, "cifar": 1, "voc": 2, "coco": 3}
_SPLIT_CODES = {"train": 0, "val": 1, "test": 2, "trainval": 3}


# --------------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=16)
def _grid(w: int, h: int) -> Tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (xs, ys), float32 (h, w); cached since every image of a size shares them."""
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    xs.setflags(write=False)
    ys.setflags(write=False)
    return xs, ys


def _background(rng: np.random.Generator, w: int, h: int, avoid_luma: Sequence[float]) -> Image.Image:
    """A ``w x h`` gradient or smooth random texture whose brightness keeps away from the objects'."""
    # Best of a few candidate base colours: contrast is what keeps a shape visible, hue is irrelevant.
    best, best_gap = None, -1.0
    for _ in range(4):
        cand = _random_color(rng) if rng.random() < 0.8 else (int(rng.integers(0, 256)),) * 3
        gap = min((abs(_luma(cand) - a) for a in avoid_luma), default=1.0)
        if gap > best_gap:
            best, best_gap = cand, gap
    base = np.array(best, dtype=np.float32)
    xs, ys = _grid(w, h)
    if rng.random() < 0.5:
        # Linear gradient towards a second colour at a random angle: low-frequency, like sky or walls.
        other = np.clip(base + rng.normal(0, 45, 3), 0, 255).astype(np.float32)
        a = rng.uniform(0, 2 * math.pi)
        proj = xs * math.cos(a) + ys * math.sin(a)
        proj = (proj - proj.min()) / max(float(proj.max() - proj.min()), 1e-6)
        arr = base + proj[..., None] * (other - base)
    else:
        # Smooth colour noise: a coarse random grid upsampled bilinearly, at a random frequency.
        cells = int(rng.integers(2, 7))
        coarse = base + rng.normal(0, rng.uniform(15, 45), (cells, cells, 3)).astype(np.float32)
        coarse_img = Image.fromarray(np.clip(coarse, 0, 255).astype(np.uint8))
        arr = np.asarray(coarse_img.resize((w, h), Image.BILINEAR), dtype=np.float32)
        if rng.random() < 0.3:
            # Faint stripes: oriented texture that is not a shape, so features cannot rely on "any edge".
            period = rng.uniform(0.08, 0.25) * min(w, h)
            a = rng.uniform(0, math.pi)
            phase = (xs * math.cos(a) + ys * math.sin(a)) * (2 * math.pi / period)
            arr = arr + rng.uniform(6, 16) * np.sin(phase)[..., None]
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _draw_clutter(draw: ImageDraw.ImageDraw, rng: np.random.Generator, w: int, h: int, count: int,
                  max_frac: float) -> None:
    """Line segments and irregular blobs: distractor edges that belong to no class (sizes relative to the
    shorter side, coordinates in the supersampled canvas ``w x h``)."""
    short = min(w, h)
    for _ in range(count):
        color = _random_color(rng)
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        if rng.random() < 0.5:
            length = rng.uniform(0.1, 0.35) * short
            a = rng.uniform(0, math.pi)
            dx, dy = 0.5 * length * math.cos(a), 0.5 * length * math.sin(a)
            width = max(1, int(round(rng.uniform(0.01, 0.03) * short)))
            draw.line([(cx - dx, cy - dy), (cx + dx, cy + dy)], fill=color, width=width)
        else:
            # Random radii per vertex: lumpy, never a regular polygon or disc.
            n = int(rng.integers(5, 10))
            t = np.sort(rng.uniform(0, 2 * math.pi, n))
            r = rng.uniform(0.03, max_frac) * short * rng.uniform(0.4, 1.0, n)
            pts = np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1)
            draw.polygon([tuple(p) for p in pts], fill=color)


def render(objects: Sequence[Object], size: Size, rng: np.random.Generator, clutter: bool = True,
           noise: bool = True) -> Image.Image:
    """Draw ``objects`` (later ones occlude earlier ones) over a random background with clutter and noise.

    Clutter drawn in front of objects is small and rare, so a polygon's visible region stays close to the
    polygon; an occluding object in a multi-object scene is the caller's to account for (draw order).
    """
    w, h = _as_wh(size)
    ss = _SUPERSAMPLE
    sw, sh = w * ss, h * ss
    # The background is smooth, so it is built at the target size and upsampled by pixel repetition (the final
    # box-downsampling returns exactly these pixels where nothing is drawn): 4x less numpy work.
    img = _background(rng, w, h, [_luma(o.color) for o in objects]).resize((sw, sh), Image.NEAREST)
    draw = ImageDraw.Draw(img)
    # Clutter density scales with area so that large (VOC/COCO-sized) canvases are as busy as small ones.
    density = w * h / (64 * 64)
    if clutter:
        _draw_clutter(draw, rng, sw, sh, int(rng.integers(2, 7) * density + 0.5), max_frac=0.1)
    for obj in objects:
        poly = [(float(x) * ss, float(y) * ss) for x, y in obj.polygon]
        _draw_texture(img, obj, poly, rng)
        if rng.random() < 0.3:
            # A contrasting outline on some objects: real objects often have edges darker than their fill.
            outline = tuple(int(v) for v in np.clip(np.array(obj.color) * rng.uniform(0.2, 0.6), 0, 255))
            draw.polygon(poly, fill=None, outline=outline, width=max(1, int(round(0.02 * min(sw, sh)))))
    if clutter and rng.random() < 0.3:
        _draw_clutter(draw, rng, sw, sh, max(1, int(density + 0.5)), max_frac=0.05)
    img = img.reduce(ss)  # box filter: anti-aliased edges at the target size
    if noise:
        arr = np.asarray(img, dtype=np.float32)
        arr = arr + rng.standard_normal(arr.shape, dtype=np.float32) * np.float32(rng.uniform(2.0, 9.0))
        img = Image.fromarray(np.clip(arr, 0, 255, out=arr).astype(np.uint8))
    return img


def _texture_pattern(name: str, period: float, xs: np.ndarray, ys: np.ndarray, center: np.ndarray,
                     rng: np.random.Generator) -> np.ndarray:
    """A {0, 1} float32 map of where the second colour goes, for the canvas-frame pixel grid ``xs, ys``."""
    phase = rng.uniform(0, 1)
    if name in ("hstripes", "wide_hstripes"):
        return ((ys / period + phase) % 1.0 < 0.5).astype(np.float32)
    if name in ("vstripes", "wide_vstripes"):
        return ((xs / period + phase) % 1.0 < 0.5).astype(np.float32)
    if name == "dstripes":
        sign = 1.0 if rng.random() < 0.5 else -1.0
        return (((xs + sign * ys) / (period * math.sqrt(2)) + phase) % 1.0 < 0.5).astype(np.float32)
    if name == "checker":
        return (((np.floor(xs / period + phase) + np.floor(ys / period + phase)) % 2) == 0).astype(np.float32)
    if name in ("dots", "grid_dots"):
        u, v = (xs / period + phase) % 1.0 - 0.5, (ys / period + phase) % 1.0 - 0.5
        return (u * u + v * v < (0.3 if name == "dots" else 0.12) ** 2).astype(np.float32)
    if name == "rings":
        r = np.hypot(xs - center[0], ys - center[1])
        return ((r / period + phase) % 1.0 < 0.5).astype(np.float32)
    if name == "crosshatch":
        u, v = (xs / period + phase) % 1.0, (ys / period + phase) % 1.0
        return ((u < 0.25) | (v < 0.25)).astype(np.float32)
    if name == "speckle":
        cells = max(2, int(round(xs.shape[1] / (period * 2))))
        coarse = (rng.random((cells, cells)) < 0.5).astype(np.uint8) * 255
        return np.asarray(Image.fromarray(coarse).resize(xs.shape[::-1], Image.NEAREST), dtype=np.float32) / 255
    if name == "waves":
        wave = np.sin(2 * math.pi * (xs / (2.5 * period) + phase)) * period * 0.6
        return (((ys + wave) / period) % 1.0 < 0.5).astype(np.float32)
    if name == "spokes":
        a = np.arctan2(ys - center[1], xs - center[0])
        return ((a / (2 * math.pi) * 8 + phase) % 1.0 < 0.5).astype(np.float32)
    if name == "half":
        a = rng.uniform(0, 2 * math.pi)
        return ((xs - center[0]) * math.cos(a) + (ys - center[1]) * math.sin(a) > 0).astype(np.float32)
    return np.zeros_like(xs)  # "solid", and "border" (drawn as a thick outline by the caller)


def _draw_texture(img: Image.Image, obj: "Object", poly, rng: np.random.Generator) -> None:
    """Fill ``poly`` (supersampled coordinates) on ``img`` with the object's colour and its class texture."""
    sw, sh = img.size
    name, frac = TEXTURES[obj.class_id]
    mask = Image.new("L", (sw, sh), 0)
    ImageDraw.Draw(mask).polygon(poly, fill=255)
    # The second colour: the fill pushed far towards black or white, so the texture keeps its contrast.
    base = np.array(obj.color, dtype=np.float32)
    second = base * rng.uniform(0.15, 0.4) if _luma(obj.color) > 0.45 else base + (255 - base) * rng.uniform(0.6, 0.85)
    x0, y0, x1, y1 = (int(v) for v in mask.getbbox() or (0, 0, 1, 1))
    xs, ys = _grid(sw, sh)
    xs, ys = xs[y0:y1, x0:x1], ys[y0:y1, x0:x1]
    pts = np.asarray(poly)
    center = (pts.min(axis=0) + pts.max(axis=0)) / 2
    period = max(frac * min(sw, sh), 2.0)
    pattern = _texture_pattern(name, period, xs, ys, center, rng)[..., None]
    patch = base * (1 - pattern) + second * pattern
    tex = Image.fromarray(np.clip(patch, 0, 255).astype(np.uint8))
    img.paste(tex, (x0, y0), mask.crop((x0, y0, x1, y1)))
    if name == "border":
        ImageDraw.Draw(img).polygon(poly, outline=tuple(int(v) for v in second),
                                    width=max(2, int(round(0.07 * min(sw, sh)))))


def make_classification_image(rng: np.random.Generator, class_id: int, size: Size = 64) -> Image.Image:
    """One object of ``class_id``, 0.35-0.8 of the canvas, near the centre, with background/clutter/noise."""
    w, h = _as_wh(size)
    # "Centred-ish": jitter the centre by up to 15% of the canvas; sample_object keeps it inside.
    center = (w / 2 + rng.uniform(-0.15, 0.15) * w, h / 2 + rng.uniform(-0.15, 0.15) * h)
    obj = sample_object(rng, class_id, (w, h), scale_range=(0.35, 0.8), center=center)
    return render([obj], (w, h), rng)


def image_rng(seed: int, layout: str, split: str, class_id: int, index: int) -> np.random.Generator:
    """The generator of one image. Independent of generation order, so any subset or sharding reproduces
    the same bytes. ``layout`` keeps, e.g., the ImageFolder and CIFAR sets from sharing images."""
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    ss = np.random.SeedSequence([seed, _LAYOUT_CODES[layout], _SPLIT_CODES[split], class_id, index])
    return np.random.default_rng(ss)


def encode_jpeg(img: Image.Image, quality: int = 90) -> bytes:
    """JPEG bytes with fixed encoder settings (no optimisation passes, no EXIF) so output is reproducible.
    Chroma is not subsampled (4:4:4): at 32-64 px, 4:2:0 visibly smears the colour edges of small shapes."""
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality, subsampling=0)
    return buf.getvalue()
