"""Detection transfer end to end on the CPU: synthetic VOC / COCO sets, the instant-test configs through
tools/train_net.py, the real VOC / COCO evaluators, preemption of a detectron2 run, and a DisCo student from a short
pretraining run through export -> tools/convert_to_d2.py -> train_net."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
QUICK = ROOT / "configs" / "detection" / "quick_schedules"
# Instant tests: fewer iterations than the configs' 20 keep the suite fast; the configs themselves train to the end.
FAST = ["SOLVER.MAX_ITER", "8", "SOLVER.STEPS", "(6,)", "SOLVER.WARMUP_ITERS", "2"]


@pytest.fixture(scope="module")
def det_root(tmp_path_factory):
    from pretrain.synthetic import write_coco, write_voc

    root = tmp_path_factory.mktemp("det") / "datasets"
    write_voc(root / "VOC2007", num_classes=4, trainval_images=16, test_images=8, image_size=64, seed=0)
    write_coco(root / "coco", num_classes=4, train_images=16, val_images=8, image_size=64, seed=0)
    return root


def _train_net(*args, env_threads="2", check=True, **env_vars):
    env = dict(os.environ, OMP_NUM_THREADS=env_threads, **env_vars)
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "train_net.py"), *map(str, args)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"train_net failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def _results(out_dir):
    with open(Path(out_dir) / "results.json") as f:
        return json.load(f)


def test_voc_instant_trains_and_evaluates(det_root, tmp_path):
    out = tmp_path / "voc"
    proc = _train_net("--config-file", QUICK / "voc_r18_C4_instant_test.yaml", "DATASETS.SYNTHETIC_ROOT", det_root,
                      "OUTPUT_DIR", out, *FAST)
    bbox = _results(out)["shapes_voc_2007_test"]["bbox"]
    assert set(bbox) >= {"AP", "AP50", "AP75"} and all(0.0 <= bbox[k] <= 100.0 for k in bbox)
    # the one-line summary: every AP with 3 decimals (a toy-scale 0.031 must not print as 0.0)
    want = ", ".join(f"{k} {bbox[k]:.3f}" for k in ("AP", "AP50", "AP75"))
    assert f"detection voc: shapes_voc_2007_test bbox: {want}\n" in proc.stdout
    assert (out / "model_final.pth").is_file() and (out / "config.yaml").is_file()

    log = (out / "log.txt").read_text()
    assert "\x1b[" not in log  # detectron2 logs the config highlighted for the terminal: not in the file
    assert log.count("Running with full config:") == 1 and "SYNTHETIC_ROOT:" in log  # the dump, once
    # progress: a line with the ETA from the first iterations on (SOLVER.LOG_PERIOD 1; detectron2's is 20)
    for it in range(8):
        assert re.search(rf"(eta: \S+  )?iter: {it}  ", log), it
    assert re.search(r"eta: \d+:\d\d:\d\d  iter: 1  ", log)
    # precise BN and the VOC AP computation show progress too
    assert re.search(r"precise-BN: 1/2 batches, [\d.]+ s each, ETA \d+:\d\d:\d\d", log)
    assert "precise-BN: done, 2 batches in" in log
    assert "VOC AP of shapes_voc_2007_test: 4 classes x 10 IoU thresholds (0.50:0.95), computing" in log
    assert re.search(r"VOC AP of shapes_voc_2007_test: done in [\d.]+ s", log)

    # --eval-only on the trained model gives the same numbers, needing only the test set: DATASETS.TRAIN names a
    # training set that does not exist (the README's VOC config without VOC trainval on disk)
    empty = tmp_path / "no_datasets"
    empty.mkdir()
    proc = _train_net("--config-file", QUICK / "voc_r18_C4_instant_test.yaml", "--eval-only",
                      "DATASETS.SYNTHETIC_ROOT", det_root, "DATASETS.TRAIN", '("voc_2007_trainval",)',
                      "OUTPUT_DIR", tmp_path / "eval", "MODEL.WEIGHTS", out / "model_final.pth",
                      DETECTRON2_DATASETS=str(empty))
    assert _results(tmp_path / "eval")["shapes_voc_2007_test"]["bbox"] == pytest.approx(bbox, abs=1e-6)
    log = (tmp_path / "eval" / "log.txt").read_text()
    assert "\x1b[" not in log and "Start inference on 8 batches" in log  # detectron2's inference progress logger


def test_coco_mask_instant_trains_and_evaluates(det_root, tmp_path):
    out = tmp_path / "coco"
    _train_net("--config-file", QUICK / "coco_r18_mask_C4_instant_test.yaml", "DATASETS.SYNTHETIC_ROOT", det_root,
               "OUTPUT_DIR", out, *FAST)
    res = _results(out)["shapes_coco_val"]
    assert {"bbox", "segm"} <= set(res)
    for task in ("bbox", "segm"):
        ap = res[task]["AP"]
        assert ap == ap and 0.0 <= ap <= 100.0  # a real number from pycocotools (NaN would mean nothing matched)


@pytest.mark.parametrize("config", sorted(p.name for p in QUICK.glob("*_instant_test.yaml")
                                           if p.name not in ("voc_r18_C4_instant_test.yaml",
                                                             "coco_r18_mask_C4_instant_test.yaml")))
def test_other_instant_configs_train_and_evaluate(det_root, tmp_path, config):
    """The timm students' instant tests (EfficientNet / MobileNetV3 backbones with their last stage as ROI head)."""
    out = tmp_path / "run"
    _train_net("--config-file", QUICK / config, "DATASETS.SYNTHETIC_ROOT", det_root, "OUTPUT_DIR", out, *FAST)
    (dataset, res), = _results(out).items()
    assert dataset == ("shapes_coco_val" if config.startswith("coco") else "shapes_voc_2007_test")
    assert {"bbox", "segm"} <= set(res) if config.startswith("coco") else "bbox" in res


def test_dataset_errors_name_the_fix(det_root, tmp_path):
    proc = _train_net("--config-file", QUICK / "voc_r18_C4_instant_test.yaml", "DATASETS.SYNTHETIC_ROOT",
                      tmp_path / "nothing", "OUTPUT_DIR", tmp_path / "x", check=False)
    assert proc.returncode != 0 and "tools/make_data.py voc" in proc.stderr
    proc = _train_net("--config-file", QUICK / "voc_r18_C4_instant_test.yaml", "DATASETS.SYNTHETIC_ROOT", det_root,
                      "MODEL.ROI_HEADS.NUM_CLASSES", 20, "OUTPUT_DIR", tmp_path / "y", check=False)
    assert proc.returncode != 0 and "set it to 4" in proc.stderr
    # the README's --eval-only command without VOC on disk, with DATASETS.SYNTHETIC_ROOT added: the error is about
    # the test set (not the training set) and names the synthetic set to evaluate on instead
    env_root = tmp_path / "empty_datasets"
    env_root.mkdir()
    env = dict(os.environ, DETECTRON2_DATASETS=str(env_root))
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "train_net.py"), "--config-file",
                           str(ROOT / "configs" / "detection" / "voc" / "r18_C4_24k.yaml"), "--eval-only",
                           "DATASETS.SYNTHETIC_ROOT", str(det_root), "MODEL.DEVICE", "cpu",
                           "OUTPUT_DIR", str(tmp_path / "z")], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0 and "DETECTRON2_DATASETS" in proc.stderr and str(env_root) in proc.stderr
    assert "'voc_2007_test' (DATASETS.TEST)" in proc.stderr and "voc_2007_trainval" not in proc.stderr
    assert 'DATASETS.TEST ("shapes_voc_2007_test",)' in proc.stderr


def _voc_cfg(config, *opts):
    from transfer.d2.config import get_cfg

    cfg = get_cfg()
    cfg.merge_from_file(str(config))
    cfg.merge_from_list([str(o) for o in opts])
    return cfg


def test_eval_only_checks_only_the_test_sets(tmp_path):
    """A synthetic root with only the VOC test split: --eval-only with the README's VOC config (its DATASETS.TEST
    pointed at the synthetic test set) passes the checks, NUM_CLASSES is checked against the test set's classes;
    training names the missing training split."""
    from pretrain.synthetic import write_voc
    from transfer.d2.datasets import DatasetCatalog
    from transfer.d2.train import check_values, prepare_datasets

    root = tmp_path / "datasets"
    write_voc(root / "VOC2007", num_classes=3, trainval_images=2, test_images=2, image_size=32, seed=0)
    (root / "VOC2007" / "ImageSets" / "Main" / "trainval.txt").unlink()
    config = ROOT / "configs" / "detection" / "voc" / "r18_C4_24k.yaml"
    opts = ["DATASETS.SYNTHETIC_ROOT", root, "DATASETS.TRAIN", '("shapes_voc_2007_trainval",)',
            "DATASETS.TEST", '("shapes_voc_2007_test",)', "MODEL.DEVICE", "cpu"]

    prepare_datasets(_voc_cfg(config, *opts, "MODEL.ROI_HEADS.NUM_CLASSES", 3), eval_only=True)
    assert "shapes_voc_2007_test" in DatasetCatalog.list()
    assert "shapes_voc_2007_trainval" not in DatasetCatalog.list()  # only the splits that exist are registered
    with pytest.raises(ValueError, match="'shapes_voc_2007_test' has 3 classes .* set it to 3"):
        prepare_datasets(_voc_cfg(config, *opts), eval_only=True)  # the config's 20
    with pytest.raises(FileNotFoundError, match=r"'shapes_voc_2007_trainval' \(DATASETS.TRAIN\) is not in "
                                                r"DATASETS.SYNTHETIC_ROOT .*trainval.txt does not exist"):
        prepare_datasets(_voc_cfg(config, *opts, "MODEL.ROI_HEADS.NUM_CLASSES", 3))
    with pytest.raises(ValueError, match="DATASETS.TEST, which is empty"):
        check_values(_voc_cfg(config, "DATASETS.TEST", "()"), eval_only=True)
    with pytest.raises(ValueError, match="SOLVER.LOG_PERIOD 0 is out of range: must be >= 1"):
        check_values(_voc_cfg(config, "SOLVER.LOG_PERIOD", 0))


def test_voc_evaluator_with_progress_gives_detectron2s_numbers(det_root):
    """VOCEvaluatorWithProgress only adds log lines: on the same predictions it returns exactly detectron2's APs."""
    from detectron2.data import DatasetCatalog
    from detectron2.evaluation import PascalVOCDetectionEvaluator
    from detectron2.structures import Boxes, Instances

    from transfer.d2.datasets import register_synthetic
    from transfer.d2.train import VOCEvaluatorWithProgress

    register_synthetic(str(det_root))
    name = "shapes_voc_2007_test"
    g = torch.Generator().manual_seed(0)
    inputs, outputs = [], []
    for d in DatasetCatalog.get(name):
        gt = torch.tensor([a["bbox"] for a in d["annotations"]], dtype=torch.float32).reshape(-1, 4)
        boxes = torch.cat([gt + torch.randn(gt.shape, generator=g) * 3, torch.rand(3, 4, generator=g) * 32])
        boxes[:, 2:] = torch.maximum(boxes[:, 2:], boxes[:, :2] + 1)
        inst = Instances((d["height"], d["width"]), pred_boxes=Boxes(boxes),
                         scores=torch.rand(len(boxes), generator=g),
                         pred_classes=torch.randint(0, 4, (len(boxes),), generator=g))
        inputs.append({"image_id": d["image_id"]})
        outputs.append({"instances": inst})
    results = []
    for evaluator in (PascalVOCDetectionEvaluator(name), VOCEvaluatorWithProgress(name)):
        evaluator.reset()
        evaluator.process(inputs, outputs)
        results.append(evaluator.evaluate())
    assert results[0]["bbox"]["AP50"] > 0  # the jittered ground truth finds objects
    assert results[1] == results[0]


def test_summary_line_shows_small_aps():
    from transfer.d2.train import _summary

    res = {"shapes_voc_2007_test": {"bbox": {"AP": 0.0314, "AP50": 0.1, "AP75": 0.0, "APs": 1.0}}}
    assert _summary(res) == "shapes_voc_2007_test bbox: AP 0.031, AP50 0.100, AP75 0.000"


def test_preempted_run_checkpoints_and_resumes(det_root, tmp_path):
    """SIGUSR2 mid-run: the iteration that finished is saved, Preempted raised; --resume continues after it."""
    import signal

    from detectron2.engine import HookBase

    from pretrain.launch import argument_parser
    from pretrain.preemption import Preempted
    from transfer.d2.train import Trainer, setup

    out = tmp_path / "pre"
    args = argument_parser().parse_args(["--config-file", str(QUICK / "voc_r18_C4_instant_test.yaml"),
                                         "DATASETS.SYNTHETIC_ROOT", str(det_root), "OUTPUT_DIR", str(out), *FAST])
    cfg = setup(args)

    class SignalAt(HookBase):
        def after_step(self):
            if self.trainer.iter == 2:
                os.kill(os.getpid(), signal.SIGUSR2)  # what SLURM sends before preempting

    class SignalledTrainer(Trainer):
        def build_hooks(self):
            hooks = super().build_hooks()
            return hooks[:-1] + [SignalAt(), hooks[-1]]  # the signal arrives just before the preemption hook runs

    handler = signal.getsignal(signal.SIGUSR2)
    trainer = SignalledTrainer(cfg)
    trainer.resume_or_load(resume=False)
    with pytest.raises(Preempted, match="after iteration 2"):
        trainer.train()
    assert signal.getsignal(signal.SIGUSR2) is handler  # our handler is removed again
    assert (out / "model_0000002.pth").is_file() and (out / "last_checkpoint").read_text() == "model_0000002.pth"
    saved = torch.load(out / "model_0000002.pth", map_location="cpu", weights_only=False)
    assert saved["iteration"] == 2

    resumed = Trainer(cfg)
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 3
    for name, p in resumed.model.state_dict().items():
        assert torch.equal(p, saved["model"][name]), name


@pytest.mark.slow
def test_disco_student_whole_path(det_root, tmp_path, imagefolder, teacher_export):
    """Pretrain a DisCo R-18 student briefly, export, convert to detectron2, fine-tune and evaluate on VOC."""
    from conftest import tiny_cfg

    from pretrain.trainer import Trainer as PretrainTrainer

    cfg = tiny_cfg(tmp_path / "disco", imagefolder, teacher_export, **{"SOLVER.EPOCHS": 1})
    PretrainTrainer(cfg).run()
    export = tmp_path / "disco" / "export" / "resnet18.pth"
    assert export.is_file()

    pkl = tmp_path / "r18.pkl"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "convert_to_d2.py"), str(export), str(pkl),
                           "--config-file", str(QUICK / "voc_r18_C4_instant_test.yaml")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    out = tmp_path / "voc"
    proc = _train_net("--config-file", QUICK / "voc_r18_C4_instant_test.yaml", "DATASETS.SYNTHETIC_ROOT", det_root,
                      "MODEL.WEIGHTS", pkl, "OUTPUT_DIR", out, *FAST)
    assert "shapes_voc_2007_test" in _results(out)
    # every pretrained weight reached the model: the first iteration starts from the student's own layer4 weights
    import pickle

    with open(pkl, "rb") as f:
        converted = pickle.load(f)["model"]
    student = torch.load(export, map_location="cpu", weights_only=True)["state_dict"]
    assert (converted["roi_heads.res5.1.conv2.weight"] == student["layer4.1.conv2.weight"].numpy()).all()
