"""Running a custom autograd function under autocast."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = ["apply_autocast"]


def apply_autocast(fn: Callable[..., Any], *args: Any) -> Any:
    """Run a custom autograd function under autocast: its in-place/``out=`` products are not
    autocast by torch, so cast the floating inputs to the autocast dtype up front."""
    device = next(a for a in args if isinstance(a, Tensor)).device.type
    if not torch.is_autocast_enabled(device):
        return fn(*args)
    dtype = torch.get_autocast_dtype(device)
    cast = [a.to(dtype) if isinstance(a, Tensor) and a.is_floating_point() else a for a in args]
    with torch.autocast(device, enabled=False):
        return fn(*cast)
