"""Load a converted ``.pkl`` into a detectron2 model and account for every key.

A pretrained key (anything in the backbone or the C4 ROI stage ``roi_heads.res5``) that does not load is an error;
keys the student never had (RPN, box predictor, mask head, FPN convs, the extra norm) are listed as new.

Every detectron2 entry point of the project (the check here, ``tools/train_net.py`` training and ``--eval-only``)
loads weights with :class:`SafeDetectionCheckpointer`: files are read through :mod:`pretrain.safeload` (a ``.pkl``
that asks for anything but plain data / numpy arrays is refused, never executed), and weights that fill none of the
model's pretrained parameters are an error (``MODEL.WEIGHTS ""`` is how to train from scratch).
"""
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from torch import nn

from pretrain.safeload import load_pickle, load_torch
from transfer.convert import RESNET_ARCHS, TIMM_LAYOUTS, Conversion, convert_read, read_checkpoint, save_d2_checkpoint

# Default detection config per student: the VOC C4 24k leaf (relative to the repository root).
DEFAULT_CONFIGS = {
    "resnet18": "configs/detection/voc/r18_C4_24k.yaml",
    "resnet34": "configs/detection/voc/r34_C4_24k.yaml",
    "resnet50": "configs/detection/voc/r50_C4_24k.yaml",
    "efficientnet_b0": "configs/detection/voc/effb0_C4_24k.yaml",
    "efficientnet_b1": "configs/detection/voc/effb1_C4_24k.yaml",
    "mobilenetv3_large_100": "configs/detection/voc/mobv3l_C4_24k.yaml",
}
# The teachers (ResNets without a config of their own): the R-50 config with these overrides builds them.
TEACHER_CONFIG_OPTS = {
    "resnet101": ("MODEL.RESNETS.DEPTH", "101"),
    "resnet152": ("MODEL.RESNETS.DEPTH", "152"),
    # SwAV's ResNet-50x2: every width doubled, the stem's included
    "resnet50x2": ("MODEL.RESNETS.STEM_OUT_CHANNELS", "128", "MODEL.RESNETS.WIDTH_PER_GROUP", "128",
                   "MODEL.RESNETS.RES2_OUT_CHANNELS", "512"),
}
# Pretrained parts of the model per layout; below them every key must come from the checkpoint.
PRETRAINED_PREFIXES = {"C4": ("backbone.", "roi_heads.res5."), "FPN": ("backbone.bottom_up.",)}
# New layers inside the pretrained parts: MoCo's extra norm after res5 (Res5ROIHeadsExtraNorm).
NEW_INSIDE_PRETRAINED = ("roi_heads.res5.norm.",)
_BN_COUNTER = "num_batches_tracked"


class NoPretrainedWeightsError(ValueError):
    """Weights (``MODEL.WEIGHTS``) of which not one fills a pretrained parameter of the model."""


def _no_weights(path: str, why: str) -> NoPretrainedWeightsError:
    return NoPretrainedWeightsError(
        f"MODEL.WEIGHTS {path}: {why}, so no parameter of the backbone / ROI stage (res5) would come from it and the "
        f"detector would silently start from random weights. Point MODEL.WEIGHTS at the .pkl tools/convert_to_d2.py "
        f"wrote for this config; to train from scratch on purpose, set MODEL.WEIGHTS \"\" (detectron2's way).")


def _d2_pickle_checkpoint(data, path: str) -> dict:
    """What detectron2's ``DetectionCheckpointer._load_file`` makes of an unpickled ``.pkl`` (detectron2 format:
    ``{"model", "__author__", ...}`` as is; else Caffe2 / Detectron blobs, ``*_momentum`` dropped, matched by
    heuristics), checked to hold at least one weight array and nothing but arrays."""
    if not isinstance(data, dict):
        raise ValueError(f"{path}: detectron2 weights are a dict ({{'model': {{name: array}}, '__author__': ...}}); "
                         f"this pickle holds a {type(data).__name__}")
    if "model" in data and "__author__" in data:
        ckpt = data
    elif isinstance(data.get("model"), dict):  # detectron2 would take it for Caffe2 blobs and fail on the dict
        if not any(isinstance(v, (np.ndarray, torch.Tensor)) for v in data["model"].values()):
            raise _no_weights(path, f"its 'model' dict holds no weight array ({len(data['model'])} entries)")
        raise ValueError(f"{path}: has a 'model' dict but no '__author__', so detectron2 would read it as Caffe2 "
                         f"blobs; write it as tools/convert_to_d2.py does ('model', '__author__', "
                         f"'matching_heuristics')")
    else:
        blobs = data["blobs"] if "blobs" in data else data  # Detectron detection models keep theirs in "blobs"
        ckpt = {"model": {k: v for k, v in blobs.items() if not k.endswith("_momentum")}, "__author__": "Caffe2",
                "matching_heuristics": True}
    weights = ckpt["model"]
    if not isinstance(weights, dict):
        raise ValueError(f"{path}: its 'model' entry is a {type(weights).__name__}, not a dict of weight arrays")
    others = sorted(k for k, v in weights.items() if not isinstance(v, (np.ndarray, torch.Tensor)))
    if len(others) == len(weights):
        raise _no_weights(path, f"the file holds no weight array ({len(weights)} entries in its weights dict)")
    if others:
        raise ValueError(f"{path}: weights must be arrays; {len(others)} entries are not: "
                         f"{[(k, type(weights[k]).__name__) for k in others[:5]]}")
    return ckpt


class SafeDetectionCheckpointer(DetectionCheckpointer):
    """detectron2's ``DetectionCheckpointer`` with every file read through :mod:`pretrain.safeload` (``.pkl`` with
    :func:`~pretrain.safeload.load_pickle`, ``.pth`` / ``.pyth`` / others with
    :func:`~pretrain.safeload.load_torch`), and loading that fills none of the model's pretrained parameters
    (backbone, ``roi_heads.res5``) refused with :class:`NoPretrainedWeightsError`."""

    PRETRAINED = tuple(sorted({p for prefixes in PRETRAINED_PREFIXES.values() for p in prefixes}))

    @classmethod
    def replacing(cls, other: DetectionCheckpointer) -> "SafeDetectionCheckpointer":
        """The same checkpointer (model, folder, checkpointables such as detectron2's trainer) as ``other``."""
        return cls(other.model, other.save_dir, save_to_disk=other.save_to_disk, **other.checkpointables)

    def load(self, path, *args, **kwargs):
        self._safe_path = path
        try:
            return super().load(path, *args, **kwargs)
        finally:
            self._safe_path = None

    def _load_file(self, filename):
        if filename.endswith(".pkl"):
            return _d2_pickle_checkpoint(load_pickle(filename, "detectron2 weights"), filename)
        if filename.endswith(".pyth"):  # pycls, as detectron2 reads it
            data = load_torch(filename, "pycls checkpoint")
            if not isinstance(data, dict) or "model_state" not in data:
                raise ValueError(f"cannot load .pyth file {filename}; pycls checkpoints must contain 'model_state'")
            return {"model": {k: v for k, v in data["model_state"].items() if not k.endswith("num_batches_tracked")},
                    "__author__": "pycls", "matching_heuristics": True}
        return super()._load_file(filename)  # detectron2's URL-query handling; it reads through _torch_load

    def _torch_load(self, f):
        return load_torch(f, "detectron2 checkpoint")

    def _load_model(self, checkpoint):
        incompatible = super()._load_model(checkpoint)
        missing = set(incompatible.missing_keys)
        # parameters, not buffers: FrozenBatchNorm2d fills running statistics a file lacks with defaults, so
        # they never show as missing
        pretrained = [k for k, _ in self.model.named_parameters()
                      if k.startswith(self.PRETRAINED) and not k.startswith(NEW_INSIDE_PRETRAINED)]
        if pretrained and all(k in missing for k in pretrained):
            shapes = (f"; {len(incompatible.incorrect_shapes)} had the wrong shape, e.g. "
                      f"{incompatible.incorrect_shapes[:3]}" if incompatible.incorrect_shapes else "")
            raise _no_weights(getattr(self, "_safe_path", None) or "(file)",
                              f"none of its keys matches the {len(pretrained)} backbone / ROI-stage parameters of "
                              f"the model (unexpected keys: {sorted(incompatible.unexpected_keys)[:5]}{shapes})")
        return incompatible


class UnsupportedArchError(ValueError):
    """An architecture with no detectron2 backbone (e.g. the demo's ``convnet_small`` / ``convnet_tiny``)."""


def short_name(arch: str) -> str:
    """The name of a student in the config files: ``resnet18`` -> ``r18`` (configs/detection/voc/r18_C4_24k.yaml)."""
    return os.path.basename(DEFAULT_CONFIGS[arch]).split("_")[0]


def supported_archs_text() -> str:
    students = ", ".join(f"{arch} ({short_name(arch)})" for arch in DEFAULT_CONFIGS)
    return (f"the students {students} (configs/detection/{{voc,coco}}/<short name>_*.yaml), and the ResNet "
            f"teachers {', '.join(TEACHER_CONFIG_OPTS)} (with --config-file)")


def check_detection_arch(arch: str) -> None:
    """Raise :class:`UnsupportedArchError`, naming ``arch`` and the architectures detection supports, unless
    ``arch`` has a detectron2 backbone (and a converter to it)."""
    if arch in RESNET_ARCHS or arch in TIMM_LAYOUTS:  # the families transfer.convert maps to detectron2 keys
        return
    raise UnsupportedArchError(
        f"architecture {arch!r} has no detectron2 backbone, so it cannot be used for detection (nothing was "
        f"converted). Detection supports {supported_archs_text()}.")


def default_config(arch: str) -> str:
    """The detection config of a student; for a teacher, an error naming the config and overrides that build it;
    for any other architecture, :class:`UnsupportedArchError`."""
    check_detection_arch(arch)
    if arch not in DEFAULT_CONFIGS:
        raise ValueError(f"no default detection config for {arch!r} (a teacher); pass --config-file "
                         f"configs/detection/voc/r50_C4_24k.yaml {' '.join(TEACHER_CONFIG_OPTS[arch])} (or a COCO "
                         f"config of R-50 with the same overrides)")
    return DEFAULT_CONFIGS[arch]


def layout_of(cfg) -> str:
    """"FPN" when the backbone is an FPN, else "C4" (the last stage in the ROI head)."""
    return "FPN" if "fpn" in cfg.MODEL.BACKBONE.NAME.lower() else "C4"


def describe_model_cfg(cfg) -> str:
    """What backbone the config builds, in words, for error messages."""
    if "timm" in cfg.MODEL.BACKBONE.NAME:
        return f"timm {cfg.MODEL.TIMM.ARCH} ({layout_of(cfg)})"
    return f"ResNet-{cfg.MODEL.RESNETS.DEPTH} ({layout_of(cfg)}, ROI heads {cfg.MODEL.ROI_HEADS.NAME})"


@dataclass
class LoadReport:
    """Per key: ``loaded`` (model keys filled from the checkpoint), ``new`` (model keys the checkpoint does not have
    and need not: key -> what it is), ``ignored`` (harmless checkpoint keys the model lacks), ``skipped`` (input keys
    the converter left out, with why) and ``errors`` (key -> problem)."""

    loaded: List[str] = field(default_factory=list)
    new: Dict[str, str] = field(default_factory=dict)
    ignored: Dict[str, str] = field(default_factory=dict)
    skipped: Dict[str, str] = field(default_factory=dict)
    errors: Dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.errors

    def lines(self) -> List[str]:
        out = [f"loaded      {k}" for k in self.loaded]
        out += [f"new         {k}  ({why})" for k, why in self.new.items()]
        out += [f"ignored     {k}  ({why})" for k, why in self.ignored.items()]
        out += [f"skipped     {k}  ({why})" for k, why in self.skipped.items()]
        out += [f"ERROR       {k}  ({why})" for k, why in self.errors.items()]
        return out

    def summary(self) -> str:
        return (f"{len(self.loaded)} loaded, {len(self.new)} new (not pretrained), {len(self.ignored)} ignored, "
                f"{len(self.skipped)} skipped by the converter, {len(self.errors)} errors")


def _new_layer(key: str) -> str:
    part = key.split(".")[:2]
    if key.startswith(NEW_INSIDE_PRETRAINED):
        return "extra norm after res5, new in the detector"
    return f"{'.'.join(part)}: detector layer, initialised by detectron2"


def check_pretrained_load(model: nn.Module, path: str, layout: str,
                          skipped: Optional[Dict[str, str]] = None) -> LoadReport:
    """Load ``path`` (a converted ``.pkl``) into ``model`` with detectron2's ``DetectionCheckpointer`` and report.

    Checked before loading: every model key under the pretrained prefixes of ``layout`` is in the checkpoint with
    the same shape, every checkpoint key exists in the model. Checked after: each loaded tensor equals the
    checkpoint's, i.e. detectron2 loaded it under exactly that name.
    """
    if layout not in PRETRAINED_PREFIXES:
        raise ValueError(f"layout {layout!r}: expected one of {tuple(PRETRAINED_PREFIXES)}")
    ckpt = load_pickle(path, "converted detectron2 weights")
    if not isinstance(ckpt, dict) or "model" not in ckpt or "__author__" not in ckpt:
        raise ValueError(f"{path} is not a converted detectron2 checkpoint (no 'model' / '__author__')")
    weights = {k: torch.as_tensor(v) for k, v in ckpt["model"].items()}
    report = LoadReport(skipped=dict(skipped or {}))
    own = model.state_dict()
    for k, v in own.items():
        pretrained = k.startswith(PRETRAINED_PREFIXES[layout]) and not k.startswith(NEW_INSIDE_PRETRAINED)
        if k in weights:
            if tuple(weights[k].shape) != tuple(v.shape):
                report.errors[k] = f"shape mismatch: checkpoint {tuple(weights[k].shape)} vs model {tuple(v.shape)}"
        elif pretrained and not k.endswith(_BN_COUNTER):
            report.errors[k] = "missing from the checkpoint: this pretrained layer would stay random"
        else:
            report.new[k] = ("BatchNorm step counter, starts at 0" if k.endswith(_BN_COUNTER) else _new_layer(k))
    for k in weights:
        if k not in own:
            if k.endswith(_BN_COUNTER):
                report.ignored[k] = "BatchNorm step counter; this norm (FrozenBN) has none"
            else:
                report.errors[k] = "unexpected: the model has no such key"
    if report.errors:
        return report
    SafeDetectionCheckpointer(model).load(path)
    after = model.state_dict()
    for k, w in weights.items():
        if k not in after:
            continue
        if torch.equal(after[k].cpu(), w.to(after[k].dtype)):
            report.loaded.append(k)
        else:
            report.errors[k] = "detectron2 did not load this tensor (value differs after loading)"
    return report


def load_error_message(report: LoadReport, arch: str, cfg_desc: str, config_file: str) -> str:
    """Name the keys and the likely cause of a failed load."""
    keys = list(report.errors.items())
    shown = "\n".join(f"  {k}: {why}" for k, why in keys[:30])
    more = f"\n  ... and {len(keys) - 30} more" if len(keys) > 30 else ""
    return (f"{len(keys)} pretrained weight(s) do not load:\n{shown}{more}\nThe checkpoint's architecture is "
            f"{arch}; the config {os.path.relpath(config_file)} builds {cfg_desc}. Likely cause: a wrong --arch or "
            f"--config-file (or config overrides such as MODEL.RESNETS.DEPTH / MODEL.TIMM.ARCH that do not match the "
            f"checkpoint).")


# ----------------------------------------------------------------------------------------------------------------
# Convert + verify (tools/convert_to_d2.py)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class LoadError(RuntimeError):
    """Pretrained weights that do not load; ``report`` has all of them."""

    def __init__(self, message: str, report: LoadReport):
        super().__init__(message)
        self.report = report


def build_check_cfg(arch: str, config_file: Optional[str] = None, opts: Sequence[str] = ()):
    """The config the converted weights are checked against: ``config_file`` (default: per arch) + ``opts``."""
    from .config import get_cfg

    config_file = config_file or os.path.join(REPO_ROOT, default_config(arch))
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"config file {config_file} does not exist")
    cfg = get_cfg()
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    cfg.MODEL.DEVICE = "cpu"  # the check builds the model on the CPU, whatever the config trains on
    cfg.MODEL.WEIGHTS = ""
    return cfg, config_file


def convert_to_d2(src: str, out: str, arch: Optional[str] = None, config_file: Optional[str] = None,
                  opts: Sequence[str] = (), force: bool = False) -> Tuple[LoadReport, Conversion, str]:
    """Convert ``src`` to ``out`` (.pkl) for the model of ``config_file``, verifying that every pretrained weight
    loads; ``out`` is only written (atomically) when they all do. -> (report, conversion, config file used)."""
    from detectron2.modeling import build_model

    if not out.endswith(".pkl"):
        raise ValueError(f"output {out!r} must end in .pkl (how detectron2 recognises a converted checkpoint)")
    if os.path.exists(out) and not force:
        raise FileExistsError(f"{out} exists; pass --force to overwrite it")
    ckpt = read_checkpoint(src, arch)
    check_detection_arch(ckpt.arch)  # before any config: one that builds something else would only confuse
    cfg, config_file = build_check_cfg(ckpt.arch, config_file, opts)
    layout = layout_of(cfg)
    conv = convert_read(ckpt, layout, src)
    tmp = f"{out[:-len('.pkl')]}.partial-{os.getpid()}.pkl"
    try:
        save_d2_checkpoint(conv, tmp)
        model = build_model(cfg)
        report = check_pretrained_load(model, tmp, layout, conv.skipped)
        if not report.ok:
            raise LoadError(load_error_message(report, ckpt.arch, describe_model_cfg(cfg), config_file), report)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return report, conv, config_file
