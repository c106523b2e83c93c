"""PyTorch front end of tvm-hapm (the optional extra ``pip install 'tvm-hapm[torch]'``).

For a user with their own ``torch.nn.Module``:

* :func:`compute_masks` / :func:`prune`: HAPM pruning with exactly the groups and rankings of the
  Relax pass :func:`tvm_hapm.passes.HardwareAwarePrune` (the masks *are* computed by that pass,
  on the module's ONNX export, and mapped back to its parameters by name), plus unstructured
  and filter pruning as baselines;
* :func:`apply_masks`: the masks held fixed while the user's own training loop fine-tunes
  (``torch.nn.utils.parametrize``); :func:`fit` is a ready-made loop;
* :func:`export_onnx`: the pruned module as ONNX for ``hapm compile`` /
  ``tvm.compile(target="hapm_fpga")``;
* :func:`pruning_report`: per layer, the sparsity, the hardware groups removed and the cycles
  the cost model predicts saved.

``import tvm_hapm`` never imports torch; only ``import tvm_hapm.torch`` does.
"""

from __future__ import annotations

try:
    import torch as _torch  # noqa: F401  (fail here, with the install hint, if torch is missing)
except ImportError as _err:  # pragma: no cover - exercised without torch installed
    raise ImportError(
        "tvm_hapm.torch needs PyTorch: pip install 'tvm-hapm[torch]' (torch==2.13.0, CPU build)"
    ) from _err

from .export import ExportError, baked, export_onnx, load_onnx_weights
from .masks import Masks, WeightMask, apply_masks, remove_masks
from .models import mobilenet_style, resnet_cifar
from .onnx_module import OnnxModule
from .prune import compute_masks, prune, pruning_report
from .quantized import QuantizedRunner, UnsupportedOperatorError
from .train import TrainConfig, accuracy, fit, predict

__all__ = [
    "ExportError",
    "Masks",
    "OnnxModule",
    "QuantizedRunner",
    "TrainConfig",
    "UnsupportedOperatorError",
    "WeightMask",
    "accuracy",
    "apply_masks",
    "baked",
    "compute_masks",
    "export_onnx",
    "fit",
    "load_onnx_weights",
    "mobilenet_style",
    "predict",
    "prune",
    "pruning_report",
    "remove_masks",
    "resnet_cifar",
]
