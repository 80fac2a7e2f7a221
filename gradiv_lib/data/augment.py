"""Data augmentation on a batch of images (random crop with padding, horizontal flip)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .core import _check_positive_int


# --------------------------------------------------------------------------------------------
# Augmentation
# --------------------------------------------------------------------------------------------


def augment_batch(
    x: Tensor,
    generator: torch.Generator | None = None,
    padding: int = 4,
    flip: bool = True,
    fill: float | Sequence[float] = 0.0,
) -> Tensor:
    """Random crop with zero padding and random horizontal flip, for a whole batch on its device.

    Each image of ``x`` (``(B, C, H, W)``) is padded by ``padding`` pixels on every side, cut back
    to ``H × W`` at a uniformly random offset in ``[0, 2·padding]²`` and, with ``flip``, mirrored
    left–right with probability ½ — the CIFAR recipe (``RandomCrop(32, padding=4)`` +
    ``RandomHorizontalFlip``). One gather does both, so it costs about one copy of the batch.

    ``fill`` is the value of the padded border in the units of ``x`` (per channel if a
    sequence). On standardised images 0 is the mean colour; torchvision pads the raw image with
    black, i.e. ``fill = -mean / std`` per channel.
    """
    if x.dim() != 4:
        raise ValueError(f"x must be a batch of images (B, C, H, W), got shape {tuple(x.shape)}")
    _check_positive_int(padding, "padding", minimum=0)
    b, c, h, w = x.shape
    fill_values = torch.as_tensor(fill, dtype=x.dtype, device=x.device).reshape(-1)
    if fill_values.numel() not in (1, c):
        raise ValueError(f"fill needs 1 or {c} values (one per channel), got {fill_values.numel()}")
    padded = F.pad(x, (padding,) * 4) if padding else x
    if padding and bool((fill_values != 0).any()):
        border = torch.ones(1, 1, h, w, dtype=x.dtype, device=x.device)
        border = F.pad(border, (padding,) * 4) == 0
        padded = torch.where(border, fill_values.view(1, -1, 1, 1).expand(1, c, 1, 1), padded)
    draw_device = generator.device if generator is not None else torch.device("cpu")
    offsets = torch.randint(0, 2 * padding + 1, (2, b), generator=generator, device=draw_device)
    mirrored = (
        torch.rand(b, generator=generator, device=draw_device) < 0.5
        if flip
        else torch.zeros(b, dtype=torch.bool, device=draw_device)
    )
    offsets, mirrored = offsets.to(x.device), mirrored.to(x.device)
    rows = offsets[0, :, None] + torch.arange(h, device=x.device)  # (B, H)
    cols_forward = torch.arange(w, device=x.device)
    cols = offsets[1, :, None] + torch.where(
        mirrored[:, None], (w - 1) - cols_forward, cols_forward
    )  # (B, W)
    batch_index = torch.arange(b, device=x.device)[:, None, None, None]
    channel_index = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch_index, channel_index, rows[:, None, :, None], cols[:, None, None, :]]


