"""tools/compare_distillers.py: the seeded Table 2 at the demo's scale -- its mean +- std table, and a tiny run end to
end (a random teacher, two students and a KD probe, one seed) that a second invocation continues without retraining."""
import json
import os
import runpy
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = runpy.run_path(os.path.join(ROOT, "tools", "compare_distillers.py"))  # its functions, main() not run


def _runs(method, values):
    return [{"method": method, "seed": seed, "knn_top1": v - 1, "knn_top5": 100.0, "linear_top1": v,
             "linear_top5": 100.0} for seed, v in enumerate(values)]


def test_mean_and_sample_std():
    s = TOOL["mean_std"]([50.0, 52.0, 57.0])
    assert s["n"] == 3 and s["mean"] == pytest.approx(53.0) and s["std"] == pytest.approx(13 ** 0.5)  # n - 1
    assert TOOL["fmt"](s) == "53.00 +- 3.61"
    one = TOOL["mean_std"]([61.234])
    assert one == {"mean": 61.234, "std": None, "n": 1} and TOOL["fmt"](one) == "61.23"
    assert TOOL["fmt"](TOOL["mean_std"]([])) == "-"


def test_summary_and_table_follow_the_paper_rows():
    runs = _runs("disco_kd", [70.0, 72.0]) + _runs("compress", [40.0]) + _runs("disco", [60.0, 64.0]) + \
        _runs("mocov2", [50.0, 50.0, 53.0])
    summary = TOOL["summarize"](runs)
    assert list(summary) == ["mocov2", "disco", "compress", "disco_kd"]  # ROWS order, only the methods run
    assert summary["mocov2"]["seeds"] == [0, 1, 2] and summary["disco"]["linear_top1"]["mean"] == 62.0
    assert summary["disco"]["knn_top1"]["mean"] == 61.0 and summary["compress"]["linear_top1"]["std"] is None
    lines = TOOL["markdown_table"](summary).splitlines()
    assert lines[0].startswith("| method | what it is | kNN top-1 | linear top-1 | seeds | paper") and len(lines) == 6
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert [c[0] for c in cells] == ["mocov2", "disco", "compress", "disco_kd"]
    assert cells[0][2:] == ["50.00 +- 1.73", "51.00 +- 1.73", "0 1 2", "52.2"]
    assert cells[1][3:] == ["62.00 +- 2.83", "0 1", "60.6"]
    assert cells[2][2:] == ["39.00", "40.00", "0", "-"]  # one seed: no +-; CompRess is not in Table 2
    assert cells[3][2] == "70.00 +- 1.41 (= disco)" and cells[3][5] == "60.6"  # KD + DisCo; kNN of the DisCo student
    paper = {m: TOOL["describe"](m)[1] for m in TOOL["ROWS"]}
    assert paper == {"mocov2": 52.2, "disco": 60.6, "seed": 57.6, "compress": None, "attention": 56.2, "rkd": 56.4,
                     "attention_disco": 60.2, "rkd_disco": 60.6, "swav": None, "swav_disco": None, "dino": None,
                     "dino_disco": None, "kd": 51.5, "disco_kd": 60.6, "disco_kd_batchmean": 60.6}


@pytest.fixture
def small_teacher(tmp_path):
    """A random convnet_small 'teacher' in our export format (the quickstart teacher's architecture)."""
    from pretrain.encoder import build_encoder
    from pretrain.export import export_encoder

    torch.manual_seed(0)
    return export_encoder(build_encoder("convnet_small", 64, 128), "convnet_small", str(tmp_path / "teacher"),
                          "convnet_small", {"method": "mocov2"})["backbone"]


def test_tiny_comparison_end_to_end_and_rerun(tmp_path, small_teacher):
    out = tmp_path / "compare"
    cmd = [sys.executable, os.path.join(ROOT, "tools", "compare_distillers.py"), "--output-dir", str(out),
           "--teacher", small_teacher, "--num-classes", "3", "--train-per-class", "16", "--val-per-class", "4",
           "SOLVER.EPOCHS", "1", "SOLVER.IMS_PER_BATCH", "16", "MODEL.MOCO.QUEUE_SIZE", "32",
           "LOSS.SEED.QUEUE_SIZE", "32", "TEST.KNN.PERIOD", "0", "--jobs", "1", "--seeds", "0",
           "--methods", "mocov2", "seed", "disco_kd"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "3 run(s) to train, 0 already exported" in proc.stdout  # disco_kd needs the DisCo student
    for method in ("mocov2", "disco", "seed"):
        assert f"trained {method} seed 0:" in proc.stdout
    res = json.loads((out / "results.json").read_text())
    assert list(res["summary"]) == ["mocov2", "disco", "seed", "disco_kd"] and res["seeds"] == [0]
    assert res["overrides"][:2] == ["SOLVER.EPOCHS", "1"] and res["cpu"] and res["minutes_total"] > 0
    assert res["teacher"]["export"] == small_teacher and 0 <= res["teacher"]["linear_top1"] <= 100
    runs = {r["method"]: r for r in res["runs"]}
    for r in runs.values():
        assert r["seed"] == 0 and 0 <= r["knn_top1"] <= r["knn_top5"] <= 100
        assert 0 <= r["linear_top1"] <= r["linear_top5"] <= 100
        assert r["linear_output_dir"] == str(out / "linear" / r["method"] / "seed0")
        assert res["summary"][r["method"]]["linear_top1"] == {"mean": r["linear_top1"], "std": None, "n": 1}
    for method in ("mocov2", "disco", "seed"):
        assert runs[method]["export"] == str(out / method / "seed0" / "export" / "convnet_tiny.pth")
        assert runs[method]["train_minutes"] > 0
        opts = runs[method]["pretrain_overrides"]
        assert opts[opts.index("SEED") + 1] == "0" and opts[-2:] == ["TEST.KNN.PERIOD", "0"]
        assert ("MODEL.TEACHER.WEIGHTS" in opts) == (method != "mocov2")
    kd = runs["disco_kd"]
    assert kd["export"] == runs["disco"]["export"] and kd["knn_top1"] == runs["disco"]["knn_top1"]
    assert kd["kd"]["reduction"] == "mean" and kd["kd"]["teacher_weights"] == small_teacher
    assert kd["kd"]["teacher_classifier"].startswith(str(out / "linear" / "teacher"))
    md = (out / "results.md").read_text()
    assert md in proc.stdout.replace("\r", "")
    assert "| mocov2 | MoCo-v2 alone, no teacher | " in md and f"| {runs['seed']['linear_top1']:.2f} | 0 | 57.6 |" in md

    exports = {m: os.path.getmtime(runs[m]["export"]) for m in ("mocov2", "disco", "seed")}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "0 run(s) to train, 3 already exported (not retrained)" in proc.stdout and "[compare] trained" not in proc.stdout
    assert {m: os.path.getmtime(runs[m]["export"]) for m in exports} == exports
    again = json.loads((out / "results.json").read_text())
    assert again["summary"] == res["summary"]  # the same exports and the finished probes give the same numbers
    assert [r.get("train_minutes") for r in again["runs"]] == [r.get("train_minutes") for r in res["runs"]]

    # a finished run is reused only with its own config: another SOLVER.EPOCHS is refused, as a resume would be
    from pretrain.config import setup_cfg
    cfg = setup_cfg(os.path.join(TOOL["CONFIGS"], runs["seed"]["config"]),
                    runs["seed"]["pretrain_overrides"] + ["SOLVER.EPOCHS", "2"])
    with pytest.raises(ValueError, match=r"another config(.|\n)*SOLVER\.EPOCHS: 1 in the checkpoint, 2 now"):
        TOOL["train_runs"]({("seed", 0): cfg}, 1)
