"""The feature vector of the fine cost model: the one place that defines it.

A feature vector describes ``(layer, hardware config, schedule, weight-block sparsity)``:

* ``layer_*``: shapes (log2(1 + x) of channels, spatial sizes, kernel, stride, groups, MACs);
* ``hw_*``: the config (arrays, array shape, buffer depths, DRAM bandwidth and latency, widths);
* ``sched_*``: every field of :class:`~tvm_hapm.target.schedule.ConvSchedule`, read with
  ``dataclasses.fields`` (a new knob adds a feature; the names are stored with a trained model
  and checked on load), and the tile / group / chunk as fractions of the layer;
* ``sp_*``: the block sparsity and how the zero blocks fall on the schedule's steps (GEMM rounds
  per array, empty steps, imbalance);
* ``mid_*``: the mid model's quantities (tiles, steps, DMA, GEMM and epilogue cycles, bounds,
  its cycles and energy).

The fine model predicts ``log(simulated / mid)`` of cycles and of energy from this vector.
Bump :data:`FEATURE_SCHEMA_VERSION` whenever the meaning of a feature changes.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np

from ..target.config import HardwareConfig
from ..target.schedule import ConvSchedule
from .analytic import Analysis, BatchAnalysis, analyze, analyze_batch
from .layer import ConvLayer

__all__ = [
    "FEATURE_SCHEMA_VERSION",
    "feature_names",
    "features",
    "features_batch",
    "features_from_analysis",
    "features_from_batch",
]

#: Version of the feature definitions below; a saved fine model records it.
#: 3: mid model of the interleaved epilogues (c86fcdd); 4: mid model of the fused ADD_REQUANT
#: epilogue (one ALU pass per output block, the stores pacing it), whose ``mid_*`` features
#: and ``log(simulated / mid)`` targets differ
FEATURE_SCHEMA_VERSION = 4

_LAYER = ("cin", "cout", "h", "w", "oh", "ow", "kh", "kw", "stride", "groups", "macs", "params")
_HW = ("arrays", "rows", "cols", "inp_depth", "wgt_depth", "acc_depth", "bytes_per_cycle",
       "dram_latency", "act_bits", "weight_bits", "macs_per_cycle")  # fmt: skip
_SP = ("fraction", "round_efficiency", "empty_steps", "step_nnz_cv", "empty_cob_frac")
_MID_LOG = ("n_tiles", "steps", "n_cg", "n_kc", "gemms", "gemm_rounds", "mean_tile",
            "dram_read", "dram_write", "gemm_cycles", "load_cycles", "epi_cycles", "pre_cycles",
            "compute_bound", "memory_bound", "instructions", "mid_cycles",
            "mid_energy_uj")  # fmt: skip
_MID_RAW = ("resident", "partial_tile_frac", "pad_frac", "tile_classes")
_MID_FRAC = ("gemm_cycles", "load_cycles", "epi_cycles", "pre_cycles", "compute_bound",
             "memory_bound")  # fmt: skip


def _sched_fields() -> list[str]:
    return [f.name for f in dataclasses.fields(ConvSchedule)]


def feature_names() -> list[str]:
    """Names of the feature vector, in order (depends on the schedule's fields)."""
    names = [f"layer_{k}" for k in _LAYER] + ["layer_depthwise", "layer_dense"]
    names += [f"hw_{k}" for k in _HW]
    names += [f"sched_{k}" for k in _sched_fields()]
    names += ["sched_tile_h_frac", "sched_tile_w_frac", "sched_group_frac", "sched_chunk_frac"]
    names += [f"sp_{k}" for k in _SP]
    names += [f"mid_log_{k}" for k in _MID_LOG] + [f"mid_{k}" for k in _MID_RAW]
    names += [f"mid_frac_{k}" for k in _MID_FRAC]
    return names


def _l(x) -> float:
    return math.log2(1.0 + max(float(x), 0.0))


def features_from_analysis(layer: ConvLayer, cfg: HardwareConfig, analysis: Analysis) -> np.ndarray:
    """The feature vector, given the mid model's analysis of the same layer."""
    c = analysis.counts
    sched = analysis.schedule
    R, C = cfg.array_rows, cfg.array_cols
    cob, cib = -(-layer.cout // C), -(-layer.cin // R)
    v = [
        _l(layer.cin), _l(layer.cout), _l(layer.h), _l(layer.w), _l(layer.oh), _l(layer.ow),
        float(layer.kh), float(layer.kw), float(layer.strides[0]), _l(layer.groups),
        _l(layer.macs), _l(layer.params), float(layer.depthwise),
        float(layer.h == layer.w == layer.kh == layer.kw == 1),
        float(cfg.num_arrays), float(R), float(C), _l(cfg.inp_depth), _l(cfg.wgt_depth),
        _l(cfg.acc_depth), _l(cfg.dram_bytes_per_cycle), _l(cfg.dram_latency_cycles),
        float(cfg.act_bits), float(cfg.weight_bits), _l(cfg.macs_per_cycle),
    ]  # fmt: skip
    for name in _sched_fields():
        v.append(_l(float(getattr(sched, name))))
    v += [
        min(sched.tile_h, layer.oh) / layer.oh,
        min(sched.tile_w, layer.ow) / layer.ow,
        min(sched.cob_group, cob) / cob,
        min(sched.cib_chunk, cib) / cib,
        c["sparsity"],
        c["round_efficiency"],
        c["empty_steps"],
        c["step_nnz_cv"],
        c["empty_cob"] / cob,
    ]
    v += [_l(c[k]) for k in _MID_LOG]
    v += [float(c[k]) for k in _MID_RAW]
    mid = max(c["mid_cycles"], 1.0)
    v += [c[k] / mid for k in _MID_FRAC]
    return np.asarray(v, dtype=np.float32)


def features(
    layer: ConvLayer,
    cfg: HardwareConfig,
    schedule: ConvSchedule | None = None,
    sparsity=None,
) -> np.ndarray:
    """The feature vector of ``(layer, cfg, schedule, sparsity)`` (float32, see
    :func:`feature_names`)."""
    return features_from_analysis(layer, cfg, analyze(layer, cfg, schedule, sparsity))


def features_from_batch(ba: BatchAnalysis, query_order: bool = True) -> np.ndarray:
    """The ``(n, features)`` float32 matrix of a batch analysis: row ``i`` equals
    :func:`features_from_analysis` of query ``i`` (to float rounding).

    The columns are stacked from the analysis' arrays (in the order the batch computed them,
    ``ba.raw``), the ``log2(1 + x)`` ones transformed in one pass, and the rows put in the
    queries' order (``query_order=False``: left in ``ba.raw``'s order)."""
    _, _, c, q = ba.raw
    cin, cout, groups, kh, kw = q["cin"], q["cout"], q["groups"], q["kh"], q["kw"]
    oh, ow, cob, cib = q["oh"], q["ow"], q["cob"], q["cib"]
    one = (q["h"] == 1) & (q["w"] == 1) & (kh == 1) & (kw == 1)
    rows = [cin, cout, q["h"], q["w"], oh, ow, kh, kw, q["stride"], groups, c["macs_dense"],
            cout * (cin // groups) * kh * kw, (groups > 1) & (groups == cin), one, q["arrays"],
            q["rows"], q["cols"], q["inp_depth"], q["wgt_depth"], q["acc_depth"],
            q["bytes_per_cycle"], q["dram_latency"], q["act_bits"], q["weight_bits"],
            q["macs_per_cycle"]]  # fmt: skip
    rows += [q[f"sched_{name}"] for name in _sched_fields()]
    rows += [
        np.minimum(q["sched_tile_h"], oh) / oh,
        np.minimum(q["sched_tile_w"], ow) / ow,
        np.minimum(q["sched_cob_group"], cob) / cob,
        np.minimum(q["sched_cib_chunk"], cib) / cib,
        c["sparsity"],
        c["round_efficiency"],
        c["empty_steps"],
        c["step_nnz_cv"],
        c["empty_cob"] / cob,
    ]
    rows += [c[k] for k in _MID_LOG]
    rows += [c[k] for k in _MID_RAW]
    mid = np.maximum(c["mid_cycles"], 1.0)
    rows += [c[k] / mid for k in _MID_FRAC]
    M = np.stack(rows).astype(np.float64, copy=False)
    lg = _log_rows()
    M[lg] = np.log2(1.0 + np.maximum(M[lg], 0.0))
    X = np.ascontiguousarray(M.T, dtype=np.float32)  # C order: the trees read rows
    return ba.to_query_order(X) if query_order else X


@functools.lru_cache(maxsize=1)
def _log_rows() -> np.ndarray:
    """Rows of :func:`features_from_batch`'s stack that are ``log2(1 + x)`` features."""
    plain = {"layer_kh", "layer_kw", "layer_stride", "layer_depthwise", "layer_dense",
             "hw_arrays", "hw_rows", "hw_cols", "hw_act_bits", "hw_weight_bits"}  # fmt: skip
    logged = [
        i
        for i, name in enumerate(feature_names())
        if (name.startswith(("layer_", "hw_", "sched_", "mid_log_")) and name not in plain)
        and not name.endswith("_frac")
    ]
    return np.array(logged, np.int64)


def features_batch(queries) -> tuple[np.ndarray, np.ndarray]:
    """Feature matrix ``(n, features)`` and the mid model's ``(n, 2)`` cycles and energy of
    ``(layer, cfg, schedule, sparsity)`` queries (one vectorised pass, :func:`analyze_batch`)."""
    ba = analyze_batch(queries)
    return features_from_batch(ba), np.stack([ba.cycles, ba.energy_uj], axis=1)
