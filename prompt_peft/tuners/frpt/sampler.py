"""DPP's saliency-driven sampler (docs/methods.md, FRPT Eq. (3)-(6), in the released code's form).

Each output cell of a ``g × g`` grid looks up the input at the saliency-weighted mean position of its
neighbourhood, the weights being the saliency times a Gaussian distance kernel. Salient regions attract many
sampling points, so they are magnified in the re-sampled image; the Gaussian keeps the grid from collapsing.

The saliency map is replicate-padded by ``g - 1`` cells on each side and the kernel has ``2g - 1`` taps, so every
output cell sees the whole map. The coordinates of the padded grid are ``(i - (g - 1)) / (g - 1)``: linear over the
padding too, which makes a uniform saliency give exactly the identity grid (a symmetric window's weighted mean
position is its centre), i.e. ``[0, 1]`` before the map to grid_sample's ``[-1, 1]``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def gaussian_kernel(grid_size: int, fwhm: float) -> torch.Tensor:
    """The ``(2g - 1) × (2g - 1)`` distance kernel ``exp(-4 ln 2 · r² / fwhm²)`` (``r`` in cells, peak 1)."""
    radius = grid_size - 1
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    squared = offsets[:, None] ** 2 + offsets[None, :] ** 2
    return torch.exp(-4 * math.log(2) * squared / fwhm**2)


def sampling_grid(saliency: torch.Tensor, kernel: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A ``grid_sample`` grid ``(B, H, W, 2)`` (x, y in ``[-1, 1]``) from a saliency map ``(B, g, g)``.

    ``saliency`` is a probability map (non-negative; its scale cancels). ``kernel`` is ``(2g - 1, 2g - 1)``. The
    ``g × g`` grid is upsampled bilinearly (corners aligned) to ``size = (H, W)``.
    """
    _, g, g_w = saliency.shape
    if g != g_w or kernel.shape != (2 * g - 1, 2 * g - 1):
        raise ValueError(f"saliency must be (B, g, g) and kernel (2g-1, 2g-1), got {saliency.shape}, {kernel.shape}")
    pad = g - 1
    mass = F.pad(saliency[:, None].float(), (pad, pad, pad, pad), mode="replicate")  # (B, 1, 3g-2, 3g-2)
    coords = (torch.arange(3 * g - 2, device=mass.device, dtype=mass.dtype) - pad) / pad
    weights = kernel.to(mass)[None, None]
    total = F.conv2d(mass, weights).clamp_min(torch.finfo(mass.dtype).tiny)  # (B, 1, g, g)
    x = F.conv2d(mass * coords[None, None, None, :], weights) / total  # coordinates vary along the width
    y = F.conv2d(mass * coords[None, None, :, None], weights) / total
    grid = (torch.cat([x, y], dim=1) * 2 - 1).clamp(-1, 1)  # (B, 2, g, g)
    grid = F.interpolate(grid, size=size, mode="bilinear", align_corners=True)
    return grid.permute(0, 2, 3, 1)


def resample(pixel_values: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Bilinear re-sampling of the images at the grid (in float32, so low-precision pixels keep exact positions)."""
    out = F.grid_sample(pixel_values.float(), grid.float(), mode="bilinear", padding_mode="border", align_corners=True)
    return out.to(pixel_values.dtype)
