"""Cost models of the hapm_fpga accelerator behind one interface (HW-Flow's three levels).

Every model answers ``predict(layer, config, schedule=None, sparsity=None) -> Cost`` (cycles and
energy in uJ of one layer), ``predict_batch(queries) -> (n, 2) array`` of ``(layer, config,
schedule, sparsity)`` queries (the fast path: one vectorised pass, see ``docs/cost_model.md``),
``predict_many(queries) -> [Cost]`` and ``predict_network(layers, config, ...)`` (the sum over
layers, which run one after the other):

* :class:`CoarseModel`: MACs over the peak plus DRAM bytes over the bandwidth.  It ignores the
  schedule; its job is ranking, not absolute numbers.
* :class:`MidModel`: the analytical model of :mod:`tvm_hapm.cost.analytic` (tiles, GEMM rounds on
  the parallel arrays with fill and drain, DMA per step, overlap, partial tiles, zero blocks).
* :class:`FineModel`: XGBoost regression of ``log(simulated / mid)`` of cycles and energy on the
  features of :mod:`tvm_hapm.cost.features`, trained on simulator measurements
  (:mod:`tvm_hapm.cost.dataset`): one booster with two outputs (multi-output trees; models saved
  with one booster per target still load).  Saved in xgboost's own format (``.json`` or
  ``.ubj``) with a JSON sidecar holding the feature-schema version and names; loading a model of
  another schema raises :class:`SchemaVersionError`.

``schedule=None`` means the compiler's schedule (``plan_conv``); ``sparsity`` is a
:class:`~tvm_hapm.cost.layer.BlockSparsity`, a fraction of zero blocks or a non-zero block mask.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import atomic
from ..target.config import HardwareConfig
from .analytic import analyze_batch, energy_model_of
from .features import FEATURE_SCHEMA_VERSION, feature_names, features_batch, features_from_batch
from .layer import BlockSparsity, ConvLayer, structural_mask

__all__ = [
    "BUNDLED_FINE_MODEL",
    "CoarseModel",
    "CompiledForest",
    "Cost",
    "CostModel",
    "FineModel",
    "MidModel",
    "SchemaVersionError",
    "load_bundled_fine_model",
]

#: Sidecar of the pretrained fine model shipped with the package.
BUNDLED_FINE_MODEL = Path(__file__).resolve().parents[1] / "data" / "cost_model_fine.json"


class SchemaVersionError(ValueError):
    """A saved fine model was trained on another feature schema than this code computes."""


@dataclass(frozen=True)
class Cost:
    """Predicted latency (cycles) and energy (microjoules)."""

    cycles: float
    energy_uj: float

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.cycles + other.cycles, self.energy_uj + other.energy_uj)

    def latency_ms(self, config: HardwareConfig) -> float:
        return self.cycles / config.clock_mhz / 1e3


def _per_layer(value, n):
    if isinstance(value, (list, tuple)) and len(value) == n and n > 0:
        return list(value)
    return [value] * n


class CostModel:
    """Interface of the three levels: subclasses implement :meth:`predict_batch`."""

    name = "base"

    def predict_batch(self, queries) -> np.ndarray:
        """``(n, 2)`` float64 cycles and energy (uJ) of ``(layer, config, schedule, sparsity)``
        queries, in one vectorised pass."""
        raise NotImplementedError

    def predict(self, layer: ConvLayer, config: HardwareConfig, schedule=None, sparsity=None):
        """Cost of one layer (a batch of one)."""
        c, e = self.predict_batch([(layer, config, schedule, sparsity)])[0]
        return Cost(float(c), float(e))

    def predict_many(self, items) -> list[Cost]:
        """Costs of ``(layer, config, schedule, sparsity)`` tuples (one batch)."""
        items = list(items)
        if not items:
            return []
        return [Cost(c, e) for c, e in self.predict_batch(items).tolist()]

    def predict_network(
        self, layers, config: HardwareConfig, schedules=None, sparsities=None
    ) -> Cost:
        """Total cost of layers run one after the other; ``schedules`` / ``sparsities``: one
        value for all layers or a list with one per layer."""
        n = len(layers)
        items = list(zip(layers, [config] * n, _per_layer(schedules, n), _per_layer(sparsities, n)))
        if not items:
            return Cost(0.0, 0.0)
        cycles, energy = self.predict_batch(items).sum(axis=0).tolist()
        return Cost(cycles, energy)


def _fraction(layer, config, sparsity) -> float:
    if sparsity is None:
        return 0.0
    if isinstance(sparsity, BlockSparsity):
        if sparsity.mask is None:
            return float(sparsity.fraction)
        sparsity = sparsity.mask
    if isinstance(sparsity, np.ndarray):
        struct = structural_mask(layer, config)
        return 1.0 - float((sparsity & struct).sum()) / max(int(struct.sum()), 1)
    return float(sparsity)


class CoarseModel(CostModel):
    """``MACs / peak + bytes / bandwidth`` cycles; energy from MACs, DRAM bytes and the static,
    clock and logic power.

    Dense MACs are scaled by the fraction of non-zero blocks; bytes are the input, the non-zero
    weights and the output, each moved once.
    """

    name = "coarse"

    def predict_batch(self, queries) -> np.ndarray:
        rows = []
        for layer, config, _schedule, sparsity in queries:
            em = energy_model_of(config)
            rows.append((
                1.0 - _fraction(layer, config, sparsity), layer.macs, layer.params,
                layer.n * layer.cin * layer.h * layer.w, layer.n * layer.cout * layer.oh * layer.ow,
                config.act_bytes, config.weight_bytes, config.macs_per_cycle,
                config.dram_bytes_per_cycle, config.clock_mhz, em.mac_pj, em.dram_pj_per_byte,
                em.background_mw,
            ))  # fmt: skip
        keep, macs, params, n_in, n_out, ab, wb, mpc, bpc, clock, mac_pj, dram_pj, background = (
            np.array(rows, dtype=np.float64).reshape(-1, 13).T
        )
        macs = macs * keep
        nbytes = n_in * ab + params * wb * keep + n_out * ab
        cycles = macs / mpc + nbytes / bpc
        energy = (macs * mac_pj + nbytes * dram_pj) * 1e-6 + background * cycles / clock / 1e3
        return np.stack([cycles, energy], axis=1)


class MidModel(CostModel):
    """The analytical model (:func:`tvm_hapm.cost.analytic.analyze`)."""

    name = "mid"

    def predict_batch(self, queries) -> np.ndarray:
        ba = analyze_batch(queries)
        return np.stack([ba.cycles, ba.energy_uj], axis=1)


class FineModel(CostModel):
    """XGBoost correction of the mid model, trained on simulator measurements.

    Parameters
    ----------
    boosters : dict
        ``{"both": xgboost.Booster}``, one booster whose two outputs predict
        ``log(simulated / mid)`` of cycles and of energy, or (older models)
        ``{"cycles": xgboost.Booster, "energy": xgboost.Booster}``, one booster each.
    meta : dict, optional
        Training information saved in the sidecar.
    """

    name = "fine"

    def __init__(self, boosters: dict, meta: dict | None = None, nthread: int = 1):
        self.boosters = boosters
        self.meta = dict(meta or {})
        self.feature_names = feature_names()
        self.set_nthread(nthread)
        self._forest: list = []  # [the compiled copy of the "both" booster, or None]

    def set_nthread(self, nthread: int) -> None:
        """Threads of XGBoost's predictor (default 1: a batch of a few hundred rows is done in
        a fraction of a millisecond, and on a busy machine more threads only add contention;
        0 = all cores, for batches of many thousands)."""
        for b in self.boosters.values():
            b.set_param({"nthread": int(nthread)})

    # ---------------------------------------------------------------- prediction
    def features_many(self, items):
        """Feature matrix and the mid model's ``(n, 2)`` predictions of the queries."""
        return features_batch(items)

    def log_ratios(self, X: np.ndarray) -> np.ndarray:
        """``(n, 2)`` predicted ``log(simulated / mid)`` of cycles and energy of feature rows
        (float32: the booster's outputs, by :class:`CompiledForest` when it reproduces them)."""
        X = np.ascontiguousarray(X, dtype=np.float32)
        both = self.boosters.get("both")
        if both is not None:
            if not self._forest:
                self._forest.append(CompiledForest.of(both, len(self.feature_names)))
            if self._forest[0] is not None:
                return self._forest[0].predict(X)
            return predict_dense(both, X).reshape(len(X), 2)
        rc = predict_dense(self.boosters["cycles"], X)
        re = predict_dense(self.boosters["energy"], X)
        return np.stack([rc, re], axis=1)

    def predict_matrix(self, X: np.ndarray, mids: np.ndarray) -> np.ndarray:
        """``(n, 2)`` cycles and energy from feature rows and the mid model's predictions."""
        return mids * np.exp(self.log_ratios(X))

    def predict_batch(self, queries) -> np.ndarray:
        """One vectorised mid analysis, one feature matrix, one booster call."""
        ba = analyze_batch(queries)
        # in the order the analysis computed the rows; the result in the queries' order
        X = features_from_batch(ba, query_order=False)
        mids = np.stack([ba.raw[0], ba.raw[1]], axis=1)
        return ba.to_query_order(mids * np.exp(self.log_ratios(X)))

    # ---------------------------------------------------------------- training
    @classmethod
    def train(
        cls,
        X: np.ndarray,
        y_cycles: np.ndarray,
        y_energy: np.ndarray,
        mids: np.ndarray,
        params: dict | None = None,
        rounds: int = 60,
        meta: dict | None = None,
        multi_output: bool = True,
    ) -> FineModel:
        """Fit the regressor on features ``X``, simulated cycles / energy and the mid model's
        ``(n, 2)`` predictions: one booster with multi-output trees (``multi_output``, each
        leaf holds both corrections, one tree walk per row and tree), else one booster per
        target."""
        import xgboost as xgb

        p = {
            "objective": "reg:squarederror",
            "max_depth": 6,
            "eta": 0.25,
            "subsample": 0.85,
            "colsample_bytree": 0.85,
            "min_child_weight": 2,
            "lambda": 1.0,
            "nthread": 1,
            "seed": 0,
        }
        if multi_output:
            p.update(tree_method="hist", multi_strategy="multi_output_tree")
        p.update(params or {})
        names = feature_names()
        target = np.log(
            np.stack([np.asarray(y_cycles, float), np.asarray(y_energy, float)], axis=1)
            / np.maximum(mids, 1e-12)
        )
        if multi_output:
            d = xgb.DMatrix(X, label=target, feature_names=names)
            boosters = {"both": xgb.train(p, d, num_boost_round=rounds)}
        else:
            boosters = {}
            for k, key in enumerate(("cycles", "energy")):
                d = xgb.DMatrix(X, label=target[:, k], feature_names=names)
                boosters[key] = xgb.train(p, d, num_boost_round=rounds)
        m = dict(meta or {})
        m.update({"params": p, "rounds": rounds, "n_train": int(len(X))})
        return cls(boosters, m)

    # ---------------------------------------------------------------- persistence
    def save(self, path: str | Path, fmt: str = "json") -> Path:
        """Save to ``<stem>.json`` (sidecar) + ``<stem>_<key>.<fmt>`` per booster (``both``; older
        models ``cycles`` and ``energy``) in xgboost's native JSON or UBJSON.  Returns the
        sidecar path."""
        path = Path(path)
        if path.suffix != ".json":
            path = path.with_suffix(".json")
        if fmt not in ("json", "ubj"):
            raise ValueError("fmt must be 'json' or 'ubj'")
        path.parent.mkdir(parents=True, exist_ok=True)
        files = {}
        for key, booster in self.boosters.items():
            f = path.with_name(f"{path.stem}_{key}.{fmt}")
            booster.save_model(str(f))
            files[key] = f.name
        side = {
            "kind": "tvm_hapm.cost.FineModel",
            "feature_schema_version": FEATURE_SCHEMA_VERSION,
            "feature_names": self.feature_names,
            "target": (
                "log(simulated / mid) of cycles and of energy_uj"
                + (" (the two outputs of one booster)" if "both" in self.boosters else "")
            ),
            "boosters": files,
            "meta": self.meta,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_text(path, json.dumps(side, indent=1, sort_keys=True, default=_json_default))
        return path

    @classmethod
    def load(cls, path: str | Path) -> FineModel:
        """Load a model saved by :meth:`save`; refuses another feature schema."""
        import xgboost as xgb

        path = Path(path)
        side = json.loads(path.read_text())
        version = side.get("feature_schema_version")
        if version != FEATURE_SCHEMA_VERSION:
            raise SchemaVersionError(
                f"fine cost model {path} uses feature schema version {version}, but this "
                f"tvm_hapm computes version {FEATURE_SCHEMA_VERSION}; retrain it "
                "(python -m tvm_hapm.cost.fit)"
            )
        names = feature_names()
        if side.get("feature_names") != names:
            missing = sorted(set(names) ^ set(side.get("feature_names") or []))
            raise SchemaVersionError(
                f"fine cost model {path} was trained on other features (differences: "
                f"{missing}); retrain it (python -m tvm_hapm.cost.fit)"
            )
        boosters = {}
        for key, fname in side["boosters"].items():
            b = xgb.Booster()
            b.load_model(str(path.with_name(fname)))
            boosters[key] = b
        return cls(boosters, side.get("meta"))


class CompiledForest:
    """The trees of an xgboost booster with vector leaves (a multi-output regression booster,
    ``reg:squarederror``) as flat arrays, evaluated by a compiled loop
    (:func:`tvm_hapm.cost._jit.forest`): the same float32 outputs as the booster's
    ``inplace_predict``, without xgboost's per-call setup (~0.1 ms of a ~0.3 ms prediction of a
    few hundred rows).

    :meth:`of` reads the booster's JSON dump and checks the copy against the booster on probe
    rows (every split condition, the float below it, missing values): it returns ``None`` (the
    caller keeps the booster) for another kind of booster, without numba, or if any output
    differs by a bit.
    """

    def __init__(self, trees: list, base: np.ndarray, n_out: int):
        left, right, feature, cond, dleft, leaf, roots, values = [], [], [], [], [], [], [], []
        depth, off = 0, 0
        for t in trees:
            lc, rc = t["left_children"], t["right_children"]
            roots.append(off)
            lvl = [0] * len(lc)
            k = 0  # the leaf vectors are stored in node order
            for i, (lo, hi) in enumerate(zip(lc, rc)):
                if lo == -1:  # a leaf: its own children
                    left.append(off + i)
                    right.append(off + i)
                    feature.append(0)
                    cond.append(0.0)
                    dleft.append(False)
                    leaf.append(len(values))
                    values.append(t["leaf_weights"][k * n_out : (k + 1) * n_out])
                    k += 1
                else:
                    left.append(off + lo)
                    right.append(off + hi)
                    feature.append(t["split_indices"][i])
                    cond.append(t["split_conditions"][i])
                    dleft.append(bool(t["default_left"][i]))
                    leaf.append(-1)
                    lvl[lo] = lvl[hi] = lvl[i] + 1
            depth = max(depth, *lvl)
            off += len(lc)
        i32 = np.int32
        self.arrays = (np.array(left, i32), np.array(right, i32), np.array(feature, i32),
                       np.array(cond, np.float32), np.array(dleft, bool), np.array(leaf, i32),
                       np.array(roots, i32), np.array(values, np.float32).reshape(-1, n_out),
                       np.array(base, np.float32))  # fmt: skip
        self.depth = depth
        self.n_out = n_out
        self.n_features = int(max(feature, default=-1)) + 1  # columns the splits read

    def predict(self, X: np.ndarray) -> np.ndarray:
        """``(n, n_out)`` float32 outputs of float32 C-contiguous rows ``X``."""
        from . import _jit

        if X.ndim != 2 or X.shape[1] < self.n_features:
            raise ValueError(f"expected rows of at least {self.n_features} features, got {X.shape}")
        out = np.empty((len(X), self.n_out), np.float32)
        _jit.forest(X, *self.arrays, self.depth, out)
        return out

    @classmethod
    def of(cls, booster, n_features: int, seed: int = 0) -> CompiledForest | None:
        """The compiled copy of ``booster``, or ``None`` (see the class)."""
        try:
            from . import _jit  # noqa: F401
        except ImportError:  # pragma: no cover - numba is a dependency
            return None
        try:
            forest = cls._from_dump(json.loads(booster.save_raw("json"))["learner"])
        except (KeyError, TypeError, ValueError, IndexError):  # a dump of another layout
            forest = None
        if forest is None or forest.n_features > n_features:
            return None
        X = forest.probe(n_features, seed)
        same = np.array_equal(forest.predict(X), predict_dense(booster, X).reshape(len(X), -1))
        return forest if same else None

    @classmethod
    def _from_dump(cls, learner: dict) -> CompiledForest | None:
        model = learner["gradient_booster"].get("model", {})
        param = learner["learner_model_param"]
        n_out = int(param.get("num_target", 1))
        trees = model.get("trees", [])
        if (
            learner["objective"]["name"] != "reg:squarederror"
            or learner["gradient_booster"].get("name") != "gbtree"
            or int(model["gbtree_model_param"].get("num_parallel_tree", 1)) != 1
            or n_out < 2
            or not trees
            or any(
                int(t["tree_param"]["size_leaf_vector"]) != n_out
                or any(t["split_type"])
                or t.get("categories")
                for t in trees
            )
        ):
            return None
        base = np.atleast_1d(np.asarray(json.loads(param["base_score"]), np.float32))
        return cls(trees, np.broadcast_to(base, (n_out,)), n_out)

    def probe(self, n_features: int, seed: int, n: int = 256) -> np.ndarray:
        """Rows whose features take the split conditions, the floats just below them and
        missing values (every branch of every node is likely taken)."""
        rng = np.random.default_rng(seed)
        _, _, feature, cond, _, leaf, *_ = self.arrays
        split = leaf < 0
        X = rng.standard_normal((n, n_features)).astype(np.float32)
        for f in range(n_features):
            c = cond[split & (feature == f)]
            if len(c):
                c = np.concatenate([c, np.nextafter(c, np.float32(-np.inf))])
                X[:, f] = rng.choice(c, n)
        X[rng.random(X.shape) < 0.05] = np.nan
        return np.ascontiguousarray(X)


def predict_dense(booster, X: np.ndarray) -> np.ndarray:
    """``booster.inplace_predict(X)``: the booster's own prediction, used where the compiled
    copy (:class:`CompiledForest`) does not apply and as the reference it is checked against.
    (A direct call of xgboost's private C function saved ~50 us a call; it went with the rule
    that no private API of another package is used.)"""
    return booster.inplace_predict(X)


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


_BUNDLED: list = []


def load_bundled_fine_model() -> FineModel:
    """The pretrained fine model shipped in ``tvm_hapm/data`` (cached)."""
    if not _BUNDLED:
        _BUNDLED.append(FineModel.load(BUNDLED_FINE_MODEL))
    return _BUNDLED[0]
