"""Class definitions and geometry: the polygon shape of every class (and its texture name), the :class:`Object`
primitive (a class id, a simple polygon in pixel coordinates, its box and colour), and :func:`sample_object`, which
draws one object with random proportions, aspect, shear, mirroring, rotation and colour.

Coordinates: ``x`` to the right, ``y`` down, continuous pixel frame where the canvas spans ``[0, W] x [0, H]``
(pixel ``(i, j)`` covers ``[i, i+1) x [j, j+1)``). ``bbox`` is ``(x0, y0, x1, y1)`` in that frame.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple, Union

import numpy as np

Size = Union[int, Tuple[int, int]]  # a square side, or (width, height)
Color = Tuple[int, int, int]

# Rotation is bounded so that orientation-defined classes stay distinct (an upright triangle vs a chevron,
# a semicircle vs its mirror); no class is a rotated copy of another (there is no "diamond" beside "square").
MAX_ROTATION_DEG = 30.0


# --------------------------------------------------------------------------------------------------------
# Shapes: each returns a simple polygon (N x 2, any scale, any centre); normalisation happens afterwards.
# ``rng`` gives per-object variation of the shape's own proportions, small enough to keep the class.
# --------------------------------------------------------------------------------------------------------

def _regular(n: int, phase: float = -math.pi / 2) -> np.ndarray:
    """Regular n-gon on the unit circle, first vertex pointing up (y down => phase -pi/2)."""
    t = phase + 2 * math.pi * np.arange(n) / n
    return np.stack([np.cos(t), np.sin(t)], axis=1)


def _circle(rng: np.random.Generator) -> np.ndarray:
    # 40 vertices: smooth at 2x supersampling of a 64 px canvas, still cheap to draw and store in COCO json.
    return _regular(40)


def _triangle(rng: np.random.Generator) -> np.ndarray:
    apex_x = rng.uniform(-0.25, 0.25)  # from isosceles to mildly scalene
    return np.array([[apex_x, -1.0], [1.0, 0.75], [-1.0, 0.75]])


def _square(rng: np.random.Generator) -> np.ndarray:
    return np.array([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]])


def _star(rng: np.random.Generator) -> np.ndarray:
    inner = rng.uniform(0.38, 0.5)
    pts = _regular(10)
    pts[1::2] *= inner
    return pts


def _cross(rng: np.random.Generator) -> np.ndarray:
    w = rng.uniform(0.28, 0.42)  # half arm width
    return np.array([[-w, -1], [w, -1], [w, -w], [1, -w], [1, w], [w, w], [w, 1], [-w, 1], [-w, w],
                     [-1, w], [-1, -w], [-w, -w]], dtype=float)


def _arrow(rng: np.random.Generator) -> np.ndarray:
    shaft = rng.uniform(0.18, 0.3)  # half shaft width
    head = rng.uniform(0.55, 0.8)  # half head width
    neck = rng.uniform(0.0, 0.3)  # x where the head starts
    return np.array([[-1, -shaft], [neck, -shaft], [neck, -head], [1, 0], [neck, head], [neck, shaft],
                     [-1, shaft]], dtype=float)


def _l_shape(rng: np.random.Generator) -> np.ndarray:
    t = rng.uniform(0.55, 0.8)  # arm thickness on a 2-wide box
    return np.array([[-1, -1], [-1 + t, -1], [-1 + t, 1 - t], [1, 1 - t], [1, 1], [-1, 1]], dtype=float)


def _crescent(rng: np.random.Generator) -> np.ndarray:
    # Unit disc minus a disc of radius r centred at (d, 0): outer arc through the left, inner arc back.
    d, r = rng.uniform(0.4, 0.55), rng.uniform(0.8, 0.9)
    x = (1 + d * d - r * r) / (2 * d)
    y = math.sqrt(max(1 - x * x, 1e-6))
    a0 = math.atan2(y, x)
    outer_t = np.linspace(a0, 2 * math.pi - a0, 28)
    outer = np.stack([np.cos(outer_t), -np.sin(outer_t)], axis=1)  # top -> left -> bottom
    b0 = math.atan2(y, x - d)
    inner_t = np.linspace(2 * math.pi - b0, b0, 20)[1:-1]  # bottom -> inner left -> top, no duplicates
    inner = np.stack([d + r * np.cos(inner_t), -r * np.sin(inner_t)], axis=1)
    return np.concatenate([outer, inner])


def _heart(rng: np.random.Generator) -> np.ndarray:
    t = np.linspace(0, 2 * math.pi, 40, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = 13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)
    return np.stack([x, -y], axis=1)  # y down: lobes on top


def _t_shape(rng: np.random.Generator) -> np.ndarray:
    bar = rng.uniform(0.5, 0.75)  # top bar thickness
    stem = rng.uniform(0.25, 0.4)  # half stem width
    return np.array([[-1, -1], [1, -1], [1, -1 + bar], [stem, -1 + bar], [stem, 1], [-stem, 1],
                     [-stem, -1 + bar], [-1, -1 + bar]], dtype=float)


def _hexagon(rng: np.random.Generator) -> np.ndarray:
    return _regular(6)


def _pentagon(rng: np.random.Generator) -> np.ndarray:
    return _regular(5)


def _semicircle(rng: np.random.Generator) -> np.ndarray:
    t = np.linspace(math.pi, 2 * math.pi, 24)
    return np.stack([np.cos(t), np.sin(t)], axis=1)  # dome on top, flat side down


def _chevron(rng: np.random.Generator) -> np.ndarray:
    notch = rng.uniform(0.2, 0.55)  # how far the notch reaches up from the base
    return np.array([[0, -1], [1, 0.8], [0, 0.8 - notch - 0.5], [-1, 0.8]], dtype=float)


def _hourglass(rng: np.random.Generator) -> np.ndarray:
    waist = rng.uniform(0.1, 0.3)  # half width at the middle
    return np.array([[-1, -1], [1, -1], [waist, 0], [1, 1], [-1, 1], [-waist, 0]], dtype=float)


def _u_shape(rng: np.random.Generator) -> np.ndarray:
    t = rng.uniform(0.45, 0.65)  # wall thickness on a 2-wide box
    return np.array([[-1, -1], [-1 + t, -1], [-1 + t, 1 - t], [1 - t, 1 - t], [1 - t, -1], [1, -1], [1, 1],
                     [-1, 1]], dtype=float)


# Order matters: ``num_classes`` takes the first N, so the first ten are the most distinct shapes and the
# near-duplicates come later. Never reorder (folder names and label ids of stored datasets would shift).
SHAPES: Tuple[Tuple[str, Callable[[np.random.Generator], np.ndarray]], ...] = (
    ("circle", _circle),
    ("triangle", _triangle),
    ("square", _square),
    ("star", _star),
    ("cross", _cross),
    ("arrow", _arrow),
    ("lshape", _l_shape),
    ("crescent", _crescent),
    ("heart", _heart),
    ("tshape", _t_shape),
    ("hexagon", _hexagon),
    ("pentagon", _pentagon),
    ("semicircle", _semicircle),
    ("chevron", _chevron),
    ("hourglass", _hourglass),
    ("ushape", _u_shape),
)
CLASS_NAMES: Tuple[str, ...] = tuple(name for name, _ in SHAPES)
MAX_CLASSES = len(SHAPES)

# Each class also has its own surface texture (a second, contrasting colour laid over the fill), so a class is a
# shape *and* a texture, as object categories are. Textures are local evidence that a convolutional network picks
# up early in training, which is what lets self-supervised features separate the classes within a CPU budget.
# Orientations are fixed in the canvas frame, and a diagonal is the same class either way because horizontal flips
# (an augmentation everywhere) turn one into the other. Period: a fraction of the canvas's shorter side.
TEXTURES: Tuple[Tuple[str, float], ...] = (
    ("hstripes", 0.13), ("vstripes", 0.13), ("dstripes", 0.13), ("checker", 0.16), ("dots", 0.16),
    ("rings", 0.13), ("solid", 0.0), ("crosshatch", 0.18), ("wide_hstripes", 0.3), ("speckle", 0.08),
    ("waves", 0.16), ("spokes", 0.0), ("wide_vstripes", 0.3), ("half", 0.0), ("grid_dots", 0.3), ("border", 0.0),
)
assert len(TEXTURES) == len(SHAPES)


def class_folder_name(class_id: int) -> str:
    """Folder / category name of a class, e.g. ``c00_circle``; zero-padded so sorting keeps label order."""
    return f"c{class_id:02d}_{CLASS_NAMES[class_id]}"


def class_names(num_classes: int) -> List[str]:
    _check_num_classes(num_classes)
    return [class_folder_name(i) for i in range(num_classes)]


def _check_num_classes(num_classes: int) -> None:
    if not 1 <= num_classes <= MAX_CLASSES:
        raise ValueError(f"num_classes must be in [1, {MAX_CLASSES}] (there are {MAX_CLASSES} shapes), "
                         f"got {num_classes}")


# --------------------------------------------------------------------------------------------------------
# Objects
# --------------------------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)  # eq=False: a generated __eq__ would compare the ndarray ambiguously
class Object:
    """One drawn instance. ``polygon``: (N, 2) float64 vertices (x, y) in canvas pixels, a simple polygon
    without holes; ``bbox``: its tight box ``(x0, y0, x1, y1)``; ``color``: fill RGB."""

    class_id: int
    polygon: np.ndarray
    bbox: Tuple[float, float, float, float]
    color: Color

    @property
    def class_name(self) -> str:
        return class_folder_name(self.class_id)

    @property
    def area(self) -> float:
        """Polygon area in pixels^2, e.g. COCO's ``area`` before occlusion."""
        return polygon_area(self.polygon)


def polygon_area(polygon: np.ndarray) -> float:
    """Area of a simple polygon given as (N, 2) vertices (shoelace formula)."""
    x, y = polygon[:, 0], polygon[:, 1]
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2)


def _as_wh(size: Size) -> Tuple[int, int]:
    if isinstance(size, (int, np.integer)):
        return int(size), int(size)
    w, h = size
    return int(w), int(h)


def _random_color(rng: np.random.Generator) -> Color:
    # HSV with a floor on saturation/value: dull greys would make many objects vanish into backgrounds.
    h, s, v = rng.uniform(0, 1), rng.uniform(0.35, 1.0), rng.uniform(0.2, 1.0)
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    r, g, b = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return int(r * 255), int(g * 255), int(b * 255)


def _luma(c: Sequence[float]) -> float:
    return (0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]) / 255.0


def sample_object(rng: np.random.Generator, class_id: int, canvas_size: Size,
                  scale_range: Tuple[float, float] = (0.35, 0.8),
                  center: Optional[Tuple[float, float]] = None,
                  max_rotation_deg: float = MAX_ROTATION_DEG) -> Object:
    """Draw one object of ``class_id`` with random proportions, aspect, shear, mirroring, rotation, colour.

    ``scale_range``: the longer side of the object's box as a fraction of the canvas's shorter side.
    ``center``: the box centre in pixels; default uniform over positions that keep the object inside. A given
    centre is shifted just enough to keep the object inside the canvas (the box never leaves it).
    """
    if not 0 <= class_id < MAX_CLASSES:
        raise ValueError(f"class_id must be in [0, {MAX_CLASSES}), got {class_id}")
    if not 0 < scale_range[0] <= scale_range[1] <= 1:
        raise ValueError(f"scale_range must satisfy 0 < low <= high <= 1 (the object must fit), got {scale_range}")
    w, h = _as_wh(canvas_size)
    pts = SHAPES[class_id][1](rng).astype(np.float64)

    # Mirroring is part of every class: horizontal flips are a standard augmentation, so a right-pointing and
    # a left-pointing arrow must be the same class anyway.
    if rng.random() < 0.5:
        pts[:, 0] = -pts[:, 0]
    aspect = math.exp(rng.uniform(-0.22, 0.22))  # width/height ratio in ~[0.8, 1.25]
    shear = rng.uniform(-0.15, 0.15)
    theta = math.radians(rng.uniform(-max_rotation_deg, max_rotation_deg))
    c, s = math.cos(theta), math.sin(theta)
    linear = np.array([[c, -s], [s, c]]) @ np.array([[1.0, shear], [0.0, 1.0]]) @ np.diag(
        [math.sqrt(aspect), 1 / math.sqrt(aspect)])
    pts = pts @ linear.T

    lo, hi = pts.min(axis=0), pts.max(axis=0)
    extent = float((hi - lo).max())
    side = rng.uniform(*scale_range) * min(w, h)
    pts = (pts - (lo + hi) / 2) * (side / extent)  # box centred at the origin, longer side == side
    half = (pts.max(axis=0) - pts.min(axis=0)) / 2
    if center is None:
        cx = rng.uniform(half[0], max(w - half[0], half[0]))
        cy = rng.uniform(half[1], max(h - half[1], half[1]))
    else:
        cx = min(max(center[0], half[0]), w - half[0])
        cy = min(max(center[1], half[1]), h - half[1])
    pts = pts + np.array([cx, cy])
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    bbox = (float(lo[0]), float(lo[1]), float(hi[0]), float(hi[1]))
    return Object(class_id=class_id, polygon=pts, bbox=bbox, color=_random_color(rng))
