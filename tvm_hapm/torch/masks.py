"""Masks held on a ``torch.nn.Module``: :class:`Masks` (keep-masks by parameter name),
:func:`apply_masks` (``torch.nn.utils.parametrize``: ``weight = original * mask``, so the user's own
training loop keeps pruned weights at zero) and :func:`remove_masks`.  Computing masks is
:mod:`tvm_hapm.torch.prune`'s; this module is what training needs, and depends on nothing else
of tvm_hapm."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

__all__ = ["Masks", "WeightMask", "apply_masks", "owner_of", "remove_masks"]


class WeightMask(nn.Module):
    """The parametrization ``weight = original * mask`` (``mask`` a fixed boolean buffer)."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask.to(torch.bool))

    def forward(self, weight):
        return weight * self.mask.to(weight.dtype)


@dataclass
class Masks:
    """Keep-masks (``True`` = kept) by parameter name, with what the pruning pass reported.

    Attributes
    ----------
    masks : dict of str to torch.Tensor
        Boolean masks, each of its parameter's shape.
    method, ranking : str
        How they were computed.
    config : str
        The hardware config whose groups they follow.
    report : list of dict
        The pass's per-layer report with ``parameter`` (the parameter's name) added.
    input_shape : tuple
        The input the module was exported with.
    """

    masks: dict
    method: str
    ranking: str
    config: str
    report: list = field(default_factory=list)
    input_shape: tuple = ()

    def sparsity(self) -> float:
        """Fraction of zeros over the masked weights."""
        total = sum(m.numel() for m in self.masks.values())
        kept = sum(int(m.sum()) for m in self.masks.values())
        return 1.0 - kept / max(total, 1)


def owner_of(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The submodule holding parameter ``name`` and the attribute name under it (an
    :class:`~tvm_hapm.torch.OnnxModule` resolves its initializer names itself)."""
    if hasattr(module, "resolve"):  # OnnxModule: masks keyed by initializer name
        return module.resolve(name)
    path, _, attr = name.rpartition(".")
    return (module.get_submodule(path) if path else module), attr


def apply_masks(module: nn.Module, masks) -> nn.Module:
    """Hold ``masks`` fixed on ``module`` (in place) with ``torch.nn.utils.parametrize``.

    The parameter keeps its identity (an optimizer built before still updates it); the weight a
    forward pass sees is ``original * mask``.  A weight already masked gets the new mask in
    place of the old one (masks only ever grow in an iterative schedule).

    Parameters
    ----------
    module : torch.nn.Module
    masks : Masks or dict of str to tensor
        Keep-masks by parameter name.

    Returns
    -------
    torch.nn.Module
        ``module``.
    """
    masks = masks.masks if isinstance(masks, Masks) else masks
    for name, mask in masks.items():
        owner, attr = owner_of(module, name)
        mask = torch.as_tensor(np.asarray(mask) if not torch.is_tensor(mask) else mask)
        if parametrize.is_parametrized(owner, attr):
            parametrize.remove_parametrizations(owner, attr, leave_parametrized=False)
        with torch.no_grad():
            getattr(owner, attr).mul_(mask.to(getattr(owner, attr).dtype))
        parametrize.register_parametrization(owner, attr, WeightMask(mask))
    return module


def remove_masks(module: nn.Module) -> nn.Module:
    """Bake every mask into its weight and remove the parametrizations (in place)."""
    for sub in module.modules():
        if parametrize.is_parametrized(sub):
            for attr in list(sub.parametrizations.keys()):
                parametrize.remove_parametrizations(sub, attr, leave_parametrized=True)
    return module
