"""tools/bench_data.py: the loader benchmark runs end to end through its CLI, its JPEG writer is deterministic and
writes the sizes asked, and the loader it times yields exactly the Trainer's batches (so it cannot drift from
training)."""
import json
import os
import runpy
import subprocess
import sys

import pytest
import torch
from PIL import Image

from conftest import tiny_cfg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tools", "bench_data.py")
TOOL = runpy.run_path(SCRIPT)  # its functions, main() not run


def test_cli_end_to_end_prints_the_table_and_the_verdict(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, SCRIPT, "--jpeg-sizes", "40x30", "30x40", "--image-size", "32", "--workers", "0", "1",
           "--backends", "torchvision",  # the default adds dali where it imports (tests/test_data_dali.py times it)
           "--batch", "4", "--batches", "2", "--warmup", "1", "--step-images-per-s", "1000000",
           "--jpeg-dir", str(tmp_path / "jpegs"), "--json", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=str(tmp_path), env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout
    assert text.startswith("data benchmark on") and "torch " in text and "torchvision " in text
    lines = text.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("backend"))
    assert lines[head].split() == ["backend", "workers", "batch", "images/s", "per", "worker", "step", "img/s",
                                   "bound"]
    rows = [line.split() for line in lines[head + 1:head + 3]]
    assert [r[:3] for r in rows] == [["torchvision", "0", "4"], ["torchvision", "1", "4"]]
    assert all(float(r[3]) > 0 and float(r[5]) == 1e6 and r[6] == "data" for r in rows)
    assert "data-bound (torchvision): the loader gives" in text and "the step consumes 1000000.0 img/s" in text

    result = json.loads(out.read_text())
    assert [(r["backend"], r["workers"], r["timed_images"]) for r in result["rows"]] == [
        ("torchvision", 0, 8), ("torchvision", 1, 8)]
    assert result["step"]["source"].startswith("given") and result["images"]["count"] == 8
    assert result["images"]["generated"] and result["machine"]["torchvision"]


def test_jpeg_writer_is_deterministic_and_writes_the_sizes_asked(tmp_path):
    a = TOOL["write_jpegs"](tmp_path / "a", 8, ["40x30", "24x36"], seed=1)
    b = TOOL["write_jpegs"](tmp_path / "b", 8, ["40x30", "24x36"], seed=1)
    paths = [TOOL["jpeg_path"](tmp_path / "a", i) for i in range(8)]
    assert a["generated"] and b["generated"] and a["count"] == 8
    for i, p in enumerate(paths):
        assert p.read_bytes() == TOOL["jpeg_path"](tmp_path / "b", i).read_bytes()
    sizes = [Image.open(p).size for p in paths]
    assert set(sizes) == {(40, 30), (24, 36)}  # both asked sizes drawn, nothing else
    assert all(Image.open(p).format == "JPEG" for p in paths)
    assert TOOL["write_jpegs"](tmp_path / "a", 8, ["40x30", "24x36"], seed=1)["generated"] is False  # reused
    from pretrain.synthetic import DatasetMismatchError
    with pytest.raises(DatasetMismatchError):
        TOOL["write_jpegs"](tmp_path / "a", 9, ["40x30", "24x36"], seed=1)  # another set: refused, not mixed
    one = TOOL["write_jpegs"](tmp_path / "c", 3, ["50x20"])
    assert {Image.open(TOOL["jpeg_path"](one["root"], i)).size for i in range(3)} == {(50, 20)}
    assert TOOL["describe_images"](one["train_dir"])["sizes"] == ["50x20"]
    with pytest.raises(ValueError):
        TOOL["parse_size"]("500")


def test_loader_yields_the_trainers_batches(tmp_path, imagefolder):
    from pretrain.trainer import Trainer

    cfg = tiny_cfg(tmp_path / "run", imagefolder, **{"DATA.NUM_WORKERS": 1, "SEED": 7})
    trainer = Trainer(cfg)
    trainer.setup()
    try:
        loader, sampler = TOOL["build_loader"](cfg, "torchvision", trainer.device)
        ref = trainer.loader
        for attr in ("batch_size", "num_workers", "pin_memory", "persistent_workers", "drop_last"):
            assert getattr(loader, attr) == getattr(ref, attr), attr
        assert type(loader.sampler) is type(ref.sampler) and type(loader.dataset) is type(ref.dataset)
        assert repr(loader.dataset.transforms) == repr(ref.dataset.transforms)
        assert len(loader.dataset) == len(ref.dataset) and sampler.iters_per_epoch == trainer.iters_per_epoch
        for epoch, start in ((0, 0), (1, 2)):  # the first batch of an epoch and a resumed position
            trainer.sampler.set_epoch(epoch, start)
            sampler.set_epoch(epoch, start)
            (v1, v2), labels, skipped = next(iter(ref))
            (m1, m2), mine_labels, mine_skipped = next(iter(loader))
            assert v1.shape == (8, 3, 32, 32)
            assert torch.equal(v1, m1) and torch.equal(v2, m2) and not torch.equal(v1, v2)
            assert torch.equal(labels, mine_labels) and torch.equal(skipped, mine_skipped)
        # the timing loop iterates the loader as the Trainer does and counts every image of the timed batches
        images, seconds = TOOL["time_loader"](loader, sampler, 1, 2)
        assert images == 16 and seconds > 0
    finally:
        trainer.lock.release()


def test_verdicts_name_the_bound():
    rows = [{"backend": "torchvision", "workers": w, "images_per_s": ips, "images_per_s_per_worker": ips / max(1, w)}
            for w, ips in ((0, 30.0), (1, 28.0), (2, 50.0))]
    data = TOOL["verdicts"](rows, 200.0)
    assert data == ["data-bound (torchvision): the loader gives 50.0 img/s with 2 workers, the step consumes 200.0 "
                    "img/s; at 25.0 img/s per worker about 8 workers (and as many free cores) would keep up"]
    step = TOOL["verdicts"](rows, 29.0)
    assert step[0].startswith("step-bound (torchvision): the loader gives 30.0 img/s with 0 workers")
    assert TOOL["verdicts"](rows, None) == []
    assert TOOL["batches_for"](0, 5, 2) == (2, 5) and TOOL["batches_for"](3, 5, 2) == (6, 6)


def test_step_is_measured_with_bench_distills_step(tmp_path, imagefolder):
    cfg = tiny_cfg(tmp_path / "run", imagefolder)
    s_bf16, t_bf16, cl, line = TOOL["step_precision"](cfg, torch.device("cpu"))
    assert all(isinstance(v, bool) for v in (s_bf16, t_bf16, cl)) and line.startswith("precision:")
    r = TOOL["measure_step"]("convnet_small:convnet_tiny", 2, 32, 16, 1, 0, torch.device("cpu"), False, False, True)
    assert r["images_per_s"] > 0 and r["pair"] == "convnet_small:convnet_tiny" and r["channels_last"]
