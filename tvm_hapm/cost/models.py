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
* :class:`FineModel`: XGBoost regressors of ``log(simulated / mid)`` for cycles and energy on the
  features of :mod:`tvm_hapm.cost.features`, trained on simulator measurements
  (:mod:`tvm_hapm.cost.dataset`).  Saved in xgboost's own format (``.json`` or ``.ubj``) with a
  JSON sidecar holding the feature-schema version and names; loading a model of another schema
  raises :class:`SchemaVersionError`.

``schedule=None`` means the compiler's schedule (``plan_conv``); ``sparsity`` is a
:class:`~tvm_hapm.cost.layer.BlockSparsity`, a fraction of zero blocks or a non-zero block mask.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..target.config import HardwareConfig
from .analytic import _energy_model, analyze_batch
from .features import FEATURE_SCHEMA_VERSION, feature_names, features_batch
from .layer import BlockSparsity, ConvLayer, structural_mask

__all__ = [
    "BUNDLED_FINE_MODEL",
    "CoarseModel",
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
    """``MACs / peak + bytes / bandwidth`` cycles; energy from MACs, DRAM bytes and static power.

    Dense MACs are scaled by the fraction of non-zero blocks; bytes are the input, the non-zero
    weights and the output, each moved once.
    """

    name = "coarse"

    def predict_batch(self, queries) -> np.ndarray:
        rows = []
        for layer, config, _schedule, sparsity in queries:
            em = _energy_model(config)
            rows.append((
                1.0 - _fraction(layer, config, sparsity), layer.macs, layer.params,
                layer.n * layer.cin * layer.h * layer.w, layer.n * layer.cout * layer.oh * layer.ow,
                config.act_bytes, config.weight_bytes, config.macs_per_cycle,
                config.dram_bytes_per_cycle, config.clock_mhz, em.mac_pj, em.dram_pj_per_byte,
                em.table["static_mw"],
            ))  # fmt: skip
        keep, macs, params, n_in, n_out, ab, wb, mpc, bpc, clock, mac_pj, dram_pj, static = (
            np.array(rows, dtype=np.float64).reshape(-1, 13).T
        )
        macs = macs * keep
        nbytes = n_in * ab + params * wb * keep + n_out * ab
        cycles = macs / mpc + nbytes / bpc
        energy = (macs * mac_pj + nbytes * dram_pj) * 1e-6 + static * cycles / clock / 1e3
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
        ``{"cycles": xgboost.Booster, "energy": xgboost.Booster}`` predicting
        ``log(simulated / mid)``.
    meta : dict, optional
        Training information saved in the sidecar.
    """

    name = "fine"

    def __init__(self, boosters: dict, meta: dict | None = None, nthread: int = 1):
        self.boosters = boosters
        self.meta = dict(meta or {})
        self.feature_names = feature_names()
        self.set_nthread(nthread)

    def set_nthread(self, nthread: int) -> None:
        """Threads of XGBoost's predictor (default 1: a batch of a few hundred rows is done in
        about a millisecond, and on a busy machine more threads only add contention; 0 = all
        cores, for batches of many thousands)."""
        for b in self.boosters.values():
            b.set_param({"nthread": int(nthread)})

    # ---------------------------------------------------------------- prediction
    def features_many(self, items):
        """Feature matrix and the mid model's ``(n, 2)`` predictions of the queries."""
        return features_batch(items)

    def predict_matrix(self, X: np.ndarray, mids: np.ndarray) -> np.ndarray:
        """``(n, 2)`` cycles and energy from feature rows and the mid model's predictions."""
        rc = self.boosters["cycles"].inplace_predict(X)
        re = self.boosters["energy"].inplace_predict(X)
        return mids * np.exp(np.stack([rc, re], axis=1))

    def predict_batch(self, queries) -> np.ndarray:
        """One vectorised mid analysis, one feature matrix, one call per booster."""
        X, mids = features_batch(queries)
        return self.predict_matrix(X, mids)

    # ---------------------------------------------------------------- training
    @classmethod
    def train(
        cls,
        X: np.ndarray,
        y_cycles: np.ndarray,
        y_energy: np.ndarray,
        mids: np.ndarray,
        params: dict | None = None,
        rounds: int = 300,
        meta: dict | None = None,
    ) -> FineModel:
        """Fit the two regressors on features ``X``, simulated cycles / energy and the mid
        model's ``(n, 2)`` predictions."""
        import xgboost as xgb

        p = {
            "objective": "reg:squarederror",
            "max_depth": 6,
            "eta": 0.08,
            "subsample": 0.85,
            "colsample_bytree": 0.85,
            "min_child_weight": 2,
            "lambda": 1.0,
            "nthread": 1,
            "seed": 0,
        }
        p.update(params or {})
        names = feature_names()
        boosters = {}
        for key, y, mid in (("cycles", y_cycles, mids[:, 0]), ("energy", y_energy, mids[:, 1])):
            target = np.log(np.asarray(y, float) / np.maximum(mid, 1e-12))
            d = xgb.DMatrix(X, label=target, feature_names=names)
            boosters[key] = xgb.train(p, d, num_boost_round=rounds)
        m = dict(meta or {})
        m.update({"params": p, "rounds": rounds, "n_train": int(len(X))})
        return cls(boosters, m)

    # ---------------------------------------------------------------- persistence
    def save(self, path: str | Path, fmt: str = "json") -> Path:
        """Save to ``<stem>.json`` (sidecar) + ``<stem>_cycles.<fmt>`` + ``<stem>_energy.<fmt>``
        (xgboost's native JSON or UBJSON).  Returns the sidecar path."""
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
            "target": "log(simulated / mid) of cycles and of energy_uj",
            "boosters": files,
            "meta": self.meta,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(side, indent=1, sort_keys=True, default=_json_default))
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
                "(python -m tvm_hapm.cost.train)"
            )
        names = feature_names()
        if side.get("feature_names") != names:
            missing = sorted(set(names) ^ set(side.get("feature_names") or []))
            raise SchemaVersionError(
                f"fine cost model {path} was trained on other features (differences: "
                f"{missing}); retrain it (python -m tvm_hapm.cost.train)"
            )
        boosters = {}
        for key, fname in side["boosters"].items():
            b = xgb.Booster()
            b.load_model(str(path.with_name(fname)))
            boosters[key] = b
        return cls(boosters, side.get("meta"))


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
