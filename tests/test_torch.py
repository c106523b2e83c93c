"""The PyTorch front end: export, masks equal to the Relax pass's, masks held in training, the
ONNX graph as a torch module, the quantized module run in PyTorch bit for bit as TVM's build."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
import tvm
from onnx import numpy_helper
from tvm.relax.frontend.onnx import from_onnx

import tvm_hapm
import tvm_hapm.torch as ht
from tvm_hapm import flow
from tvm_hapm.compress.numpynet import NumpyNet
from tvm_hapm.data import load_bundled_model, load_digits, set_batch
from tvm_hapm.models import zoo
from tvm_hapm.passes import hapm_pipeline, pruning_masks
from tvm_hapm.passes.prune import prunable_layers
from tvm_hapm.target.config import get_config
from tvm_hapm.target.layout import expand_weight_blocks
from tvm_hapm.testing import llvm_reference

torch.set_num_threads(2)
CFG = get_config("zedboard")
RESNET_SHAPE, MOBILE_SHAPE = (1, 1, 32, 32), (1, 3, 32, 40)


def _trained_like(module, seed=0):
    """Random batch-norm statistics and affine parameters, as a trained network has (a fresh
    one's zero-initialised gammas would fold whole layers to zero)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(0.5 + torch.rand(c, generator=gen))
                m.bias.copy_(0.1 * torch.randn(c, generator=gen))
                m.running_mean.copy_(0.1 * torch.randn(c, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(c, generator=gen))
    return module.eval()


def _resnet():
    return _trained_like(ht.resnet_cifar(8, in_ch=1, width=16, seed=0))


def _mobilenet():
    return _trained_like(ht.mobilenet_style(seed=0))


def _relax_masks(model, method, sparsity, ranking, keep_first_last=True):
    """The masks the Relax pass gives on the ONNX graph, by ONNX weight name."""
    mod = from_onnx(model)
    layers = prunable_layers(mod)
    skip = [layers[0]["layer"], layers[-1]["layer"]] if keep_first_last else []
    if method == "filter":
        skip = []
    pruned = flow.pruning_pass(method, sparsity, CFG, skip=skip, ranking=ranking)(mod)
    masks = pruning_masks(pruned)
    # the pass may rebuild the function (new variable names): pair its own layers
    layers = prunable_layers(pruned)
    names = flow.paired_weight_names(model, layers)
    weights = {t.name: t for t in model.graph.initializer}
    out = {}
    for lay, w in zip(layers, names):
        m = masks.get(lay["layer"])
        if m is None:
            continue
        out[w] = m if tuple(m.shape) == tuple(weights[w].dims) else m.T
    return out


WITHOUT_TORCH = """
import importlib.abc, sys

class NoTorch(importlib.abc.MetaPathFinder):  # as if PyTorch were not installed
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "torch":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NoTorch())
import numpy as np, tvm, tvm_hapm, tvm_hapm.cli
from tvm_hapm import flow
from tvm_hapm.data import load_bundled_model, load_digits
x_tr, _, x_te, y_te = load_digits(size=16, channels=1)
acc = flow.int8_accuracy(load_bundled_model(1), x_tr[:32], x_te[:64], y_te[:64], "zedboard")
assert acc.engine == "tvm" and acc.accuracy > 0.9, acc
lat = flow.simulate(load_bundled_model(1), "zedboard", x_tr, x_te)[0]
assert lat > 0
try:
    import tvm_hapm.torch
except ImportError as err:
    assert "pip install 'tvm-hapm[torch]'" in str(err), err
else:
    raise AssertionError("tvm_hapm.torch imported without torch")
print("core ok")
"""


def test_the_core_imports_and_works_without_torch():
    # (apache-tvm-ffi itself imports torch when it is installed, so "not imported" cannot be
    # observed in this environment; what is shown is that nothing of the core needs it)
    proc = subprocess.run(
        [sys.executable, "-c", WITHOUT_TORCH], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0 and "core ok" in proc.stdout, proc.stderr


@pytest.mark.parametrize(
    "make, shape, builder",
    [
        (_resnet, RESNET_SHAPE, lambda: zoo.resnet_cifar(8, in_ch=1)),
        (_mobilenet, MOBILE_SHAPE, zoo.mobilenet_style),
    ],
    ids=["resnet", "mobilenet"],
)
def test_export_has_the_zoo_layers_and_computes_the_module(make, shape, builder):
    module = make()
    model = ht.export_onnx(module, shape)
    assert [n.op_type for n in model.graph.node] == [n.op_type for n in builder().graph.node]
    state = dict(module.state_dict())
    for init in model.graph.initializer:  # every parameter or buffer keeps its name and value
        if init.name in state:
            np.testing.assert_array_equal(numpy_helper.to_array(init), state[init.name].numpy())
    assert {n for n, _ in module.named_parameters()} <= {t.name for t in model.graph.initializer}
    x = np.random.default_rng(0).random((4, *shape[1:]), dtype=np.float32)
    with torch.no_grad():
        ref = module(torch.from_numpy(x)).numpy()
    ours = llvm_reference(from_onnx(set_batch(model, 4)), x)[0]  # TVM's own import and build
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("ranking", ["layer", "global", "per_mac"])
@pytest.mark.parametrize("make, shape", [(_resnet, RESNET_SHAPE), (_mobilenet, MOBILE_SHAPE)],
                         ids=["resnet", "mobilenet"])  # fmt: skip
def test_hapm_masks_equal_the_relax_pass(make, shape, ranking):
    module = make()
    masks = ht.compute_masks(module, shape, 0.5, "hapm", ranking=ranking, config=CFG)
    ref = _relax_masks(ht.export_onnx(module, shape), "hapm", 0.5, ranking)
    assert set(masks.masks) == set(ref) and len(ref) >= 8
    for name, m in masks.masks.items():
        assert m.dtype == torch.bool
        np.testing.assert_array_equal(m.numpy(), ref[name], err_msg=name)
        assert tuple(m.shape) == tuple(module.get_parameter(name).shape)
    assert 0.3 < masks.sparsity() < 0.7
    assert all(e["parameter"] in masks.masks for e in masks.report)


@pytest.mark.parametrize("method", ["unstructured", "filter"])
def test_baseline_masks_equal_the_relax_pass(method):
    module = _mobilenet()
    masks = ht.compute_masks(module, MOBILE_SHAPE, 0.4, method, config=CFG)
    ref = _relax_masks(ht.export_onnx(module, MOBILE_SHAPE), method, 0.4, "layer")
    assert set(masks.masks) == set(ref)
    for name, m in masks.masks.items():
        np.testing.assert_array_equal(m.numpy(), ref[name], err_msg=name)


def test_per_layer_takes_module_and_parameter_names():
    module = _resnet()
    masks = ht.compute_masks(
        module, RESNET_SHAPE, 0.0, ranking="layer", config=CFG,
        per_layer={"stages.0.0.conv1.conv": 0.5, "stages.1.0.conv2.conv.weight": 0.25},
    )  # fmt: skip
    sparsity = {n: 1 - m.float().mean().item() for n, m in masks.masks.items()}
    assert sparsity["stages.0.0.conv1.conv.weight"] == pytest.approx(0.5, abs=0.1)
    assert sparsity["stages.1.0.conv2.conv.weight"] == pytest.approx(0.25, abs=0.1)
    assert sparsity["stages.2.0.conv1.conv.weight"] == 0
    with pytest.raises(KeyError, match="not prunable layers"):
        ht.compute_masks(module, RESNET_SHAPE, 0.0, config=CFG, per_layer={"nope": 0.5})


def test_masks_hold_while_training_and_are_exported():
    module = _resnet().train()
    opt = torch.optim.SGD(module.parameters(), lr=0.05, momentum=0.9)  # built before the masks
    masks = ht.prune(module, RESNET_SHAPE, 0.5, config=CFG)
    before = {n: module.get_parameter(n.replace(".weight", ".parametrizations.weight.original"))
              .detach().clone() for n in masks.masks}  # fmt: skip
    x = torch.rand(16, *RESNET_SHAPE[1:])
    y = torch.randint(0, 10, (16,))
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(module(x), y).backward()
        opt.step()
    model = ht.export_onnx(module, RESNET_SHAPE)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for name, m in masks.masks.items():
        w = inits[name]
        assert not w[~m.numpy()].any(), name  # pruned weights exported as zeros
        assert (w[m.numpy()] != 0).all(), name
        owner, attr = name.rpartition(".")[0], name.rpartition(".")[2]
        live = getattr(module.get_submodule(owner), attr).detach()
        assert not torch.equal(live[m], before[name][m]), name  # the kept weights trained
    assert "Mul" not in {n.op_type for n in model.graph.node}
    ht.remove_masks(module)
    assert not any("parametrizations" in n for n, _ in module.named_parameters())


def test_compiled_pruned_model_issues_no_gemm_for_a_removed_group():
    module = _mobilenet()
    masks = ht.prune(module, MOBILE_SHAPE, 0.5, config=CFG)
    model = ht.export_onnx(module, MOBILE_SHAPE)
    x = np.random.default_rng(0).random((4, *MOBILE_SHAPE), dtype=np.float32)
    qmod = tvm_hapm.quantize(from_onnx(model), list(x), CFG)
    programs = []
    tvm.compile(qmod, target="hapm_fpga-zedboard", relax_pipeline=hapm_pipeline(CFG, programs))
    kinds = ("conv2d", "conv2d_residual", "dense")
    layer_progs = [p for p in programs if p.info.get("kind") in kinds]
    names = flow.paired_weight_names(model, prunable_layers(from_onnx(model)))
    assert len(layer_progs) == len(names)
    checked = 0
    for prog, name in zip(layer_progs, names):
        if name not in masks.masks:
            continue
        keep = masks.masks[name].numpy().astype(np.int8)
        oihw = keep if keep.ndim == 4 else keep[:, :, None, None]
        groups = module.get_submodule(name.rpartition(".")[0]).groups if keep.ndim == 4 else 1
        blocks = expand_weight_blocks(CFG, oihw, groups)
        kept_blocks = int(np.any(blocks != 0, axis=(4, 5)).sum())
        all_blocks = int(np.any(expand_weight_blocks(CFG, np.ones_like(oihw), groups) != 0,
                                axis=(4, 5)).sum())  # fmt: skip
        # the program holds (and GEMMs) exactly the blocks with a kept weight: every block of a
        # removed group is gone
        assert prog.info["nonzero_blocks"] == kept_blocks, name
        checked += kept_blocks < all_blocks
    assert checked >= 4


def test_pruning_report_predicts_savings_where_groups_were_removed():
    module = _resnet()
    masks = ht.prune(module, RESNET_SHAPE, 0.5, config=CFG)
    rows = ht.pruning_report(module, masks, level="mid")
    assert [r["parameter"] for r in rows][0] == "stem.conv.weight"
    for r in rows:
        if r["groups_removed"]:
            assert r["cycles_saved"] > 0 and r["sparsity"] > 0
        else:
            assert r["cycles_saved"] == pytest.approx(0, abs=1e-6)
    assert rows[0]["sparsity"] == 0 and rows[-1]["sparsity"] == 0  # first and last kept


@pytest.mark.parametrize(
    "builder",
    [lambda: zoo.resnet_cifar(8, in_ch=1, batch=4), lambda: zoo.mobilenet_style(batch=4),
     lambda: zoo.tiny_cnn(batch=4)],
    ids=["resnet", "mobilenet", "tiny"],
)  # fmt: skip
def test_onnx_module_computes_what_numpynet_does(builder):
    model = builder()
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    x = np.random.default_rng(1).random(shape, dtype=np.float32)
    net = ht.OnnxModule(model).eval()
    with torch.no_grad():
        ours = net(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(ours, NumpyNet(model).forward(x), rtol=1e-4, atol=1e-4)
    # untouched, the values go back bit for bit
    back = net.to_onnx()
    for a, b in zip(back.graph.initializer, model.graph.initializer):
        np.testing.assert_array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b))


@pytest.mark.parametrize("pads", [[1, 1, 1, 1], [0, 1, 1, 0], [2, 0, 1, 1]])
def test_onnx_module_pads_convolutions_as_onnx_does(pads):
    # symmetric pads go to conv2d, the others through an explicit pad: both equal NumPy's
    from onnx import TensorProto, helper

    w = np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], pads=pads, strides=[2, 1])], "pad",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 9, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "w")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    x = np.random.default_rng(1).standard_normal((2, 3, 9, 8)).astype(np.float32)
    with torch.no_grad():
        ours = ht.OnnxModule(model)(torch.from_numpy(x)).numpy()
    ref = NumpyNet(model).forward(x)
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)


def test_onnx_module_fine_tunes_with_masks_and_writes_back():
    model = load_bundled_model(batch=1)
    pruned, _ = flow.prune_onnx(model, "hapm", 0.5)
    from tvm_hapm.compress.relax_training import extract_masks

    masks = extract_masks(pruned)
    net = ht.apply_masks(ht.OnnxModule(pruned), masks)
    x, y, _, _ = load_digits(size=16, channels=1)
    hist = ht.fit(net, (x, y), ht.TrainConfig(epochs=1, lr=0.01, crop_padding=1, flip=False))
    assert hist["steps"] == len(x) // 128 and hist["images_per_s"] > 0
    tuned = net.to_onnx()
    assert [n.op_type for n in tuned.graph.node] == [n.op_type for n in pruned.graph.node]
    after = {t.name: numpy_helper.to_array(t) for t in tuned.graph.initializer}
    before = {t.name: numpy_helper.to_array(t) for t in pruned.graph.initializer}
    for name, m in masks.items():
        assert not after[name][~m].any()
        assert not np.array_equal(after[name][m], before[name][m])
    onnx.checker.check_model(tuned)


def test_distillation_pulls_the_student_towards_the_teacher():
    x, y, _, _ = load_digits(size=16, channels=1)
    teacher = ht.OnnxModule(load_bundled_model(batch=1))
    says = ht.predict(teacher, x).argmax(1)
    wrong = (says + 1) % 10  # labels that contradict the teacher everywhere

    def agreement(distill):
        student = ht.OnnxModule(flow.prune_onnx(load_bundled_model(batch=1), "hapm", 0.5)[0])
        cfg = ht.TrainConfig(epochs=3, lr=0.01, crop_padding=0, flip=False, distill=distill)
        ht.fit(student, (x, wrong), cfg, teacher=teacher)
        return ht.accuracy(student, x, says)

    without, with_ = agreement(0.0), agreement(1.0)
    assert without < 0.5 and with_ > 0.9, (without, with_)
    with pytest.raises(ValueError, match="teacher"):
        ht.fit(teacher, (x, y), ht.TrainConfig(distill=0.5))
    with pytest.raises(ValueError, match="distill"):
        ht.TrainConfig(distill=1.5)


@pytest.mark.parametrize("preset", ["zedboard", "int16"])
@pytest.mark.parametrize(
    "builder, shape",
    [(load_bundled_model, (1, 16, 16)), (lambda b: zoo.mobilenet_style(batch=b),
     (3, 32, 40)), (lambda b: zoo.resnet_cifar(8, in_ch=1, batch=b), (1, 32, 32))],
    ids=["digits-maxpool", "mobilenet-depthwise", "resnet-residual"],
)  # fmt: skip
def test_quantized_runner_is_bit_exact_with_tvm(builder, shape, preset):
    if preset == "int16":
        cfg = CFG.replace(name="int16-test", act_bits=16, weight_bits=16, num_arrays=2)
    else:
        cfg = CFG
    rng = np.random.default_rng(2)
    x_cal = rng.random((16, *shape), dtype=np.float32)
    x = rng.random((16, *shape), dtype=np.float32)
    qmod = tvm_hapm.quantize(from_onnx(builder(16)), [x_cal], cfg)
    runner = ht.QuantizedRunner(qmod)
    np.testing.assert_array_equal(runner(x).numpy(), llvm_reference(qmod, x)[0])
    # any batch: the first images alone give the same outputs
    np.testing.assert_array_equal(runner(x[:3]).numpy(), runner(x).numpy()[:3])


def test_quantized_runner_refuses_what_it_does_not_implement():
    from tvm import relax

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((2, 4), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.sigmoid(x))
        bb.emit_func_output(out)
    with pytest.raises(ht.UnsupportedOperatorError, match="sigmoid"):
        ht.QuantizedRunner(bb.get())


def test_int8_accuracy_engines_agree():
    x_tr, _, x_te, y_te = load_digits(size=16, channels=1)
    model = load_bundled_model(batch=1)
    a = flow.int8_accuracy(model, x_tr[:64], x_te, y_te, CFG, engine="torch", check=True)
    b = flow.int8_accuracy(model, x_tr[:64], x_te, y_te, CFG, engine="tvm")
    assert a.engine == "torch" and b.engine == "tvm"
    assert a.checked == {"images": 64, "bit_exact": True}
    np.testing.assert_array_equal(a.correct, b.correct)
    assert len(a.correct) == len(y_te) == 450  # every image, the last partial batch included
    assert a.accuracy > 0.95


def test_recover_fine_tunes_in_torch_and_keeps_the_masks():
    x, y, _, _ = load_digits(size=16, channels=1)
    model = load_bundled_model(batch=1)
    pruned, _ = flow.prune_onnx(model, "hapm", 0.6)
    out, info = flow.recover(pruned, model, (x, y), steps=20, engine="torch")
    assert info["engine"] == "torch" and info["finetune_images_per_s"] > 0
    assert info["kept"] in ("reconstructed", "finetuned")
    zeros = {t.name: numpy_helper.to_array(t) == 0 for t in pruned.graph.initializer}
    for t in out.graph.initializer:
        a = numpy_helper.to_array(t)
        if a.ndim in (2, 4):
            assert (a[zeros[t.name]] == 0).all(), t.name


@pytest.mark.parametrize("engine", ["torch", "tvm"])
def test_finetune_holds_the_zeros_and_trains_the_rest(engine):
    x, y, _, _ = load_digits(size=16, channels=1)
    pruned, _ = flow.prune_onnx(load_bundled_model(batch=1), "hapm", 0.6)
    tuned, history = flow.finetune(pruned, (x, y), steps=10, engine=engine)
    assert history["images_per_s"] > 0
    before = {t.name: numpy_helper.to_array(t) for t in pruned.graph.initializer}
    after = {t.name: numpy_helper.to_array(t) for t in tuned.graph.initializer}
    changed = 0
    for name, w in before.items():
        if w.ndim in (2, 4):
            zero = w == 0
            assert not after[name][zero].any(), name
            changed += not np.array_equal(after[name][~zero], w[~zero])
    assert changed >= 3


def test_onnx_module_trains_batch_norm_as_torch_does():
    module = _resnet().train()
    net = ht.OnnxModule(ht.export_onnx(module, RESNET_SHAPE)).train()
    x = torch.rand(8, *RESNET_SHAPE[1:])
    with torch.no_grad():
        ref, ours = module(x), net(x)  # batch statistics, running statistics updated
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    back = {t.name: numpy_helper.to_array(t) for t in net.to_onnx().graph.initializer}
    for name, value in module.state_dict().items():
        if name.endswith(("running_mean", "running_var")):
            np.testing.assert_allclose(back[name], value.numpy(), rtol=1e-5, atol=1e-6)
