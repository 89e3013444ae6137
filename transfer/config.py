"""The evaluators' configuration (linear, semi-supervised, CIFAR, kNN, t-SNE) and their command line.

One config language with the pretrainer: an fvcore ``CfgNode`` that rejects duplicated yaml keys
(:class:`pretrain.cfgnode.StrictYamlMixin`), ``_BASE_`` inheritance, ``KEY VALUE`` overrides, and the resolved
config written to ``OUTPUT_DIR/config.yaml``. Every key has a one-line comment. The command line is the one of
:mod:`pretrain.cli` (detectron2's flags plus the SLURM flags of :mod:`pretrain.slurm`), launched the way
``pretrain/launch.py`` does (local, ``--num-gpus N`` processes, or ``--slurm``).
"""
from pretrain.cfgnode import CfgNode, ConfigError, check_ranges, merge_and_freeze

CN = CfgNode
_C = CN()

_C.OUTPUT_DIR = "runs/eval"  # config.yaml, log.txt, metrics.jsonl, checkpoints/, results.json (and PNGs) go here
_C.SEED = 0  # classifier initialisation, the training order (a permutation per (SEED, epoch)) and augmentations

_C.MODEL = CN()
_C.MODEL.ARCH = ""  # backbone name in pretrain.backbones.BACKBONES; "" = the one the checkpoint names
_C.MODEL.WEIGHTS = ""  # frozen backbone: our export, MoCo-v1/v2 .pth.tar, SwAV, DisCo-pytorch; "random" = untrained
_C.MODEL.AMP_DTYPE = ""  # autocast dtype of the frozen backbone's forward: "" (fp32, the paper), bfloat16, float16
_C.MODEL.CHANNELS_LAST = False  # channels_last memory format for the backbone (faster with AMP on GPUs)
_C.MODEL.FEATURES = CN()  # what the evaluators read from the frozen backbone (transfer.common.build_feature_extractor)
_C.MODEL.FEATURES.N_LAST_BLOCKS = 0  # 0: the pooled output; n: concat of the last n blocks' normed CLS (DINO ViT-S: 4)
_C.MODEL.FEATURES.AVGPOOL_PATCH_TOKENS = False  # n >= 1: also the mean of the last block's normed patch tokens (ViT-B)

_C.DATA = CN()
_C.DATA.DATASET = "imagefolder"  # "imagefolder" (TRAIN_DIR / VAL_DIR), "cifar10" or "cifar100" (ROOT, python pickles)
_C.DATA.NAME = ""  # dataset name in the summary line and results.json ("" = derived from DATASET and the paths)
_C.DATA.TRAIN_DIR = ""  # ImageFolder root of the labelled training images, e.g. /datasets/imagenet/train
_C.DATA.VAL_DIR = ""  # ImageFolder root of the evaluation images, e.g. /datasets/imagenet/val (same class folders)
_C.DATA.ROOT = ""  # CIFAR: the folder holding cifar-10-batches-py / cifar-100-python, or that folder itself
_C.DATA.SUBSET_FILE = ""  # SimCLR subset list (1percent.txt / 10percent.txt): train only on the images it names
_C.DATA.SUBSET_PERCENT = 0.0  # no list: a deterministic class-balanced PERCENT % of each class (0 = every image)
_C.DATA.SUBSET_PER_CLASS = 0  # no list: a deterministic class-balanced PER_CLASS images of each class (0 = all)
_C.DATA.IMAGE_SIZE = 224  # RandomResizedCrop size for training, centre-crop size for evaluation
_C.DATA.VAL_RESIZE = 256  # evaluation: resize the shorter side to this, then centre-crop IMAGE_SIZE (CIFAR: 224)
_C.DATA.INTERPOLATION = "bilinear"  # resize interpolation: bilinear (MoCo's lincls) or bicubic (CIFAR 32 -> 224)
_C.DATA.TRAIN_INTERPOLATION = ""  # RandomResizedCrop's; "" = INTERPOLATION (DINO: bilinear crops, bicubic evaluation)
_C.DATA.TRAIN_AUGMENT = True  # True: RandomResizedCrop + flip; False: the evaluation resize/crop (CIFAR protocol)
_C.DATA.MEAN = (0.485, 0.456, 0.406)  # normalisation mean (RGB, 0-1)
_C.DATA.STD = (0.229, 0.224, 0.225)  # normalisation std (RGB, 0-1)
_C.DATA.NUM_WORKERS = 8  # DataLoader workers per process

_C.SOLVER = CN()
_C.SOLVER.EPOCHS = 100  # linear classifier training epochs (paper: 100)
_C.SOLVER.IMS_PER_BATCH = 256  # total batch over all processes (MoCo's lincls: 256)
_C.SOLVER.BASE_LR = 30.0  # learning rate, not scaled with the batch (paper: 30 ResNets, 3 EfficientNet/MobileNet)
_C.SOLVER.MOMENTUM = 0.9  # SGD momentum
_C.SOLVER.WEIGHT_DECAY = 0.0  # SGD weight decay (MoCo's and DisCo's lincls: 0)
_C.SOLVER.SCHEDULER = "multistep"  # "multistep": lr * GAMMA at each epoch in STEPS; "cosine": per-epoch cosine to 0
_C.SOLVER.STEPS = (60, 80)  # multistep: epochs at which the lr is multiplied by GAMMA (paper: 60 and 80)
_C.SOLVER.GAMMA = 0.1  # multistep factor (paper: /10; DisCo-pytorch's scripts halve it, see configs/eval/README)
_C.SOLVER.CACHE_FEATURES = False  # extract frozen features once and train on them (needs DATA.TRAIN_AUGMENT False)
_C.SOLVER.STOP_AT_EPOCH = -1  # stop cleanly (checkpoint written) after this many epochs; -1 = run to the end
_C.SOLVER.CHECKPOINT_PERIOD = 1  # epochs between checkpoints (also after the last epoch and at STOP_AT_EPOCH)
_C.SOLVER.MAX_TO_KEEP = 2  # newest per-epoch checkpoints kept in OUTPUT_DIR/checkpoints
_C.SOLVER.RESUME_CHANGED_CONFIG = False  # True: continue a checkpoint whose config differs in a key that matters

_C.TEST = CN()
_C.TEST.EVAL_PERIOD = 0  # epochs between evaluations on the validation set during training (0 = only at the end)
_C.TEST.IMS_PER_BATCH = 256  # batch per process for evaluation and feature extraction

_C.KD = CN()  # knowledge distillation (Hinton et al.) while the linear classifier trains: paper Table 2 "KD" rows
_C.KD.TEACHER_CLASSIFIER = ""  # "" = no KD; else the teacher's linear-evaluation OUTPUT_DIR or a checkpoint file in it
_C.KD.TEACHER_WEIGHTS = ""  # teacher backbone; "" = the weights its classifier checkpoint names (its MODEL.WEIGHTS)
_C.KD.TEACHER_ARCH = ""  # teacher backbone architecture; "" = the one its classifier checkpoint names
_C.KD.ALPHA = 0.5  # loss = ALPHA * T^2 * KL(teacher || student at TEMPERATURE) + (1 - ALPHA) * cross-entropy
_C.KD.TEMPERATURE = 2.0  # T: both softmaxes of the KL term at logits / T (DisCo-pytorch: 2.0)
_C.KD.REDUCTION = "batchmean"  # KL "batchmean" (Hinton: sum over classes) or "mean" (official code: / classes too)

_C.INFO_PLANE = CN()  # the classifier output's information plane (paper Figure 7; DisCo-pytorch mi_by_binning.py)
_C.INFO_PLANE.ENABLED = False  # record I(X;T) and I(T;Y) (bits) of the softmax output in metrics.jsonl every epoch
_C.INFO_PLANE.BINS = 30  # equal-width bins of [0, 1] for each softmax probability (official: 30)
_C.INFO_PLANE.MAX_IMAGES = 1000  # fixed class-balanced training images the estimate uses (official: 1000; 0 = all)

_C.KNN = CN()
_C.KNN.K = 20  # neighbours (DINO: 20)
_C.KNN.TEMPERATURE = 0.07  # each neighbour votes with weight exp(cosine similarity / T) (DINO: 0.07)
_C.KNN.MAX_TRAIN_IMAGES = 0  # feature bank: at most this many training images, class-balanced (0 = all)

_C.TSNE = CN()
_C.TSNE.NUM_CLASSES = 10  # classes drawn (the first ones after a seeded shuffle; paper Figure 8: 10 ImageNet classes)
_C.TSNE.PER_CLASS = 50  # evaluation images per class embedded
_C.TSNE.PERPLEXITY = 30.0  # t-SNE perplexity (lowered automatically when there are too few points)
_C.TSNE.COMPARE_WEIGHTS = ()  # more checkpoints drawn as further panels next to MODEL.WEIGHTS (paper: three)
_C.TSNE.COMPARE_ARCHS = ()  # their architectures, in the same order ("" or absent = the one each checkpoint names)

DATASETS = ("imagefolder", "cifar10", "cifar100")
KD_REDUCTIONS = ("batchmean", "mean")  # = pretrain.losses.kd.KD_REDUCTIONS


# keys a resumed classifier may change without becoming another run: how it is run, watched or stored, and what
# it is evaluated on (the evaluation runs under the current config: --eval-only on another split is a new report,
# not a mix); MODEL.ARCH, MODEL.WEIGHTS and KD.* are compared by the evaluator itself (an error / a warning)
SAFE_ON_RESUME = ("OUTPUT_DIR", "DATA.NAME", "DATA.NUM_WORKERS", "DATA.VAL_DIR", "DATA.VAL_RESIZE",
                  "SOLVER.STOP_AT_EPOCH", "SOLVER.CHECKPOINT_PERIOD", "SOLVER.MAX_TO_KEEP",
                  "SOLVER.RESUME_CHANGED_CONFIG", "TEST", "MODEL.ARCH", "MODEL.WEIGHTS", "KD", "INFO_PLANE", "KNN",
                  "TSNE")


def get_eval_cfg() -> CfgNode:
    """A fresh copy of the defaults above."""
    return _C.clone()


# (key, allowed range, 0 or the number of values of a sequence key): every numeric key with a natural range
VALUE_RANGES = (
    ("SEED", "[0, 4294967295]", 0),
    ("MODEL.FEATURES.N_LAST_BLOCKS", ">= 0", 0),
    ("DATA.SUBSET_PERCENT", "[0, 100]", 0),
    ("DATA.SUBSET_PER_CLASS", ">= 0", 0),
    ("DATA.IMAGE_SIZE", ">= 1", 0),
    ("DATA.VAL_RESIZE", ">= 0", 0),
    ("DATA.MEAN", "[0, 1]", 3),
    ("DATA.STD", "> 0", 3),
    ("DATA.NUM_WORKERS", ">= 0", 0),
    ("SOLVER.EPOCHS", ">= 1", 0),
    ("SOLVER.IMS_PER_BATCH", ">= 1", 0),
    ("SOLVER.BASE_LR", "> 0", 0),
    ("SOLVER.MOMENTUM", "[0, 1)", 0),
    ("SOLVER.WEIGHT_DECAY", ">= 0", 0),
    ("SOLVER.GAMMA", "(0, 1]", 0),
    ("SOLVER.STOP_AT_EPOCH", ">= -1", 0),
    ("SOLVER.CHECKPOINT_PERIOD", ">= 1", 0),
    ("SOLVER.MAX_TO_KEEP", ">= 1", 0),
    ("TEST.EVAL_PERIOD", ">= 0", 0),
    ("TEST.IMS_PER_BATCH", ">= 1", 0),
    ("KD.ALPHA", "[0, 1]", 0),
    ("KD.TEMPERATURE", "> 0", 0),
    ("INFO_PLANE.BINS", ">= 2", 0),
    ("INFO_PLANE.MAX_IMAGES", ">= 0", 0),
    ("KNN.K", ">= 1", 0),
    ("KNN.TEMPERATURE", "> 0", 0),
    ("KNN.MAX_TRAIN_IMAGES", ">= 0", 0),
    ("TSNE.NUM_CLASSES", ">= 1", 0),
    ("TSNE.PER_CLASS", ">= 1", 0),
    ("TSNE.PERPLEXITY", "> 0", 0),
)


def validate_eval_cfg(cfg: CfgNode) -> None:
    d, s = cfg.DATA, cfg.SOLVER
    if not cfg.OUTPUT_DIR:
        raise ConfigError("OUTPUT_DIR is empty: name the folder the evaluation writes to")
    check_ranges(cfg, VALUE_RANGES)
    if d.VAL_RESIZE and d.VAL_RESIZE < d.IMAGE_SIZE:
        raise ConfigError(f"DATA.VAL_RESIZE {d.VAL_RESIZE} is out of range: must be >= DATA.IMAGE_SIZE {d.IMAGE_SIZE} "
                          f"(the centre crop is taken from the resized image), or 0 for IMAGE_SIZE / 0.875")
    steps = list(s.STEPS)
    if s.SCHEDULER == "multistep" and (not all(isinstance(x, int) and x >= 1 for x in steps) or steps != sorted(steps)):
        raise ConfigError(f"SOLVER.STEPS {tuple(steps)} is out of range: must be epochs >= 1 in ascending order")
    if d.DATASET not in DATASETS:
        raise ConfigError(f"DATA.DATASET must be one of {DATASETS}, got {d.DATASET!r}")
    if d.INTERPOLATION not in ("bilinear", "bicubic"):
        raise ConfigError(f"DATA.INTERPOLATION must be 'bilinear' or 'bicubic', got {d.INTERPOLATION!r}")
    if d.TRAIN_INTERPOLATION not in ("", "bilinear", "bicubic"):
        raise ConfigError(f"DATA.TRAIN_INTERPOLATION must be '' (= DATA.INTERPOLATION), 'bilinear' or 'bicubic', got "
                          f"{d.TRAIN_INTERPOLATION!r}")
    f = cfg.MODEL.FEATURES
    if f.AVGPOOL_PATCH_TOKENS and not f.N_LAST_BLOCKS:
        raise ConfigError("MODEL.FEATURES.AVGPOOL_PATCH_TOKENS True needs MODEL.FEATURES.N_LAST_BLOCKS >= 1: the "
                          "averaged patch tokens are appended to the CLS tokens of DINO's ViT features; set "
                          "N_LAST_BLOCKS (DINO: 1 with the average for ViT-B, 4 without it for ViT-S) or clear "
                          "AVGPOOL_PATCH_TOKENS")
    if s.SCHEDULER not in ("multistep", "cosine"):
        raise ConfigError(f"SOLVER.SCHEDULER must be 'multistep' or 'cosine', got {s.SCHEDULER!r}")
    if cfg.MODEL.AMP_DTYPE not in ("", "bfloat16", "float16"):
        raise ConfigError(f"MODEL.AMP_DTYPE must be '', 'bfloat16' or 'float16', got {cfg.MODEL.AMP_DTYPE!r}")
    if s.CACHE_FEATURES and d.TRAIN_AUGMENT:
        raise ConfigError("SOLVER.CACHE_FEATURES needs DATA.TRAIN_AUGMENT False: cached features are computed once, "
                          "so random crops / flips cannot be redrawn each epoch")
    chosen = [k for k, v in (("DATA.SUBSET_FILE", d.SUBSET_FILE), ("DATA.SUBSET_PERCENT", d.SUBSET_PERCENT),
                             ("DATA.SUBSET_PER_CLASS", d.SUBSET_PER_CLASS)) if v]
    if len(chosen) > 1:
        raise ConfigError(f"choose one way to take a training subset, got {' and '.join(chosen)}")
    if d.SUBSET_FILE and d.DATASET != "imagefolder":
        raise ConfigError("DATA.SUBSET_FILE names ImageFolder files; for CIFAR use DATA.SUBSET_PERCENT / PER_CLASS")
    if cfg.KD.REDUCTION not in KD_REDUCTIONS:
        raise ConfigError(f"KD.REDUCTION must be 'batchmean' (Hinton: the KL summed over classes, averaged over the "
                          f"batch) or 'mean' (the official DisCo-pytorch kd_ce_loss.py: averaged over batch x "
                          f"classes), got {cfg.KD.REDUCTION!r}")
    if not cfg.KD.TEACHER_CLASSIFIER and (cfg.KD.TEACHER_WEIGHTS or cfg.KD.TEACHER_ARCH):
        raise ConfigError("KD.TEACHER_WEIGHTS / KD.TEACHER_ARCH are set but KD.TEACHER_CLASSIFIER is empty: knowledge "
                          "distillation needs the teacher's linear classifier; set KD.TEACHER_CLASSIFIER to the "
                          "teacher's linear-evaluation OUTPUT_DIR (or clear the other KD.TEACHER_* keys)")
    if len(cfg.TSNE.COMPARE_ARCHS) > len(cfg.TSNE.COMPARE_WEIGHTS):
        raise ConfigError("TSNE.COMPARE_ARCHS has more entries than TSNE.COMPARE_WEIGHTS")


def setup_eval_cfg(config_file: str = "", opts=()) -> CfgNode:
    """defaults -> merge ``config_file`` (with its ``_BASE_`` chain) -> merge ``KEY VALUE`` ``opts`` -> freeze."""
    return merge_and_freeze(get_eval_cfg(), config_file, opts, validate_eval_cfg)
