"""Where samcp runs torch: one rule for every command (train, predict, benchmarks)."""

from __future__ import annotations

import torch

from samcp.pipeline.errors import SamcpError


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when visible), ``cpu``, ``cuda`` or ``cuda:N``.

    Raises:
        SamcpError: another name, or CUDA asked for but not visible.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise SamcpError(f"unknown --device {name!r}; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SamcpError("--device cuda but no CUDA device is visible; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise SamcpError(
                f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible"
            )
    return device
