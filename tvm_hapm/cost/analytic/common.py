"""What the mid model's parts share: the result type, the default schedule, the energy model of a
config, and the round and store-bound arithmetic of a step."""

from __future__ import annotations

import dataclasses
from functools import lru_cache

import numpy as np

from ...runtime.energy import EnergyModel
from ...target.config import HardwareConfig
from ...target.schedule import ConvSchedule, plan_conv
from ..layer import ConvLayer

#: Event counts are truncated to integers (as the timing model's are) after scaling by this, so
#: that a count that is an integer in exact arithmetic stays one whatever the summation order
#: (expected counts of a sparsity fraction are fractional sums).
ROUND_UP = 1.0 + 1e-11


def schedule_dict(schedule) -> dict:
    """The schedule's knobs by field name (read generically: new knobs appear automatically)."""
    return {f.name: getattr(schedule, f.name) for f in dataclasses.fields(schedule)}


def default_schedule(layer: ConvLayer, cfg: HardwareConfig, mask=None) -> ConvSchedule:
    """``plan_conv``'s schedule of the layer (what the compiler picks)."""
    R, C = cfg.array_rows, cfg.array_cols
    cob, cib = -(-layer.cout // C), -(-layer.cin // R)
    return plan_conv(
        cfg, layer.h, layer.w, layer.oh, layer.ow, layer.kh, layer.kw, layer.strides,
        layer.dilation, cib, cob, mask,
    )  # fmt: skip


_ENERGY_MODELS: dict = {}


def energy_model_of(cfg: HardwareConfig) -> EnergyModel:
    """The :class:`EnergyModel` of ``cfg``, one per distinct config (every field: the table, the
    part, the clock and the RTL parameters all enter its energies)."""
    key = tuple(
        tuple(sorted(v.items())) if isinstance(v, dict) else v
        for v in (getattr(cfg, f.name) for f in dataclasses.fields(cfg))
    )
    em = _ENERGY_MODELS.get(key)
    if em is None:
        if len(_ENERGY_MODELS) > 256:
            _ENERGY_MODELS.clear()
        em = _ENERGY_MODELS[key] = EnergyModel(cfg)
    return em


@dataclasses.dataclass
class Analysis:
    """Quantities of one layer on one config and schedule (see :func:`analyze`)."""

    cycles: float
    energy_uj: float
    counts: dict  # event counts and structural quantities (features of the fine model)
    schedule: ConvSchedule


def fluid_rounds(n_p: np.ndarray, frac: float, A: int) -> np.ndarray:
    """Rounds of positions of ``n_p`` (structural, of which a fraction ``frac`` is expected
    zero) non-zero blocks on ``A`` arrays (see
    :func:`tvm_hapm.testing.mid_reference.position_rounds`)."""
    if frac:
        return np.maximum(n_p * (1.0 - frac), A) / A * (1.0 - frac**n_p)
    return np.where(n_p > 0, np.maximum(n_p, A), 0) / A


def store_bound(g_prev, st, A, gemm_one):
    """The fewest cycles of a double-buffered region whose previous region has ``g_prev`` output
    blocks, each stored in ``st`` cycles (latency and beats), on ``A`` arrays whose GEMMs take
    ``gemm_one`` cycles each.

    The store module stores one block at a time, so a region lasts at least its predecessor's
    stores.  And the stores cannot start early: the first ALU pass of the previous region's
    epilogue comes after the region's first dispatch, and its token (the one the store pops) is
    released only when the GEMMs issued before it are done; those GEMMs write the accumulator
    half of the region before, so each waits for that region's store of its output block.  A
    region therefore also lasts the stores of the ``min(g_prev, A)`` blocks of a dispatch plus a
    GEMM.  Either bound exceeds the GEMMs when a block's GEMMs are few (a small input-channel
    count, 1x1 kernels, small tiles): there the stores, not the ALU, pace the layer.
    """
    return np.maximum(g_prev * st, np.minimum(g_prev, A) * st + gemm_one)


@lru_cache(maxsize=4096)
def struct_position_counts(cout, cin, groups, kh, kw, R, C, G, K):
    """``n_p`` of the structural blocks per (group, input block) ``(n_cg, n_kc, K)`` (equal
    at every kernel position)."""
    from ..layer import structural_blocks

    s = structural_blocks(cout, cin, groups, 1, 1, R, C)[:, :, 0, 0]
    cob, cib = s.shape
    n_cg, n_kc = -(-cob // G), -(-cib // K)
    cnt = np.zeros((n_cg * G, n_kc * K))
    cnt[:cob, :cib] = s
    out = cnt.reshape(n_cg, G, n_kc, K).sum(axis=1)
    out.flags.writeable = False
    return out


@lru_cache(maxsize=16)
def _sched_fields_of(cls) -> tuple:
    return tuple(f.name for f in dataclasses.fields(cls))


def sched_field_names(schedule) -> tuple:
    return _sched_fields_of(type(schedule))
