"""Tile planning and fusion for stage 2 (pure functions over sizes and tensors).

Everything here is in latent units (1 latent = the VAE's factor in pixels: 8 for SDXL, 4 for the
tiny world's f4 VAE; `planning.make_plan` takes it). The full-resolution canvas
is covered by a regular grid of native-size tiles with overlap; only tiles that touch
the (dilated) mask are processed, so the cost follows the mask's area, not the
image's. Overlapping tiles are fused by weighted averaging with smooth windows
(MultiDiffusion-style), which is what keeps seams out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Tile:
    """A tile in latent units: rows [top, top + height), columns [left, left + width)."""

    top: int
    left: int
    height: int
    width: int

    @property
    def bottom(self) -> int:
        return self.top + self.height

    @property
    def right(self) -> int:
        return self.left + self.width

    @property
    def slices(self) -> tuple[slice, slice]:
        return slice(self.top, self.top + self.height), slice(self.left, self.left + self.width)

    def shifted(self, dy: int, dx: int) -> "Tile":
        return Tile(self.top + dy, self.left + dx, self.height, self.width)


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets along one axis: stride tile - overlap, the last tile flush with the end."""
    if tile <= 0 or not 0 <= overlap < tile:
        raise ValueError(f"need tile > overlap >= 0, got tile={tile}, overlap={overlap}")
    if length <= tile:
        return [0]
    stride = tile - overlap
    count = math.ceil((length - tile) / stride) + 1
    return [min(i * stride, length - tile) for i in range(count)]


def plan_tiles(canvas: tuple[int, int], tile: int, overlap: int) -> list[Tile]:
    """The full grid of tiles over a (height, width) latent canvas."""
    height, width = canvas
    return [
        Tile(top, left, min(tile, height), min(tile, width))
        for top in tile_starts(height, tile, overlap)
        for left in tile_starts(width, tile, overlap)
    ]


def tiles_touching(tiles: list[Tile], latent_mask: np.ndarray) -> list[Tile]:
    """The tiles that contain at least one masked latent."""
    return [t for t in tiles if latent_mask[t.slices].any()]


def overlaps(a: Tile, b: Tile) -> bool:
    return a.top < b.bottom and b.top < a.bottom and a.left < b.right and b.left < a.right


def group_tiles(tiles: list[Tile]) -> list[list[Tile]]:
    """Split tiles into groups that share no latent (connected by overlap).

    Groups are fused and decoded independently, so two masks far apart cost two
    small regions, not the box around both.
    """
    groups: list[list[Tile]] = []
    for tile in tiles:
        joined = [g for g in groups if any(overlaps(tile, t) for t in g)]
        merged = [tile] + [t for g in joined for t in g]
        groups = [g for g in groups if g not in joined] + [merged]
    order = {t: i for i, t in enumerate(tiles)}
    groups = [sorted(g, key=order.__getitem__) for g in groups]
    return sorted(groups, key=lambda g: order[g[0]])


def bounding_tile(tiles: list[Tile]) -> Tile:
    """The smallest box holding all tiles (the region stage 2 works in)."""
    top = min(t.top for t in tiles)
    left = min(t.left for t in tiles)
    bottom = max(t.top + t.height for t in tiles)
    right = max(t.left + t.width for t in tiles)
    return Tile(top, left, bottom - top, right - left)


def _ramp(length: int, overlap: int, fade_start: bool, fade_end: bool) -> torch.Tensor:
    """1-D window: 1 in the middle, a raised-cosine ramp over `overlap` at faded ends."""
    w = torch.ones(length, dtype=torch.float64)
    ramp_len = min(overlap, length // 2)
    if ramp_len > 0:
        ramp = 0.5 - 0.5 * torch.cos(math.pi * (torch.arange(ramp_len, dtype=torch.float64) + 0.5) / ramp_len)
        if fade_start:
            w[:ramp_len] = ramp
        if fade_end:
            w[length - ramp_len :] = ramp.flip(0)
    return w


def tile_window(tile: Tile, canvas: tuple[int, int], overlap: int) -> torch.Tensor:
    """Fusion weights (height, width) of a tile: ramps only towards neighbouring tiles.

    Edges on the canvas border keep full weight, so every latent of the canvas that a
    tile covers has a positive total weight.
    """
    height, width = canvas
    wy = _ramp(tile.height, overlap, tile.top > 0, tile.top + tile.height < height)
    wx = _ramp(tile.width, overlap, tile.left > 0, tile.left + tile.width < width)
    return (wy[:, None] * wx[None, :]).float()


@dataclass
class TileFusion:
    """Weighted average of per-tile predictions over a region (MultiDiffusion)."""

    shape: tuple  # (B, C, H, W) of the region
    windows: list[torch.Tensor]  # one (h, w) window per tile, in region coordinates
    tiles: list[Tile]

    def __post_init__(self):
        self.weight = torch.zeros(self.shape[-2:], dtype=torch.float32)
        for tile, window in zip(self.tiles, self.windows, strict=True):
            self.weight[tile.slices] += window
        self.covered = self.weight > 0

    def start(self, device) -> "FusionSum":
        """An empty weighted sum on `device`, to add predictions batch by batch."""
        return FusionSum(self, torch.zeros(self.shape, device=device, dtype=torch.float32))

    def fuse(self, predictions: list[torch.Tensor]) -> torch.Tensor:
        """predictions[i] (B, C, h_i, w_i) for tile i -> (B, C, H, W); zero where no tile is."""
        fused = self.start(predictions[0].device)
        for tile, pred in zip(self.tiles, predictions, strict=True):
            fused.add([tile], pred)
        return fused.result(predictions[0].dtype)


@dataclass
class FusionSum:
    """The running weighted sum of one fusion: memory follows the region, not the number of patches."""

    fusion: TileFusion
    total: torch.Tensor

    def __post_init__(self):
        self.windows = dict(zip(self.fusion.tiles, self.fusion.windows, strict=True))

    def add(self, tiles: list[Tile], predictions: torch.Tensor) -> None:
        """predictions (k, C, h, w): one item per tile, in order."""
        for tile, pred in zip(tiles, predictions.split(1), strict=True):
            self.total[(..., *tile.slices)] += pred.float() * self.windows[tile].to(self.total.device)

    def result(self, dtype) -> torch.Tensor:
        weight = self.fusion.weight.to(self.total.device).clamp_min(1e-12)
        return (self.total / weight).to(dtype)
