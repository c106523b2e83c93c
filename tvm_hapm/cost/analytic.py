"""Closed-form analysis of a convolution's instruction stream (the mid-level cost model).

:func:`analyze` follows :func:`tvm_hapm.target.codegen.conv2d_program` without generating the
program: it groups the output tiles into classes of equal shape (first / middle / last tile of
each dimension), counts the GEMMs of every (output-channel group, input-channel chunk) *step*
from the non-zero block mask, and prices each step with the costs of ``docs/timing.md``:

* a step's DMA (input chunk, weight chunk unless the weights are resident, the bias vectors)
  is serial with its GEMMs, because the input and weight buffers are single-buffered and the
  dependency tokens order a reload after the GEMMs that read the previous contents; with a
  ``double_buffer`` schedule knob (when the schedule has one) the loads overlap the previous
  step's compute (``max`` instead of ``sum``);
* the GEMMs of a step spread round-robin over the arrays: ``ceil(n / A)`` rounds of
  ``2R + C - 2 + T`` cycles each, plus the issue skew;
* the epilogue (bias ADD, REQUANT, clip) waits for all GEMMs; the stores of a step overlap the
  next step's loads on the shared DRAM port, except the last one;
* all-zero blocks cost nothing (the code generator drops them).

The event counts (MACs, buffer and DRAM bytes, ALU lanes) are exact for the mask given and feed
:class:`tvm_hapm.runtime.energy.EnergyModel`, so the mid energy differs from the simulator's
only through the latency (static energy).
"""

from __future__ import annotations

import dataclasses
import math
from functools import lru_cache

import numpy as np

from ..runtime.energy import EnergyModel
from ..runtime.timing import ALU_LATENCY, TimingResult
from ..target.config import HardwareConfig
from ..target.schedule import ConvSchedule, plan_conv
from .layer import BlockSparsity, ConvLayer, structural_mask

__all__ = ["Analysis", "analyze", "default_schedule", "schedule_dict"]

_MAX_X = (1 << 12) - 1


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


def _positions(out: int, tile: int, stride: int, k: int, dil: int, pad_lo: int, size: int):
    """Tile classes of one dimension: {(t, t_in, in_bounds): count}."""
    classes: dict = {}
    for o0 in range(0, out, tile):
        t = min(tile, out - o0)
        t_in = (t - 1) * stride + (k - 1) * dil + 1
        i0 = o0 * stride - pad_lo
        lo = max(0, -i0)
        hi = max(0, i0 + t_in - size)
        key = (t, t_in, t_in - lo - hi)
        classes[key] = classes.get(key, 0) + 1
    return classes


@lru_cache(maxsize=4096)
def _positions_cached(out, tile, stride, k, dil, pad_lo, size):
    return tuple(_positions(out, tile, stride, k, dil, pad_lo, size).items())


_ENERGY_MODELS: dict = {}


def _energy_model(cfg: HardwareConfig) -> EnergyModel:
    key = (
        cfg.act_bits, cfg.weight_bits, cfg.inp_buffer_bytes, cfg.wgt_buffer_bytes,
        cfg.acc_buffer_bytes, cfg.macs_per_cycle, tuple(sorted(cfg.energy.items())),
    )  # fmt: skip
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


def analyze(
    layer: ConvLayer,
    cfg: HardwareConfig,
    schedule: ConvSchedule | None = None,
    sparsity: BlockSparsity | float | np.ndarray | None = None,
) -> Analysis:
    """Mid-level analysis: cycles, energy and the counts behind them."""
    R, C, A = cfg.array_rows, cfg.array_cols, cfg.num_arrays
    B, L = cfg.dram_bytes_per_cycle, cfg.dram_latency_cycles
    ab, wb = cfg.act_bytes, cfg.weight_bytes
    inp_b, wgt_b, acc_b = R * ab, R * C * wb, C * 4
    struct = structural_mask(layer, cfg)
    cob, cib = struct.shape[:2]

    # ---- non-zero blocks per (cob, cib): exact from a mask, else expected from a fraction
    if isinstance(sparsity, np.ndarray):
        per_cc = (np.asarray(sparsity, bool) & struct).sum(axis=(2, 3)).astype(float)
        frac = 1.0 - per_cc.sum() / max(struct.sum(), 1)
    elif isinstance(sparsity, BlockSparsity) and sparsity.mask is not None:
        per_cc = (np.asarray(sparsity.mask, bool) & struct).sum(axis=(2, 3)).astype(float)
        frac = 1.0 - per_cc.sum() / max(struct.sum(), 1)
    else:
        if isinstance(sparsity, BlockSparsity):
            frac = float(sparsity.fraction)
        else:
            frac = float(sparsity or 0.0)
        per_cc = struct.sum(axis=(2, 3)).astype(float) * (1.0 - frac)
    exact = not (frac > 0 and per_cc is not None and not _is_int(per_cc))
    if schedule is None:
        schedule = default_schedule(layer, cfg)
    knobs = schedule_dict(schedule)
    TH, TW = schedule.tile_h, schedule.tile_w
    G, K = max(1, schedule.cob_group), max(1, schedule.cib_chunk)
    dbuf = bool(knobs.get("double_buffer", False))

    # ---- steps: (cg, kc) chunk sums
    n_cg, n_kc = -(-cob // G), -(-cib // K)
    pad_cob, pad_cib = n_cg * G - cob, n_kc * K - cib
    blk = np.pad(per_cc, ((0, pad_cob), (0, pad_cib)))
    steps = blk.reshape(n_cg, G, n_kc, K).sum(axis=(1, 3))  # non-zero blocks per step
    gsz = np.minimum(G, cob - np.arange(n_cg) * G)  # output blocks per group
    ksz = np.minimum(K, cib - np.arange(n_kc) * K)  # input blocks per chunk
    nnz = float(blk.sum())
    if exact:
        rounds = np.ceil(steps / A)
    else:  # expected rounds of a binomial count, approximated smoothly
        rounds = np.where(steps > 0, np.ceil(np.maximum(steps, 1e-9) / A), 0.0)
        rounds = np.maximum(steps / A, rounds - 0.5 * (1 - (steps % A) / A) * (steps % A > 0))
    skew = np.where(steps > 0, np.minimum(steps, A) - 1, 0)
    # output blocks whose every weight is zero (an extra MUL by 0 each tile)
    empty_cob = float((per_cc.sum(axis=1) == 0).sum()) if exact else 0.0
    resident = nnz <= cfg.wgt_depth
    one_step = n_cg * n_kc == 1

    # weight DMA cycles of each step (non-resident) and of the resident load
    def wload(nblocks):
        nblocks = np.asarray(nblocks, float)
        first = np.minimum(nblocks, _MAX_X)
        rest = nblocks - first
        beats = np.ceil(nblocks * wgt_b / B)
        return beats + L * ((nblocks > 0).astype(float) + (rest > 0))

    w_step = wload(steps) if not resident else np.zeros_like(steps)
    w_once = float(wload(nnz)) if resident else 0.0
    if not resident and one_step:
        w_once, w_step = float(w_step[0, 0]), np.zeros_like(steps)

    # ---- tile classes
    pt, pl, pb, pr = layer.padding
    hcl = _positions_cached(
        layer.oh, TH, layer.strides[0], layer.kh, layer.dilation[0], pt, layer.h
    )
    wcl = _positions_cached(
        layer.ow, TW, layer.strides[1], layer.kw, layer.dilation[1], pl, layer.w
    )
    th = np.array([k[0] for k, _ in hcl], float)
    thi = np.array([k[1] for k, _ in hcl], float)
    rows = np.array([k[2] for k, _ in hcl], float)
    hc = np.array([c for _, c in hcl], float)
    tw = np.array([k[0] for k, _ in wcl], float)
    twi = np.array([k[1] for k, _ in wcl], float)
    cols = np.array([k[2] for k, _ in wcl], float)
    wc = np.array([c for _, c in wcl], float)
    t = np.outer(th, tw).ravel()
    data = np.outer(rows, cols).ravel()
    padded = np.outer(thi, twi).ravel()
    cnt = np.outer(hc, wc).ravel() * layer.n
    n_tiles = float(cnt.sum())
    pix = float((cnt * t).sum())  # = n * oh * ow

    ld_in = L + np.ceil(data * inp_b / B) + (padded - data)  # one input-block load
    st = L + np.ceil(t * C * ab / B)  # one output-block store
    clip_ops = 1  # ReLU: MAX only (the dataset's convention)
    n_alu = 2 + clip_ops
    alu_one = ALU_LATENCY + t
    g0 = 2 * R + C - 2

    # ---- per tile: sum over steps (vectorised over tile classes x steps)
    ks = ksz[None, :]  # (1, n_kc)
    inp_loaded = np.ones((n_cg, n_kc)) if n_kc > 1 else np.r_[1.0, np.zeros(n_cg - 1)][:, None]
    in_dma = ld_in[:, None, None] * (inp_loaded * ks)[None]  # (classes, n_cg, n_kc)
    wdma = w_step[None]
    bias = (L + np.ceil(2 * gsz * C * 4 / B))[None, :, None] * (np.arange(n_kc) == 0)[None, None]
    gemm = rounds[None] * (g0 + t[:, None, None]) + skew[None]
    load_seq = in_dma + wdma
    # the first chunk of a group also waits for the previous group's last store
    prev_store = np.zeros((1, n_cg, n_kc))
    prev_store[:, :, 0] = 1.0
    waits = np.maximum(bias, prev_store * st[:, None, None])
    # a step without GEMMs does not wait for its loads (nothing on chip reads them)
    pre = np.where(steps[None] > 0, np.maximum(load_seq, waits), waits)
    if dbuf:
        step = np.maximum(pre, gemm)
    else:
        step = pre + gemm
    epi = (gsz[None, :] * n_alu * alu_one[:, None]).sum(axis=1)  # ALU over groups
    epi = epi + (empty_cob / max(n_cg, 1)) * alu_one  # MUL of empty output blocks (rough)
    tile_cycles = step.sum(axis=(1, 2)) + epi
    cycles = float((cnt * tile_cycles).sum()) + w_once + float(st[-1]) + 1.0
    # the load module alone (its loads are serial) bounds the run from below
    load_module = float((cnt[:, None, None] * load_seq).sum()) + w_once
    cycles = max(cycles, load_module + float(st[-1]) + 1.0)

    # ---- event counts (exact for an exact mask)
    macs = nnz * R * C * pix
    gemms = nnz * n_tiles
    inp_loads = float((cnt * padded).sum()) * (ksz.sum() if n_kc > 1 else cib)
    inp_loads *= n_cg if n_kc > 1 else 1
    inp_dram = float((cnt * data).sum()) * inp_b * (cib * (n_cg if n_kc > 1 else 1))
    if resident or one_step:
        w_blocks_loaded = nnz
    else:
        w_blocks_loaded = nnz * n_tiles
    bias_bytes = 2 * cob * C * 4 * n_tiles
    out_bytes = cob * C * ab * pix
    dram_read = inp_dram + w_blocks_loaded * wgt_b + bias_bytes
    started = cob - empty_cob
    acc_reads = (nnz - started) * pix * acc_b  # GEMMs that accumulate
    acc_reads += cob * pix * acc_b * (n_alu + 2)  # ALU dst reads + ADD/REQUANT operands
    acc_reads += cob * pix * acc_b  # STORE
    acc_writes = nnz * pix * acc_b + cob * pix * acc_b * n_alu + bias_bytes
    acc_reads += empty_cob * pix * acc_b
    acc_writes += empty_cob * pix * acc_b
    add_lanes = cob * pix * C * (1 + clip_ops)
    mul_lanes = cob * pix * C + empty_cob * pix * C
    latency_ms = cycles / cfg.clock_mhz / 1e3
    tr = TimingResult(
        cycles=int(cycles), latency_ms=latency_ms, macs=int(macs),
        dram_bytes_read=int(dram_read), dram_bytes_written=int(out_bytes),
        buffer_reads={"inp": pix * nnz * inp_b, "wgt": gemms * wgt_b, "acc": acc_reads},
        buffer_writes={"inp": inp_loads * inp_b, "wgt": w_blocks_loaded * wgt_b, "acc": acc_writes},
        alu_add_lanes=int(add_lanes), alu_mul_lanes=int(mul_lanes),
    )  # fmt: skip
    energy = _energy_model(cfg).estimate(tr).total_uj

    gemm_total = float((cnt[:, None, None] * gemm).sum())
    load_total = float((cnt[:, None, None] * load_seq).sum()) + w_once
    epi_total = float((cnt * epi).sum())
    struct_blocks = float(struct.sum())
    counts = {
        "macs_dense": float(layer.macs),
        "macs": macs,
        "struct_blocks": struct_blocks,
        "nnz_blocks": nnz,
        "sparsity": float(frac),
        "n_tiles": n_tiles,
        "tile_classes": float(len(t)),
        "n_cg": float(n_cg),
        "n_kc": float(n_kc),
        "steps": float(n_cg * n_kc),
        "resident": float(resident),
        "gemms": gemms,
        "gemm_rounds": float(rounds.sum()) * n_tiles,
        "round_efficiency": float(steps.sum() / max(A * rounds.sum(), 1e-9)),
        "empty_steps": float((steps == 0).sum()) / (n_cg * n_kc),
        "step_nnz_cv": float(steps.std() / max(steps.mean(), 1e-9)),
        "empty_cob": empty_cob,
        "mean_tile": pix / max(n_tiles, 1),
        "partial_tile_frac": float((cnt * (t < TH * TW)).sum()) / max(n_tiles, 1),
        "pad_frac": float((cnt * (padded - data)).sum() / max((cnt * padded).sum(), 1)),
        "dram_read": dram_read,
        "dram_write": out_bytes,
        "gemm_cycles": gemm_total,
        "load_cycles": load_total,
        "epi_cycles": epi_total,
        "pre_cycles": float((cnt[:, None, None] * pre).sum()),
        "compute_bound": float(macs / cfg.macs_per_cycle),
        "memory_bound": float((dram_read + out_bytes) / B),
        "instructions": float(
            n_tiles * (cib * (n_cg if n_kc > 1 else 1) + cob * (n_alu + 1) + n_cg) + gemms
        ),
        "mid_cycles": cycles,
        "mid_energy_uj": energy,
    }
    return Analysis(cycles=cycles, energy_uj=energy, counts=counts, schedule=schedule)


def _is_int(a: np.ndarray) -> bool:
    return bool(np.all(np.abs(a - np.round(a)) < 1e-9))


def log2p(x: float) -> float:
    return math.log2(1.0 + max(float(x), 0.0))
