"""Methods are plug-ins: a distiller defined in this file, registered by name, trains through tools/pretrain.py with
nothing but a config, and its term reaches metrics.jsonl, the checkpoint and the training curves."""
import json
import os
import runpy
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pretrain.cfgnode import CN
from pretrain.checkpoint import Checkpointer
from pretrain.config import get_cfg
from pretrain.methods import DISTILLERS, TESTBEDS, Distiller

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@DISTILLERS.register()
class ToyAttentionMatch(Distiller):
    """Matches the spatial energy of the deepest student feature map with the teacher's (an AT-like toy), with a
    learnable scale (a trainable parameter of the part) and a step counter (a buffer that must be checkpointed)."""

    name = "toy_maps"
    student_views = (0,)
    student_maps = True
    teacher_views = (0,)
    teacher_maps = True

    def __init__(self, weight: float):
        super().__init__()
        self.weight = weight
        self.scale = nn.Parameter(torch.ones(()))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    @staticmethod
    def add_config(cfg) -> None:
        cfg.LOSS.TOY_MAPS = CN()
        cfg.LOSS.TOY_MAPS.WEIGHT = 10.0  # weight of the toy term

    @classmethod
    def from_config(cls, cfg, student, teacher):
        return cls(cfg.LOSS.TOY_MAPS.WEIGHT)

    def targets(self, student, views, teacher):
        return {"map": _energy(teacher[0]["maps"][-1])}

    def losses(self, view, out, targets):
        s = _energy(out["maps"][-1])
        t = F.interpolate(targets["map"][:, None], size=s.shape[-2:], mode="bilinear")[:, 0]
        return {"loss_toy_maps": self.weight * (self.scale * s - t).pow(2).mean()}

    def after_step(self, student, targets):
        self.steps += 1


def _energy(fmap):
    return F.normalize(fmap.float().pow(2).mean(1).flatten(1), dim=1).view(fmap.shape[0], *fmap.shape[2:])


def test_registered_part_adds_its_keys_to_every_config():
    cfg = get_cfg()
    assert cfg.LOSS.TOY_MAPS.WEIGHT == 10.0 and cfg.LOSS.DISCO.WEIGHT == 32.0 and cfg.MODEL.MOCO.QUEUE_SIZE == 65536
    assert {"mocov2", "none"} <= set(TESTBEDS.names()) and {"disco", "toy_maps"} <= set(DISTILLERS.names())
    with pytest.raises(AssertionError, match="already registered"):
        DISTILLERS.register(ToyAttentionMatch)


def test_toy_distiller_trains_through_the_cli(tmp_path, imagefolder, teacher_export, monkeypatch):
    out = tmp_path / "toy"
    opts = ["OUTPUT_DIR", out, "DATA.TRAIN_DIR", imagefolder / "train", "DATA.VAL_DIR", "", "DATA.IMAGE_SIZE", 32,
            "DATA.NUM_WORKERS", 0, "SOLVER.IMS_PER_BATCH", 8, "SOLVER.EPOCHS", 1, "MODEL.MOCO.QUEUE_SIZE", 32,
            "MODEL.STUDENT.ARCH", "resnet18", "MODEL.STUDENT.HEAD.HIDDEN_DIM", 64, "MODEL.TEACHER.ARCH", "resnet18",
            "MODEL.TEACHER.WEIGHTS", teacher_export, "TRAIN.LOG_PERIOD", 2, "SOLVER.BASE_LR", 0.3,
            "METHOD.DISTILLERS", "['toy_maps', 'disco']"]
    monkeypatch.setattr(sys, "argv", ["tools/pretrain.py", *map(str, opts)])
    runpy.run_path(os.path.join(ROOT, "tools", "pretrain.py"), run_name="__main__")

    recs = [json.loads(x) for x in open(out / "metrics.jsonl") if '"loss"' in x]  # not the teacher health record
    assert [r["iter"] for r in recs] == [2, 4, 6, 8]
    for r in recs:
        assert {"loss", "loss_mocov2", "loss_disco", "loss_toy_maps"} <= set(r)
        assert r["loss"] == pytest.approx(r["loss_mocov2"] + r["loss_disco"] + r["loss_toy_maps"], rel=1e-5)
    state, _ = Checkpointer(str(out)).load_latest()
    assert int(state["model"]["distillers.toy_maps.steps"]) == 8  # its after_step ran, its buffer is checkpointed
    assert float(state["model"]["distillers.toy_maps.scale"]) != 1.0  # its parameter is optimised
    assert "mocov2 + toy_maps + disco" in (out / "log.txt").read_text()
    meta = torch.load(out / "export" / "resnet18.pth", weights_only=True)
    assert meta["method"] == "mocov2 + toy_maps + disco"

    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "plot_curves.py"), str(out), "--out",
                           str(tmp_path / "curves.png")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "panels: loss, loss_disco, loss_mocov2, loss_toy_maps, lr" in proc.stdout
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_readme_recipe_works_as_written(tmp_path, teacher_export):
    """The "Adding a method" example of README.md, executed as it is printed, registers a distiller that builds
    from a config and takes a training step."""
    from pretrain.config import setup_cfg
    from pretrain.engine import train_step
    from pretrain.model import build_method

    readme = open(os.path.join(ROOT, "README.md")).read()
    block = readme.split("**Adding a method**", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    if "cosine" not in DISTILLERS:
        exec(compile(block, "README.md", "exec"), {"__name__": "readme_recipe"})
    cfg = setup_cfg("", ["METHOD.TESTBED", "none", "METHOD.DISTILLERS", "['cosine']", "MODEL.STUDENT.ARCH",
                         "resnet18", "MODEL.TEACHER.ARCH", "resnet18", "MODEL.TEACHER.WEIGHTS", str(teacher_export),
                         "SOLVER.IMS_PER_BATCH", "4"])
    assert cfg.LOSS.COSINE.WEIGHT == 1.0
    method = build_method(cfg)
    assert method.student_views == (0,) and method.description == "cosine"
    views = [torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)]
    losses = train_step(method, views, torch.optim.SGD(method.trainable_parameters(), lr=0.1))
    assert set(losses) == {"loss", "loss_cosine"} and 0 < losses["loss_cosine"] <= 2
