"""Pruning ONNX models through the Relax passes (tvm_hapm.flow)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from tvm_hapm.data import load_bundled_model
from tvm_hapm.flow import prune_onnx, sparsity_of


def _weights(model):
    return {
        i.name: numpy_helper.to_array(i)
        for i in model.graph.initializer
        if numpy_helper.to_array(i).ndim in (2, 4)
    }


@pytest.mark.parametrize("method", ["hapm", "unstructured"])
def test_prune_onnx_writes_zeros_into_the_middle_layers_only(method):
    model = load_bundled_model(batch=1)
    before = model.SerializeToString()
    pruned, report = prune_onnx(model, method, 0.5)
    assert model.SerializeToString() == before  # the input is not changed
    onnx.checker.check_model(pruned)
    orig, new = _weights(model), _weights(pruned)
    changed = [n for n in orig if not np.array_equal(orig[n], new[n])]
    assert len(changed) == 1  # three layers: the first and the last stay dense
    name = changed[0]
    zeros = new[name] == 0
    assert abs(zeros.mean() - 0.5) < 0.1
    # only zeros were written, and the kept weights are untouched
    np.testing.assert_array_equal(new[name][~zeros], orig[name][~zeros])
    assert 0 < sparsity_of(pruned) < 0.5
    assert any(e.get("sparsity", 0) > 0 for e in report)


def test_prune_onnx_refuses_unknown_methods():
    with pytest.raises(ValueError, match="unknown pruning method"):
        prune_onnx(load_bundled_model(batch=1), "random", 0.5)
