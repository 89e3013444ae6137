"""The README's main job end to end, at a toy size: data -> teacher -> DisCo + MoCo-v2 students -> kNN table."""
import json
import os
import subprocess
import sys

from pretrain.checkpoint import load_exported_backbone

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_runs_end_to_end(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, os.path.join(ROOT, "tools", "demo.py"), "--output-dir", str(out), "--num-classes", "4",
           "--train-per-class", "16", "--val-per-class", "4", "SOLVER.EPOCHS", "1", "SOLVER.IMS_PER_BATCH", "16",
           "MODEL.MOCO.QUEUE_SIZE", "64", "TEST.KNN.PERIOD", "-1", "DATA.NUM_WORKERS", "0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "student DisCo" in proc.stdout and "student MoCo-v2" in proc.stdout
    res = json.loads((out / "results.json").read_text())
    for name, method in (("teacher (MoCo-v2)", "moco"), ("student DisCo", "disco"), ("student MoCo-v2", "moco")):
        r = res[name]
        assert r["method"] == method and 0 <= r["knn_top1"] <= r["knn_top5"] <= 100
        backbone, meta = load_exported_backbone(r["export"])
        assert meta["arch"] == r["arch"] and os.path.isfile(r["head"])
    assert res["student DisCo"]["arch"] == res["student MoCo-v2"]["arch"]
    teacher_export = res["teacher (MoCo-v2)"]["export"]
    assert load_exported_backbone(res["student DisCo"]["export"])[1]["teacher"]["weights"] == teacher_export
