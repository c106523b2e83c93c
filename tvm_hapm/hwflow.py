"""HW-Flow: search per-layer HAPM pruning ratios that minimise latency or energy under an accuracy
budget, with the hardware judged at a chosen abstraction level.  See ``docs/hwflow.md``.

``optimize(model, data, config, objective, max_accuracy_drop, level, method, ...)`` returns an
:class:`OptimizeResult`.  Pieces:

* :class:`HWFlowEnv`: the layers of the model (``prunable_layers`` of the ``from_onnx`` module),
  HAPM masks of every layer at every ratio of a grid (one :func:`HardwareAwarePrune` run per grid
  ratio; a layer's mask depends only on its own ratio, so any per-layer combination is exactly
  what ``per_layer=`` gives), per-layer hardware cost tables at the chosen level (coarse / mid /
  fine cost models on each layer's exact block mask; ``sim``: compile + one simulated image per
  grid ratio, per-program cycles and energy) and an accuracy estimate (float top-1 of a NumPy
  forward of the ONNX graph on a fixed validation split of the *training* data, after optional
  BN recalibration and an optional short ``train.finetune``).
* Search methods with the same evaluation budget: ``"rl"`` (AMC-style sequential Gaussian policy,
  REINFORCE with a moving baseline, numpy), ``"greedy"`` (latency saliency) and ``"evolution"``.
* :func:`finalize`: the winner pruned with ``HardwareAwarePrune(per_layer=...)`` into ONNX,
  fine-tuned, int8 test accuracy and simulated latency / energy.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from . import flow
from .flow import simulate  # re-exported: HW-Flow's sim level and finalize use it
from .numpynet import NumpyNet  # the search's accuracy estimate (re-exported)

__all__ = [
    "ALLOCATIONS",
    "LEVELS",
    "METHODS",
    "OBJECTIVES",
    "Candidate",
    "HWFlowEnv",
    "NumpyNet",
    "OptimizeResult",
    "finalize",
    "optimize",
    "pareto_plot",
    "prune_onnx_per_layer",
    "simulate",
    "validation_split",
]

LEVELS = ("coarse", "mid", "fine", "sim")
OBJECTIVES = ("latency", "energy")
METHODS = ("rl", "greedy", "evolution", "uniform", "per_mac")
# Network-wide allocations a search can start from (HWFlowEnv.allocation): every layer at one
# ratio, or HAPM's latency-aware ranking (importance per MAC saved, flow.prune_onnx
# ranking="per_mac")
ALLOCATIONS = ("uniform", "per_mac")
DEFAULT_GRID = tuple(np.round(np.arange(0.0, 0.91, 0.1), 2))
#: Ridge of the candidates' least-squares reconstruction (relative to the Gram diagonal), as
#: :func:`tvm_hapm.reconstruct.reconstruct`.  0.1 kept ResNet-56's refitted weights at 80% HAPM
#: int8-friendly (97.8% float, 97.6% with int8 weights, against 97.3% / 95.8% at 1e-3) but cost
#: ResNet-20 at 70% 0.7 point of int8 test accuracy, so the default stays and the accuracy
#: estimate sees int8 weights instead (``int8_weights``).
RECONSTRUCT_RIDGE = 1e-3
# images per batch of int8_accuracy, and the calibration images of its quantized model
INT8_EVAL_BATCH = 150


def validation_split(n: int, val_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(validation indices, the rest)`` of ``n`` training images: the seeded split
    :class:`HWFlowEnv` measures accuracy on (a model trained without the first part sees it
    for the first time there)."""
    order = np.random.default_rng(seed).permutation(n)
    return order[:val_size], order[val_size:]


# ------------------------------------------------------------------------------ pruning (ONNX)
def _layer_initializers(model: onnx.ModelProto, mod=None):
    """``(prunable layer records, ONNX weight names)`` in the same order, shapes checked."""
    from tvm.relax.frontend.onnx import from_onnx

    from .flow import paired_weight_names
    from .passes.prune import prunable_layers

    mod = from_onnx(model) if mod is None else mod
    layers = prunable_layers(mod)
    return layers, paired_weight_names(model, layers), mod


def prune_onnx_per_layer(model: onnx.ModelProto, ratios: dict, config=None, criterion="l2"):
    """Prune ``model`` with ``HardwareAwarePrune(0, config, per_layer=ratios)`` and write the
    zeros back into the ONNX initializers.  Returns ``(pruned ONNX, report, masks by ONNX
    weight name)``."""
    from .flow import prune_onnx

    ratios = {k: float(v) for k, v in ratios.items() if float(v) > 0}
    return prune_onnx(
        model,
        "hapm",
        0.0,
        config,
        criterion,
        keep_first_last=False,
        per_layer=ratios,
        return_masks=True,
    )


# ------------------------------------------------------------------------------ deployment
def int8_accuracy(
    model: onnx.ModelProto, config, x_cal, x, y, batch: int = INT8_EVAL_BATCH, percentile=None,
    engine: str = "auto",
) -> float:  # fmt: skip
    """Top-1 (a fraction) of the int8 model on every image of ``x``: :func:`tvm_hapm.flow.
    int8_accuracy` calibrated on the first ``batch`` images of ``x_cal`` (the calibration of
    the executable ``hapm optimize`` writes); ``percentile``: the quantizer's."""
    return flow.int8_accuracy(
        model, x_cal[:batch], x, y, config, percentile, engine=engine
    ).accuracy


# ------------------------------------------------------------------------------ environment
@dataclass
class Candidate:
    """One evaluated per-layer ratio vector."""

    ratios: tuple
    accuracy: float
    drop: float  # accuracy points (percent) lost on the validation split
    cycles: float
    energy_uj: float
    latency_ms: float
    feasible: bool
    reward: float
    method: str = ""
    index: int = 0

    def to_dict(self) -> dict:
        return {
            "ratios": [float(r) for r in self.ratios],
            "accuracy": self.accuracy,
            "drop": self.drop,
            "latency_ms": self.latency_ms,
            "energy_uj": self.energy_uj,
            "feasible": self.feasible,
            "reward": self.reward,
            "index": self.index,
        }


class HWFlowEnv:
    """Per-layer pruning environment (see the module docstring).

    Parameters
    ----------
    model : onnx.ModelProto
        Float classifier (any batch; batch 1 is used for the hardware).
    data : tuple
        ``(x_train, y_train)``; a fixed ``val_size`` subset (seeded) is the validation split
        the accuracy is measured on, the rest is used for BN recalibration / fine-tuning.
    reconstruct : bool
        Recover each candidate with layer-wise least-squares reconstruction
        (:func:`tvm_hapm.reconstruct.reconstruct`, on ``recal_size`` images of the non-validation
        split) before measuring its accuracy, instead of BN recalibration alone.  HAPM groups
        remove whole blocks of inputs, which costs far more accuracy before recovery than after
        it; judging candidates unrecovered steers the search away from what fine-tuning would
        make feasible.  About 10 s per new candidate for ResNet-20.
    reconstruct_ridge : float
        Ridge of the reconstruction (:data:`RECONSTRUCT_RIDGE`).
    int8_weights : bool
        Measure accuracy with every prunable weight rounded to the accelerator's weight grid
        per output channel, as the quantizer does (batch norm folding scales a channel, which
        does not change its rounding): a reconstruction that refits a heavily pruned layer can
        leave outliers that only int8 reveals.
    calibration_percentile : float, optional
        The quantizer's activation calibration for :func:`finalize`'s int8 accuracy (None: the
        maximum; see :data:`tvm_hapm.passes.quantize.DEFAULT_PERCENTILE`).
    engine : {"auto", "torch", "tvm"}
        What measures accuracy and fine-tunes (:func:`tvm_hapm.flow.resolve_engine`): PyTorch
        (:class:`tvm_hapm.torch.OnnxModule`, :func:`tvm_hapm.flow.finetune`) when installed,
        else NumPy and TVM.  Reconstruction and batch-norm recalibration run in NumPy.
    val_data : tuple, optional
        ``(x_val, y_val)``: a validation split of its own (e.g. Fashion-MNIST's) instead of
        ``val_size`` images taken out of ``data``; all of ``data`` is then used for recovery.
    """

    def __init__(
        self,
        model: onnx.ModelProto,
        data,
        config=None,
        objective: str = "latency",
        max_accuracy_drop: float = 1.0,
        level: str = "fine",
        grid=DEFAULT_GRID,
        val_size: int = 300,
        recalibrate_bn: bool = True,
        recal_size: int = 256,
        finetune_steps: int = 0,
        finetune_lr: float | None = None,
        skip=(),
        seed: int = 0,
        penalty: float = 1.0,
        fine_model=None,
        reconstruct: bool = False,
        reconstruct_rows: int = 4096,
        calibration_percentile: float | None = None,
        reconstruct_ridge: float = RECONSTRUCT_RIDGE,
        int8_weights: bool = True,
        engine: str = "auto",
        val_data=None,
    ):
        from .data import set_batch
        from .target.config import get_config

        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
        if level not in LEVELS:
            raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
        self.config = get_config(config)
        self.model = set_batch(model, 1)
        self.objective, self.level = objective, level
        self.budget = float(max_accuracy_drop)
        self.grid = np.asarray(sorted(set(float(g) for g in grid)), float)
        if self.grid[0] != 0.0 or self.grid[-1] >= 1.0:
            raise ValueError("the ratio grid must start at 0 and stay below 1")
        self.penalty = float(penalty)
        self.finetune_steps, self.finetune_lr = int(finetune_steps), finetune_lr
        self.engine = flow.resolve_engine(engine)
        self.recalibrate_bn = bool(recalibrate_bn)
        self.reconstruct = bool(reconstruct)
        self.reconstruct_rows = int(reconstruct_rows)
        self.calibration_percentile = calibration_percentile
        self.reconstruct_ridge = float(reconstruct_ridge)
        self.int8_weights = bool(int8_weights)
        self._recovered: dict = {}  # ratio indices -> reconstructed ONNX model
        self.seed = int(seed)
        x, y = data
        if val_data is None:
            val, rest = validation_split(len(x), val_size, seed)
            self.x_val, self.y_val = x[val], y[val]
            self.x_tune, self.y_tune = x[rest], y[rest]
        else:
            self.x_val, self.y_val = val_data
            self.x_tune, self.y_tune = x, y
        self.x_recal = self.x_tune[:recal_size]
        self.net = NumpyNet(self.model)
        self.layers, self.weight_names, self._mod = _layer_initializers(self.model)
        self.names = [lay["layer"] for lay in self.layers]
        self.skip = set(skip)
        self._build_masks()
        self._build_features()
        self.fine_model = fine_model
        t0 = time.perf_counter()
        self.tables = {}
        self.table(level)
        self.table_seconds = time.perf_counter() - t0
        self._acc_cache: dict = {}
        self._allocations: dict = {}  # (allocation, grid index) -> ratio indices or None
        self.history: list[Candidate] = []
        self.dense_accuracy = self._accuracy(tuple([0] * self.n))
        self.dense_cost = self.cost(tuple([0] * self.n))

    # -- layers, masks, features ------------------------------------------------------------
    @property
    def n(self) -> int:
        return len(self.names)

    def _build_masks(self):
        from .passes.prune import HardwareAwarePrune, pruning_masks

        self.weights = {w: self.net.inits[w] for w in self.weight_names}
        self.masks = [[None] * len(self.grid) for _ in range(self.n)]
        for gi, r in enumerate(self.grid):
            if r == 0:
                for li, w in enumerate(self.weight_names):
                    self.masks[li][gi] = np.ones(self.weights[w].shape, bool)
                continue
            m = pruning_masks(HardwareAwarePrune(float(r), self.config)(self._mod))
            for li, name in enumerate(self.names):
                self.masks[li][gi] = np.asarray(m[name], bool)
        # a ratio index is allowed for a layer unless the layer is skipped
        self.max_index = np.array(
            [0 if nm in self.skip else len(self.grid) - 1 for nm in self.names], int
        )

    def _build_features(self):
        from .cost import layers_from_onnx

        self.conv_layers = layers_from_onnx(self.model)
        if len(self.conv_layers) != self.n:
            raise ValueError("cost-model layers and prunable layers differ in number")
        macs = np.array([cl.macs for cl in self.conv_layers], float)
        params = np.array([cl.params for cl in self.conv_layers], float)
        self.flops_share, self.params_share = macs / macs.sum(), params / params.sum()
        rows = []
        for i, (lay, cl) in enumerate(zip(self.layers, self.conv_layers)):
            rows.append(
                [
                    i / max(self.n - 1, 1),
                    1.0 if lay["kind"] == "dense" else 0.0,
                    np.log2(cl.cin) / 10,
                    np.log2(cl.cout) / 10,
                    cl.kh / 7,
                    cl.strides[0] / 2,
                    self.flops_share[i],
                    self.params_share[i],
                ]
            )
        self.static_features = np.asarray(rows, float)

    def _oihw(self, li, w):
        cl = self.conv_layers[li]
        if w.ndim == 4:
            return w
        if w.shape == (cl.cout, cl.cin):
            return w[:, :, None, None]
        return w.T[:, :, None, None]

    # -- hardware cost tables ---------------------------------------------------------------
    def table(self, level: str) -> np.ndarray:
        """``(layers, grid, 2)`` cycles and energy of every layer at every grid ratio, plus a
        constant for what is not a prunable layer (``self.tables[level + "_other"]``)."""
        if level in self.tables:
            return self.tables[level]
        from .cost import BlockSparsity, CoarseModel, MidModel, load_bundled_fine_model

        t = np.zeros((self.n, len(self.grid), 2))
        other = np.zeros(2)
        if level == "sim":
            t, other = self._sim_table()
        else:
            model = {"coarse": CoarseModel, "mid": MidModel}.get(level)
            if model is not None:
                model = model()
            else:
                model = self.fine_model or load_bundled_fine_model()
            items, where = [], []
            for li, cl in enumerate(self.conv_layers):
                w = self.weights[self.weight_names[li]]
                for gi in range(len(self.grid)):
                    oihw = self._oihw(li, np.where(self.masks[li][gi], w, 0))
                    items.append(
                        (cl, self.config, None, BlockSparsity.from_weight(cl, self.config, oihw))
                    )
                    where.append((li, gi))
            for (li, gi), c in zip(where, model.predict_many(items)):
                t[li, gi] = (c.cycles, c.energy_uj)
        self.tables[level] = t
        self.tables[level + "_other"] = other
        return t

    def _sim_table(self):
        """Simulate the model pruned uniformly at every grid ratio; program ``k`` of the conv /
        dense programs is prunable layer ``k`` (layers run one after the other, so a layer's
        cost depends only on its own mask).  Non-layer programs give the constant."""
        t = np.zeros((self.n, len(self.grid), 2))
        other = np.zeros(2)
        for gi, r in enumerate(self.grid):
            m = self.model
            if r > 0:
                m, _, _ = prune_onnx_per_layer(
                    self.model, {nm: r for nm in self.names}, self.config
                )
            per = simulate(m, self.config, self.x_tune, self.x_val)[3]
            lay = [(c, e) for nm, c, e in per if "conv2d" in nm or "dense" in nm or "matmul" in nm]
            if len(lay) != self.n:
                raise RuntimeError(f"simulated {len(lay)} layer programs for {self.n} layers")
            t[:, gi] = lay
            if gi == 0:
                other = np.array([sum(c for _, c, _ in per), sum(e for _, _, e in per)]) - t[
                    :, 0
                ].sum(0)
        return t, other

    def cost(self, idx, level: str | None = None) -> tuple[float, float]:
        """``(cycles, energy_uj)`` of ratio indices ``idx`` at ``level``."""
        t = self.table(level or self.level)
        other = self.tables[(level or self.level) + "_other"]
        c = t[np.arange(self.n), np.asarray(idx, int)].sum(0) + other
        return float(c[0]), float(c[1])

    def objective_value(self, idx, level=None) -> float:
        c = self.cost(idx, level)
        return c[0] if self.objective == "latency" else c[1]

    def layer_costs(self, level=None) -> np.ndarray:
        t = self.table(level or self.level)
        return t[:, :, 0 if self.objective == "latency" else 1]

    # -- accuracy ---------------------------------------------------------------------------
    def pruned_values(self, idx) -> dict:
        vals = {}
        for li, gi in enumerate(idx):
            if gi:
                w = self.weight_names[li]
                vals[w] = np.where(self.masks[li][gi], self.weights[w], 0).astype(np.float32)
        return vals

    def _accuracy(self, idx) -> float:
        idx = tuple(int(i) for i in idx)
        if idx in self._acc_cache:
            return self._acc_cache[idx]
        vals = self.pruned_values(idx)
        if any(idx) and self.reconstruct:
            model = self.recovered_model(idx)
            if self.int8_weights:
                model = _with_values(model, self._weight_grid(NumpyNet(model).inits))
            acc = flow.float_accuracy(model, self.x_val, self.y_val, self.engine)
            self._acc_cache[idx] = acc
            return acc
        if any(idx):
            if self.recalibrate_bn:
                _, stats = self.net.forward(self.x_recal, vals, recalibrate=True)
                vals.update(stats)
            if self.finetune_steps > 0:
                vals = self._short_finetune(vals)
        if self.int8_weights:
            vals.update(self._weight_grid({**self.net.inits, **vals}))
        if self.engine == "torch":
            acc = flow.float_accuracy(_with_values(self.model, vals), self.x_val, self.y_val)
        else:
            acc = self.net.accuracy(self.x_val, self.y_val, vals)
        self._acc_cache[idx] = acc
        return acc

    def _weight_grid(self, values: dict) -> dict:
        """The prunable weights of ``values`` rounded per output channel to the int8 grid."""
        hi = self.config.weight_range[1]
        out = {}
        for li, name in enumerate(self.weight_names):
            w = np.asarray(values[name], np.float32)
            by_row = w.ndim == 4 or w.shape[0] == self.conv_layers[li].cout  # (cout, ...)
            rows = w.reshape(w.shape[0], -1) if by_row else w.T
            s = np.abs(rows).max(axis=1, keepdims=True) / hi
            s[s == 0] = 1.0
            q = (np.clip(np.round(rows / s), -hi, hi) * s).astype(np.float32)
            out[name] = q.reshape(w.shape) if by_row else q.T
        return out

    def recovered_model(self, idx) -> onnx.ModelProto:
        """The model pruned at ratio indices ``idx`` and reconstructed (cached)."""
        from .reconstruct import reconstruct

        idx = tuple(int(i) for i in idx)
        if idx not in self._recovered:
            pruned = _with_values(self.model, self.pruned_values(idx))
            rebuilt, _ = reconstruct(
                pruned, self.model, self.x_recal, max_rows=self.reconstruct_rows, seed=self.seed,
                ridge=self.reconstruct_ridge,
            )  # fmt: skip
            if self.finetune_steps > 0:
                rebuilt = _with_values(
                    rebuilt,
                    self._short_finetune(
                        {t.name: numpy_helper.to_array(t) for t in rebuilt.graph.initializer}
                    ),
                )
            self._recovered[idx] = rebuilt
        return self._recovered[idx]

    def _short_finetune(self, vals):
        m = _with_values(self.model, vals)
        tuned, _ = flow.finetune(
            m, (self.x_tune, self.y_tune), self.finetune_steps, self.finetune_lr, self.seed,
            self.engine,
        )  # fmt: skip
        return {t.name: numpy_helper.to_array(t) for t in tuned.graph.initializer}

    def allocation(self, name: str, gi: int) -> tuple | None:
        """Ratio indices of allocation ``name`` (:data:`ALLOCATIONS`) at the network-wide ratio
        ``grid[gi]``, or None when the allocation cannot reach it.

        ``"uniform"`` puts every layer at ``grid[gi]``.  ``"per_mac"`` spreads a weight
        sparsity of ``grid[gi]`` as ``flow.prune_onnx(ranking="per_mac")`` does (first and last
        layer dense, no layer beyond :data:`tvm_hapm.flow.PER_MAC_MAX_LAYER_SPARSITY`) and takes
        each layer's achieved sparsity to the nearest grid ratio.
        """
        if name not in ALLOCATIONS:
            raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {name!r}")
        key = (name, int(gi))
        if key not in self._allocations:
            self._allocations[key] = self._allocate(name, int(gi))
        return self._allocations[key]

    def _allocate(self, name: str, gi: int) -> tuple | None:
        if name == "uniform" or gi == 0:
            return tuple(min(gi, m) for m in self.max_index)
        from .flow import pruning_pass
        from .passes.prune import PruneError, prune_report

        # first and last layer dense, as prune_onnx(keep_first_last=True) has them
        skip = self.skip | {self.names[0], self.names[-1]} if self.n > 2 else self.skip
        try:
            pruned = pruning_pass(
                "hapm", float(self.grid[gi]), self.config, skip=skip, ranking="per_mac"
            )(self._mod)
        except PruneError:  # beyond what the cap lets the ranking prune
            return None
        achieved = {e["layer"]: e["sparsity"] for e in prune_report(pruned)}
        return tuple(
            min(int(np.argmin(np.abs(self.grid - achieved.get(nm, 0.0)))), m)
            for nm, m in zip(self.names, self.max_index)
        )

    def evaluate(self, idx, method: str = "") -> Candidate:
        """Accuracy and cost of ratio indices ``idx``; recorded in ``history``."""
        idx = tuple(int(min(max(i, 0), m)) for i, m in zip(idx, self.max_index))
        acc = self._accuracy(idx)
        drop = 100.0 * (self.dense_accuracy - acc)
        cyc, en = self.cost(idx)
        obj = cyc if self.objective == "latency" else en
        dense_obj = self.dense_cost[0] if self.objective == "latency" else self.dense_cost[1]
        feasible = drop <= self.budget + 1e-9
        reward = -obj / dense_obj - (
            0.0 if feasible else self.penalty * (1.0 + (drop - self.budget) / 10.0)
        )
        cand = Candidate(
            tuple(float(self.grid[i]) for i in idx), acc, drop, cyc, en,
            cyc / self.config.clock_mhz / 1e3, feasible, reward, method, len(self.history),
        )  # fmt: skip
        cand.idx = idx
        self.history.append(cand)
        return cand

    def state(self, li, idx_so_far, prev_action) -> np.ndarray:
        """AMC state: static layer features + reduced-so-far + remaining cost share + prev."""
        lc = self.layer_costs()
        dense = lc[:, 0]
        done = sum(dense[j] - lc[j, idx_so_far[j]] for j in range(li))
        remaining = dense[li:].sum() / dense.sum()
        return np.concatenate(
            [self.static_features[li], [done / dense.sum(), remaining, prev_action, 1.0]]
        )

    def best(self, method: str | None = None) -> Candidate:
        pool = [c for c in self.history if c.feasible and (method is None or c.method == method)]
        return min(pool, key=lambda c: (self.objective_value(c.idx), c.index))

    def with_level(self, level: str) -> HWFlowEnv:
        """The same environment judging the hardware at ``level``: masks, accuracy estimates
        and recovered models are shared (computed once for all levels), the history is new."""
        if level not in LEVELS:
            raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
        other = copy.copy(self)
        other.level = level
        other.table(level)
        other.history = []
        other.dense_cost = other.cost(tuple([0] * self.n))
        return other


def _with_values(model, values):
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for t in out.graph.initializer:
        if t.name in values:
            t.CopyFrom(numpy_helper.from_array(np.asarray(values[t.name], np.float32), t.name))
    return out


# ------------------------------------------------------------------------------ search methods
def allocation_bisection(
    env: HWFlowEnv, method: str, budget: int, progress=None, allocation: str = "uniform"
):
    """The largest network-wide grid ratio whose ``allocation`` (:meth:`HWFlowEnv.allocation`)
    keeps the validation drop within the budget: a bisection over the grid (the drop grows about
    monotonically with the ratio), ``ceil(log2(len(grid)))`` evaluations at most, and at most
    ``budget``.  A ratio the allocation cannot reach counts as infeasible without an evaluation.

    Returns ``(grid index, best feasible candidate or None, evaluations used)``."""
    lo, hi = 0, len(env.grid) - 1
    used, best = 0, None
    while lo < hi and used < budget:
        mid = (lo + hi + 1) // 2
        idx = env.allocation(allocation, mid)
        if idx is None:
            hi = mid - 1
            continue
        c = env.evaluate(idx, method)
        used += 1
        if progress:
            progress({"method": method, "episode": used - 1, **c.to_dict()})
        if c.feasible:
            lo, best = mid, c
        else:
            hi = mid - 1
    return lo, best, used


def search_start(env: HWFlowEnv, method: str, budget: int, progress=None, start="best"):
    """Where a search starts: the best feasible candidate (by reward) of the allocation
    bisections ``start`` names (an allocation, ``"best"`` for all of :data:`ALLOCATIONS`, or
    None for none), each with up to ``budget`` evaluations.

    Returns ``(best candidate or None, evaluations used)``."""
    names = ALLOCATIONS if start == "best" else () if start is None else (start,)
    best, used = None, 0
    for name in names:
        _, cand, n = allocation_bisection(env, method, budget, progress, name)
        used += n
        if cand is not None and (best is None or cand.reward > best.reward):
            best = cand
    return best, used


def search_uniform(env: HWFlowEnv, episodes: int, seed: int, progress=None):
    """The no-search baseline: one ratio for every layer, the largest feasible one."""
    _, best, _ = allocation_bisection(env, "uniform", episodes, progress)
    return best


def search_per_mac(env: HWFlowEnv, episodes: int, seed: int, progress=None):
    """The hardware-aware no-search baseline: HAPM's per-MAC allocation of the largest feasible
    network-wide sparsity."""
    _, best, _ = allocation_bisection(env, "per_mac", episodes, progress, "per_mac")
    return best


def search_rl(env: HWFlowEnv, episodes: int, seed: int, progress=None, lr: float = 0.05,
              sigma0: float = 0.25, sigma_min: float = 0.05, warmup: int = 0,
              start: str | None = "best"):  # fmt: skip
    """AMC-style agent: one layer at a time, Gaussian policy
    ``a = clip(sigmoid(w.s + b[layer]) + sigma*e)`` over the ratio (snapped to the grid),
    REINFORCE with a moving-average baseline; ``b`` is a learned per-layer offset.

    With ``start`` the first evaluations are :func:`search_start`'s, and the policy starts at
    the best start candidate (each layer's offset set so that ``sigmoid`` gives its ratio) with
    that candidate's reward as the baseline, instead of a random warm-up: the agent refines the
    start per layer rather than rediscovering it."""
    rng = np.random.default_rng([seed, 1])
    dim = env.static_features.shape[1] + 4
    w = np.zeros(dim)
    w[-1] = -1.0  # start around sigmoid(-1) ~ 0.27 of the largest ratio
    bias = np.zeros(env.n)
    top = env.grid[-1]
    baseline, beta = None, 0.8
    used = 0
    if start is not None:
        best, used = search_start(env, "rl", max(1, episodes // 3), progress, start)
        if best is not None:
            p = np.clip(np.asarray(best.ratios) / top, 0.05, 0.95)
            w[-1] = 0.0
            bias = np.log(p / (1 - p))
            baseline = best.reward
        warmup = 0
    else:
        warmup = warmup or max(2, episodes // 10)
    for ep in range(used, episodes):
        sigma = max(sigma_min, sigma0 * (1 - ep / max(episodes, 1)))
        idx = [0] * env.n
        grads, bgrads, prev = [], np.zeros(env.n), 0.0
        for li in range(env.n):
            s = env.state(li, idx, prev)
            mu = 1.0 / (1.0 + np.exp(-(w @ s + bias[li])))
            if ep < warmup:
                a = float(rng.uniform(0, 1))
            else:
                a = float(np.clip(mu + sigma * rng.standard_normal(), 0.0, 1.0))
            # grad of log N(a; mu, sigma) w.r.t. w and b (through the sigmoid)
            dz = (a - mu) / sigma**2 * mu * (1 - mu)
            grads.append(dz * s)
            bgrads[li] = dz
            gi = int(np.argmin(np.abs(env.grid - a * top)))
            idx[li] = min(gi, env.max_index[li])
            prev = a
        cand = env.evaluate(idx, "rl")
        r = cand.reward
        baseline = r if baseline is None else beta * baseline + (1 - beta) * r
        if ep >= warmup:
            g = np.concatenate([np.sum(grads, axis=0), bgrads])
            step = lr * (r - baseline) * g / (np.linalg.norm(g) + 1e-8) * 10
            w += step[:dim]
            bias += step[dim:]
        if progress:
            progress({"method": "rl", "episode": ep, **cand.to_dict()})
    return env.best("rl") if any(c.method == "rl" and c.feasible for c in env.history) else None


def search_greedy(env: HWFlowEnv, episodes: int, seed: int, progress=None, step: int = 1,
                  accept_frac: float = 0.25, start: str | None = "best"):  # fmt: skip
    """Greedy by latency (objective) saliency: each round evaluates one grid step more on every
    open layer, ranks the moves by objective saved per accuracy point lost and takes the best
    ``accept_frac`` of them together (falling back to the single best) while feasible.  With
    ``start`` it starts from :func:`search_start`'s candidate instead of dense."""
    idx = [0] * env.n
    frozen = {li for li in range(env.n) if env.max_index[li] == 0}
    used = 0
    lc = env.layer_costs()
    if start is not None:
        best, used = search_start(env, "greedy", max(1, episodes // 3), progress, start)
        if best is not None:
            idx = list(best.idx)

    def ev(cand_idx):
        nonlocal used
        used += 1
        c = env.evaluate(cand_idx, "greedy")
        if progress:
            progress({"method": "greedy", "episode": used - 1, **c.to_dict()})
        return c

    cur_acc = env.dense_accuracy if not any(idx) else env._accuracy(idx)
    while used < episodes:
        moves = []
        for li in range(env.n):
            if li in frozen or used >= episodes:
                continue
            nxt = min(idx[li] + step, env.max_index[li])
            if nxt == idx[li]:
                frozen.add(li)
                continue
            trial = list(idx)
            trial[li] = nxt
            c = ev(trial)
            if not c.feasible:
                frozen.add(li)
                continue
            saved = lc[li, idx[li]] - lc[li, nxt]
            lost = max(cur_acc - c.accuracy, 0.0) * 100
            moves.append((saved / (lost + 0.05), li, nxt, c))
        if not moves:
            break
        moves.sort(key=lambda m: (-m[0], m[1]))
        k = max(1, int(round(accept_frac * len(moves))))
        accepted = False
        while k > 1 and used < episodes:
            trial = list(idx)
            for _, li, nxt, _ in moves[:k]:
                trial[li] = nxt
            c = ev(trial)
            if c.feasible:
                idx, cur_acc, accepted = trial, c.accuracy, True
                break
            k //= 2
        if not accepted:
            _, li, nxt, c = moves[0]
            idx[li] = nxt
            cur_acc = c.accuracy
    return (
        env.best("greedy")
        if any(c.method == "greedy" and c.feasible for c in env.history)
        else None
    )


def search_evolution(env: HWFlowEnv, episodes: int, seed: int, progress=None, pop: int = 8,
                     mutate: float = 0.3, start: str | None = "best"):  # fmt: skip
    """(mu + lambda) evolution on the ratio indices; fitness = the environment's reward.  With
    ``start`` the first population is :func:`search_start`'s candidates and mutations of the
    best of them, else it goes from mild to strong random ratios."""
    rng = np.random.default_rng([seed, 2])
    hi = env.max_index
    popl = []
    used = 0
    center = None
    if start is not None:
        best, used = search_start(env, "evolution", max(1, episodes // 3), progress, start)
        popl = [c for c in env.history if c.method == "evolution"][-used:] if used else []
        center = best.idx if best is not None else None
    while used < min(pop, episodes):
        if center is not None:
            idx = [int(np.clip(c + rng.choice([-1, 0, 1]), 0, m)) for c, m in zip(center, hi)]
        else:
            top = max(1, int(round((used + 1) / pop * len(env.grid) / 2)))  # mild to strong
            idx = [int(rng.integers(0, min(m, top) + 1)) if m else 0 for m in hi]
        popl.append(env.evaluate(idx, "evolution"))
        used += 1
        if progress:
            progress({"method": "evolution", "episode": used - 1, **popl[-1].to_dict()})
    while used < episodes:
        popl.sort(key=lambda c: (-c.reward, c.index))
        parents = popl[: max(2, pop // 2)]
        a, b = (parents[i] for i in rng.choice(len(parents), 2, replace=False))
        child = [int(x if rng.random() < 0.5 else y) for x, y in zip(a.idx, b.idx)]
        for li in range(env.n):
            if hi[li] and rng.random() < mutate:
                child[li] = int(np.clip(child[li] + rng.choice([-2, -1, 1, 2]), 0, hi[li]))
        c = env.evaluate(child, "evolution")
        used += 1
        popl.append(c)
        popl = sorted(popl, key=lambda c: (-c.reward, c.index))[:pop]
        if progress:
            progress({"method": "evolution", "episode": used - 1, **c.to_dict()})
    return (
        env.best("evolution")
        if any(c.method == "evolution" and c.feasible for c in env.history)
        else None
    )


_SEARCH = {
    "rl": search_rl,
    "greedy": search_greedy,
    "evolution": search_evolution,
    "uniform": search_uniform,
    "per_mac": search_per_mac,
}


# ------------------------------------------------------------------------------ optimize
@dataclass
class OptimizeResult:
    """What :func:`optimize` found."""

    method: str
    level: str
    objective: str
    ratios: dict  # layer name -> ratio
    model: onnx.ModelProto  # pruned (and finalised) ONNX model, batch 1
    predicted: dict  # level -> {"latency_ms", "energy_uj"} of the winner (and dense)
    val_accuracy: float
    val_dense_accuracy: float
    val_drop: float
    search_seconds: float
    evaluations: int
    history: list = field(default_factory=list)  # Candidate.to_dict() of every evaluation
    final: dict = field(default_factory=dict)  # finalize(): test accuracy, simulated costs

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "level": self.level,
            "objective": self.objective,
            "ratios": self.ratios,
            "predicted": self.predicted,
            "val_accuracy": self.val_accuracy,
            "val_dense_accuracy": self.val_dense_accuracy,
            "val_drop": self.val_drop,
            "search_seconds": self.search_seconds,
            "evaluations": self.evaluations,
            "final": self.final,
        }


def optimize(
    model,
    data,
    config=None,
    objective: str = "latency",
    max_accuracy_drop: float = 1.0,
    level: str = "fine",
    method: str = "rl",
    episodes: int = 60,
    finetune_steps: int = 0,
    seed: int = 0,
    progress: Callable[[dict], None] | None = None,
    *,
    env: HWFlowEnv | None = None,
    test_data=None,
    final_finetune_steps: int = 0,
    simulate_result: bool = False,
    **env_kwargs,
) -> OptimizeResult:
    """Search per-layer HAPM ratios (see the module docstring).

    ``data`` is ``(x_train, y_train)`` (validation split taken from it, seeded) or
    ``(x_train, y_train, x_test, y_test)``; the test part is used only by :func:`finalize`
    (when ``test_data`` or ``simulate_result`` asks for it).  ``env`` reuses an environment
    (its cost tables and accuracy cache) for several searches.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if isinstance(model, str):
        model = onnx.load(model)
    if len(data) == 4 and test_data is None:
        test_data = (data[2], data[3])
    data = (data[0], data[1])
    t0 = time.perf_counter()
    if env is None:
        env = HWFlowEnv(model, data, config, objective, max_accuracy_drop, level,
                        finetune_steps=finetune_steps, seed=seed, **env_kwargs)  # fmt: skip
    start = len(env.history)
    best = _SEARCH[method](env, episodes, seed, progress)
    if best is None:  # nothing feasible: dense
        best = env.evaluate([0] * env.n, method)
    seconds = time.perf_counter() - t0
    ratios = {nm: float(r) for nm, r in zip(env.names, best.ratios)}
    predicted = {}
    for lv in ("coarse", "mid", "fine") + (("sim",) if level == "sim" else ()):
        try:
            c, e = env.cost(best.idx, lv)
            cd, ed = env.cost([0] * env.n, lv)
        except Exception as err:
            predicted[lv] = {"error": f"{type(err).__name__}: {err}"}
            continue
        predicted[lv] = {
            "latency_ms": c / env.config.clock_mhz / 1e3,
            "energy_uj": e,
            "dense_latency_ms": cd / env.config.clock_mhz / 1e3,
            "dense_energy_uj": ed,
        }
    pruned, _, _ = prune_onnx_per_layer(env.model, ratios, env.config)
    vals = env.pruned_values(best.idx)
    if env.reconstruct and any(best.idx):
        pruned = env.recovered_model(best.idx)
    elif env.recalibrate_bn and any(best.idx):
        _, stats = env.net.forward(env.x_recal, vals, recalibrate=True)
        pruned = _with_values(pruned, stats)
    res = OptimizeResult(
        method, env.level, env.objective, ratios, pruned, predicted, best.accuracy,
        env.dense_accuracy, best.drop, seconds, len(env.history) - start,
        [c.to_dict() | {"method": c.method} for c in env.history[start:]],
    )  # fmt: skip
    res.winner_index = best.index
    res.budget = env.budget
    if simulate_result or test_data is not None or final_finetune_steps:
        finalize(res, env, test_data, final_finetune_steps, simulate_result, seed)
    return res


def finalize(res: OptimizeResult, env: HWFlowEnv, test_data=None, finetune_steps: int = 0,
             simulate_result: bool = True, seed: int = 0, lr: float | None = None,
             train_config=None) -> dict:  # fmt: skip
    """Fine-tune the winner (``finetune_steps`` of :func:`tvm_hapm.flow.finetune` on the
    non-validation training images, masks held, with the environment's engine), then its int8
    accuracy on the validation split (what a choice among runs may use) and on ``test_data``,
    and its simulated latency / energy.  The per-image int8 results are kept in ``res.int8``
    (``{"val": Int8Accuracy, "test": ...}``).  The int8 models are calibrated on the first
    :data:`INT8_EVAL_BATCH` images of the non-validation split."""
    model = res.model
    out = {"finetune_steps": int(finetune_steps)}
    if finetune_steps > 0 and any(r > 0 for r in res.ratios.values()):
        t0 = time.perf_counter()
        model, hist = flow.finetune(
            model, (env.x_tune, env.y_tune), finetune_steps, lr, seed, env.engine, train_config
        )
        out["finetune_seconds"] = time.perf_counter() - t0
        out["finetune_images_per_s"] = hist["images_per_s"]
        out["val_accuracy_after_finetune"] = flow.float_accuracy(
            model, env.x_val, env.y_val, env.engine
        )
    res.model = model

    def int8(x, y):
        return flow.int8_accuracy(
            model, env.x_tune[:INT8_EVAL_BATCH], x, y, env.config, env.calibration_percentile,
            engine=env.engine,
        )  # fmt: skip

    # per-image results (paired comparisons) stay on the result, out of its JSON record
    res.int8 = {"val": int8(env.x_val, env.y_val)}
    out["val_int8_accuracy"] = res.int8["val"].accuracy
    if test_data is not None:
        x_te, y_te = test_data
        res.int8["test"] = int8(x_te, y_te)
        out["test_int8_accuracy"] = res.int8["test"].accuracy
        out["test_float_accuracy"] = flow.float_accuracy(model, x_te, y_te, env.engine)
    if simulate_result:
        lat, en, cyc, _, _ = simulate(model, env.config, env.x_tune, env.x_val)
        out.update({"sim_latency_ms": lat, "sim_energy_uj": en, "sim_cycles": cyc})
    res.final = out
    return out


# ------------------------------------------------------------------------------ plot
def pareto_plot(results, path, objective: str | None = None) -> str:
    """Objective (latency or energy) vs validation accuracy of every evaluated candidate of one
    or more :class:`OptimizeResult`; winners marked with a star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [results] if isinstance(results, OptimizeResult) else list(results)
    objective = objective or results[0].objective
    key = "latency_ms" if objective == "latency" else "energy_uj"
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for i, r in enumerate(results):
        color = f"C{i}"
        h = r.history
        ax.scatter([c[key] for c in h], [100 * c["accuracy"] for c in h], s=10, alpha=0.5,
                   color=color, label=f"{r.method} / {r.level}")  # fmt: skip
        win = next((c for c in h if c["index"] == getattr(r, "winner_index", -1)), None)
        if win is not None:
            ax.scatter([win[key]], [100 * win["accuracy"]], marker="*", s=200, color=color,
                       edgecolor="k", zorder=5)  # fmt: skip
    r0 = results[0]
    ax.axhline(100 * r0.val_dense_accuracy, color="grey", lw=0.8, ls=":", label="dense")
    budget = getattr(r0, "budget", None)
    if budget is not None:
        ax.axhline(100 * r0.val_dense_accuracy - budget, color="red", lw=0.6, ls="--",
                   label="accuracy budget")  # fmt: skip
    ax.set_xlabel(
        f"predicted {objective} ({'ms' if objective == 'latency' else 'µJ'}), level's model"
    )
    ax.set_ylabel("validation top-1 (%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(str(path), dpi=120)
    plt.close(fig)
    return str(path)
