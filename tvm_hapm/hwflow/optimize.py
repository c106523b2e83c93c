"""HW-Flow's entry points: :func:`optimize` runs a search and :func:`finalize` fine-tunes,
measures and simulates its winner (see :mod:`tvm_hapm.hwflow`)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import onnx

from ..compress import flow
from ..compress.flow import simulate
from .env import EnvOptions, HWFlowEnv, prune_onnx_per_layer, with_values
from .search import SEARCHES

__all__ = ["INT8_EVAL_BATCH", "METHODS", "OptimizeResult", "finalize", "int8_accuracy", "optimize"]

METHODS = ("rl", "greedy", "evolution", "uniform", "per_mac")
# images per batch of int8_accuracy, and the calibration images of its quantized model
INT8_EVAL_BATCH = 150


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
        options = EnvOptions(objective=objective, max_accuracy_drop=max_accuracy_drop,
                             level=level, finetune_steps=finetune_steps, seed=seed)  # fmt: skip
        env = HWFlowEnv(model, data, config, options, **env_kwargs)
    start = len(env.history)
    best = SEARCHES[method](env, episodes, seed, progress)
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
        pruned = with_values(pruned, stats)
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
