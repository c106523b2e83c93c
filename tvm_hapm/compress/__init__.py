"""Model compression on ONNX models: pruning by a Relax pass, recovery and the one evaluate path.

* :mod:`~tvm_hapm.compress.flow`: prune (``prune_onnx``: HAPM, unstructured, filter; iterative),
  recover (``recover``: least-squares reconstruction, then fine-tuning, in PyTorch when installed)
  and evaluate (``int8_accuracy``, ``simulate``, ``evaluate_deployed``: quantize, compile and
  simulate with the hardware config always passed), also as ``tvm_hapm.flow``;
* :mod:`~tvm_hapm.compress.reconstruct`: layer-wise least-squares reconstruction of pruned weights;
* :mod:`~tvm_hapm.compress.numpynet`: a NumPy forward pass of the ONNX graphs the flow handles;
* :mod:`~tvm_hapm.compress.relax_training`: fine-tuning inside TVM (``relax.training``), the
  engine without PyTorch.
"""

from . import flow, numpynet, reconstruct, relax_training

__all__ = ["flow", "numpynet", "reconstruct", "relax_training"]
