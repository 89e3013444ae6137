"""The pretrainer's configuration: fvcore ``CfgNode`` with ``_BASE_`` inheritance and ``KEY VALUE`` overrides.

Every key has a one-line comment. ``get_cfg()`` returns a fresh copy of the defaults, with the keys of every
registered testbed and distiller (their ``add_config``); leaf yaml files in ``configs/pretrain/`` override only what
differs. YAML files with a duplicated key are rejected (:mod:`pretrain.cfgnode`).
"""
import os

import pretrain.distillers  # noqa: F401  (registers every distiller)
import pretrain.testbeds  # noqa: F401  (registers every testbed)

from .cfgnode import CN, CfgNode, ConfigError, cfg_value, check_ranges, merge_and_freeze
from .cfgnode import save_cfg  # noqa: F401  (pretrainer API)
from .methods import DISTILLERS, TESTBEDS
from .precision import AUTO_KEYS


# METHOD of earlier versions -> the METHOD.DISTILLERS that replace it (the testbed was always mocov2)
OLD_METHODS = {"disco": ["disco"], "moco": []}
# Keys added after checkpoints were written without them take their default when such a checkpoint is resumed or
# compared (current_form): a new key's default always does what runs before it did. A key whose default does not
# must be listed here with the value that reproduces those runs.
ADDED_KEYS = {}


def current_form(saved: str) -> str:
    """A checkpoint's config dump in today's keys, to compare with the config it resumes under: ``METHOD: disco`` /
    ``moco`` of earlier versions becomes ``METHOD.TESTBED mocov2`` + ``METHOD.DISTILLERS [disco]`` / ``[]`` (the
    same run), and every key it lacks (added since it was written) gets :data:`ADDED_KEYS`' value, else the
    default: the value that reproduces what it ran."""
    old = CfgNode.load_cfg(saved)
    if isinstance(old.get("METHOD"), str):
        old.METHOD = CfgNode({"TESTBED": "mocov2", "DISTILLERS": OLD_METHODS[old.METHOD]})
    _fill_absent(old, get_cfg(), "")
    return old.dump()


def _fill_absent(node, defaults, prefix: str) -> None:
    for key, value in defaults.items():
        name = prefix + key
        if key not in node:
            node[key] = ADDED_KEYS.get(name, value.clone() if isinstance(value, CfgNode) else value)
        elif isinstance(value, dict) and isinstance(node[key], dict):
            _fill_absent(node[key], value, name + ".")


def _refuse_old_method(value, where: str) -> None:
    if not isinstance(value, str):
        return
    distillers = "[" + ", ".join(OLD_METHODS.get(value.strip(), [value])) + "]"
    raise ConfigError(
        f"METHOD: {value} in {where} is the form of earlier versions. A method is now a testbed plus a list of "
        f"distillers; write\n  METHOD:\n    TESTBED: mocov2\n    DISTILLERS: {distillers}\n(on the command line: "
        f"METHOD.TESTBED mocov2 METHOD.DISTILLERS \"{distillers}\"). Registered testbeds: "
        f"{', '.join(sorted(TESTBEDS.names()))}; distillers: {', '.join(sorted(DISTILLERS.names()))}.")


_C = CN()

_C.OUTPUT_DIR = "runs/pretrain"  # everything of a run goes here: config.yaml, checkpoints, metrics.jsonl, export/
_C.SEED = 0  # global seed; augmentations are a pure function of (SEED, epoch, image index)

_C.METHOD = CN()  # a testbed + distillers, each a registered plug-in (pretrain/methods.py); L = sum of their terms
_C.METHOD.TESTBED = "mocov2"  # the student's own self-supervised objective (TESTBEDS): mocov2, or none (distil only)
_C.METHOD.DISTILLERS = ["disco"]  # terms towards the frozen MODEL.TEACHER (DISTILLERS), e.g. [attention, disco]

_C.MODEL = CN()
_C.MODEL.CHANNELS_LAST = "auto"  # channels_last memory format for all encoders; auto: on CPUs and autocast GPUs

_C.MODEL.STUDENT = CN()
_C.MODEL.STUDENT.ARCH = "resnet18"  # backbone name in pretrain.backbones.BACKBONES (timm architecture)
_C.MODEL.STUDENT.WEIGHTS = ""  # optional local timm-format state dict to initialise the student backbone from
_C.MODEL.STUDENT.HEAD = CN()
_C.MODEL.STUDENT.HEAD.NUM_LAYERS = 2  # linear layers in the projection MLP (ReLU between them)
_C.MODEL.STUDENT.HEAD.HIDDEN_DIM = 2048  # DisCo's widened hidden layer ("distilling bottleneck"); MoCo-v2 uses D
_C.MODEL.STUDENT.HEAD.OUT_DIM = 128  # embedding dim; must equal the teacher head's output dim for DisCo
_C.MODEL.STUDENT.HEAD.BN = False  # BatchNorm1d after each hidden linear layer (SwAV-style); MoCo-v2 has none
_C.MODEL.STUDENT.HEAD.ACT = "relu"  # activation between the head's layers: relu (MoCo, SwAV) | gelu (DINO's head)
_C.set_choices("MODEL.STUDENT.HEAD.ACT", ("relu", "gelu"))
_C.MODEL.STUDENT.DROP_PATH = 0.0  # stochastic depth rate of a transformer student (timm drop_path_rate; DINO: 0.1)
_C.MODEL.STUDENT.SYNC_BN = False  # SyncBatchNorm across processes for the student (SwAV); per-process BN otherwise

_C.MODEL.TEACHER = CN()
_C.MODEL.TEACHER.ARCH = "resnet50"  # teacher backbone name in pretrain.backbones.BACKBONES
_C.MODEL.TEACHER.WEIGHTS = ""  # teacher checkpoint (our export, MoCo-v1/v2 .pth.tar, SwAV); needed by distillers
_C.MODEL.TEACHER.BN_TRAIN = False  # True reproduces the official code: teacher BN uses batch stats, updates running stats
# True reproduces the official code: the student's MoCo queue starts as the teacher checkpoint's (when it has one);
# never on resume (the official code overwrote a resumed queue)
_C.MODEL.TEACHER.COPY_QUEUE = False
# the teacher's embedding is L2-normalised (DisCo on MoCo-v2). False reproduces the official SwAV + DisCo script,
# whose teacher is built without SwAV's normalize=True: its raw 128-d projection is the target of the student's
# normalised embedding
_C.MODEL.TEACHER.NORMALIZE = True

_C.LOSS = CN()  # each method part adds its node here with its weight (LOSS.DISCO.WEIGHT, LOSS.CONTRASTIVE.WEIGHT)

_C.DATA = CN()
_C.DATA.TRAIN_DIR = ""  # ImageFolder root for training (e.g. /datasets/imagenet/train: <class>/<image>)
_C.DATA.VAL_DIR = ""  # ImageFolder root of a held-out split for the online kNN monitor ("" = no monitor)
_C.DATA.IMAGE_SIZE = 224  # RandomResizedCrop output size
_C.DATA.CROP_SCALE = (0.2, 1.0)  # RandomResizedCrop area range (MoCo-v2)
_C.DATA.BLUR_SIGMA = (0.1, 2.0)  # GaussianBlur sigma range, applied with p=0.5 (MoCo-v2)
_C.DATA.COLOR_JITTER = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue; applied with p=0.8 (MoCo-v2)
_C.DATA.GRAYSCALE_P = 0.2  # probability of converting a view to grayscale (MoCo-v2)
_C.DATA.NUM_WORKERS = 8  # DataLoader workers per process
_C.DATA.SKIP_CORRUPT = False  # False: an unreadable image stops the run naming the file; True: skip it and count it
_C.DATA.MEAN = (0.485, 0.456, 0.406)  # normalisation mean (RGB, 0-1)
_C.DATA.STD = (0.229, 0.224, 0.225)  # normalisation std (RGB, 0-1)
# the views: mocov2 (two views of DATA.IMAGE_SIZE at DATA.CROP_SCALE) or a multi-crop recipe, swav | dino
# (pretrain.data.multi_crop_transforms), whose views are DATA.MULTI_CROP.NUM[i] crops of SIZES[i] each
_C.DATA.AUGMENTATION = "mocov2"
_C.set_choices("DATA.AUGMENTATION", ("mocov2", "swav", "dino"))
_C.DATA.MULTI_CROP = CN()
_C.DATA.MULTI_CROP.NUM = (2, 6)  # views per crop size, global (assignment / teacher) crops first (SwAV: 2 + 6)
_C.DATA.MULTI_CROP.SIZES = (224, 96)  # crop size of each group (SwAV, DINO: 224 and 96)
_C.DATA.MULTI_CROP.MIN_SCALE = (0.14, 0.05)  # RandomResizedCrop area lower bound per group (DINO: 0.4, 0.05)
_C.DATA.MULTI_CROP.MAX_SCALE = (1.0, 0.14)  # upper bound per group (DINO: 1.0, 0.4)
_C.DATA.BACKEND = "torchvision"  # torchvision (PIL in DataLoader workers) | dali (NVIDIA DALI, pip install -e .[dali])
_C.set_choices("DATA.BACKEND", ("torchvision", "dali"))

_C.SOLVER = CN()
_C.SOLVER.EPOCHS = 200  # training epochs over DATA.TRAIN_DIR
_C.SOLVER.IMS_PER_BATCH = 256  # total batch over all processes (paper: 8 GPUs x 32)
_C.SOLVER.BASE_LR = 0.03  # learning rate for REFERENCE_BATCH images; scaled linearly with IMS_PER_BATCH
_C.SOLVER.REFERENCE_BATCH = 256  # batch size BASE_LR is defined for (MoCo: 0.03 per 256)
# "sgd" (MoCo-v2, the paper), "larc" (SGD wrapped in LARC, SwAV: pretrain.optim.LARC) or "adamw" (DINO; ViT
# students; fast short CPU runs)
_C.SOLVER.OPTIMIZER = "sgd"
_C.set_choices("SOLVER.OPTIMIZER", ("sgd", "larc", "adamw"))
_C.SOLVER.LARC_TRUST = 0.001  # LARC's trust coefficient (SwAV: 0.001); used by SOLVER.OPTIMIZER larc
_C.SOLVER.MOMENTUM = 0.9  # SGD momentum (AdamW: beta1)
_C.SOLVER.WEIGHT_DECAY = 1e-4  # weight decay (decoupled for AdamW)
_C.SOLVER.WEIGHT_DECAY_END = -1.0  # >= 0: cosine schedule of the weight decay per iteration to this value (DINO 0.4)
_C.SOLVER.WEIGHT_DECAY_NORM_BIAS = True  # decay biases and norm weights too (MoCo, SwAV); False: not them (DINO)
_C.SOLVER.CLIP_GRAD = 0.0  # > 0: clip each parameter's gradient to this L2 norm before the step (DINO: 3.0)
_C.SOLVER.FINAL_LR_FACTOR = 0.0  # the cosine ends at this fraction of the peak lr (SwAV 0.6 -> 0.0006: 0.001)
_C.SOLVER.WARMUP_EPOCHS = 0  # linear warm-up epochs before the cosine schedule (MoCo-v2: 0)
_C.SOLVER.COSINE_PER_ITER = False  # False: cosine steps once per epoch as MoCo-v2; True: smooth per-iteration cosine

_C.TRAIN = CN()
_C.TRAIN.AMP = CN()
_C.TRAIN.AMP.ENABLED = "auto"  # autocast for the student's (query and key) forwards; auto: on where bf16 is native
_C.TRAIN.AMP.TEACHER = "auto"  # autocast for the frozen teacher's forward (usually the largest cost); auto: as above
_C.TRAIN.AMP.DTYPE = "bfloat16"  # "bfloat16" (no loss scaling) or "float16" (GradScaler, GPU only)
_C.TRAIN.CHECKPOINT_PERIOD = 1000  # iterations between checkpoints (also written at the end of each epoch and on exit)
_C.TRAIN.MAX_TO_KEEP = 3  # newest iteration checkpoints kept on disk
_C.TRAIN.LOG_PERIOD = 20  # iterations between metrics.jsonl / TensorBoard entries
_C.TRAIN.STOP_AT_ITER = -1  # stop cleanly (checkpoint written) after this global iteration; -1 = run to the end
_C.TRAIN.DETERMINISTIC = False  # torch.use_deterministic_algorithms; bitwise-reproducible resume on CPU
_C.TRAIN.RESUME_CHANGED_CONFIG = False  # resume although keys outside SAFE_ON_RESUME differ from the checkpoint's
_C.TRAIN.COMPILE = False  # torch.compile the student, teacher and key encoders in place (same losses, other speed)

# True, False or auto (the default): auto is resolved once the device is known (pretrain.precision.resolve_auto:
# bf16 autocast on CUDA GPUs with bf16 and on CPUs with native bf16, fp32 elsewhere; channels_last on CPUs and on
# GPUs that autocast); OUTPUT_DIR/config.yaml and the checkpoints hold the resolved True / False
for _key in AUTO_KEYS:
    _C.set_choices(_key, (True, False, "auto"))

# Keys (or whole nodes) that may differ between a checkpoint's config and the config that resumes it: they change
# how the run is executed or watched, not what it computes. Any other difference stops the resume (pretrain.cfgdiff).
# DATA.BACKEND is not one: both backends draw the same crops and augmentation parameters, but their pixels differ
# slightly (resize and blur implementations, the GPU's JPEG decoder), so switching mid-run changes what is computed.
SAFE_ON_RESUME = ("OUTPUT_DIR", "DATA.NUM_WORKERS", "DATA.VAL_DIR", "DATA.SKIP_CORRUPT", "TRAIN.LOG_PERIOD",
                  "TRAIN.CHECKPOINT_PERIOD", "TRAIN.MAX_TO_KEEP", "TRAIN.STOP_AT_ITER", "TRAIN.DETERMINISTIC",
                  "TRAIN.RESUME_CHANGED_CONFIG", "TRAIN.COMPILE", "TEST")

_C.TEST = CN()
_C.TEST.KNN = CN()
_C.TEST.KNN.PERIOD = 1  # epochs between online kNN evaluations on DATA.VAL_DIR (0 = only at the end, -1 = never)
_C.TEST.KNN.K = 20  # neighbours (DINO: 20)
_C.TEST.KNN.TEMPERATURE = 0.07  # weight exp(sim / T) of each neighbour (DINO: 0.07)
_C.TEST.KNN.IMAGE_SIZE = 224  # centre-crop size for the monitor (resize to size / 0.875 first)
_C.TEST.KNN.MAX_TRAIN_IMAGES = 20000  # feature bank: at most this many training images, class-balanced
_C.TEST.TEACHER_HEALTH = CN()  # before a fresh distillation run: is the teacher embedding collapsed? (health.py)
_C.TEST.TEACHER_HEALTH.IMAGES = 256  # training images (class-balanced, eval transform) it is measured on; 0 = no check


def get_cfg() -> CfgNode:
    """A fresh copy of the defaults above plus the keys of every registered testbed and distiller."""
    cfg = _C.clone()
    for registry in (TESTBEDS, DISTILLERS):
        for _, part in sorted(registry):
            part.add_config(cfg)
    return cfg


def setup_cfg(config_file: str = "", opts=()) -> CfgNode:
    """defaults -> merge ``config_file`` (with its ``_BASE_`` chain) -> merge ``KEY VALUE`` ``opts`` -> freeze.
    The ``METHOD: disco`` / ``METHOD: moco`` of earlier versions is refused with the keys that replace it."""
    if config_file and os.path.isfile(config_file):
        _refuse_old_method(CfgNode.load_yaml_with_base(config_file).get("METHOD"), config_file)
    for key, value in zip(list(opts)[0::2], list(opts)[1::2]):
        if key == "METHOD":
            _refuse_old_method(value, "the command line")
    return merge_and_freeze(get_cfg(), config_file, opts, validate_cfg)


def validate_cfg(cfg: CfgNode) -> None:
    """Refuse, naming the key, a config that cannot run: unknown method parts, out-of-range values
    (:data:`VALUE_RANGES` and the parts' ``check_config``), inconsistent combinations."""
    check_values(cfg)
    m = cfg.METHOD
    if m.TESTBED not in TESTBEDS:
        raise ConfigError(f"METHOD.TESTBED {m.TESTBED!r} is not a registered testbed; use one of "
                          f"{', '.join(sorted(TESTBEDS.names()))}")
    for name in m.DISTILLERS:
        if name not in DISTILLERS:
            raise ConfigError(f"METHOD.DISTILLERS: {name!r} is not a registered distiller; use names from "
                              f"{', '.join(sorted(DISTILLERS.names()))}")
    if len(set(m.DISTILLERS)) != len(m.DISTILLERS):
        raise ConfigError(f"METHOD.DISTILLERS {list(m.DISTILLERS)} names a distiller twice")
    if m.TESTBED == "none" and not m.DISTILLERS:
        raise ConfigError("METHOD.TESTBED none with no METHOD.DISTILLERS trains nothing")
    if m.DISTILLERS and not cfg.MODEL.TEACHER.WEIGHTS:
        raise ConfigError(f"METHOD.DISTILLERS {list(m.DISTILLERS)} distil a frozen teacher: set "
                          f"MODEL.TEACHER.WEIGHTS to a teacher checkpoint (our export, MoCo-v1/v2 .pth.tar or SwAV), or use METHOD.DISTILLERS []")
    if cfg.DATA.AUGMENTATION != "mocov2" and cfg.DATA.BACKEND == "dali":
        raise ConfigError(f"DATA.BACKEND dali draws the two MoCo-v2 views only; DATA.AUGMENTATION "
                          f"{cfg.DATA.AUGMENTATION} (multi-crop) needs DATA.BACKEND torchvision")
    for key in AUTO_KEYS:
        value = cfg_value(cfg, key)
        if not (isinstance(value, bool) or value == "auto"):
            raise ConfigError(f"{key} {value!r}: allowed values are True, False, auto")
    if cfg.TRAIN.AMP.DTYPE not in ("bfloat16", "float16"):
        raise ConfigError(f"TRAIN.AMP.DTYPE must be 'bfloat16' or 'float16', got {cfg.TRAIN.AMP.DTYPE!r}")
    TESTBEDS.get(m.TESTBED).check_config(cfg)
    for name in m.DISTILLERS:
        DISTILLERS.get(name).check_config(cfg)


# (key, allowed range, 0 or the number of values of a sequence key): every numeric key with a natural range; a
# testbed's or distiller's own keys are checked by its check_config
VALUE_RANGES = (
    ("SEED", "[0, 4294967295]", 0),  # numpy's seed range
    ("MODEL.STUDENT.HEAD.NUM_LAYERS", ">= 1", 0),
    ("MODEL.STUDENT.HEAD.HIDDEN_DIM", ">= 1", 0),
    ("MODEL.STUDENT.HEAD.OUT_DIM", ">= 1", 0),
    ("DATA.IMAGE_SIZE", ">= 1", 0),
    ("DATA.CROP_SCALE", "(0, 1]", 2),
    ("DATA.BLUR_SIGMA", ">= 0", 2),
    ("DATA.COLOR_JITTER", ">= 0", 4),
    ("DATA.GRAYSCALE_P", "[0, 1]", 0),
    ("DATA.NUM_WORKERS", ">= 0", 0),
    ("DATA.MEAN", "[0, 1]", 3),
    ("DATA.STD", "> 0", 3),
    ("SOLVER.EPOCHS", ">= 1", 0),
    ("SOLVER.IMS_PER_BATCH", ">= 1", 0),
    ("SOLVER.BASE_LR", "> 0", 0),
    ("SOLVER.REFERENCE_BATCH", ">= 1", 0),
    ("SOLVER.MOMENTUM", "[0, 1)", 0),
    ("SOLVER.WEIGHT_DECAY", ">= 0", 0),
    ("SOLVER.WARMUP_EPOCHS", ">= 0", 0),
    ("SOLVER.WEIGHT_DECAY_END", ">= -1", 0),
    ("SOLVER.CLIP_GRAD", ">= 0", 0),
    ("SOLVER.FINAL_LR_FACTOR", "[0, 1]", 0),
    ("SOLVER.LARC_TRUST", "> 0", 0),
    ("MODEL.STUDENT.DROP_PATH", "[0, 1)", 0),
    ("TRAIN.CHECKPOINT_PERIOD", ">= 1", 0),
    ("TRAIN.MAX_TO_KEEP", ">= 1", 0),
    ("TRAIN.LOG_PERIOD", ">= 1", 0),
    ("TRAIN.STOP_AT_ITER", ">= -1", 0),
    ("TEST.KNN.PERIOD", ">= -1", 0),
    ("TEST.KNN.K", ">= 1", 0),
    ("TEST.KNN.TEMPERATURE", "> 0", 0),
    ("TEST.KNN.IMAGE_SIZE", ">= 1", 0),
    ("TEST.KNN.MAX_TRAIN_IMAGES", ">= 0", 0),
    ("TEST.TEACHER_HEALTH.IMAGES", ">= 0", 0),
)


def check_values(cfg: CfgNode) -> None:
    """:data:`VALUE_RANGES` and the ranges that involve two values."""
    if not cfg.OUTPUT_DIR:
        raise ConfigError("OUTPUT_DIR is empty: name the folder the run writes to")
    check_ranges(cfg, VALUE_RANGES)
    d, s = cfg.DATA, cfg.SOLVER
    for key, (lo, hi) in (("DATA.CROP_SCALE", d.CROP_SCALE), ("DATA.BLUR_SIGMA", d.BLUR_SIGMA)):
        if lo > hi:
            raise ConfigError(f"{key} {tuple((lo, hi))} must be (low, high) with low <= high")
    m = d.MULTI_CROP
    if d.AUGMENTATION != "mocov2":
        if not (len(m.NUM) == len(m.SIZES) == len(m.MIN_SCALE) == len(m.MAX_SCALE)) or not m.NUM:
            raise ConfigError(f"DATA.MULTI_CROP: NUM {tuple(m.NUM)}, SIZES {tuple(m.SIZES)}, MIN_SCALE "
                              f"{tuple(m.MIN_SCALE)} and MAX_SCALE {tuple(m.MAX_SCALE)} need one value per crop size")
        for i, (num, size, lo, hi) in enumerate(zip(m.NUM, m.SIZES, m.MIN_SCALE, m.MAX_SCALE)):
            if num < 1 or size < 1 or not 0 < lo <= hi <= 1:
                raise ConfigError(f"DATA.MULTI_CROP group {i}: NUM {num} and SIZES {size} must be >= 1 and "
                                  f"0 < MIN_SCALE {lo} <= MAX_SCALE {hi} <= 1")
        if m.NUM[0] < 2:
            raise ConfigError(f"DATA.MULTI_CROP.NUM {tuple(m.NUM)}: the first group (the global crops) needs at least "
                              f"2 views")
    if d.COLOR_JITTER[3] > 0.5:
        raise ConfigError(f"DATA.COLOR_JITTER {tuple(d.COLOR_JITTER)}: the hue jitter (4th value) must be in [0, 0.5]")
    if s.WARMUP_EPOCHS > s.EPOCHS:
        raise ConfigError(f"SOLVER.WARMUP_EPOCHS {s.WARMUP_EPOCHS} is out of range: must be in [0, SOLVER.EPOCHS "
                          f"{s.EPOCHS}]")
