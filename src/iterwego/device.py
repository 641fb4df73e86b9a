"""Where the model runs: one device choice and one mixed-precision policy for every caller."""

from __future__ import annotations

import torch

from .config import AMP_MODES

__all__ = ["autocast", "pick_device"]


def pick_device(name: str = "auto") -> torch.device:
    """``"auto"``: the first CUDA device when one is visible, else the CPU; anything else is taken as written."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast(device: torch.device | str, mode: str = "auto"):
    """bf16 autocast on CUDA ("auto"/"bf16"); a no-op on CPU under "auto" and everywhere under "off"."""
    device = torch.device(device)
    if mode not in AMP_MODES:
        raise ValueError(f"train.amp must be 'auto', 'bf16' or 'off', got {mode!r}")
    on = mode == "bf16" or (mode == "auto" and device.type == "cuda")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=on)
