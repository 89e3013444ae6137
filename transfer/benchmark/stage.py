"""One stage of the benchmark graph, and when it is done: its ``results.json`` parses and holds the stage's result
keys (the tools write it last, so a stage killed while writing it is not done)."""
import json
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from pretrain.checkpoint import save_atomic

from .config import Run

DETECTION_STAGES = ("voc", "coco")


@dataclass
class Stage:
    name: str  # "data", "<run>/<kind>" or "report"
    kind: str  # data, pretrain, export, knn, linear, semi_1pct, semi_10pct, cifar10, cifar100, tsne, convert, voc,
    # coco or report
    out: str  # its folder (the tool's OUTPUT_DIR)
    run: Optional[Run] = None
    tool: str = ""  # a LAUNCHER_TOOLS name, or "" for the benchmark's own steps
    argv: List[str] = field(default_factory=list)  # the tool's command line (its flags and KEY VALUE overrides)
    needs: List[str] = field(default_factory=list)
    gpus: int = 0
    nodes: int = 1
    timeout: int = 60  # minutes
    cpus: int = 2
    env: Dict[str, str] = field(default_factory=dict)
    info: dict = field(default_factory=dict)  # what the benchmark's own steps need (paths, arch, ...)

    @property
    def results(self) -> str:
        return os.path.join(self.out, "results.json")

    def command(self) -> str:
        """The command that does this stage by hand (what a stage runs in-process)."""
        import shlex

        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env.items())
        if self.tool:
            line = f"python tools/{self.tool}.py {' '.join(shlex.quote(a) for a in self.argv)}"
        else:
            line = f"(benchmark step {self.kind}: {self.info.get('what', '')})"
        return f"{env} {line}".strip()


def _required_keys(kind: str):
    return {"pretrain": ("export",), "export": ("export", "arch"), "knn": ("top1",), "linear": ("top1",),
            "semi_1pct": ("top1",), "semi_10pct": ("top1",), "cifar10": ("top1",), "cifar100": ("top1",),
            "tsne": ("png",), "convert": ("pkl",), "data": ("paths",), "report": ("table",)}.get(kind, ())


def read_results(stage: Stage) -> Optional[dict]:
    """The stage's results.json if it is complete (parses, holds the stage's result keys), else None."""
    try:
        with open(stage.results) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not data:
        return None
    if stage.kind in DETECTION_STAGES:  # {dataset: {task: {AP, AP50, ...}}}
        ok = all(isinstance(r, dict) and r and all(isinstance(m, dict) and "AP" in m for m in r.values())
                 for r in data.values())
        return data if ok else None
    return data if all(k in data for k in _required_keys(stage.kind)) else None


def is_done(stage: Stage) -> bool:
    return stage.kind != "report" and read_results(stage) is not None


def write_json(path: str, data: dict) -> None:
    """Write ``data`` to ``path`` as JSON with :func:`pretrain.checkpoint.save_atomic` (a reader never sees half a
    file)."""
    save_atomic(data, path, lambda d, f: f.write(json.dumps(d, indent=1).encode()))
