"""Mixed-precision names used in configs, as torch dtypes."""
from typing import Optional

import torch

AMP_DTYPES = {"": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


def amp_dtype(name: str) -> Optional[torch.dtype]:
    """``""`` (no autocast, float32), ``"bfloat16"`` or ``"float16"`` -> the autocast dtype (None for float32)."""
    if name not in AMP_DTYPES:
        raise ValueError(f"unknown autocast dtype {name!r}; use one of {sorted(AMP_DTYPES)}")
    return AMP_DTYPES[name]
