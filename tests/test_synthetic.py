"""pretrain.synthetic and tools/make_data.py: the on-disk layout, determinism, geometry, and refusal to overwrite."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from torchvision.datasets import ImageFolder

from pretrain import synthetic
from pretrain.synthetic import DatasetMismatchError, write_imagefolder

REPO = Path(__file__).resolve().parents[1]
# Small enough that every write takes well under a second.
SMALL = dict(num_classes=3, train_per_class=4, val_per_class=2, image_size=32)


def _files(root: Path) -> dict:
    """Relative path -> bytes of every file under ``root``."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("syn") / "data"
    write_imagefolder(root, seed=0, **SMALL)
    return root


def test_class_list():
    assert synthetic.MAX_CLASSES >= 12
    assert len(set(synthetic.CLASS_NAMES)) == synthetic.MAX_CLASSES
    names = synthetic.class_names(synthetic.MAX_CLASSES)
    # Alphabetical order (what ImageFolder sorts by) must equal label order.
    assert names == sorted(names)
    assert names[0] == "c00_circle"
    with pytest.raises(ValueError):
        synthetic.class_names(synthetic.MAX_CLASSES + 1)


def test_imagefolder_layout(small_dataset: Path):
    meta = json.loads((small_dataset / "meta.json").read_text())
    for split, per_class in [("train", SMALL["train_per_class"]), ("val", SMALL["val_per_class"])]:
        ds = ImageFolder(str(small_dataset / split))
        assert ds.classes == meta["classes"] == synthetic.class_names(SMALL["num_classes"])
        assert len(ds) == SMALL["num_classes"] * per_class
        assert np.bincount(ds.targets).tolist() == [per_class] * SMALL["num_classes"]
        img, target = ds[len(ds) - 1]
        assert img.mode == "RGB" and img.size == (SMALL["image_size"],) * 2
        assert target == SMALL["num_classes"] - 1
    first = small_dataset / "train" / "c00_circle" / "c00_circle_00000.jpg"
    assert first.read_bytes()[:2] == b"\xff\xd8"  # a real JPEG
    # Nothing but the dataset and its meta; no temporary folder left beside it.
    assert sorted(p.name for p in small_dataset.iterdir()) == ["meta.json", "train", "val"]
    assert [p.name for p in small_dataset.parent.iterdir()] == ["data"]


def test_deterministic(small_dataset: Path, tmp_path: Path):
    again = write_imagefolder(tmp_path / "again", seed=0, workers=2, **SMALL)  # worker count must not matter
    assert again["generated"]
    reference = _files(small_dataset)
    assert _files(tmp_path / "again") == reference

    write_imagefolder(tmp_path / "other", seed=1, **SMALL)
    other = _files(tmp_path / "other")
    assert other.keys() == reference.keys()
    changed = [k for k in reference if k.endswith(".jpg") and reference[k] != other[k]]
    assert len(changed) == sum(k.endswith(".jpg") for k in reference)


def test_image_rng_is_per_image():
    # An image does not depend on which others were drawn before it (sharding / partial generation).
    a = synthetic.make_classification_image(synthetic.image_rng(0, "imagefolder", "train", 2, 7), 2, 32)
    synthetic.make_classification_image(synthetic.image_rng(0, "imagefolder", "train", 1, 0), 1, 32)
    b = synthetic.make_classification_image(synthetic.image_rng(0, "imagefolder", "train", 2, 7), 2, 32)
    assert a.tobytes() == b.tobytes()
    c = synthetic.make_classification_image(synthetic.image_rng(0, "imagefolder", "val", 2, 7), 2, 32)
    assert a.tobytes() != c.tobytes()


def _segments_cross(p1, p2, q1, q2) -> bool:
    """Proper intersection of segments p1p2 and q1q2 (touching at endpoints does not count)."""
    def orient(a, b, c):
        return np.sign((b[0] - a[0]) * (c[1] - a[1]) - (b[1] - a[1]) * (c[0] - a[0]))
    return (orient(p1, p2, q1) * orient(p1, p2, q2) < 0) and (orient(q1, q2, p1) * orient(q1, q2, p2) < 0)


def _is_simple(poly: np.ndarray) -> bool:
    n = len(poly)
    edges = [(poly[i], poly[(i + 1) % n]) for i in range(n)]
    for i in range(n):
        for j in range(i + 2, n):
            if i == 0 and j == n - 1:
                continue  # adjacent through the closing edge
            if _segments_cross(*edges[i], *edges[j]):
                return False
    return True


@pytest.mark.parametrize("class_id", range(synthetic.MAX_CLASSES))
def test_polygon_and_bbox(class_id: int):
    rng = np.random.default_rng(class_id)
    for canvas, scale_range, center in [(64, (0.35, 0.8), None), ((120, 80), (0.1, 0.9), None),
                                        (32, (0.8, 0.95), (-10.0, 40.0)), ((50, 90), (0.3, 0.5), (25, 45))]:
        w, h = (canvas, canvas) if isinstance(canvas, int) else canvas
        for _ in range(5):
            obj = synthetic.sample_object(rng, class_id, canvas, scale_range=scale_range, center=center)
            poly = obj.polygon
            assert poly.ndim == 2 and poly.shape[1] == 2 and len(poly) >= 3 and np.isfinite(poly).all()
            x0, y0, x1, y1 = obj.bbox
            # The box is the polygon's tight box, inside the canvas.
            assert np.allclose([x0, y0], poly.min(axis=0)) and np.allclose([x1, y1], poly.max(axis=0))
            assert 0 <= x0 < x1 <= w + 1e-9 and 0 <= y0 < y1 <= h + 1e-9
            longest = max(x1 - x0, y1 - y0) / min(w, h)
            assert scale_range[0] - 1e-9 <= longest <= scale_range[1] + 1e-9
            assert 0 < obj.area <= (x1 - x0) * (y1 - y0) + 1e-6
            assert _is_simple(poly), f"{obj.class_name} polygon self-intersects"
            assert obj.class_name == synthetic.class_folder_name(class_id)
            assert len(obj.color) == 3 and all(0 <= v <= 255 for v in obj.color)


def test_render_sizes():
    rng = np.random.default_rng(0)
    objs = [synthetic.sample_object(rng, c, (96, 48), scale_range=(0.3, 0.6)) for c in range(3)]
    img = synthetic.render(objs, (96, 48), rng)
    assert img.mode == "RGB" and img.size == (96, 48)


def test_skip_if_identical(small_dataset: Path):
    before = {p: p.stat().st_mtime_ns for p in small_dataset.rglob("*")}
    info = write_imagefolder(small_dataset, seed=0, **SMALL)
    assert info["generated"] is False and info["root"] == str(small_dataset)
    assert {p: p.stat().st_mtime_ns for p in small_dataset.rglob("*")} == before


def test_refuses_to_overwrite(small_dataset: Path, tmp_path: Path):
    before = _files(small_dataset)
    with pytest.raises(DatasetMismatchError, match="seed"):
        write_imagefolder(small_dataset, seed=1, **SMALL)
    with pytest.raises(DatasetMismatchError, match="num_classes"):
        write_imagefolder(small_dataset, seed=0, **{**SMALL, "num_classes": 4})
    assert _files(small_dataset) == before

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(DatasetMismatchError, match="no readable meta.json"):
        write_imagefolder(foreign, **SMALL)
    assert _files(foreign) == {"notes.txt": b"mine"}

    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    with pytest.raises(DatasetMismatchError, match="not a directory"):
        write_imagefolder(a_file, **SMALL)


def test_incomplete_copy_is_refused(tmp_path: Path):
    root = tmp_path / "data"
    write_imagefolder(root, **SMALL)
    next((root / "val").rglob("*.jpg")).unlink()
    with pytest.raises(DatasetMismatchError, match="incomplete"):
        write_imagefolder(root, **SMALL)


def test_empty_directory_is_filled(tmp_path: Path):
    root = tmp_path / "empty"
    root.mkdir()
    assert write_imagefolder(root, **SMALL)["generated"]
    assert len(ImageFolder(str(root / "train"))) == SMALL["num_classes"] * SMALL["train_per_class"]


def test_failed_generation_leaves_nothing(tmp_path: Path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("disk full")
    monkeypatch.setattr(synthetic, "make_classification_image", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        write_imagefolder(tmp_path / "data", workers=1, **SMALL)
    assert list(tmp_path.iterdir()) == []  # neither the target nor a temporary folder


def test_cli(tmp_path: Path):
    out = tmp_path / "cli"
    cmd = [sys.executable, str(REPO / "tools" / "make_data.py"), "imagefolder", str(out), "--num-classes", "2",
           "--train-per-class", "3", "--val-per-class", "1", "--image-size", "32", "--seed", "5"]
    # Run from elsewhere: the script must find the package whatever the working directory.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    first = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert first.returncode == 0, first.stderr
    assert "wrote" in first.stdout and "c01_triangle" in first.stdout
    assert len(ImageFolder(str(out / "train"))) == 6 and len(ImageFolder(str(out / "val"))) == 2
    assert json.loads((out / "meta.json").read_text())["seed"] == 5

    second = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert second.returncode == 0 and "reused" in second.stdout

    clash = subprocess.run(cmd[:-1] + ["6"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert clash.returncode == 2 and "error:" in clash.stderr and "Traceback" not in clash.stderr
