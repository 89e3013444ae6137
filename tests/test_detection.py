"""Detection transfer end to end on the CPU: synthetic VOC / COCO sets, the instant-test configs through
tools/train_net.py, the real VOC / COCO evaluators, preemption of a detectron2 run, and a DisCo student from a short
pretraining run through export -> tools/convert_to_d2.py -> train_net."""
import json
import os
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


def _train_net(*args, env_threads="2", check=True):
    env = dict(os.environ, OMP_NUM_THREADS=env_threads)
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
    assert "detection voc: shapes_voc_2007_test bbox: AP" in proc.stdout  # the one-line summary
    assert (out / "model_final.pth").is_file() and (out / "config.yaml").is_file()

    # --eval-only on the trained model gives the same numbers
    proc = _train_net("--config-file", QUICK / "voc_r18_C4_instant_test.yaml", "--eval-only",
                      "DATASETS.SYNTHETIC_ROOT", det_root, "OUTPUT_DIR", tmp_path / "eval",
                      "MODEL.WEIGHTS", out / "model_final.pth")
    assert _results(tmp_path / "eval")["shapes_voc_2007_test"]["bbox"] == pytest.approx(bbox, abs=1e-6)


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
    env_root = tmp_path / "empty_datasets"
    env_root.mkdir()
    env = dict(os.environ, DETECTRON2_DATASETS=str(env_root))
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "train_net.py"), "--config-file",
                           str(ROOT / "configs" / "detection" / "voc" / "r18_C4_24k.yaml"), "MODEL.DEVICE", "cpu",
                           "OUTPUT_DIR", str(tmp_path / "z")], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0 and "DETECTRON2_DATASETS" in proc.stderr and str(env_root) in proc.stderr


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
