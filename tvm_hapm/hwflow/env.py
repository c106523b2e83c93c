"""The HW-Flow environment (:class:`HWFlowEnv`): per-layer HAPM masks on a ratio grid, the
hardware cost tables of each level, the accuracy estimate and the candidates evaluated; see
:mod:`tvm_hapm.hwflow`."""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from ..compress import flow
from ..compress.flow import time_programs
from ..compress.numpynet import NumpyNet

__all__ = [
    "ALLOCATIONS",
    "DEFAULT_GRID",
    "LEVELS",
    "OBJECTIVES",
    "RECONSTRUCT_RIDGE",
    "Candidate",
    "EnvOptions",
    "HWFlowEnv",
    "layer_initializers",
    "prune_onnx_per_layer",
    "validation_split",
    "with_values",
]

LEVELS = ("coarse", "mid", "fine", "sim")
OBJECTIVES = ("latency", "energy")
# Network-wide allocations a search can start from (HWFlowEnv.allocation): every layer at one
# ratio, or HAPM's latency-aware ranking (importance per MAC saved, flow.prune_onnx
# ranking="per_mac")
ALLOCATIONS = ("uniform", "per_mac")
DEFAULT_GRID = tuple(np.round(np.arange(0.0, 0.91, 0.1), 2))
#: Ridge of the candidates' least-squares reconstruction (relative to the Gram diagonal), as
#: :func:`tvm_hapm.compress.reconstruct.reconstruct`.  0.1 kept ResNet-56's refitted weights at 80%
#: HAPM
#: int8-friendly (97.8% float, 97.6% with int8 weights, against 97.3% / 95.8% at 1e-3) but cost
#: ResNet-20 at 70% 0.7 point of int8 test accuracy, so the default stays and the accuracy
#: estimate sees int8 weights instead (``int8_weights``).
RECONSTRUCT_RIDGE = 1e-3


def validation_split(n: int, val_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(validation indices, the rest)`` of ``n`` training images: the seeded split
    :class:`HWFlowEnv` measures accuracy on (a model trained without the first part sees it
    for the first time there)."""
    order = np.random.default_rng(seed).permutation(n)
    return order[:val_size], order[val_size:]


# ------------------------------------------------------------------------------ pruning (ONNX)
def layer_initializers(model: onnx.ModelProto, mod=None):
    """``(prunable layer records, ONNX weight names)`` in the same order, shapes checked."""
    from tvm.relax.frontend.onnx import from_onnx

    from ..compress.flow import paired_weight_names
    from ..passes.prune import prunable_layers

    mod = from_onnx(model) if mod is None else mod
    layers = prunable_layers(mod)
    return layers, paired_weight_names(model, layers), mod


def prune_onnx_per_layer(model: onnx.ModelProto, ratios: dict, config=None, criterion="l2"):
    """Prune ``model`` with ``HardwareAwarePrune(0, config, per_layer=ratios)`` and write the
    zeros back into the ONNX initializers.  Returns ``(pruned ONNX, report, masks by ONNX
    weight name)``."""
    from ..compress.flow import prune_onnx

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


# ------------------------------------------------------------------------------ environment
@dataclass(frozen=True)
class EnvOptions:
    """How an :class:`HWFlowEnv` judges a candidate (one value object instead of the
    constructor's twenty arguments; ``HWFlowEnv(..., options, **changes)`` changes some).

    Attributes
    ----------
    objective : {"latency", "energy"}
        What the hardware cost of a candidate is.
    max_accuracy_drop : float
        Accuracy points a feasible candidate may lose on the validation split.
    level : {"coarse", "mid", "fine", "sim"}
        The hardware model (:data:`LEVELS`).
    grid : tuple of float
        The per-layer ratios, from 0 and below 1.
    penalty : float
        Weight of the budget violation in the reward.
    skip : tuple of str
        Layers kept dense.
    seed : int
        Seed of the validation split and the searches' draws.
    val_size : int
        Images taken out of the training data for validation (without ``val_data``).
    recalibrate_bn, recal_size : bool, int
        Re-estimate batch-norm statistics on ``recal_size`` images of each candidate.
    finetune_steps, finetune_lr : int, float or None
        Fine-tuning of each candidate (0 steps: none).
    reconstruct, reconstruct_rows, reconstruct_ridge : bool, int, float
        Layer-wise least-squares reconstruction of each candidate (see :class:`HWFlowEnv`).
    int8_weights : bool
        Measure accuracy with the weights on the accelerator's grid.
    calibration_percentile : float or None
        The quantizer's activation calibration for :func:`finalize`'s int8 accuracy.
    engine : {"auto", "torch", "tvm"}
        What measures accuracy and fine-tunes (:func:`tvm_hapm.flow.resolve_engine`).
    """

    objective: str = "latency"
    max_accuracy_drop: float = 1.0
    level: str = "fine"
    grid: tuple = DEFAULT_GRID
    penalty: float = 1.0
    skip: tuple = ()
    seed: int = 0
    val_size: int = 300
    recalibrate_bn: bool = True
    recal_size: int = 256
    finetune_steps: int = 0
    finetune_lr: float | None = None
    reconstruct: bool = False
    reconstruct_rows: int = 4096
    reconstruct_ridge: float = RECONSTRUCT_RIDGE
    int8_weights: bool = True
    calibration_percentile: float | None = None
    engine: str = "auto"

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.level not in LEVELS:
            raise ValueError(f"level must be one of {LEVELS}, got {self.level!r}")
        grid = tuple(sorted({float(g) for g in self.grid}))
        if not grid or grid[0] != 0.0 or grid[-1] >= 1.0:
            raise ValueError("the ratio grid must start at 0 and stay below 1")
        object.__setattr__(self, "grid", grid)
        object.__setattr__(self, "skip", tuple(self.skip))


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
    config : HardwareConfig or str, optional
        The accelerator (default: the default preset).
    options : EnvOptions, optional
        How candidates are judged and recovered (default: ``EnvOptions()``); keyword
        ``changes`` replace some of its fields (``HWFlowEnv(m, d, "zedboard", level="mid")``).
    fine_model : FineModel, optional
        The fine level's model (default: the bundled one).
    val_data : tuple, optional
        ``(x_val, y_val)``: a validation split of its own (e.g. Fashion-MNIST's) instead of
        ``val_size`` images taken out of ``data``; all of ``data`` is then used for recovery.

    Notes
    -----
    ``reconstruct`` recovers each candidate with layer-wise least-squares reconstruction
    (:func:`tvm_hapm.compress.reconstruct.reconstruct`, on ``recal_size`` images of the
    non-validation split) before measuring its accuracy, instead of BN recalibration alone.
    HAPM groups remove whole blocks of inputs, which costs far more accuracy before recovery
    than after it; judging candidates unrecovered steers the search away from what fine-tuning
    would make feasible.  About 10 s per new candidate for ResNet-20.  ``int8_weights`` measures
    accuracy with every prunable weight rounded to the accelerator's weight grid per output
    channel, as the quantizer does (batch norm folding scales a channel, which does not change
    its rounding): a reconstruction that refits a heavily pruned layer can leave outliers that
    only int8 reveals.  ``engine`` chooses PyTorch (:class:`tvm_hapm.torch.OnnxModule`,
    :func:`tvm_hapm.flow.finetune`) when installed, else NumPy and TVM; reconstruction and
    batch-norm recalibration run in NumPy.
    """

    def __init__(
        self,
        model: onnx.ModelProto,
        data,
        config=None,
        options: EnvOptions | None = None,
        *,
        fine_model=None,
        val_data=None,
        **changes,
    ):
        from ..data import set_batch
        from ..target.config import get_config

        opt = dataclasses.replace(options or EnvOptions(), **changes)
        self.options = opt
        self.config = get_config(config)
        self.model = set_batch(model, 1)
        self.objective, self.level = opt.objective, opt.level
        self.budget = float(opt.max_accuracy_drop)
        self.grid = np.asarray(opt.grid, float)
        self.penalty = float(opt.penalty)
        self.finetune_steps, self.finetune_lr = int(opt.finetune_steps), opt.finetune_lr
        self.engine = flow.resolve_engine(opt.engine)
        self.recalibrate_bn = bool(opt.recalibrate_bn)
        self.reconstruct = bool(opt.reconstruct)
        self.reconstruct_rows = int(opt.reconstruct_rows)
        self.calibration_percentile = opt.calibration_percentile
        self.reconstruct_ridge = float(opt.reconstruct_ridge)
        self.int8_weights = bool(opt.int8_weights)
        self._recovered: dict = {}  # ratio indices -> reconstructed ONNX model
        self.seed = int(opt.seed)
        x, y = data
        if val_data is None:
            val, rest = validation_split(len(x), opt.val_size, opt.seed)
            self.x_val, self.y_val = x[val], y[val]
            self.x_tune, self.y_tune = x[rest], y[rest]
        else:
            self.x_val, self.y_val = val_data
            self.x_tune, self.y_tune = x, y
        self.x_recal = self.x_tune[: opt.recal_size]
        self.net = NumpyNet(self.model)
        self.layers, self.weight_names, self._mod = layer_initializers(self.model)
        self.names = [lay["layer"] for lay in self.layers]
        self.skip = set(opt.skip)
        self._build_masks()
        self._build_features()
        self.fine_model = fine_model
        t0 = time.perf_counter()
        self.tables = {}
        self.table(opt.level)
        self.table_seconds = time.perf_counter() - t0
        self._acc_cache: dict = {}
        self._allocations: dict = {}  # (allocation, grid index) -> ratio indices or None
        self.history: list[Candidate] = []
        self.dense_accuracy = self.accuracy(tuple([0] * self.n))
        self.dense_cost = self.cost(tuple([0] * self.n))

    # -- layers, masks, features ------------------------------------------------------------
    @property
    def n(self) -> int:
        return len(self.names)

    def _build_masks(self):
        from ..passes.prune import HardwareAwarePrune, pruning_masks

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
        from ..cost import layers_from_onnx

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
        from ..cost import BlockSparsity, CoarseModel, MidModel, load_bundled_fine_model

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
        """Time the model pruned uniformly at every grid ratio (its programs through the timing
        and energy models, :func:`time_programs`); program ``k`` of the conv / dense programs
        is prunable layer ``k`` (layers run one after the other, so a layer's
        cost depends only on its own mask).  Non-layer programs give the constant."""
        t = np.zeros((self.n, len(self.grid), 2))
        other = np.zeros(2)
        for gi, r in enumerate(self.grid):
            m = self.model
            if r > 0:
                m, _, _ = prune_onnx_per_layer(
                    self.model, {nm: r for nm in self.names}, self.config
                )
            per = time_programs(m, self.config, self.x_tune)[3]
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

    def accuracy(self, idx) -> float:
        """Validation top-1 (a fraction) of the candidate with ratio indices ``idx``, after its
        recovery (reconstruction, or batch-norm recalibration and the optional short
        fine-tuning), with int8-rounded weights when ``int8_weights``; cached per ``idx``."""
        idx = tuple(int(i) for i in idx)
        if idx in self._acc_cache:
            return self._acc_cache[idx]
        vals = self.pruned_values(idx)
        if any(idx) and self.reconstruct:
            model = self.recovered_model(idx)
            if self.int8_weights:
                model = with_values(model, self.weight_grid(NumpyNet(model).inits))
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
            vals.update(self.weight_grid({**self.net.inits, **vals}))
        if self.engine == "torch":
            acc = flow.float_accuracy(with_values(self.model, vals), self.x_val, self.y_val)
        else:
            acc = self.net.accuracy(self.x_val, self.y_val, vals)
        self._acc_cache[idx] = acc
        return acc

    def weight_grid(self, values: dict) -> dict:
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
        from ..compress.reconstruct import reconstruct

        idx = tuple(int(i) for i in idx)
        if idx not in self._recovered:
            pruned = with_values(self.model, self.pruned_values(idx))
            rebuilt, _ = reconstruct(
                pruned, self.model, self.x_recal, max_rows=self.reconstruct_rows, seed=self.seed,
                ridge=self.reconstruct_ridge,
            )  # fmt: skip
            if self.finetune_steps > 0:
                rebuilt = with_values(
                    rebuilt,
                    self._short_finetune(
                        {t.name: numpy_helper.to_array(t) for t in rebuilt.graph.initializer}
                    ),
                )
            self._recovered[idx] = rebuilt
        return self._recovered[idx]

    def _short_finetune(self, vals):
        m = with_values(self.model, vals)
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
        from ..compress.flow import pruning_pass
        from ..passes.prune import PruneError, prune_report

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
        acc = self.accuracy(idx)
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
        other.options = dataclasses.replace(self.options, level=level)
        other.table(level)
        other.history = []
        other.dense_cost = other.cost(tuple([0] * self.n))
        return other


def with_values(model, values):
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for t in out.graph.initializer:
        if t.name in values:
            t.CopyFrom(numpy_helper.from_array(np.asarray(values[t.name], np.float32), t.name))
    return out
