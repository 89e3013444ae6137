"""The pretrainer's configuration: fvcore ``CfgNode`` with ``_BASE_`` inheritance and ``KEY VALUE`` overrides.

Every key has a one-line comment. ``get_cfg()`` returns a fresh copy of the defaults; leaf yaml files in
``configs/pretrain/`` override only what differs. YAML files with a duplicated key are rejected (PyYAML silently
keeps the last occurrence, which is how the official DisCo VOC config lost three keys).
"""
import os

import yaml
from fvcore.common.config import CfgNode as _FvcoreCfgNode


class DuplicateKeyError(ValueError):
    pass


class _StrictLoader(yaml.SafeLoader):
    """A SafeLoader that refuses a mapping with the same key twice."""

    filename = "<string>"

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise DuplicateKeyError(
                    f"duplicate key {key!r} in {self.filename} (line {seen[key] + 1} and line "
                    f"{key_node.start_mark.line + 1}); YAML would silently keep only the last one. "
                    f"Merge the two {key!r} blocks into one.")
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def check_yaml_duplicates(filename: str) -> None:
    """Raise :class:`DuplicateKeyError` naming the key and file if ``filename`` repeats a key at any level."""
    with open(filename) as f:
        text = f.read()
    loader = _StrictLoader(text)
    loader.filename = filename
    try:
        loader.get_single_data()
    finally:
        loader.dispose()


class StrictYamlMixin:
    """Mix into any fvcore-derived CfgNode (ours, detectron2's) to reject duplicate keys in every file of a
    ``_BASE_`` chain. fvcore's loader calls ``cls.load_yaml_with_base`` recursively for each base."""

    @classmethod
    def load_yaml_with_base(cls, filename: str, allow_unsafe: bool = False):
        check_yaml_duplicates(filename)
        return super().load_yaml_with_base(filename, allow_unsafe=allow_unsafe)


class CfgNode(StrictYamlMixin, _FvcoreCfgNode):
    pass


CN = CfgNode
_C = CN()

_C.OUTPUT_DIR = "runs/pretrain"  # everything of a run goes here: config.yaml, checkpoints, metrics.jsonl, export/
_C.SEED = 0  # global seed; augmentations are a pure function of (SEED, epoch, image index)
_C.METHOD = "disco"  # "disco": distil a frozen teacher + MoCo-v2 (L = w_dis*L_dis + lambda*L_co); "moco": MoCo-v2 only

_C.MODEL = CN()
_C.MODEL.CHANNELS_LAST = False  # channels_last memory format for all encoders (faster with AMP on GPU and bf16 CPUs)

_C.MODEL.STUDENT = CN()
_C.MODEL.STUDENT.ARCH = "resnet18"  # backbone name in pretrain.backbones.BACKBONES (timm architecture)
_C.MODEL.STUDENT.WEIGHTS = ""  # optional local timm-format state dict to initialise the student backbone from
_C.MODEL.STUDENT.HEAD = CN()
_C.MODEL.STUDENT.HEAD.NUM_LAYERS = 2  # linear layers in the projection MLP (ReLU between them)
_C.MODEL.STUDENT.HEAD.HIDDEN_DIM = 2048  # DisCo's widened hidden layer ("distilling bottleneck"); MoCo-v2 uses D
_C.MODEL.STUDENT.HEAD.OUT_DIM = 128  # embedding dim; must equal the teacher head's output dim for DisCo
_C.MODEL.STUDENT.HEAD.BN = False  # BatchNorm1d after each hidden linear layer (SwAV-style); MoCo-v2 has none

_C.MODEL.TEACHER = CN()
_C.MODEL.TEACHER.ARCH = "resnet50"  # teacher backbone name in pretrain.backbones.BACKBONES
_C.MODEL.TEACHER.WEIGHTS = ""  # teacher checkpoint: our export, MoCo-v1/v2 .pth.tar or SwAV state dict (required for disco)
_C.MODEL.TEACHER.BN_TRAIN = False  # True reproduces the official code: teacher BN uses batch stats, updates running stats

_C.MODEL.MOCO = CN()
_C.MODEL.MOCO.QUEUE_SIZE = 65536  # K, number of negative keys; must be a multiple of the total batch size
_C.MODEL.MOCO.MOMENTUM = 0.999  # m, momentum of the key encoder update
_C.MODEL.MOCO.TEMPERATURE = 0.2  # T, softmax temperature of InfoNCE (MoCo-v2: 0.2)
_C.MODEL.MOCO.SHUFFLE_BN = True  # shuffle the key batch before the momentum encoder (across processes if several)
_C.MODEL.MOCO.BN_SPLITS = 1  # BN groups per process for the shuffled keys; >1 emulates multi-GPU shuffle-BN on one

_C.LOSS = CN()
_C.LOSS.DISCO = CN()
# w_dis, weight of L_dis = w_dis * mean_over_batch(||E_s - E_t||^2 + ||E'_s - E'_t||^2) on L2-normalised embeddings.
# The official code sums the MSE over its per-GPU batch (32 in the paper's 8x32 setting) and over the 128 dims,
# i.e. 32 * mean_over_batch(...). WEIGHT 32 reproduces that effective weight whatever the per-GPU batch and GPU count.
_C.LOSS.DISCO.WEIGHT = 32.0
_C.LOSS.CONTRASTIVE = CN()
_C.LOSS.CONTRASTIVE.WEIGHT = 1.0  # lambda, weight of the student's own MoCo-v2 InfoNCE loss L_co; 0 = distillation only

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

_C.SOLVER = CN()
_C.SOLVER.EPOCHS = 200  # training epochs over DATA.TRAIN_DIR
_C.SOLVER.IMS_PER_BATCH = 256  # total batch over all processes (paper: 8 GPUs x 32)
_C.SOLVER.BASE_LR = 0.03  # learning rate for REFERENCE_BATCH images; scaled linearly with IMS_PER_BATCH
_C.SOLVER.REFERENCE_BATCH = 256  # batch size BASE_LR is defined for (MoCo: 0.03 per 256)
_C.SOLVER.OPTIMIZER = "sgd"  # "sgd" (MoCo-v2, the paper) or "adamw" (ViT students; fast short CPU runs)
_C.SOLVER.MOMENTUM = 0.9  # SGD momentum (AdamW: beta1)
_C.SOLVER.WEIGHT_DECAY = 1e-4  # weight decay (decoupled for AdamW)
_C.SOLVER.WARMUP_EPOCHS = 0  # linear warm-up epochs before the cosine schedule (MoCo-v2: 0)
_C.SOLVER.COSINE_PER_ITER = False  # False: cosine steps once per epoch as MoCo-v2; True: smooth per-iteration cosine

_C.TRAIN = CN()
_C.TRAIN.AMP = CN()
_C.TRAIN.AMP.ENABLED = False  # autocast mixed precision for the student's (query and key) forward passes
_C.TRAIN.AMP.TEACHER = False  # autocast for the frozen teacher's forward (no gradients, usually the largest cost)
_C.TRAIN.AMP.DTYPE = "bfloat16"  # "bfloat16" (no loss scaling) or "float16" (GradScaler, GPU only)
_C.TRAIN.CHECKPOINT_PERIOD = 1000  # iterations between checkpoints (also written at the end of each epoch and on exit)
_C.TRAIN.MAX_TO_KEEP = 3  # newest iteration checkpoints kept on disk
_C.TRAIN.LOG_PERIOD = 20  # iterations between metrics.jsonl / TensorBoard entries
_C.TRAIN.STOP_AT_ITER = -1  # stop cleanly (checkpoint written) after this global iteration; -1 = run to the end
_C.TRAIN.DETERMINISTIC = False  # torch.use_deterministic_algorithms; bitwise-reproducible resume on CPU

_C.TEST = CN()
_C.TEST.KNN = CN()
_C.TEST.KNN.PERIOD = 1  # epochs between online kNN evaluations on DATA.VAL_DIR (0 = only at the end, -1 = never)
_C.TEST.KNN.K = 20  # neighbours (DINO: 20)
_C.TEST.KNN.TEMPERATURE = 0.07  # weight exp(sim / T) of each neighbour (DINO: 0.07)
_C.TEST.KNN.IMAGE_SIZE = 224  # centre-crop size for the monitor (resize to size / 0.875 first)
_C.TEST.KNN.MAX_TRAIN_IMAGES = 20000  # feature bank: at most this many training images, class-balanced


def get_cfg() -> CfgNode:
    """A fresh copy of the defaults above."""
    return _C.clone()


def setup_cfg(config_file: str = "", opts=()) -> CfgNode:
    """defaults -> merge ``config_file`` (with its ``_BASE_`` chain) -> merge ``KEY VALUE`` ``opts`` -> freeze."""
    return merge_and_freeze(get_cfg(), config_file, opts, validate_cfg)


def merge_and_freeze(cfg: CfgNode, config_file: str, opts, validate) -> CfgNode:
    """The one config path of every CLI: merge ``config_file`` and the ``KEY VALUE`` ``opts`` into ``cfg``,
    ``validate(cfg)``, freeze."""
    if config_file:
        if not os.path.isfile(config_file):
            raise FileNotFoundError(f"config file {config_file!r} does not exist")
        cfg.merge_from_file(config_file)
    if opts:
        if len(opts) % 2:
            raise ValueError(f"overrides must be KEY VALUE pairs, got an odd number: {list(opts)}")
        cfg.merge_from_list(ints_as_floats(cfg, list(opts)))
    validate(cfg)
    cfg.freeze()
    return cfg


def ints_as_floats(cfg: CfgNode, opts: list) -> list:
    """``SOLVER.BASE_LR 3`` on the command line means 3.0: yacs would refuse an int for a float key."""
    out = list(opts)
    for i in range(0, len(out), 2):
        node = cfg
        for part in str(out[i]).split("."):
            node = node.get(part) if isinstance(node, _FvcoreCfgNode) else None
        if isinstance(node, float) and isinstance(out[i + 1], str):
            try:
                out[i + 1] = repr(float(int(out[i + 1])))
            except ValueError:
                pass
    return out


def validate_cfg(cfg: CfgNode) -> None:
    if cfg.METHOD not in ("disco", "moco"):
        raise ValueError(f"METHOD must be 'disco' or 'moco', got {cfg.METHOD!r}")
    if cfg.SOLVER.OPTIMIZER not in ("sgd", "adamw"):
        raise ValueError(f"SOLVER.OPTIMIZER must be 'sgd' or 'adamw', got {cfg.SOLVER.OPTIMIZER!r}")
    if cfg.TRAIN.AMP.DTYPE not in ("bfloat16", "float16"):
        raise ValueError(f"TRAIN.AMP.DTYPE must be 'bfloat16' or 'float16', got {cfg.TRAIN.AMP.DTYPE!r}")
    if cfg.METHOD == "disco" and not cfg.MODEL.TEACHER.WEIGHTS:
        raise ValueError("METHOD disco needs a frozen teacher: set MODEL.TEACHER.WEIGHTS to a teacher checkpoint "
                         "(our export, MoCo-v1/v2 .pth.tar or SwAV), or use METHOD moco")
    if cfg.METHOD == "moco" and cfg.LOSS.CONTRASTIVE.WEIGHT <= 0:
        raise ValueError("METHOD moco with LOSS.CONTRASTIVE.WEIGHT <= 0 trains nothing")


def save_cfg(cfg: CfgNode, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(cfg.dump())
