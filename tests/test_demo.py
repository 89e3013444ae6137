"""The README's main job end to end, at a toy size: data -> teacher -> DisCo + MoCo-v2 students -> kNN and
linear-probe table, t-SNE figure and training curves."""
import json
import os
import subprocess
import sys

from pretrain.export import load_exported_backbone

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_runs_end_to_end(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, os.path.join(ROOT, "tools", "demo.py"), "--output-dir", str(out), "--num-classes", "4",
           "--train-per-class", "16", "--val-per-class", "4", "SOLVER.EPOCHS", "1", "SOLVER.IMS_PER_BATCH", "16",
           "MODEL.MOCO.QUEUE_SIZE", "64", "TEST.KNN.PERIOD", "-1", "DATA.NUM_WORKERS", "0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "student DisCo" in proc.stdout and "student MoCo-v2" in proc.stdout and "linear top-1" in proc.stdout
    res = json.loads((out / "results.json").read_text())
    for name, method in (("teacher (MoCo-v2)", "mocov2"), ("student DisCo", "mocov2 + disco"),
                         ("student MoCo-v2", "mocov2")):
        r = res[name]
        assert r["method"] == method and 0 <= r["knn_top1"] <= r["knn_top5"] <= 100
        assert 0 <= r["linear_top1"] <= r["linear_top5"] <= 100
        probe = json.loads(open(os.path.join(r["linear_output_dir"], "results.json")).read())
        assert probe["weights"] == r["export"] and probe["epochs"] == 100 and probe["cached_features"]
        assert round(probe["top1"], 2) == r["linear_top1"]
        backbone, meta = load_exported_backbone(r["export"])
        assert meta["arch"] == r["arch"] and os.path.isfile(r["head"])
    for png in (res["tsne_png"], res["curves_png"]):
        assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert res["student DisCo"]["arch"] == res["student MoCo-v2"]["arch"] == res["student random init"]["arch"]
    rand = res["student random init"]
    assert rand["epochs"] == 0 and 0 <= rand["knn_top1"] <= 100 and 0 <= rand["linear_top1"] <= 100
    assert "student random init" in proc.stdout
    teacher_export = res["teacher (MoCo-v2)"]["export"]
    assert load_exported_backbone(res["student DisCo"]["export"])[1]["teacher"]["weights"] == teacher_export
