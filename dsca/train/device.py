"""Where and in which precision the model runs: device, mixed precision, CPU threads."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["resolve_device", "autocast_context", "grad_scaler", "cpu_threads"]


def resolve_device(name: str) -> torch.device:
    """"auto" -> cuda when available, else cpu; errors clearly when cuda is asked but absent."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available")
    if device.type == "cuda" and device.index is not None:
        count = torch.cuda.device_count()
        if device.index >= count:
            raise RuntimeError(f"device {name!r} requested but only {count} CUDA device(s) exist")
        # kernels that launch on "the current device" (Triton, some cuBLAS handles) must see
        # this one; the CAPool launchers also guard each launch themselves
        torch.cuda.set_device(device)
    return device


def autocast_context(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """The mixed-precision context of the ``amp`` setting: autocast on CUDA only, bf16 where
    supported for ``auto``."""
    if device.type != "cuda" or amp == "off":
        return contextlib.nullcontext()
    if amp == "auto":
        amp = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type="cuda", dtype=dtype)


def grad_scaler(device: torch.device, amp: str) -> torch.amp.GradScaler | None:
    """A gradient scaler when :func:`autocast_context` runs in fp16 (bf16 needs none), else None."""
    use_fp16 = device.type == "cuda" and (
        amp == "fp16" or (amp == "auto" and not torch.cuda.is_bf16_supported())
    )
    return torch.amp.GradScaler("cuda") if use_fp16 else None


@contextlib.contextmanager
def cpu_threads(n: int) -> Iterator[None]:
    """Run with ``n`` torch CPU threads (0 = leave as is), restoring the count afterwards."""
    before = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
