"""pretrain.synthetic and tools/make_data.py: the on-disk layout, determinism, geometry, and refusal to overwrite."""
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from torchvision.datasets import ImageFolder

from pretrain import synthetic
from pretrain.synthetic import DatasetMismatchError, write_imagefolder
from conftest import load_tool

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
    # Patched where the ImageFolder writer looks it up (its module), not on the package's re-export.
    monkeypatch.setattr(synthetic.imagefolder, "make_classification_image", broken)
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


# ------------------------------------------------------------------------------------------------------------
# CIFAR
# ------------------------------------------------------------------------------------------------------------

CIFAR = dict(num_classes=4, train_per_class=12, test_per_class=5)


def _no_md5(cls):
    """torchvision's CIFAR class with its md5 checks (of the real files) reduced to existence checks."""
    return type(f"Synthetic{cls.__name__}", (cls,), {
        "train_list": [[name, None] for name, _ in cls.train_list],
        "test_list": [[name, None] for name, _ in cls.test_list],
        "meta": {**cls.meta, "md5": None},
    })


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cifar")
    synthetic.write_cifar(root, "cifar10", seed=3, **CIFAR)
    synthetic.write_cifar(root, "cifar100", seed=3, **{**CIFAR, "num_classes": 6})  # shares root
    return root


def _regenerate_cifar(seed: int, split: str, class_id: int, index: int) -> np.ndarray:
    img = synthetic.make_classification_image(synthetic.image_rng(seed, "cifar", split, class_id, index), class_id,
                                              32)
    return np.asarray(img)


def test_cifar10_torchvision_reads(cifar_root: Path):
    from torchvision.datasets import CIFAR10
    meta = json.loads((cifar_root / "cifar-10-batches-py" / "meta.json").read_text())
    splits = [(True, "train", CIFAR["train_per_class"]), (False, "test", CIFAR["test_per_class"])]
    for train, split, per_class in splits:
        ds = _no_md5(CIFAR10)(str(cifar_root), train=train)
        assert ds.classes == meta["classes"] == ["circle", "triangle", "square", "star"]
        assert len(ds) == CIFAR["num_classes"] * per_class
        assert np.bincount(ds.targets).tolist() == [per_class] * CIFAR["num_classes"]
        assert ds.targets != sorted(ds.targets)  # shuffled: labels mixed within the files, as in real CIFAR
        order = synthetic.cifar_sample_order(3, split, CIFAR["num_classes"], per_class)
        for k in (0, 7, len(ds) - 1):
            img, target = ds[k]
            class_id, index = order[k]
            assert target == class_id and img.size == (32, 32)
            assert np.array_equal(np.asarray(img), _regenerate_cifar(3, split, class_id, index))


def test_cifar100_torchvision_reads(cifar_root: Path):
    from torchvision.datasets import CIFAR100
    ds = _no_md5(CIFAR100)(str(cifar_root), train=True)
    assert ds.classes == [synthetic.CLASS_NAMES[c] for c in range(6)]
    assert len(ds) == 6 * CIFAR["train_per_class"]
    order = synthetic.cifar_sample_order(3, "train", 6, CIFAR["train_per_class"])
    img, target = ds[5]
    assert target == order[5][0]
    assert np.array_equal(np.asarray(img), _regenerate_cifar(3, "train", *order[5]))
    with open(cifar_root / "cifar-100-python" / "train", "rb") as f:
        entry = pickle.load(f, encoding="bytes")
    assert entry[b"coarse_labels"] == [c // synthetic.CIFAR_COARSE_GROUP for c in entry[b"fine_labels"]]
    with open(cifar_root / "cifar-100-python" / "meta", "rb") as f:
        meta = pickle.load(f, encoding="bytes")
    assert meta[b"coarse_label_names"] == [b"g0_circle_triangle_square_star", b"g1_cross_arrow"]
    assert len(meta[b"fine_label_names"]) == 6


def test_cifar_pickles_like_originals(cifar_root: Path):
    folder = cifar_root / "cifar-10-batches-py"
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["batches.meta", "test_batch", "meta.json"] + [f"data_batch_{i}" for i in range(1, 6)])
    sizes, labels = [], []
    for i in range(1, 6):
        raw = (folder / f"data_batch_{i}").read_bytes()
        assert raw[:2] == b"\x80\x02"  # protocol 2
        as_bytes = pickle.loads(raw, encoding="bytes")
        as_str = pickle.loads(raw, encoding="latin1")
        # Python 2 strings: bytes keys under encoding="bytes", str keys under "latin1" (what torchvision uses).
        assert sorted(as_bytes) == [b"batch_label", b"data", b"filenames", b"labels"]
        assert sorted(as_str) == ["batch_label", "data", "filenames", "labels"]
        assert as_bytes[b"batch_label"] == f"training batch {i} of 5".encode()
        data = as_bytes[b"data"]
        assert data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3072
        assert np.array_equal(data, as_str["data"])
        assert len(as_bytes[b"labels"]) == len(as_bytes[b"filenames"]) == len(data)
        assert all(isinstance(n, bytes) and n.endswith(b".png") for n in as_bytes[b"filenames"])
        sizes.append(len(data))
        labels += as_bytes[b"labels"]
    assert sum(sizes) == 48 and max(sizes) - min(sizes) <= 1
    # Batches hold the shuffled order in sequence; channel planes R, G, B of each 32x32 image.
    order = synthetic.cifar_sample_order(3, "train", 4, 12)
    assert labels == [c for c, _ in order]
    first = pickle.loads((folder / "data_batch_1").read_bytes(), encoding="bytes")[b"data"][0]
    assert np.array_equal(first.reshape(3, 32, 32).transpose(1, 2, 0), _regenerate_cifar(3, "train", *order[0]))
    meta = pickle.loads((folder / "batches.meta").read_bytes(), encoding="bytes")
    assert meta == {b"num_cases_per_batch": sizes[0], b"label_names": [b"circle", b"triangle", b"square", b"star"],
                    b"num_vis": 3072}


def test_cifar_reuse_and_refuse(cifar_root: Path):
    again = synthetic.write_cifar(cifar_root, "cifar10", seed=3, **CIFAR)
    assert again["generated"] is False and again["root"] == str(cifar_root / "cifar-10-batches-py")
    with pytest.raises(DatasetMismatchError, match="seed"):
        synthetic.write_cifar(cifar_root, "cifar10", seed=4, **CIFAR)
    with pytest.raises(ValueError, match="variant"):
        synthetic.write_cifar(cifar_root, "cifar1000", **CIFAR)
    with pytest.raises(ValueError, match="num_classes"):
        synthetic.write_cifar(cifar_root, "cifar100", num_classes=100)


# ------------------------------------------------------------------------------------------------------------
# SimCLR subset lists
# ------------------------------------------------------------------------------------------------------------

def test_subset_list(small_dataset: Path, tmp_path: Path):
    out = tmp_path / "lists" / "half.txt"
    names = synthetic.write_subset_list(small_dataset, out, percent=50, seed=1)
    text = out.read_text()
    assert text == "".join(n + "\n" for n in names) and text.endswith(".jpg\n") and "/" not in text
    assert "\r" not in text and not text.startswith("\n")
    per_class = {c: sum(n.startswith(c) for n in names) for c in synthetic.class_names(SMALL["num_classes"])}
    assert per_class == {c: SMALL["train_per_class"] // 2 for c in per_class}
    for n in names:  # every name is a real training image
        assert (small_dataset / "train" / n.rsplit("_", 1)[0] / n).is_file()
    # Identical request: reused, same bytes; another seed picks other images.
    assert synthetic.write_subset_list(small_dataset, out, percent=50, seed=1) == names
    other = synthetic.write_subset_list(small_dataset, tmp_path / "other.txt", percent=50, seed=2)
    assert other != names
    with pytest.raises(DatasetMismatchError, match="differs"):
        synthetic.write_subset_list(small_dataset, out, percent=50, seed=2)
    assert out.read_text() == text
    # At least one per class, however small the percentage; per_class counts exactly.
    assert len(synthetic.write_subset_list(small_dataset, tmp_path / "tiny.txt", percent=1)) == SMALL["num_classes"]
    assert len(synthetic.write_subset_list(small_dataset, tmp_path / "pc.txt", per_class=3)) == 3 * SMALL["num_classes"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left
    with pytest.raises(ValueError, match="exactly one"):
        synthetic.write_subset_list(small_dataset, tmp_path / "x.txt", percent=10, per_class=1)
    with pytest.raises(ValueError, match="holds only"):
        synthetic.write_subset_list(small_dataset, tmp_path / "x.txt", per_class=SMALL["train_per_class"] + 1)
    with pytest.raises(FileNotFoundError, match="class folders"):
        synthetic.write_subset_list(tmp_path, tmp_path / "x.txt", percent=10)


# ------------------------------------------------------------------------------------------------------------
# Detection scenes, VOC, COCO
# ------------------------------------------------------------------------------------------------------------

DET = dict(num_classes=4, image_size=(96, 64), objects_per_image=(1, 3))


def test_sample_scene():
    sizes, difficult, classes = [], 0, set()
    for i in range(200):
        rng = np.random.default_rng(i)
        objects = synthetic.sample_scene(rng, 5, (96, 64), (2, 4))
        assert 1 <= len(objects) <= 4
        sizes.append(len(objects))
        boxes = [synthetic.pixel_box(o, (96, 64)) for o in objects]
        for a in range(len(boxes)):
            x0, y0, x1, y1 = boxes[a]
            assert 0 <= x0 < x1 <= 96 and 0 <= y0 < y1 <= 64
            for b in range(a):  # pixel boxes never touch: masks and boxes are exact
                p0, q0, p1, q1 = boxes[b]
                assert x1 <= p0 or p1 <= x0 or y1 <= q0 or q1 <= y0
        difficult += sum(synthetic.is_difficult(o, (96, 64)) for o in objects)
        classes |= {o.class_id for o in objects}
    assert classes == set(range(5))
    assert np.mean(sizes) > 2.5  # mostly the requested 2-4
    assert 0 < difficult < 0.2 * sum(sizes)  # some small "difficult" objects, most normal
    with pytest.raises(ValueError, match="objects_per_image"):
        synthetic.sample_scene(np.random.default_rng(0), 4, 64, (0, 2))


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("voc") / "VOC2007"
    synthetic.write_voc(root, trainval_images=12, test_images=6, seed=1, **DET)
    return root


def test_voc_detectron2_reads(voc_root: Path):
    from detectron2.data.datasets.pascal_voc import load_voc_instances
    names = json.loads((voc_root / "meta.json").read_text())["classes"]
    assert names == synthetic.class_names(4)
    for split, count, first in [("trainval", 12, 0), ("test", 6, 12), ("train", 6, 0)]:
        dicts = load_voc_instances(str(voc_root), split, names)
        assert len(dicts) == count
        if split == "train":
            continue
        for k, d in enumerate(dicts):
            assert d["image_id"] == f"{first + k + 1:06d}" and (d["width"], d["height"]) == (96, 64)
            assert Path(d["file_name"]).is_file()
            objects = synthetic.sample_scene(synthetic.scene_rng(1, "voc", split, k), 4, (96, 64), (1, 3))
            assert [a["category_id"] for a in d["annotations"]] == [o.class_id for o in objects]
            for a, o in zip(d["annotations"], objects):
                # detectron2's box (after its -1 on xmin/ymin) is the pixel box around the polygon's exact box.
                assert a["bbox"] == list(map(float, synthetic.pixel_box(o, (96, 64))))
                x0, y0, x1, y1 = o.bbox
                assert a["bbox"][0] <= x0 < a["bbox"][0] + 1 and a["bbox"][2] - 1 < x1 <= a["bbox"][2]
                assert a["bbox"][1] <= y0 < a["bbox"][1] + 1 and a["bbox"][3] - 1 < y1 <= a["bbox"][3]


def test_voc_files(voc_root: Path):
    import xml.etree.ElementTree as ET
    assert sorted(p.name for p in voc_root.iterdir()) == ["Annotations", "ImageSets", "JPEGImages", "meta.json"]
    jpegs = sorted(p.stem for p in (voc_root / "JPEGImages").iterdir())
    assert jpegs == sorted(p.stem for p in (voc_root / "Annotations").iterdir())
    main = voc_root / "ImageSets" / "Main"
    sets = {s: (main / f"{s}.txt").read_text().split("\n") for s in ("train", "val", "trainval", "test")}
    assert all(lines[-1] == "" for lines in sets.values())  # trailing newline
    sets = {s: lines[:-1] for s, lines in sets.items()}
    assert sorted(sets["train"] + sets["val"]) == sets["trainval"] and not set(sets["train"]) & set(sets["val"])
    assert sorted(sets["trainval"] + sets["test"]) == jpegs
    total_objects, total_difficult = 0, 0
    for file_id in jpegs:
        root = ET.parse(voc_root / "Annotations" / f"{file_id}.xml").getroot()
        assert root.tag == "annotation" and root.findtext("folder") == "VOC2007"
        assert root.findtext("filename") == f"{file_id}.jpg" and root.findtext("segmented") == "0"
        assert [root.findtext(f"size/{t}") for t in ("width", "height", "depth")] == ["96", "64", "3"]
        present = {}
        for obj in root.findall("object"):
            assert obj.findtext("pose") == "Unspecified" and obj.findtext("truncated") in ("0", "1")
            difficult = int(obj.findtext("difficult"))
            box = [int(obj.findtext(f"bndbox/{t}")) for t in ("xmin", "ymin", "xmax", "ymax")]
            assert 1 <= box[0] <= box[2] <= 96 and 1 <= box[1] <= box[3] <= 64
            total_objects += 1
            total_difficult += difficult
            present[obj.findtext("name")] = max(present.get(obj.findtext("name"), -1), 1 - difficult)
        for split in ("trainval", "test"):
            if file_id in sets[split]:
                for name in synthetic.class_names(4):
                    lines = (main / f"{name}_{split}.txt").read_text().splitlines()
                    assert f"{file_id} {present.get(name, -1):2d}" in lines
    assert total_objects >= 18 and total_difficult < total_objects / 2


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("coco") / "coco"
    synthetic.write_coco(root, train_images=12, val_images=6, seed=2, **{**DET, "image_size": 64})
    return root


def _edges(img: np.ndarray) -> np.ndarray:
    """Per-pixel sum of absolute colour differences to its 4 neighbours."""
    g = np.zeros(img.shape[:2], np.float32)
    dx, dy = np.abs(np.diff(img, axis=1)).sum(-1), np.abs(np.diff(img, axis=0)).sum(-1)
    g[:, 1:] += dx
    g[:, :-1] += dx
    g[1:, :] += dy
    g[:-1, :] += dy
    return g


def _erode(m: np.ndarray) -> np.ndarray:
    e = m.copy()
    e[1:, :] &= m[:-1, :]
    e[:-1, :] &= m[1:, :]
    e[:, 1:] &= m[:, :-1]
    e[:, :-1] &= m[:, 1:]
    return e


def test_coco_pycocotools_reads(coco_root: Path):
    from PIL import Image
    from pycocotools.coco import COCO
    assert sorted(p.name for p in coco_root.iterdir()) == ["annotations", "meta.json", "train2017", "val2017"]
    ann_ids, image_ids = set(), set()
    wins, ratios = [], []
    for split, count in [("train2017", 12), ("val2017", 6)]:
        data = json.loads((coco_root / "annotations" / f"instances_{split}.json").read_text())
        assert set(data) == {"info", "licenses", "images", "annotations", "categories"}
        assert data["categories"] == [{"supercategory": "shape", "id": c + 1, "name": n}
                                      for c, n in enumerate(synthetic.class_names(4))]
        coco = COCO(str(coco_root / "annotations" / f"instances_{split}.json"))
        assert len(coco.getImgIds()) == count
        assert sorted(p.name for p in (coco_root / split).iterdir()) == sorted(
            im["file_name"] for im in data["images"])
        for k, image_id in enumerate(sorted(coco.getImgIds())):
            info = coco.loadImgs(image_id)[0]
            assert info["file_name"] == f"{image_id:012d}.jpg" and (info["width"], info["height"]) == (64, 64)
            img = np.asarray(Image.open(coco_root / split / info["file_name"]).convert("RGB"), dtype=np.float32)
            edges = _edges(img)
            objects = synthetic.sample_scene(synthetic.scene_rng(2, "coco", split[:-4], k), 4, 64, (1, 3))
            anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
            assert [a["category_id"] - 1 for a in anns] == [o.class_id for o in objects]
            for a, o in zip(anns, objects):
                assert a["iscrowd"] == 0 and len(a["segmentation"]) == 1
                assert np.allclose(a["bbox"], [o.bbox[0], o.bbox[1], o.bbox[2] - o.bbox[0], o.bbox[3] - o.bbox[1]],
                                   atol=0.02)
                assert a["area"] == pytest.approx(o.area, rel=0.01)
                mask = coco.annToMask(a).astype(bool)
                assert abs(mask.sum() - a["area"]) <= 0.15 * a["area"] + 4  # rasterised polygon ~ its area
                if mask.sum() < 20:
                    continue
                # The mask's outline sits on the drawn object's edge: edge strength along it beats the same
                # outline moved 3 px in any direction (a swapped x/y or a scale error would not).
                band = ~_erode(~mask) & ~_erode(mask)
                true = edges[band].mean()
                moved = [edges[np.roll(band, s, axis=ax)].mean() for ax in (0, 1) for s in (-3, 3)]
                wins.append(true > max(moved))
                ratios.append(true / np.mean(moved))
            image_ids.add(image_id)
            ann_ids |= {a["id"] for a in anns}
    assert len(image_ids) == 18 and len(ann_ids) == sum(
        len(json.loads((coco_root / "annotations" / f"instances_{s}.json").read_text())["annotations"])
        for s in ("train2017", "val2017"))
    assert len(wins) >= 15 and np.mean(wins) >= 0.75 and np.mean(ratios) >= 1.4, (np.mean(wins), np.mean(ratios))


def test_coco_detectron2_reads(coco_root: Path):
    from detectron2.data import MetadataCatalog
    from detectron2.data.datasets.coco import load_coco_json
    from detectron2.structures import BoxMode
    name = "test_synthetic_coco_val"  # a dataset name makes detectron2 map category ids 1..N to 0..N-1
    dicts = load_coco_json(str(coco_root / "annotations" / "instances_val2017.json"), str(coco_root / "val2017"),
                           dataset_name=name)
    assert MetadataCatalog.get(name).thing_classes == synthetic.class_names(4)
    assert len(dicts) == 6
    for k, d in enumerate(dicts):
        assert Path(d["file_name"]).is_file() and d["width"] == d["height"] == 64
        objects = synthetic.sample_scene(synthetic.scene_rng(2, "coco", "val", k), 4, 64, (1, 3))
        assert [a["category_id"] for a in d["annotations"]] == [o.class_id for o in objects]
        for a in d["annotations"]:
            assert a["bbox_mode"] == BoxMode.XYWH_ABS and len(a["segmentation"][0]) >= 6


@pytest.mark.parametrize("writer, counts, image_dir", [
    (synthetic.write_voc, dict(trainval_images=5, test_images=3), "JPEGImages"),
    (synthetic.write_coco, dict(train_images=5, val_images=3), "val2017"),
])
def test_detection_deterministic_and_refusal(tmp_path: Path, writer, counts, image_dir):
    args = dict(num_classes=3, image_size=48, objects_per_image=(1, 2), **counts)
    first = writer(tmp_path / "a", seed=0, workers=1, **args)
    assert first["generated"] and first["image_size"] == [48, 48]
    writer(tmp_path / "b", seed=0, workers=2, **args)  # the worker count must not change a byte
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    assert writer(tmp_path / "a", seed=0, **args)["generated"] is False
    with pytest.raises(DatasetMismatchError, match="seed"):
        writer(tmp_path / "a", seed=1, **args)
    with pytest.raises(DatasetMismatchError, match="objects_per_image"):
        writer(tmp_path / "a", seed=0, **{**args, "objects_per_image": (1, 3)})
    next((tmp_path / "b" / image_dir).iterdir()).unlink()
    with pytest.raises(DatasetMismatchError, match="incomplete"):
        writer(tmp_path / "b", seed=0, **args)
    with pytest.raises(ValueError, match="image_size"):
        writer(tmp_path / "c", **{**args, "image_size": 8})
    assert not (tmp_path / "c").exists()


def test_cli_more_layouts(tmp_path: Path, small_dataset: Path, capsys):
    cli = load_tool("make_data")

    assert cli.main(["cifar", str(tmp_path / "c"), "--num-classes", "3", "--train-per-class", "2",
                     "--test-per-class", "1"]) == 0
    assert cli.main(["cifar", str(tmp_path / "c"), "--variant", "cifar100", "--num-classes", "5",
                     "--train-per-class", "2", "--test-per-class", "1"]) == 0
    assert (tmp_path / "c" / "cifar-10-batches-py" / "data_batch_5").is_file()
    assert json.loads((tmp_path / "c" / "cifar-100-python" / "meta.json").read_text())["num_classes"] == 5
    assert cli.main(["voc", str(tmp_path / "VOC2007"), "--trainval-images", "2", "--test-images", "1",
                     "--image-size", "64", "48", "--objects-per-image", "1", "2"]) == 0
    assert json.loads((tmp_path / "VOC2007" / "meta.json").read_text())["image_size"] == [64, 48]
    assert cli.main(["coco", str(tmp_path / "coco"), "--train-images", "2", "--val-images", "1",
                     "--image-size", "32"]) == 0
    assert len(list((tmp_path / "coco" / "train2017").iterdir())) == 2
    assert cli.main(["subset", str(small_dataset), str(tmp_path / "1percent.txt"), "--per-class", "1"]) == 0
    assert len((tmp_path / "1percent.txt").read_text().splitlines()) == SMALL["num_classes"]
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 5 and out[0].startswith("wrote cifar10") and out[3].startswith("wrote COCO")

    # Refusals and bad arguments: one "error:" line, exit status 2, no traceback.
    assert cli.main(["subset", str(small_dataset), str(tmp_path / "1percent.txt"), "--per-class", "2"]) == 2
    assert cli.main(["coco", str(tmp_path / "coco"), "--train-images", "3", "--val-images", "1"]) == 2
    assert cli.main(["voc", str(tmp_path / "v2"), "--image-size", "1", "2", "3"]) == 2
    assert cli.main(["cifar", str(tmp_path / "c2"), "--num-classes", "40"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 4 and all(line.startswith("error: ") for line in err)
