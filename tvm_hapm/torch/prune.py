"""Pruning a ``torch.nn.Module`` with the Relax passes' groups and rankings.

One place defines the groups: :func:`compute_masks` exports the module to ONNX
(:func:`~tvm_hapm.torch.export_onnx`, initializers named by parameter), runs the very pass the
compiler flow runs (:func:`tvm_hapm.flow.prune_onnx`: :func:`~tvm_hapm.passes.HardwareAwarePrune`
with the ``layer``, ``global`` or ``per_mac`` ranking, :func:`~tvm_hapm.passes.MagnitudePrune`
or :func:`~tvm_hapm.passes.FilterPrune`) and maps each mask back to the parameter of the same
name.  The groups therefore follow the hardware config and each layer's schedule exactly as
``tvm.compile(target="hapm_fpga")`` will: a group the masks remove is a dispatch of weight blocks
the compiled program does not issue.

:func:`apply_masks` holds the masks with ``torch.nn.utils.parametrize`` (the weight a forward
pass sees is ``original * mask``, so pruned weights stay zero through any optimizer);
:func:`remove_masks` bakes them in.  :func:`prune` does both and returns the report.
"""

from __future__ import annotations

import re

import numpy as np
import torch
from torch import nn

from .export import export_onnx
from .masks import Masks, apply_masks

__all__ = ["compute_masks", "prune", "pruning_report"]


def _original_names(module: nn.Module) -> dict[str, str]:
    """Parameter name in the exported graph -> name under ``module`` (a parametrized weight
    ``conv.weight`` is stored as ``conv.parametrizations.weight.original``)."""
    out = {}
    for name, _ in module.named_parameters():
        m = re.fullmatch(r"(.*?\.)?parametrizations\.([^.]+)\.original", name)
        out[f"{m.group(1) or ''}{m.group(2)}" if m else name] = name
    return out


def compute_masks(
    module: nn.Module,
    input_shape,
    sparsity: float,
    method: str = "hapm",
    ranking: str | None = None,
    config=None,
    criterion: str = "l2",
    keep_first_last: bool = True,
    per_layer: dict | None = None,
    max_layer_sparsity: float | None = None,
) -> Masks:
    """Masks of ``module`` pruned to ``sparsity`` by the Relax pass of ``method``.

    Parameters
    ----------
    module : torch.nn.Module
        A float CNN (see :func:`~tvm_hapm.torch.export_onnx`); masks already applied to it are
        taken into account (their zeros have no importance).
    input_shape : tuple of int
        ``(batch, channels, height, width)``: the layers' output sizes set the schedules and the
        ``per_mac`` ranking.
    sparsity : float
        Target weight sparsity (``"filter"``: the fraction of channels removed).
    method : {"hapm", "unstructured", "filter"}
        HAPM hardware groups, unstructured magnitude, or whole filters.
    ranking : {"layer", "global", "per_mac"}, optional
        Where the pruning goes (see :func:`tvm_hapm.flow.prune_onnx`); default ``"per_mac"`` for
        HAPM, ``"layer"`` otherwise.
    config : HardwareConfig or str, optional
        The accelerator (a preset, a target tag such as ``"hapm_fpga-zedboard"``, or a JSON file).
    criterion : {"l1", "l2"}
        Group importance.
    keep_first_last : bool
        Leave the first and the last layer dense.
    per_layer : dict, optional
        Parameter name (``"layer1.0.conv1.weight"``) or module name (``"layer1.0.conv1"``) ->
        its own sparsity.
    max_layer_sparsity : float, optional
        HAPM with the ``global`` or ``per_mac`` ranking: no layer pruned beyond it (``per_mac``
        default :data:`tvm_hapm.flow.PER_MAC_MAX_LAYER_SPARSITY`).

    Returns
    -------
    Masks
    """
    from ..compress.flow import prune_onnx
    from ..target.config import get_config

    cfg = get_config(config)
    ranking = ranking or ("per_mac" if method == "hapm" else "layer")
    model = export_onnx(module, input_shape)
    weight_of = _weight_of_layer(model)
    if per_layer:
        relax_of = {w: lay for lay, w in weight_of.items()}
        relax_of.update({w.rpartition(".")[0]: lay for lay, w in weight_of.items()})
        unknown = sorted(set(per_layer) - set(relax_of))
        if unknown:
            raise KeyError(f"per_layer names {unknown} are not prunable layers of the module")
        per_layer = {relax_of[k]: v for k, v in per_layer.items()}
    _, report, masks = prune_onnx(
        model, method, sparsity, config=cfg, criterion=criterion, keep_first_last=keep_first_last,
        per_layer=per_layer, return_masks=True, ranking=ranking,
        max_layer_sparsity=max_layer_sparsity,
    )  # fmt: skip
    stored = _original_names(module)
    out = {}
    for name, mask in masks.items():
        if name not in stored:
            raise KeyError(f"the exported weight {name!r} is not a parameter of the module")
        param = module.get_parameter(stored[name])
        if tuple(mask.shape) != tuple(param.shape):
            raise ValueError(f"mask of {name} has shape {mask.shape}, parameter {param.shape}")
        out[name] = torch.from_numpy(np.ascontiguousarray(mask))
    for entry in report:
        entry["parameter"] = weight_of.get(entry.get("layer"))
    return Masks(out, method, ranking, cfg.name, report, tuple(int(d) for d in input_shape))


def _weight_of_layer(model) -> dict:
    """Relax layer name -> ONNX weight (parameter) name, in graph order, paired as the flow
    pairs them."""
    from tvm.relax.frontend.onnx import from_onnx

    from ..compress.flow import paired_weight_names
    from ..passes.prune import prunable_layers

    layers = prunable_layers(from_onnx(model))
    names = paired_weight_names(model, layers)
    return {lay["layer"]: w for lay, w in zip(layers, names)}


def prune(module: nn.Module, input_shape, sparsity: float, method: str = "hapm", **kwargs):
    """:func:`compute_masks` then :func:`apply_masks`; returns the :class:`Masks` (the module
    is changed in place).  ``kwargs`` go to :func:`compute_masks`."""
    masks = compute_masks(module, input_shape, sparsity, method, **kwargs)
    apply_masks(module, masks)
    return masks


def pruning_report(module: nn.Module, masks: Masks, level: str = "mid") -> list[dict]:
    """Per layer: parameter, kind, weights, sparsity, hardware groups removed (HAPM) and the
    cycles and energy the cost model predicts for the dense and the masked layer.

    Parameters
    ----------
    module : torch.nn.Module
        The module the masks were computed for.
    masks : Masks
        From :func:`compute_masks` / :func:`prune`.
    level : {"coarse", "mid", "fine"}
        Cost model (:mod:`tvm_hapm.cost`): operation counts, the analytical model, or the
        bundled XGBoost model.

    Returns
    -------
    list of dict
        One entry per prunable layer in graph order; ``cycles_saved`` is dense minus masked.
    """
    from ..cost import (
        BlockSparsity,
        CoarseModel,
        MidModel,
        layers_from_onnx,
        load_bundled_fine_model,
    )
    from ..target.config import get_config

    cfg = get_config(masks.config)
    model = export_onnx(module, masks.input_shape)
    conv_layers = layers_from_onnx(model)
    by_param = {e["parameter"]: e for e in masks.report if e.get("parameter")}
    weight_of = _weight_of_layer(model)
    params = _original_names(module)
    cost_model = {"coarse": CoarseModel, "mid": MidModel}.get(level)
    cost_model = cost_model() if cost_model else load_bundled_fine_model()
    items, rows = [], []
    for (relax_name, wname), cl in zip(weight_of.items(), conv_layers):
        w = module.get_parameter(params[wname]).detach().numpy()
        mask = masks.masks.get(wname)
        kept = w if mask is None else w * mask.numpy()
        oihw = [a if a.ndim == 4 else _dense_oihw(a, cl) for a in (np.ones_like(w), kept)]
        items += [(cl, cfg, None, BlockSparsity.from_weight(cl, cfg, a)) for a in oihw]
        entry = by_param.get(wname, {})
        rows.append({
            "parameter": wname,
            "layer": relax_name,
            "kind": "dense" if w.ndim == 2 else "conv2d",
            "weights": int(w.size),
            "sparsity": 0.0 if mask is None else 1.0 - int(mask.sum()) / mask.numel(),
            "groups_total": entry.get("groups_total"),
            "groups_removed": entry.get("groups_pruned"),
        })  # fmt: skip
    costs = cost_model.predict_many(items)
    for k, row in enumerate(rows):
        dense, pruned = costs[2 * k], costs[2 * k + 1]
        row.update({
            "cycles_dense": float(dense.cycles), "cycles": float(pruned.cycles),
            "cycles_saved": float(dense.cycles - pruned.cycles),
            "energy_uj_dense": float(dense.energy_uj), "energy_uj": float(pruned.energy_uj),
        })  # fmt: skip
    return rows


def _dense_oihw(w: np.ndarray, cl) -> np.ndarray:
    """A Linear weight ``(out, in)`` as the OIHW ``(out, in, 1, 1)`` the cost model reads."""
    mk = w if w.shape == (cl.cout, cl.cin) else w.T
    return mk[:, :, None, None]
