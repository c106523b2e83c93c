"""HW-Flow: search per-layer HAPM pruning ratios that minimise latency or energy under an accuracy
budget, with the hardware judged at a chosen abstraction level.  See ``docs/hwflow.md``.

``optimize(model, data, config, objective, max_accuracy_drop, level, method, ...)`` returns an
:class:`OptimizeResult`.  Pieces:

* ``env`` -- :class:`HWFlowEnv`: the layers of the model (``prunable_layers`` of the
  ``from_onnx`` module), HAPM masks of every layer at every ratio of a grid (one
  :func:`HardwareAwarePrune` run per grid ratio; a layer's mask depends only on its own ratio, so
  any per-layer combination is exactly what ``per_layer=`` gives), per-layer hardware cost tables
  at the chosen level (coarse / mid / fine cost models on each layer's exact block mask; ``sim``:
  the accelerator programs of each grid ratio through the timing and energy models,
  :func:`~tvm_hapm.compress.flow.time_programs`) and an accuracy
  estimate (float top-1 on a validation split, PyTorch or NumPy, after reconstruction or batch
  norm recalibration and an optional short fine-tuning).
* ``search`` -- methods with the same evaluation budget: ``"rl"`` (AMC-style sequential
  Gaussian policy, REINFORCE with a moving baseline), ``"greedy"`` (latency saliency),
  ``"evolution"`` and the ``"uniform"`` / ``"per_mac"`` bisections.
* ``optimize`` -- :func:`optimize` and :func:`finalize`: the winner pruned with
  ``HardwareAwarePrune(per_layer=...)`` into ONNX, fine-tuned, its int8 validation and test
  accuracy and simulated latency / energy; ``plot`` -- :func:`pareto_plot`.
* ``calibrate`` -- :func:`calibrate_budget`: the searches' accuracy budget calibrated on
  validation against what the winners' recovery achieves.
"""

from ..compress.flow import simulate
from ..compress.numpynet import NumpyNet  # the search's accuracy estimate (re-exported)
from .calibrate import budget_from_points, calibrate_budget
from .env import (
    ALLOCATIONS,
    DEFAULT_GRID,
    LEVELS,
    OBJECTIVES,
    RECONSTRUCT_RIDGE,
    Candidate,
    EnvOptions,
    HWFlowEnv,
    prune_onnx_per_layer,
    validation_split,
)
from .optimize import INT8_EVAL_BATCH, METHODS, OptimizeResult, finalize, int8_accuracy, optimize
from .plot import pareto_plot
from .search import (
    allocation_bisection,
    search_evolution,
    search_greedy,
    search_per_mac,
    search_rl,
    search_start,
    search_uniform,
)

__all__ = [
    "ALLOCATIONS",
    "budget_from_points",
    "calibrate_budget",
    "DEFAULT_GRID",
    "INT8_EVAL_BATCH",
    "LEVELS",
    "METHODS",
    "OBJECTIVES",
    "RECONSTRUCT_RIDGE",
    "Candidate",
    "EnvOptions",
    "HWFlowEnv",
    "NumpyNet",
    "OptimizeResult",
    "allocation_bisection",
    "finalize",
    "int8_accuracy",
    "optimize",
    "pareto_plot",
    "prune_onnx_per_layer",
    "search_evolution",
    "search_greedy",
    "search_per_mac",
    "search_rl",
    "search_start",
    "search_uniform",
    "simulate",
    "validation_split",
]
