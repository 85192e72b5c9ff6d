"""One place that turns a device argument ("auto", "cpu", "cuda", "cuda:1") into a torch device."""

from __future__ import annotations

import logging

import torch

from engine.errors import InvalidInputError

logger = logging.getLogger(__name__)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """Return the torch device to use.

    "auto" picks CUDA when torch sees a GPU and the CPU otherwise (a logged decision). Asking for
    CUDA explicitly on a machine without one is an error, not a silent fallback.
    """
    if isinstance(device, torch.device):
        return device
    name = str(device).strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        logger.debug("device='auto': no CUDA device visible, using the CPU")
        return torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InvalidInputError(
                f"device={device!r} was asked for but torch sees no CUDA device; "
                "use 'auto' or 'cpu'"
            )
        return torch.device(name)
    raise InvalidInputError(f"unknown device {device!r}; use 'auto', 'cpu' or 'cuda[:N]'")
