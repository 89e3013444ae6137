"""transfer/study.py and tools/collect_studies.py: a study of many tools/compare_distillers.py output folders as one
markdown table and sweep plots -- the rows read from results.json (per-seed values in seed order), the table's
mean +- std, which cells make a sweep (the no-override cell at --default, a duplicate x refused), the error for a
folder without results.json, and the CLI end to end (table file and both PNGs)."""
import json
import os
import subprocess
import sys

import matplotlib
import pytest

matplotlib.use("Agg")

from transfer.plots import is_power_of_two_grid, sweep_figure  # noqa: E402
from transfer.study import load_cells, markdown, sweep_points  # noqa: E402
from conftest import load_tool  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "collect_studies.py")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


SUMMARIZE = load_tool("compare_distillers").summarize  # results.json is made with the tool's own summarize


def write_cell(folder, overrides, values, teacher=(38.6, 70.6)):
    """A compare_distillers output folder: results.json with ``overrides`` (flat KEY VALUE list) and, per method,
    ``values`` {method: [(seed, knn_top1, linear_top1), ...]} (in any order, as the records come in the tool)."""
    folder.mkdir(parents=True)
    runs = []
    for method, recs in values.items():
        for seed, knn, linear in recs:
            runs.append({"method": method, "seed": seed, "export": str(folder / method / f"seed{seed}" / "x.pth"),
                         "config": "quickstart.yaml", "pretrain_overrides": ["SEED", str(seed), *overrides],
                         "train_minutes": 1.0, "knn_top1": knn, "knn_top5": 90.0, "linear_top1": linear,
                         "linear_top5": 95.0, "linear_output_dir": str(folder / "linear"), "kd": None})
    results = {"cpu": "test", "data": {"root": str(folder / "data"), "num_classes": 10, "splits": {}, "image_size": 32},
               "teacher": {"export": "/t.pth", "train_minutes": None, "arch": "convnet_small",
                           "knn_top1": teacher[0], "knn_top5": 90.0, "linear_top1": teacher[1], "linear_top5": 97.0},
               "seeds": sorted({r["seed"] for r in runs}), "jobs": 2, "overrides": list(overrides),
               "summary": SUMMARIZE(runs), "runs": runs, "minutes_total": 3.0}
    (folder / "results.json").write_text(json.dumps(results, indent=1))
    return str(folder)


@pytest.fixture
def study(tmp_path):
    """defaults (disco and mocov2), LOSS.DISCO.WEIGHT 2.0 / 4.0 (disco, seeds out of order), a cell with two
    overrides and one with another key (neither in the weight sweep)."""
    return {
        "base": write_cell(tmp_path / "base", [], {"mocov2": [(0, 20.0, 40.0), (1, 22.0, 44.0)],
                                                   "disco": [(0, 30.0, 50.0), (1, 31.0, 52.0), (2, 32.0, 54.0)]}),
        "w2": write_cell(tmp_path / "w2", ["LOSS.DISCO.WEIGHT", "2.0"],
                         {"disco": [(2, 35.0, 64.0), (0, 33.0, 60.0), (1, 34.0, 62.0)]}),
        "w4": write_cell(tmp_path / "w4", ["LOSS.DISCO.WEIGHT", "4.0"], {"disco": [(0, 36.0, 58.2)]}),
        "both": write_cell(tmp_path / "both", ["LOSS.DISCO.WEIGHT", "8.0", "SOLVER.EPOCHS", "5"],
                           {"disco": [(0, 1.0, 1.0)]}),
        "bn": write_cell(tmp_path / "bn", ["MODEL.TEACHER.BN_TRAIN", "True"], {"disco": [(0, 2.0, 2.0)]}),
    }


def test_load_cells_values_and_seed_order(study):
    rows = load_cells([study["base"], study["w2"]])
    assert [(r["dir"], r["method"]) for r in rows] == [(study["base"], "mocov2"), (study["base"], "disco"),
                                                       (study["w2"], "disco")]  # folder order, then ROWS order
    mocov2, _, w2 = rows
    assert mocov2["overrides"] == {} and w2["overrides"] == {"LOSS.DISCO.WEIGHT": "2.0"}
    assert (w2["teacher_knn"], w2["teacher_linear"]) == (38.6, 70.6)
    assert w2["seeds"] == [0, 1, 2]
    assert w2["per_seed_linear"] == [60.0, 62.0, 64.0] and w2["per_seed_knn"] == [33.0, 34.0, 35.0]  # by seed
    assert w2["linear"] == pytest.approx((62.0, 2.0, 3)) and w2["knn"] == pytest.approx((34.0, 1.0, 3))
    assert mocov2["linear"][2] == 2 and mocov2["linear"][1] == pytest.approx(8 ** 0.5)


def test_markdown_table(study):
    rows = load_cells([study["base"], study["w2"], study["w4"], study["both"]])
    lines = markdown(rows).splitlines()
    assert lines[0] == ("| cell (overrides) | method | teacher kNN / linear | kNN top-1 | linear top-1 | "
                        "per-seed linear | seeds |")
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert len(cells) == 5
    assert cells[0] == ["defaults", "mocov2", "38.6 / 70.6", "21.0 +- 1.4", "42.0 +- 2.8", "40.0 44.0", "0 1"]
    assert cells[2] == ["LOSS.DISCO.WEIGHT 2.0", "disco", "38.6 / 70.6", "34.0 +- 1.0", "62.0 +- 2.0",
                        "60.0 62.0 64.0", "0 1 2"]
    assert cells[3][3:] == ["36.0", "58.2", "58.2", "0"]  # one seed: no +-
    assert cells[4][0] == "LOSS.DISCO.WEIGHT 8.0, SOLVER.EPOCHS 5"  # full keys, given order


def test_sweep_points_selection_default_and_duplicates(study, tmp_path):
    rows = load_cells(list(study.values()))
    points = sweep_points(rows, "LOSS.DISCO.WEIGHT", "disco")
    assert [p[0] for p in points] == [2.0, 4.0]  # not the defaults, not the cell with a second override
    x, mean, std, n, values = points[0]
    assert (x, n, values) == (2.0, 3, [60.0, 62.0, 64.0]) and (mean, std) == pytest.approx((62.0, 2.0))
    assert points[1][1:] == (58.2, None, 1, [58.2])

    with_default = sweep_points(rows, "LOSS.DISCO.WEIGHT", "disco", default="1.0")
    assert [p[0] for p in with_default] == [1.0, 2.0, 4.0] and with_default[0][4] == [50.0, 52.0, 54.0]
    knn = sweep_points(rows, "LOSS.DISCO.WEIGHT", "disco", default=1, metric="knn")
    assert [p[4] for p in knn] == [[30.0, 31.0, 32.0], [33.0, 34.0, 35.0], [36.0]]
    assert sweep_points(rows, "LOSS.DISCO.WEIGHT", "mocov2") == []
    assert [p[0] for p in sweep_points(rows, "LOSS.DISCO.WEIGHT", "mocov2", default=1.0)] == [1.0]

    again = write_cell(tmp_path / "w2_again", ["LOSS.DISCO.WEIGHT", "2"], {"disco": [(0, 1.0, 1.0)]})
    with pytest.raises(ValueError, match="two cells") as e:
        sweep_points(rows + load_cells([again]), "LOSS.DISCO.WEIGHT", "disco")
    assert study["w2"] in str(e.value) and again in str(e.value)
    with pytest.raises(ValueError) as e:  # the default cell lands on an explicit cell's x
        sweep_points(rows, "LOSS.DISCO.WEIGHT", "disco", default=4)
    assert study["base"] in str(e.value) and study["w4"] in str(e.value)
    with pytest.raises(ValueError, match="not a number"):
        sweep_points(rows, "MODEL.TEACHER.BN_TRAIN", "disco")


def test_missing_or_unreadable_results(tmp_path, study):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError) as e:
        load_cells([study["base"], str(empty)])
    message = str(e.value)
    assert os.path.join(str(empty), "results.json") in message
    assert f"run tools/compare_distillers.py --output-dir {empty} first" in message
    (empty / "results.json").write_text('{"summary": ')  # a run killed while writing
    with pytest.raises(ValueError, match="cannot be read.*tools/compare_distillers.py --output-dir"):
        load_cells([str(empty)])
    (empty / "results.json").write_text('{"other": 1}')
    with pytest.raises(ValueError, match="not a results.json of tools/compare_distillers.py"):
        load_cells([str(empty)])


def test_sweep_figure_axes_and_legend():
    pts = [(1.0, 50.0, 2.0, 3, [48.0, 50.0, 52.0]), (2.0, 55.0, None, 1, [55.0]), (8.0, 60.0, 1.0, 2, [59.0, 61.0])]
    assert is_power_of_two_grid([1, 2, 8]) and is_power_of_two_grid([0.5, 4]) and not is_power_of_two_grid([1, 3])
    assert not is_power_of_two_grid([0, 1, 2])
    ax = sweep_figure({"disco": pts}, "LOSS.DISCO.WEIGHT", {"mocov2 (base)": (42.0, 2.8)}).axes[0]
    assert ax.get_xscale() == "log" and [t.get_text() for t in ax.get_xticklabels()] == ["1", "2", "8"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["disco", "mocov2 (base)", "one seed (dots)"]
    ax = sweep_figure({"disco": [(0.0, *pts[0][1:]), (3.0, *pts[1][1:])]}, "K").axes[0]
    assert ax.get_xscale() == "linear" and ax.get_xlabel() == "K"
    with pytest.raises(ValueError, match="no point"):
        sweep_figure({"disco": []}, "K")


def test_cli_end_to_end(study, tmp_path):
    out = tmp_path / "report"
    cmd = [sys.executable, TOOL, study["base"], study["w2"], study["w4"], "--output", str(out / "study.md"),
           "--sweep", "LOSS.DISCO.WEIGHT", "--method", "disco", "--default", "1.0", "--plot", str(out / "weight"),
           "--baseline", f"{study['base']}:mocov2"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    table = (out / "study.md").read_text()
    assert table.startswith("| cell (overrides) | method |") and "| LOSS.DISCO.WEIGHT 2.0 | disco |" in table
    assert table.strip() in res.stdout
    for metric in ("linear", "knn"):
        png = out / f"weight_{metric}.png"
        assert png.stat().st_size > 1000 and png.read_bytes()[:8] == PNG_MAGIC
    assert "at 1, 2, 4 ->" in res.stdout

    res = subprocess.run([sys.executable, TOOL, str(tmp_path / "nowhere")], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 2 and "run tools/compare_distillers.py --output-dir" in res.stderr
    assert "Traceback" not in res.stderr
    res = subprocess.run([sys.executable, TOOL, study["w2"], "--sweep", "LOSS.DISCO.WEIGHT", "--method", "mocov2",
                          "--plot", str(tmp_path / "none")], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "no cell of 'mocov2'" in res.stderr and not list(tmp_path.glob("none*"))
