"""tools/benchmark.py: the benchmark config and its sweeps, the stage graph, the local runner (end to end on the
quickstart graph at toy size, resumed after a kill, a failing stage) and the SLURM job graph with dependencies."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pretrain.cfgnode import ConfigError, UnknownKeyError
from pretrain.slurm import slurm_answers
from transfer.benchmark.config import expand_runs, setup_benchmark_cfg
from transfer.benchmark.graph import build_graph, select, toposort
from transfer.benchmark.paper import load_paper_numbers, paper_cells

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "configs" / "benchmark"
TOOL = str(ROOT / "tools" / "benchmark.py")
DET_TOY = "['SOLVER.MAX_ITER', 2, 'SOLVER.STEPS', '(1,)', 'SOLVER.WARMUP_ITERS', 1, 'TEST.PRECISE_BN.NUM_ITER', 1]"
TOY = ["DATA.SYNTHETIC.NUM_CLASSES", "4", "DATA.SYNTHETIC.TRAIN_PER_CLASS", "16", "DATA.SYNTHETIC.VAL_PER_CLASS", "4",
       "DATA.SYNTHETIC.CIFAR_TRAIN_PER_CLASS", "8", "DATA.SYNTHETIC.CIFAR_TEST_PER_CLASS", "2",
       "DATA.SYNTHETIC.DET_TRAIN_IMAGES", "4", "DATA.SYNTHETIC.DET_TEST_IMAGES", "2",
       "PRETRAIN.OPTS", "['SOLVER.IMS_PER_BATCH', 8, 'SOLVER.EPOCHS', 1, 'MODEL.MOCO.QUEUE_SIZE', 32, "
                        "'TEST.KNN.PERIOD', 0, 'TEST.TEACHER_HEALTH.IMAGES', 16, 'MODEL.STUDENT.HEAD.HIDDEN_DIM', 64]",
       "VOC.OPTS", DET_TOY, "COCO.OPTS", DET_TOY]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def _bench(*args, timeout=900):
    return subprocess.run([sys.executable, TOOL, *map(str, args)], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout, env=ENV)


def test_sweep_expands_runs_names_and_teachers(tmp_path):
    cfg = setup_benchmark_cfg(_write(tmp_path / "b.yaml", """
SWEEP:
  student: [r18, effb0]
  seed: [0, 1]
RUNS:
  teacher: {PRETRAIN: configs/pretrain/quickstart_teacher.yaml, EVALUATE: False}
  disco:
    PRETRAIN: configs/pretrain/disco/r50_{student}.yaml
    TEACHER: teacher
    OPTS: [SEED, "{seed}"]
    PAPER: table1/r50/{student}/disco
"""))
    runs = expand_runs(cfg)
    assert [r.name for r in runs] == ["teacher", "disco_r18_seed0", "disco_r18_seed1", "disco_effb0_seed0",
                                      "disco_effb0_seed1"]
    r = runs[3]
    assert (r.pretrain, r.opts, r.paper, r.teacher) == ("configs/pretrain/disco/r50_effb0.yaml", ["SEED", "0"],
                                                         "table1/r50/effb0/disco", "run:teacher")
    assert r.values == {"student": "effb0", "seed": 0} and not runs[0].evaluate


@pytest.mark.parametrize("text, error, words", [
    ("RUNS: {a: {PRETRAIN: x.yaml, OPT: []}}", UnknownKeyError, ["RUNS.a.OPT", "OPTS"]),
    ("RUNS: {a: {PRETRAIN: 'x_{student}.yaml'}}", ConfigError, ["{student}", "SWEEP"]),
    ("RUNS: {a: {PRETRAIN: x.yaml, WEIGHTS: y.pth}}", ConfigError, ["exactly one of PRETRAIN", "WEIGHTS"]),
    ("SWEEP: {arch: [a]}\nRUNS: {a: {PRETRAIN: x.yaml}}", ConfigError, ["SWEEP.arch"]),
    ("OUTPUT_DIR: x", ConfigError, ["no RUNS"]),
])
def test_bad_benchmark_configs_name_the_cause(tmp_path, text, error, words):
    with pytest.raises(error) as e:
        setup_benchmark_cfg(_write(tmp_path / "b.yaml", text))
    assert all(w in str(e.value) for w in words), str(e.value)


def test_unknown_paper_row_fails_when_the_graph_is_built(tmp_path):
    cfg = setup_benchmark_cfg(_write(tmp_path / "b.yaml", f"""
OUTPUT_DIR: {tmp_path / 'out'}
RUNS: {{a: {{PRETRAIN: configs/pretrain/quickstart_moco.yaml, PAPER: table1/r50/r18/discoo}}}}
"""))
    with pytest.raises(ConfigError, match="run a: PAPER: no paper row 'table1/r50/r18/discoo'; closest: "
                                         "table1/r50/r18/disco"):
        build_graph(cfg)


def test_shipped_configs_build_their_graphs_with_paper_rows(tmp_path):
    numbers = load_paper_numbers()
    graphs = {}
    for path in sorted(BENCH.glob("*.yaml")):
        cfg = setup_benchmark_cfg(str(path), ["OUTPUT_DIR", str(tmp_path / path.stem)])  # nothing done yet
        stages = toposort(build_graph(cfg))
        graphs[path.stem] = {s.name: s for s in stages}
        for run in expand_runs(cfg):
            paper_cells(run.paper, numbers)  # every PAPER key exists
        seen = set()
        for s in stages:  # dependency order
            assert set(s.needs) <= seen, s.name
            seen.add(s.name)
    t1 = graphs["table1_r50"]
    assert len([n for n in t1 if n.endswith("/linear")]) == 10 and "report" in t1
    assert "linear_imagenet_mobile.yaml" in " ".join(t1["disco_effb0/linear"].argv)
    assert "linear_imagenet_resnet.yaml" in " ".join(t1["mocov2_r18/linear"].argv)
    assert "configs/pretrain/disco/r50_mobv3l.yaml" in t1["disco_mobv3l/pretrain"].argv[1]
    t3 = graphs["table3_r34"]
    assert t3["disco_r101/voc"].needs == ["disco_r101/convert"]
    assert "r34_C4_48k_bs32.yaml" in t3["disco_r101/voc"].argv[1]
    argv = t3["disco_r101/pretrain"].argv
    assert argv[argv.index("MODEL.TEACHER.WEIGHTS") + 1] == "pretrained/moco_v2_r101_200ep.pth"
    assert [n for n in graphs["fig9_hidden_dim"] if n.endswith("/pretrain")][0] == "disco_hidden_dim128/pretrain"
    q = graphs["quickstart"]
    assert q["disco/pretrain"].needs == ["data", "teacher/export"]
    argv = q["disco/pretrain"].argv
    assert argv[argv.index("MODEL.TEACHER.WEIGHTS") + 1].endswith("teacher/pretrain/export/convnet_small.pth")
    assert q["disco/coco"].needs == ["disco/convert"] and q["disco/convert"].needs == ["disco/export"]
    assert "teacher/knn" not in q  # EVALUATE False: a teacher only
    # --only / --skip: a run, a kind, a stage; the report always stays
    only = [s.name for s in select(list(q.values()), ["mocov2"], ["coco", "mocov2/voc"])]
    assert "mocov2/linear" in only and "report" in only and "data" in only  # needed, not done yet
    assert not any(n.startswith("disco") or n.endswith(("/coco", "/voc")) for n in only)
    with pytest.raises(ConfigError, match="matches no stage"):
        select(list(q.values()), ["nonsense"])


def test_dry_run_prints_the_graph_and_runs_nothing(tmp_path):
    proc = _bench("--config-file", BENCH / "quickstart.yaml", "OUTPUT_DIR", tmp_path / "q", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "python tools/train_net.py --config-file configs/detection/quick_schedules/voc_r18_C4_instant_test.yaml" \
        in proc.stdout
    assert "28 stage(s) to run, 0 done" in proc.stdout
    assert not (tmp_path / "q").exists()


def _stage_json(out: Path, stage: str) -> dict:
    return json.loads((out / stage / "stage.json").read_text())


def test_quickstart_graph_end_to_end_then_nothing_reruns(tmp_path):
    """Every stage of configs/benchmark/quickstart.yaml at toy size: one table with every cell of both runs filled,
    the plots, wall time per stage; the same command again runs only the report."""
    out = tmp_path / "q"
    proc = _bench("--config-file", BENCH / "quickstart.yaml", "OUTPUT_DIR", out, *TOY)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    results = json.loads((out / "results.json").read_text())
    from transfer.benchmark.results import CELLS

    assert [r["run"] for r in results["runs"]] == ["disco", "mocov2"]
    for run in results["runs"]:
        missing = [name for _, name, _ in CELLS if name not in run["cells"]]
        assert not missing, (run["run"], missing)
        assert run["arch"] == "resnet18" and run["tsne_png"]
    assert all(s["status"] == "done" and s["wall_s"] is not None for s in results["stages"])
    assert next(s for s in results["stages"] if s["stage"] == "disco/pretrain")["images_per_s"] > 0
    md = (out / "results.md").read_text()
    assert "[" + f"{results['runs'][0]['cells']['linear_top1']:.2f}](disco/linear/)" in md
    assert all((out / p).is_file() for p in results["plots"].values()) and "protocols" in results["plots"]
    assert json.loads((out / "disco" / "export" / "results.json").read_text())["loads_in_timm"]

    before = {s: _stage_json(out, s)["finished"] for s in ("data", "disco/pretrain", "mocov2/coco")}
    proc = _bench("--config-file", BENCH / "quickstart.yaml", "OUTPUT_DIR", out, *TOY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "1/1 report" in proc.stdout and "disco/pretrain" not in proc.stdout.split("# Benchmark")[0]
    assert before == {s: _stage_json(out, s)["finished"] for s in before}


def test_killed_pipeline_resumes_and_done_stages_are_not_rerun(tmp_path):
    """kill -9 the benchmark while a stage trains: the stage's process is told (SIGTERM) and checkpoints; the same
    command again skips the finished data stage and continues the pretraining from its checkpoint. --only teacher
    runs the stages it needs (data) too."""
    out = tmp_path / "k"
    cmd = ["--config-file", str(BENCH / "quickstart.yaml"), "OUTPUT_DIR", str(out), *TOY[:14], "PRETRAIN.OPTS",
           "['SOLVER.EPOCHS', 12, 'TRAIN.CHECKPOINT_PERIOD', 4, 'SOLVER.IMS_PER_BATCH', 8, 'MODEL.MOCO.QUEUE_SIZE', "
           "32, 'TEST.KNN.PERIOD', 0]", "--only", "teacher"]
    proc = subprocess.Popen([sys.executable, TOOL, *cmd], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    ckpts = out / "teacher" / "pretrain" / "checkpoints"
    deadline = time.time() + 300
    while not (ckpts.is_dir() and any(ckpts.glob("model_*.pth"))):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.2)
    data_done = _stage_json(out, "data")["finished"]
    children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    def alive(pid):  # an orphan that exited may stay a zombie where nothing reaps it
        try:
            return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
        except OSError:
            return False

    deadline = time.time() + 120  # the orphaned stage process checkpoints at its next iteration and exits
    while any(alive(pid) for pid in children):
        assert time.time() < deadline, "the stage's process outlived the benchmark by 2 minutes"
        time.sleep(0.2)
    log = out / "teacher" / "pretrain" / "stage.log"
    assert not (out / "teacher" / "pretrain" / "export").exists()
    assert "stopped on request" in log.read_text()

    again = _bench(*cmd)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "data:" not in again.stdout.split("# Benchmark")[0] and _stage_json(out, "data")["finished"] == data_done
    timing = _stage_json(out, "teacher/pretrain")
    assert timing["resumed"] and "resumed from" in log.read_text().split("===")[-1]
    assert json.loads((out / "teacher" / "pretrain" / "results.json").read_text())["iterations"] == 12 * 8


@pytest.fixture
def convnet_export(tmp_path):
    """An export of a (random) convnet_tiny: kNN works on it, detection cannot (no detectron2 backbone)."""
    import torch

    from pretrain.encoder import build_encoder
    from pretrain.export import export_encoder

    torch.manual_seed(0)
    return export_encoder(build_encoder("convnet_tiny", 32, 16), "convnet_tiny", str(tmp_path / "w"), "convnet_tiny",
                          {"method": "random"})["backbone"]


def _weights_only(tmp_path, weights: str, imagefolder, enabled=("KNN", "CIFAR10", "VOC")) -> str:
    from transfer.benchmark.config import PROTOCOLS

    knn = "\n  OPTS: [DATA.IMAGE_SIZE, 32, DATA.VAL_RESIZE, 32, DATA.NUM_WORKERS, 0, KNN.K, 5]"
    protocols = "\n".join(f"{p}:\n  GPUS: 0\n  CPUS: 1{knn if p == 'KNN' else ''}" if p in enabled else
                           f"{p}: {{ENABLED: False}}" for p in PROTOCOLS)
    return _write(tmp_path / "w.yaml", f"""
OUTPUT_DIR: {tmp_path / 'bench'}
DATA:
  TRAIN_DIR: {imagefolder / 'train'}
  VAL_DIR: {imagefolder / 'val'}
  CIFAR10: {tmp_path / 'no_cifar_here'}
RUNS:
  random: {{WEIGHTS: {weights}}}
{protocols}
""")


def test_failed_stage_is_named_its_dependants_skipped_the_rest_done(tmp_path, imagefolder, convnet_export):
    """CIFAR-10 without its dataset fails, the conversion of a convnet (no detectron2 backbone) fails and VOC, which
    needs it, is skipped; kNN still runs; exit status 1 naming both failures and their logs."""
    config = _weights_only(tmp_path, convnet_export, imagefolder)
    proc = _bench("--config-file", config)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 stage(s) failed: random/cifar10, random/convert" in proc.stderr
    assert "random/voc: skipped, it needs random/convert (failed)" in proc.stdout
    assert "no_cifar_here" in (tmp_path / "bench" / "random" / "cifar10" / "stage.log").read_text()
    results = json.loads((tmp_path / "bench" / "results.json").read_text())
    assert set(results["runs"][0]["cells"]) == {"knn_top1", "knn_top5"}
    status = {s["stage"]: s["status"] for s in results["stages"]}
    assert status["random/knn"] == "done" and status["random/voc"] == "not done"
    # one stage by hand, in this process: what each stage's process and SLURM job runs
    first = _stage_json(tmp_path / "bench", "random/knn")["finished"]
    time.sleep(1)
    proc = _bench("--config-file", config, "--run-stage", "random/knn")
    assert proc.returncode == 0 and "knn convnet_tiny" in proc.stdout, proc.stderr[-2000:]
    assert _stage_json(tmp_path / "bench", "random/knn")["finished"] != first


@pytest.mark.skipif(not slurm_answers(), reason="no local SLURM: run `tools/local_slurm.sh install && "
                                                "tools/local_slurm.sh start`")
def test_slurm_job_graph_with_dependencies(tmp_path, imagefolder, convnet_export):
    """Every stage its own job; kNN starts only after the export job completed (afterok), the report after both
    (afterany); --wait follows the graph and the report job writes the table."""
    config = _weights_only(tmp_path, convnet_export, imagefolder, enabled=("KNN",))
    proc = _bench("--config-file", config, "--slurm", "--wait", "--mem", "4", timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    jobs = json.loads((tmp_path / "bench" / "slurm_jobs.json").read_text())
    assert set(jobs) == {"random/export", "random/knn", "report"}
    assert f"random/knn: job {jobs['random/knn']} after afterok:{jobs['random/export']}" in proc.stdout

    def times(job):
        out = subprocess.run(["sacct", "-n", "-P", "-X", "-j", str(job), "--format=Start,End,State"],
                             capture_output=True, text=True).stdout.split()[0]
        return out.split("|")

    export, knn, report = times(jobs["random/export"]), times(jobs["random/knn"]), times(jobs["report"])
    assert export[2] == knn[2] == report[2] == "COMPLETED"
    assert knn[0] >= export[1] and report[0] >= knn[1]  # ISO timestamps compare as strings
    results = json.loads((tmp_path / "bench" / "results.json").read_text())
    assert "knn_top1" in results["runs"][0]["cells"]
