"""Blocking: view a tensor as rows of scale-sharing blocks, and back.

A 1-D block of size b runs along one axis; a 2-D tile (bm, bn) covers two axes. Ragged tails are
padded with zeros (zeros never change a block's amax) and cut off again afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class BlockLayout:
    shape: tuple[int, ...]  # shape after moving the block axes last
    axes: tuple[int, ...]  # normalized axes of the input
    block: tuple[int, ...]
    padded: tuple[int, ...]  # padded sizes of the block axes


def normalize_block(block) -> tuple[int, ...]:
    if isinstance(block, bool) or block is None:
        raise TypeError(f"block must be a positive int or a pair of positive ints, got {block!r}")
    if isinstance(block, int):
        block = (block,)
    if isinstance(block, (str, bytes)):
        raise TypeError(f"block must be a positive int or a pair of positive ints, got {block!r}")
    try:
        block = tuple(block)
    except TypeError:
        raise TypeError(f"block must be a positive int or a pair of positive ints, got {block!r}") from None
    if len(block) not in (1, 2) or not all(isinstance(b, int) and not isinstance(b, bool) for b in block):
        raise TypeError(f"block must be a positive int or a pair of positive ints, got {block!r}")
    if any(b <= 0 for b in block):
        raise ValueError(f"block sizes must be positive, got {block!r}")
    return block


def normalize_axes(axis, ndim: int, nblock_dims: int) -> tuple[int, ...]:
    if axis is None:
        axis = -1 if nblock_dims == 1 else (-2, -1)
    if isinstance(axis, int):
        axes = (axis,)
    elif isinstance(axis, (tuple, list)):
        axes = tuple(axis)
    else:
        raise TypeError(f"axis must be an int (or a pair of ints for 2-D tiles), got {axis!r}")
    if len(axes) != nblock_dims:
        raise ValueError(f"axis {axis!r} does not fit a {nblock_dims}-D block; give {nblock_dims} axes")
    if nblock_dims > ndim:
        raise ValueError(f"a {nblock_dims}-D tile needs a tensor of at least {nblock_dims} dims, got {ndim}")
    out = []
    for a in axes:
        if not isinstance(a, int) or isinstance(a, bool):
            raise TypeError(f"axis must be an int, got {a!r}")
        if not -ndim <= a < ndim:
            raise ValueError(f"axis {a} is out of range for a tensor with {ndim} dims (accepted: {-ndim}..{ndim - 1})")
        out.append(a % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"tile axes must differ, got {axis!r}")
    return tuple(out)


def to_blocks(x: torch.Tensor, block: tuple[int, ...], axes: tuple[int, ...]) -> tuple[torch.Tensor, BlockLayout]:
    """Return (blocks [N, prod(block)], layout). `x` should already be fp32."""
    xm = x.movedim(axes, tuple(range(-len(axes), 0)))
    moved_shape = tuple(xm.shape)
    sizes = xm.shape[-len(axes):]
    padded = tuple(-(-s // b) * b for s, b in zip(sizes, block))
    pad = []
    for s, p in zip(reversed(sizes), reversed(padded)):
        pad += [0, p - s]
    if any(pad):
        xm = F.pad(xm, pad)
    lead = xm.shape[: xm.ndim - len(axes)]
    layout = BlockLayout(shape=moved_shape, axes=axes, block=block, padded=padded)
    if len(block) == 1:
        return xm.reshape(-1, block[0]), layout
    (bm, bn), (pm, pn) = block, padded
    tiles = xm.reshape(*lead, pm // bm, bm, pn // bn, bn).transpose(-3, -2)
    return tiles.reshape(-1, bm * bn), layout


def from_blocks(yb: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    nd = len(layout.axes)
    lead = layout.shape[: len(layout.shape) - nd]
    if nd == 1:
        y = yb.reshape(*lead, layout.padded[0])[..., : layout.shape[-1]]
    else:
        (bm, bn), (pm, pn) = layout.block, layout.padded
        y = yb.reshape(*lead, pm // bm, pn // bn, bm, bn).transpose(-3, -2).reshape(*lead, pm, pn)
        y = y[..., : layout.shape[-2], : layout.shape[-1]]
    return y.movedim(tuple(range(-nd, 0)), layout.axes)
