"""The accuracy budget of a search, calibrated on validation against the winners' recovery.

A search judges each candidate by a cheap estimate (reconstruction, perhaps a short fine-tuning)
while its winner gets a long recovery.  On a real dataset the estimate is far more pessimistic:
on Fashion-MNIST's ResNet-20, uniform 50% loses 2.72 points as the search sees it and 0.78 after
two epochs of fine-tuning.  With the budget applied to the estimate, the searches stop where the
recovered models would still have most of the budget left.  :func:`calibrate_budget` measures
both drops at a few uniform allocations, on the validation split only, and
:func:`budget_from_points` turns them into the budget the search should apply to its estimate.
The final choice among runs must still check the recovered drop (``finalize``).
"""

from __future__ import annotations

import numpy as np

from .env import HWFlowEnv
from .optimize import OptimizeResult, finalize

__all__ = ["budget_from_points", "calibrate_budget"]


def budget_from_points(estimated, recovered, max_drop: float) -> float:
    """The estimated drop at which the recovered drop reaches ``max_drop``.

    Parameters
    ----------
    estimated, recovered : sequence of float
        Drops (points) of the same candidates: as the search estimates them, and after the
        winners' recovery.
    max_drop : float
        The budget on the recovered drop.

    Returns
    -------
    float
        The recovered drop, interpolated piecewise linearly through ``(0, 0)`` and the points
        (sorted by estimate and made non-decreasing, since a larger estimated drop is not
        expected to recover better), reaches ``max_drop`` at this estimate; never beyond the
        largest estimate measured (no extrapolation), never below 0.
    """
    est = np.concatenate([[0.0], np.asarray(estimated, float)])
    rec = np.concatenate([[0.0], np.asarray(recovered, float)])
    if len(est) != len(rec):
        raise ValueError(f"{len(est) - 1} estimated drops for {len(rec) - 1} recovered ones")
    if not (np.isfinite(est).all() and np.isfinite(rec).all()):
        raise ValueError("the drops must be finite")
    order = np.argsort(est, kind="stable")
    est, rec = est[order], np.maximum.accumulate(rec[order])
    if rec[-1] <= max_drop:
        return max(float(est[-1]), 0.0)
    k = int(np.argmax(rec > max_drop))  # the first point over the budget (k >= 1)
    t = (max_drop - rec[k - 1]) / max(rec[k] - rec[k - 1], 1e-12)
    return max(float(est[k - 1] + t * (est[k] - est[k - 1])), 0.0)


def calibrate_budget(
    env: HWFlowEnv, ratios, finetune_steps: int, dense_val_accuracy: float, seed: int = 0,
    train_config=None, measured=(), on_point=None,
) -> dict:  # fmt: skip
    """Measure, at uniform allocations, the drop ``env`` estimates and the int8 validation drop
    after the winners' recovery (:func:`finalize` with ``finetune_steps``), and the budget they
    give (:func:`budget_from_points` at ``env``'s own budget).

    Parameters
    ----------
    env : HWFlowEnv
        The searches' environment (its candidates and accuracy cache are shared with them).
    ratios : sequence of float
        Uniform ratios to measure (each taken to the nearest grid ratio).
    finetune_steps : int
        The winners' fine-tuning.
    dense_val_accuracy : float
        The dense model's int8 validation accuracy (a fraction), as the final choice measures it.
    seed, train_config
        As for :func:`finalize`.
    measured : sequence of dict, optional
        Points an earlier call measured with the same environment and recovery (as in the
        returned ``points``): a ratio found there is not measured again.  A recovery of ResNet-56
        takes about an hour on one core, so a long calibration can resume where it stopped.
    on_point : callable, optional
        Called with the list of points so far after each new measurement (a checkpoint).

    Returns
    -------
    dict
        ``points`` (``ratio``, ``estimated_drop``, ``recovered_val_int8_drop`` of each) and
        ``search_budget``.  Only the validation split is used.
    """
    known = {round(float(p["ratio"]), 6): dict(p) for p in measured}
    points = []
    for ratio in ratios:
        gi = int(np.argmin(np.abs(env.grid - ratio)))
        if round(float(env.grid[gi]), 6) in known:
            points.append(known[round(float(env.grid[gi]), 6)])
            continue
        idx = env.allocation("uniform", gi)
        cand = env.evaluate(idx, "calibration")
        res = OptimizeResult(
            "calibration", env.level, env.objective, dict(zip(env.names, cand.ratios)),
            env.recovered_model(idx), {}, cand.accuracy, env.dense_accuracy, cand.drop, 0.0, 1,
        )  # fmt: skip
        f = finalize(res, env, None, finetune_steps, False, seed, train_config=train_config)
        points.append({
            "ratio": float(env.grid[gi]),
            "estimated_drop": cand.drop,
            "recovered_val_int8_drop": 100 * (dense_val_accuracy - f["val_int8_accuracy"]),
        })  # fmt: skip
        if on_point is not None:
            on_point(list(points))
    budget = budget_from_points(
        [p["estimated_drop"] for p in points],
        [p["recovered_val_int8_drop"] for p in points],
        env.budget,
    )
    return {"points": points, "search_budget": budget}
