"""Mixed precision and memory layout: the configs' dtype names as torch dtypes, and what ``auto`` means on a device.

``TRAIN.AMP.ENABLED``, ``TRAIN.AMP.TEACHER`` and ``MODEL.CHANNELS_LAST`` take True, False or ``auto`` (the default).
:func:`resolve_auto` decides ``auto`` from the device's capabilities: bf16 autocast for student and teacher where the
device runs bf16 natively (a CUDA GPU with bf16, Ampere or newer; a CPU with native bf16 instructions, AVX512-BF16 or
AMX, by oneDNN's check), fp32 elsewhere (an AVX2-only CPU emulates bf16, several times slower than fp32). The
channels_last layout on every CPU (oneDNN's convolutions run it without layout reorders: 1.1-1.45x the contiguous
fp32 step on an AVX2-only CPU, tools/bench_distill.py) and on GPUs that autocast (tensor cores); contiguous
elsewhere. :func:`resolve_cfg` applies it to a config; the Trainer calls it once, when the device is known, and
writes the resolved True / False into config.yaml and its checkpoints.
"""
from typing import Dict, List, Optional, Tuple

import torch

from .cfgnode import cfg_value

AMP_DTYPES = {"": None, "bfloat16": torch.bfloat16, "float16": torch.float16}

# the config keys that take True, False or "auto"
AUTO_KEYS = ("TRAIN.AMP.ENABLED", "TRAIN.AMP.TEACHER", "MODEL.CHANNELS_LAST")


def amp_dtype(name: str) -> Optional[torch.dtype]:
    """``""`` (no autocast, float32), ``"bfloat16"`` or ``"float16"`` -> the autocast dtype (None for float32)."""
    if name not in AMP_DTYPES:
        raise ValueError(f"unknown autocast dtype {name!r}; use one of {sorted(AMP_DTYPES)}")
    return AMP_DTYPES[name]


def native_bf16(device) -> bool:
    """Whether bf16 runs natively (not emulated) on ``device``: on CUDA a GPU with bf16 units (compute capability 8 or
    newer: ``torch.cuda.is_bf16_supported`` without emulation; any ROCm GPU), on the CPU oneDNN's check (AVX512-BF16
    or AMX; an AVX2-only CPU emulates bf16, slower than fp32)."""
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return False
        with torch.cuda.device(device):
            try:
                return bool(torch.cuda.is_bf16_supported(including_emulation=False))
            except TypeError:  # torch < 2.3 has no including_emulation and does not emulate
                return bool(torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")  # the ones that decide the speed of fp32 and bf16


def cpu_info() -> Tuple[str, List[str]]:
    """(model name, which of :data:`CPU_FLAGS` the CPU has) from /proc/cpuinfo; ("unknown CPU", []) elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return "unknown CPU", []
    name, flags = "unknown CPU", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and name == "unknown CPU":
            name = value.strip() or name
        elif key.strip() == "flags" and not flags:
            flags = set(value.split())
    return name, [f for f in CPU_FLAGS if f in flags]


def device_name(device) -> str:
    """``cpu AMD EPYC (avx2; oneDNN AVX2)`` / ``cuda:0 NVIDIA H100 80GB HBM3 (sm_90)``."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(device)
        return f"{device} {torch.cuda.get_device_name(device)} (sm_{major}{minor})"
    if device.type == "cpu":
        name, flags = cpu_info()
        return (f"cpu {name} ({', '.join(flags) or 'none of ' + '/'.join(CPU_FLAGS)}; oneDNN "
                f"{torch.backends.cpu.get_cpu_capability()})")
    return str(device)


def resolve_auto(device, dtype: str = "bfloat16") -> Dict[str, object]:
    """What ``auto`` means on ``device`` for autocast ``dtype`` (TRAIN.AMP.DTYPE): ``{"amp", "teacher_amp",
    "channels_last": bool, "reason": str}``. Autocast (student and teacher) where bf16 runs natively
    (:func:`native_bf16`), or, for float16, on any CUDA GPU (it needs one); fp32 elsewhere. channels_last on CPUs with
    oneDNN and where autocast is on; contiguous elsewhere."""
    device = torch.device(device)
    where = device_name(device)
    if dtype == "float16":
        amp = device.type == "cuda"
        why = (f"{where}: float16 autocast (with loss scaling) runs on the GPU" if amp else
               f"{where}: TRAIN.AMP.DTYPE float16 needs a GPU, so fp32")
    elif native_bf16(device):
        amp = True
        why = f"{where} runs bf16 natively" + (" (oneDNN: AVX512-BF16 / AMX)" if device.type == "cpu" else "")
    else:
        amp = False
        why = (f"{where} has no native bf16 (oneDNN: no AVX512-BF16 / AMX): bf16 would be emulated, slower "
               f"than fp32, so fp32" if device.type == "cpu" else
               f"{where} has no native bf16 (compute capability < 8): bf16 would be emulated, so fp32"
               if device.type == "cuda" else f"{where}: no bf16 rule for this device type, so fp32")
    if device.type == "cpu" and torch.backends.mkldnn.is_available():
        channels_last = True
        why += "; channels_last: oneDNN's convolutions run it without layout reorders"
    else:
        channels_last = amp
        why += "; channels_last for the tensor cores" if amp else "; contiguous layout"
    return {"amp": amp, "teacher_amp": amp, "channels_last": channels_last, "reason": why}


_RESOLVED_NAME = {"TRAIN.AMP.ENABLED": "amp", "TRAIN.AMP.TEACHER": "teacher_amp",
                  "MODEL.CHANNELS_LAST": "channels_last"}


def resolve_cfg(cfg, device):
    """``cfg`` with every ``auto`` of :data:`AUTO_KEYS` replaced by :func:`resolve_auto`'s choice for ``device``
    (a frozen clone; ``cfg`` itself when nothing is ``auto``), the keys that were ``auto`` and one line for the log:
    ``precision: TRAIN.AMP.ENABLED False (auto), ... -- <reason>``."""
    auto = [k for k in AUTO_KEYS if cfg_value(cfg, k) == "auto"]
    if auto:  # the device is looked at only when something is left to it (build_method re-checks resolved configs)
        choice = resolve_auto(device, cfg.TRAIN.AMP.DTYPE)
        cfg = cfg.clone()
        cfg.defrost()
        for key in auto:
            parent, leaf = key.rsplit(".", 1)
            cfg_value(cfg, parent)[leaf] = bool(choice[_RESOLVED_NAME[key]])
        cfg.freeze()
    values = ", ".join(f"{k} {cfg_value(cfg, k)} ({'auto' if k in auto else 'set'})" for k in AUTO_KEYS)
    dtype = cfg.TRAIN.AMP.DTYPE if (cfg.TRAIN.AMP.ENABLED or cfg.TRAIN.AMP.TEACHER) else "none"
    line = f"precision: {values}, autocast dtype {dtype}" + (f"; auto because {choice['reason']}" if auto else "")
    return cfg, auto, line
