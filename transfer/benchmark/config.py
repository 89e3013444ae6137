"""The benchmark config: which runs (pretrain a student, or evaluate an existing checkpoint), which protocols on each,
the data they read and the resources of every stage. The project's one config language (fvcore ``CfgNode`` with
``_BASE_`` and ``KEY VALUE`` overrides); each protocol names the existing config of its evaluator.

A run is a node of ``RUNS`` (any name). ``SWEEP`` expands runs over grids: every ``{var}`` in a run's strings
(``PRETRAIN``, ``WEIGHTS``, ``TEACHER``, ``OPTS``, ``PAPER``) takes each value of ``SWEEP.var``; a run that uses two
variables expands over their product. ``{arch}`` (the student's architecture), ``{short}`` (its short name in the
detection configs: r18, effb0, ...) and ``{family}`` (``resnet`` or ``mobile``: which linear-evaluation config) are
filled in every protocol's ``CONFIG`` and ``OPTS`` for each run, as are the run's sweep variables.
"""
import itertools
import os
import re
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

from pretrain.cfgnode import CfgNode as CN
from pretrain.cfgnode import ConfigError, UnknownKeyError, merge_and_freeze

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_C = CN()
_C.OUTPUT_DIR = "runs/benchmark"  # <run>/<stage>/ folders, data/, results.md, results.json, plots

# Where the datasets are ("" = whatever the protocol's own config says). With DATA.SYNTHETIC.ENABLED the first stage
# writes synthetic stand-ins in the real layouts under OUTPUT_DIR/data and every path below points there.
_C.DATA = CN()
_C.DATA.TRAIN_DIR = ""  # ImageFolder training images (pretraining, kNN / linear / semi / t-SNE): DATA.TRAIN_DIR
_C.DATA.VAL_DIR = ""  # ImageFolder evaluation images of the same classes: DATA.VAL_DIR
_C.DATA.SUBSET_1PCT = ""  # SimCLR's 1percent.txt (semi 1 %): DATA.SUBSET_FILE
_C.DATA.SUBSET_10PCT = ""  # SimCLR's 10percent.txt (semi 10 %)
_C.DATA.CIFAR10 = ""  # the folder holding cifar-10-batches-py/: DATA.ROOT of the cifar10 protocol
_C.DATA.CIFAR100 = ""  # the folder holding cifar-100-python/
_C.DATA.DETECTRON2_DATASETS = ""  # VOC2007/, VOC2012/, coco/ (exported as $DETECTRON2_DATASETS for VOC / COCO)
_C.DATA.SYNTHETIC = CN()
_C.DATA.SYNTHETIC.ENABLED = False  # write synthetic data (tools/make_data.py layouts) and use it everywhere
_C.DATA.SYNTHETIC.NUM_CLASSES = 10
_C.DATA.SYNTHETIC.TRAIN_PER_CLASS = 300
_C.DATA.SYNTHETIC.VAL_PER_CLASS = 50
_C.DATA.SYNTHETIC.IMAGE_SIZE = 32  # ImageFolder side in pixels
_C.DATA.SYNTHETIC.CIFAR_TRAIN_PER_CLASS = 100
_C.DATA.SYNTHETIC.CIFAR_TEST_PER_CLASS = 20
_C.DATA.SYNTHETIC.DET_TRAIN_IMAGES = 64  # VOC trainval / COCO train2017 images (4 shape classes, 64 px)
_C.DATA.SYNTHETIC.DET_TEST_IMAGES = 16

# Every pretraining (stage <run>/pretrain): resources, and overrides applied to every run after the run's own.
_C.PRETRAIN = CN()
_C.PRETRAIN.OPTS = []
_C.PRETRAIN.GPUS = 8  # per node; 0 = CPU (one process locally, --tasks-per-node gloo tasks on SLURM)
_C.PRETRAIN.NODES = 1
_C.PRETRAIN.TIMEOUT = 72 * 60  # SLURM time limit in minutes (a run that needs longer is requeued and resumes)
_C.PRETRAIN.CPUS = 10  # CPU cores per task

# The protocols. Each: ENABLED, the evaluator's config (CONFIG, OPTS appended after the benchmark's own overrides)
# and the resources of its stage. KNN, LINEAR, SEMI_*, CIFAR*: tools/eval_knn.py / eval_linear.py; TSNE: tools/tsne.py;
# VOC / COCO: tools/convert_to_d2.py then tools/train_net.py.
PROTOCOLS = {  # name: (tool, default config, GPUs, minutes)
    "KNN": ("eval_knn", "configs/eval/knn_imagenet.yaml", 1, 120),
    "LINEAR": ("eval_linear", "configs/eval/linear_imagenet_{family}.yaml", 8, 24 * 60),
    "SEMI_1PCT": ("eval_linear", "configs/eval/semi_1pct.yaml", 8, 12 * 60),
    "SEMI_10PCT": ("eval_linear", "configs/eval/semi_10pct.yaml", 8, 12 * 60),
    "CIFAR10": ("eval_linear", "configs/eval/cifar10.yaml", 1, 6 * 60),
    "CIFAR100": ("eval_linear", "configs/eval/cifar100.yaml", 1, 6 * 60),
    "TSNE": ("tsne", "configs/eval/tsne_imagenet.yaml", 1, 60),
    "VOC": ("train_net", "configs/detection/voc/{short}_C4_24k.yaml", 8, 24 * 60),
    "COCO": ("train_net", "configs/detection/coco/{short}_mask_C4_2x.yaml", 8, 48 * 60),
}
for _name, (_tool, _config, _gpus, _minutes) in PROTOCOLS.items():
    _C[_name] = CN()
    _C[_name].ENABLED = True
    _C[_name].CONFIG = _config
    _C[_name].OPTS = []
    _C[_name].GPUS = _gpus
    _C[_name].NODES = 1
    _C[_name].TIMEOUT = _minutes
    _C[_name].CPUS = 10

_C.SWEEP = CN(new_allowed=True)  # var: [values]; see the module docstring
_C.RUNS = CN(new_allowed=True)  # name: a run (RUN_KEYS)

RUN_KEYS = {  # a run's keys, their defaults and what they mean
    "PRETRAIN": "",  # pretraining config (configs/pretrain/...); "" = evaluate WEIGHTS only
    "WEIGHTS": "",  # instead of PRETRAIN: an existing export or checkpoint (any format tools/convert_to_d2.py reads)
    "ARCH": "",  # with WEIGHTS: the architecture when the checkpoint does not say
    "TEACHER": "",  # MODEL.TEACHER.WEIGHTS: another run's name (its export; that run trains first) or a file
    "OPTS": [],  # pretraining overrides of this run (before PRETRAIN.OPTS)
    "PAPER": "",  # the paper's row to show beside ours (a key of transfer/benchmark/paper_numbers.yaml)
    "EVALUATE": True,  # False: only pretrain and export (e.g. a teacher of other runs)
}
_VAR = re.compile(r"\{([a-z_][a-z0-9_]*)\}")
BUILTIN_VARS = ("arch", "short", "family")


def get_benchmark_cfg() -> CN:
    return _C.clone()


def setup_benchmark_cfg(config_file: str = "", opts=()) -> CN:
    """defaults -> merge ``config_file`` -> merge ``KEY VALUE`` ``opts`` -> check -> freeze."""
    return merge_and_freeze(get_benchmark_cfg(), config_file, opts, validate_benchmark_cfg)


def validate_benchmark_cfg(cfg: CN) -> None:
    if not cfg.RUNS:
        raise ConfigError("the benchmark config has no RUNS: add at least one, e.g. RUNS: {disco: {PRETRAIN: "
                          "configs/pretrain/disco/r50_r18.yaml}}")
    for var, values in cfg.SWEEP.items():
        if not _VAR.fullmatch("{" + var + "}") or var in BUILTIN_VARS:
            raise ConfigError(f"SWEEP.{var}: a sweep variable is a lower-case name other than {BUILTIN_VARS}")
        if not isinstance(values, (list, tuple)) or not values:
            raise ConfigError(f"SWEEP.{var}: expected a non-empty list of values, got {values!r}")
    for name, run in cfg.RUNS.items():
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
            raise ConfigError(f"RUNS.{name}: a run's name is a folder name (letters, digits, _ . -)")
        if not isinstance(run, dict):
            raise ConfigError(f"RUNS.{name}: expected a mapping of {', '.join(RUN_KEYS)}, got {run!r}")
        for key, value in run.items():
            if key not in RUN_KEYS:
                import difflib

                close = difflib.get_close_matches(key, RUN_KEYS, 3)
                raise UnknownKeyError(f"RUNS.{name}.{key}: not a key of a run"
                                      f"{' (did you mean ' + ', '.join(close) + '?)' if close else ''}; "
                                      f"a run has {', '.join(RUN_KEYS)}")
            if type(value) is not type(RUN_KEYS[key]) and not (isinstance(value, tuple) and key == "OPTS"):
                raise ConfigError(f"RUNS.{name}.{key}: expected a {type(RUN_KEYS[key]).__name__}, got {value!r}")
        if bool(run.get("PRETRAIN")) == bool(run.get("WEIGHTS")):
            raise ConfigError(f"RUNS.{name}: give exactly one of PRETRAIN (a pretraining config) and WEIGHTS (an "
                              f"existing checkpoint to evaluate)")
        for var in set(_VAR.findall(str(dict(run)))) - set(cfg.SWEEP):
            raise ConfigError(f"RUNS.{name} uses {{{var}}} but SWEEP has no {var!r} (it has "
                              f"{', '.join(cfg.SWEEP) or 'none'})")
    for proto in PROTOCOLS:
        node = cfg[proto]
        if node.GPUS < 0 or node.NODES < 1 or node.TIMEOUT < 1 or node.CPUS < 1:
            raise ConfigError(f"{proto}: GPUS >= 0, NODES >= 1, TIMEOUT >= 1 (minutes) and CPUS >= 1 required")


@dataclass
class Run:
    """One expanded run: its name (a folder of OUTPUT_DIR), the run template it came from and the sweep values."""

    name: str
    template: str
    values: Dict[str, object]  # sweep variable -> value of this run
    pretrain: str = ""
    weights: str = ""
    arch: str = ""
    teacher: str = ""
    opts: List[str] = field(default_factory=list)
    paper: str = ""
    evaluate: bool = True

    def fill(self, text: str, extra: Dict[str, object] = None) -> str:
        """``text`` with the run's sweep values (and ``extra``) in its ``{var}`` places."""
        values = {**self.values, **(extra or {})}

        def sub(m):
            if m.group(1) not in values:
                raise ConfigError(f"{text!r} (run {self.name}): no value for {{{m.group(1)}}}; known: "
                                  f"{', '.join(values) or 'none'}")
            return str(values[m.group(1)])

        return _VAR.sub(sub, text)


def _suffix(var: str, value) -> str:
    text = str(value)
    return text if isinstance(value, str) and not text.isdigit() else f"{var}{text}"


def expand_runs(cfg) -> List[Run]:
    """Every run of ``cfg.RUNS`` expanded over the sweep variables it uses, in config order (then sweep order).
    Names: ``<run>_<value>_...`` (a number as ``<var><value>``, e.g. ``disco_r18_seed0``)."""
    runs, seen = [], {}
    for template, node in cfg.RUNS.items():
        spec = {k: node.get(k, v) for k, v in RUN_KEYS.items()}
        used = [v for v in cfg.SWEEP if "{" + v + "}" in str(spec)]
        for combo in itertools.product(*(cfg.SWEEP[v] for v in used)):
            values = dict(zip(used, combo))
            name = "_".join([template] + [_suffix(v, x) for v, x in values.items()])
            if name in seen:
                raise ConfigError(f"runs {seen[name]} and {template} both expand to {name!r}; rename one")
            seen[name] = template
            run = Run(name, template, values)
            fill = run.fill
            run.pretrain, run.weights, run.arch = fill(spec["PRETRAIN"]), fill(spec["WEIGHTS"]), spec["ARCH"]
            run.teacher, run.paper, run.evaluate = fill(spec["TEACHER"]), fill(spec["PAPER"]), spec["EVALUATE"]
            run.opts = [fill(str(o)) for o in spec["OPTS"]]
            runs.append(run)
    by_template = {}
    for run in runs:
        by_template.setdefault(run.template, []).append(run)
    for run in runs:  # TEACHER: a run template's name resolves to the expansion with the same sweep values
        if run.teacher in by_template:
            match = [t for t in by_template[run.teacher]
                     if all(run.values.get(k) == v for k, v in t.values.items())]
            if len(match) != 1:
                raise ConfigError(f"run {run.name}: TEACHER {run.teacher!r} expands to "
                                  f"{len(by_template[run.teacher])} runs; give it the same sweep variables")
            run.teacher = "run:" + match[0].name
        elif run.teacher in {r.name for r in runs}:
            run.teacher = "run:" + run.teacher
    return runs


def family(arch: str) -> str:
    """``resnet`` or ``mobile``: which of the linear-evaluation configs (lr 30 / lr 3) the paper uses for ``arch``."""
    return "resnet" if arch.startswith("resnet") else "mobile"


def builtin_values(arch: str) -> Dict[str, str]:
    from transfer.d2.weights import DEFAULT_CONFIGS, short_name  # detectron2: only once the graph is built

    return {"arch": arch, "short": short_name(arch) if arch in DEFAULT_CONFIGS else arch, "family": family(arch)}


def resolve(path: str) -> str:
    """A config path relative to the working directory if it exists there, else to the repository root."""
    if not path or os.path.isabs(path) or os.path.exists(path):
        return path
    candidate = os.path.join(ROOT, path)
    return candidate if os.path.exists(candidate) else path


def protocol_names() -> Tuple[str, ...]:
    return tuple(PROTOCOLS)
