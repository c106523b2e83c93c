"""Pruning passes: hardware-aware groups, unstructured magnitude pruning, filter pruning."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.relax.frontend.onnx import from_onnx

import tvm_hapm
from tvm_hapm.data import load_bundled_model
from tvm_hapm.models import zoo
from tvm_hapm.passes import hapm_pipeline
from tvm_hapm.passes.prune import (
    HardwareAwarePrune,
    MagnitudePrune,
    PruneError,
    find_layers,
    hapm_groups,
    layer_schedule,
    prune_report,
    pruning_masks,
)
from tvm_hapm.passes.prune_filter import FilterPrune
from tvm_hapm.target.config import HardwareConfig, get_config
from tvm_hapm.target.isa import Opcode
from tvm_hapm.target.layout import expand_weight_blocks
from tvm_hapm.testing import llvm_reference, run_vm

CUSTOM = HardwareConfig(name="prune-test", num_arrays=3, array_rows=4, array_cols=8)


def _conv_module(weights, x_shape=(1, 16, 6, 6), dense=None):
    """``main(x) = [dense(flatten(] conv2d(x, w0) [-> conv2d(., w1) ...] [)]``."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(x_shape, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = x
            for w in weights:
                y = bb.emit(relax.op.nn.conv2d(y, relax.const(w)))
            if dense is not None:
                y = bb.emit(relax.op.reshape(y, (x_shape[0], dense.shape[1])))
                wt = bb.emit(relax.op.permute_dims(relax.const(dense), [1, 0]))
                y = bb.emit(relax.op.matmul(y, wt))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def _rng_weights(shape, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 1, shape).astype("float32")
    w[w == 0] = 1.0  # no accidental zeros: every zero is a pruned weight
    return w


# --------------------------------------------------------------------------------------------
# (e) arguments
@pytest.mark.parametrize(
    "make",
    [
        lambda s, c: HardwareAwarePrune(s, criterion=c),
        lambda s, c: MagnitudePrune(s, criterion=c),
        lambda s, c: FilterPrune(s, criterion=c),
    ],
)
def test_bad_arguments(make):
    for bad in (-0.1, 1.0, 1.5, "half", None, True):
        with pytest.raises(ValueError, match="sparsity"):
            make(bad, "l1")
    with pytest.raises(ValueError, match="unknown importance criterion 'l3'"):
        make(0.5, "l3")
    assert issubclass(PruneError, ValueError)


def test_unknown_layer_names_are_refused():
    mod = _conv_module([_rng_weights((8, 16, 1, 1))])
    with pytest.raises(ValueError, match="unknown layers"):
        HardwareAwarePrune(0.5, CUSTOM, per_layer={"nope": 0.2})(mod)


# --------------------------------------------------------------------------------------------
# (a) structural equality with hand-built expected modules
def test_hapm_prune_matches_hand_built_module():
    # R = C = 8, one array: a group is one 8x8 block; the (cob 0, cib 1) block is the weakest
    cfg = HardwareConfig(name="one-array", num_arrays=1, array_rows=8, array_cols=8)
    w = np.full((16, 16, 1, 1), 2.0, "float32")
    w[:8, 8:] = 0.5  # block (0, 1)
    w[8:, :8] = 1.0  # block (1, 0)
    mod = _conv_module([w])
    out = HardwareAwarePrune(0.25, cfg, criterion="l1")(mod)
    expected_w = w.copy()
    expected_w[:8, 8:] = 0
    tvm.ir.assert_structural_equal(out["main"], _conv_module([expected_w])["main"])
    # 50 %: the two weakest blocks
    out = HardwareAwarePrune(0.5, cfg)(mod)
    expected_w[8:, :8] = 0
    tvm.ir.assert_structural_equal(out["main"], _conv_module([expected_w])["main"])


def test_magnitude_prune_matches_hand_built_module():
    w = np.arange(1, 2 * 16 * 1 * 1 + 1, dtype="float32").reshape(2, 16, 1, 1)
    w[1] *= -1
    d = np.arange(1, 2 * 36 * 3 + 1, dtype="float32").reshape(3, 72)[:, ::-1].copy()
    mod = _conv_module([w], dense=d)
    out = MagnitudePrune(0.25)(mod)
    ew, ed = w.copy(), d.copy()
    ew.reshape(-1)[np.argsort(np.abs(w).reshape(-1), kind="stable")[:8]] = 0
    ed[np.abs(d) <= np.sort(np.abs(d).reshape(-1))[53]] = 0
    tvm.ir.assert_structural_equal(out["main"], _conv_module([ew], dense=ed)["main"])
    # the input module is untouched
    assert np.count_nonzero(find_layers(mod)[0].weight == 0) == 0


def _two_resolution_module(wa, wb):
    """``conv2d(conv2d(x, wa), wb, strides=2)``: 1x1 convs on an 8x8 image, so a weight of
    ``wa`` does 64 MACs per image and one of ``wb`` 16."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 16, 8, 8), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, relax.const(wa)))
            y = bb.emit(relax.op.nn.conv2d(y, relax.const(wb), strides=2))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def _blocks(levels):
    """A (16, 16, 1, 1) weight whose 8x8 block (o, i) holds ``levels[o][i]``."""
    return np.kron(np.asarray(levels, "float32"), np.ones((8, 8), "float32"))[:, :, None, None]


def test_hapm_cost_weighted_global_ranking_and_cap():
    # one 8x8 array: a group is one block; 512 weights, 25 % = two blocks
    cfg = HardwareConfig(name="one-array", num_arrays=1, array_rows=8, array_cols=8)
    wa = _blocks([[2.0, 1.2], [1.5, 2.0]])  # 64 MACs per weight
    wb = _blocks([[0.9, 1.0], [1.1, 0.8]])  # 16 MACs per weight
    mod = _two_resolution_module(wa, wb)

    def expect(a_zero, b_zero):
        ea, eb = wa.copy(), wb.copy()
        for w, zero in ((ea, a_zero), (eb, b_zero)):
            for o, i in zero:
                w[8 * o : 8 * o + 8, 8 * i : 8 * i + 8] = 0
        return _two_resolution_module(ea, eb)["main"]

    # by importance alone the weakest blocks are wb's 0.8 and 0.9
    out = HardwareAwarePrune(0.25, cfg, global_=True)(mod)
    tvm.ir.assert_structural_equal(out["main"], expect([], [(1, 1), (0, 0)]))
    # per MAC saved, wa's blocks are cheaper: 1.2 / 64 and 1.5 / 64 are below 0.8 / 16
    out = HardwareAwarePrune(0.25, cfg, global_=True, cost_weighted=True)(mod)
    tvm.ir.assert_structural_equal(out["main"], expect([(0, 1), (1, 0)], []))
    assert {e["ranking"] for e in prune_report(out)} == {"global_per_mac"}
    # capped at a quarter of each layer: wa gives one block, the next cheapest is wb's 0.8
    out = HardwareAwarePrune(0.25, cfg, global_=True, cost_weighted=True, max_layer_sparsity=0.25)(
        mod
    )
    tvm.ir.assert_structural_equal(out["main"], expect([(0, 1)], [(1, 1)]))
    with pytest.raises(PruneError, match="out of reach with max_layer_sparsity 0.25"):
        HardwareAwarePrune(0.4, cfg, global_=True, max_layer_sparsity=0.25)(mod)
    for bad in (0, -0.5, 1.5, "all", True):
        with pytest.raises(PruneError, match="max_layer_sparsity"):
            HardwareAwarePrune(0.5, cfg, global_=True, max_layer_sparsity=bad)


# --------------------------------------------------------------------------------------------
# (c) magnitude pruning: exact zero counts
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9])
def test_magnitude_exact_zero_count(sparsity):
    mod = from_onnx(zoo.mobilenet_style())
    out = MagnitudePrune(sparsity)(mod)
    for lay in find_layers(out):
        assert np.count_nonzero(lay.weight == 0) == round(sparsity * lay.weight.size), lay.name
    out = MagnitudePrune(sparsity, global_=True)(mod)
    zeros = sum(np.count_nonzero(lay.weight == 0) for lay in find_layers(out))
    total = sum(lay.weight.size for lay in find_layers(out))
    assert zeros == round(sparsity * total)


# --------------------------------------------------------------------------------------------
# (b) hardware-aware groups
@pytest.mark.parametrize("cfg", [get_config("zedboard"), CUSTOM], ids=["zedboard", "custom"])
@pytest.mark.parametrize("criterion", ["l1", "l2"])
def test_hapm_zeroes_exactly_aligned_groups(cfg, criterion):
    mod = from_onnx(zoo.mobilenet_style())  # odd channels, depthwise convs, a dense layer
    target = 0.4
    out = HardwareAwarePrune(target, cfg, criterion=criterion)(mod)
    report = {e["layer"]: e for e in prune_report(out)}
    before = {lay.name: lay for lay in find_layers(mod)}
    for lay in find_layers(out):
        w0, w = before[lay.name].oihw(), lay.oihw()
        sched = layer_schedule(cfg, before[lay.name])
        assert sched.cob_group == report[lay.name]["cob_group"]
        gid = hapm_groups(w0, lay.groups, cfg, sched)
        n = int(gid.max()) + 1
        sizes = np.bincount(gid.ravel(), minlength=n)
        zeros = np.bincount(gid.ravel(), weights=(w == 0).ravel(), minlength=n)
        pruned = np.flatnonzero((zeros == sizes) & (sizes > 0))
        # every zero lies in a fully zeroed group, and the groups are the reported ones
        assert np.all((zeros == 0) | (zeros == sizes)), lay.name
        assert pruned.tolist() == report[lay.name]["pruned_groups"]
        # the pruned weights are the pruned groups' weights, nothing else changed
        np.testing.assert_array_equal(np.where(w == 0, 0, w0), w)
        # achieved sparsity is within one group of the target
        assert abs(sizes[pruned].sum() - target * w.size) <= sizes.max() / 2 + 1e-9, lay.name
        # importance order: every pruned group is at most as important as every kept one
        v = w0.astype(np.float64).ravel()
        if criterion == "l1":
            norm = np.bincount(gid.ravel(), np.abs(v), n) / np.maximum(sizes, 1)
        else:
            norm = np.sqrt(np.bincount(gid.ravel(), v * v, n) / np.maximum(sizes, 1))
        kept = np.setdiff1d(np.flatnonzero(sizes), pruned)
        if pruned.size and kept.size:
            assert norm[pruned].max() <= norm[kept].min() + 1e-12, lay.name


def test_hapm_groups_are_dispatch_blocks():
    # groups line up with the code generator's weight blocks: a pruned group empties exactly
    # G blocks (cob_group output blocks at one (cib, kh, kw))
    cfg = CUSTOM
    w = _rng_weights((21, 10, 3, 3))
    sched = layer_schedule(cfg, ((1, 10, 9, 9), w.shape, (1, 21, 7, 7)))
    G = sched.cob_group
    gid = hapm_groups(w, 1, cfg, sched)
    for g in np.unique(gid):
        mask = gid == g
        blocks = expand_weight_blocks(cfg, np.where(mask, 1, 0).astype("int8"), 1)
        nz = np.argwhere(np.any(blocks != 0, axis=(4, 5)))
        cobs, cibs, ys, xs = nz.T
        assert len({(c, y, x) for c, y, x in zip(cibs, ys, xs)}) == 1
        assert len(set(cobs // G)) == 1 and len(cobs) <= G
    # depthwise: only the diagonal blocks exist
    dw = _rng_weights((13, 1, 3, 3))
    gid = hapm_groups(dw, 13, cfg, 2)
    assert gid.shape == dw.shape
    blocks_total = len(np.unique(gid))
    assert blocks_total == len({(o // 8 // 2, o // 4) for o in range(13)}) * 9


def _gemm_count(prog):
    return sum(1 for ins in prog.instructions if ins.opcode == Opcode.GEMM)


def _load_wgt_count(prog):
    from tvm_hapm.target.isa import Buffer

    return sum(
        ins.y_size * ins.x_size
        for ins in prog.instructions
        if ins.opcode == Opcode.LOAD and ins.buffer == Buffer.WGT
    )


def _compile(qmod, cfg):
    programs = []
    ex = tvm.compile(qmod, target="hapm_fpga", relax_pipeline=hapm_pipeline(cfg, programs))
    return ex, [p for p in programs if p.info.get("kind") in ("conv2d", "dense")]


def test_hapm_prune_removes_gemms_and_stays_bit_exact():
    cfg = get_config("zedboard")
    mod = from_onnx(load_bundled_model())
    rng = np.random.default_rng(0)
    calib = [rng.uniform(0, 1, (1, 1, 16, 16)).astype("float32") for _ in range(2)]
    x = rng.uniform(0, 1, (1, 1, 16, 16)).astype("float32")
    sparsity = 0.5
    hw = HardwareAwarePrune(sparsity, cfg)(mod)
    mag = MagnitudePrune(sparsity)(mod)
    progs = {}
    for key, m in (("dense", mod), ("hapm", hw), ("magnitude", mag)):
        q = tvm_hapm.quantize(m, calib, cfg)
        ex, progs[key] = _compile(q, cfg)
        if key == "hapm":
            np.testing.assert_array_equal(run_vm(ex, x)[0], llvm_reference(q, x)[0])
    layers = find_layers(hw)
    assert len(progs["dense"]) == len(layers) == 3
    for lay, p0, p1, p2 in zip(layers, progs["dense"], progs["hapm"], progs["magnitude"]):
        g0, g1, g2 = _gemm_count(p0), _gemm_count(p1), _gemm_count(p2)
        blocks0, blocks1 = p0.info["nonzero_blocks"], p1.info["nonzero_blocks"]
        # the compiled weight blocks are exactly the non-empty blocks of the pruned weights
        expanded = expand_weight_blocks(cfg, lay.oihw(), lay.groups)
        assert blocks1 == int(np.any(expanded != 0, axis=(4, 5)).sum())
        # GEMMs (one per block and tile) and loaded weight blocks shrink in proportion
        assert blocks1 < blocks0
        assert g1 == pytest.approx(g0 * blocks1 / blocks0, rel=0.05), lay.name
        assert _load_wgt_count(p1) == pytest.approx(_load_wgt_count(p0) * blocks1 / blocks0, 0.05)
        # unstructured pruning at the same sparsity removes (almost) no GEMM
        assert g2 >= 0.95 * g0, lay.name
    total = [sum(_gemm_count(p) for p in progs[k]) for k in ("dense", "hapm", "magnitude")]
    assert total[1] <= 0.6 * total[0] and total[2] >= 0.95 * total[0]


def test_passes_deterministic_and_masks():
    mod = from_onnx(zoo.tiny_cnn())
    a = HardwareAwarePrune(0.5, CUSTOM, global_=True)(mod)
    b = HardwareAwarePrune(0.5, CUSTOM, global_=True)(mod)
    tvm.ir.assert_structural_equal(a, b)
    masks = pruning_masks(a)
    layers = {lay.name: lay for lay in find_layers(a)}
    assert set(masks) == set(layers)
    for name, mask in masks.items():
        assert mask.shape == layers[name].weight.shape  # dense: the stored (M, K) constant
        np.testing.assert_array_equal(mask, layers[name].weight != 0)
    r = prune_report(a)
    achieved = sum(e["zeros"] for e in r) / sum(e["weights"] for e in r)
    assert abs(achieved - 0.5) <= max(e["group_size"] for e in r) / sum(e["weights"] for e in r)
    assert not prune_report(mod)  # the input module is unchanged


# --------------------------------------------------------------------------------------------
# (d) filter pruning
def _llvm(mod, x):
    return run_vm(tvm.compile(mod, target="llvm"), x)[0]


def _channels(mod):
    return {lay.name: lay.oihw().shape[:2] for lay in find_layers(mod)}


def _small_residual_net():
    """Stem, a residual basic block, an inverted residual (depthwise + add), a head."""
    g = zoo.GraphBuilder(seed=3)
    x = g.conv_bn("input", 3, 13, 3, 1)
    x = g.basic_block(x, 13, 13, 1)
    x = g.inverted_residual(x, 13, 13, 1, expand=2)
    out = g.head(x, 13, 5)
    return g.build(out, (1, 3, 8, 8), (1, 5), "small_residual")


@pytest.mark.parametrize("name", ["small_residual", "tiny_cnn", "resnet_cifar", "mobilenet_style"])
def test_filter_prune_shrinks_and_matches_zeroed_model(name):
    if name == "small_residual":
        onnx_model = _small_residual_net()
    elif name == "resnet_cifar":
        onnx_model = zoo.resnet_cifar(depth=8)
    else:
        onnx_model = getattr(zoo, name)()
    mod = from_onnx(onnx_model)
    cfg = get_config("zedboard")
    report = []
    pruned = FilterPrune(0.5, cfg, report=report)(mod)
    zeroed = FilterPrune(0.5, cfg, shrink=False)(mod)
    before, after = _channels(zeroed), _channels(pruned)
    spaces = [e for e in report if "space" in e]
    shrunk = 0
    for s in spaces:
        for lay in s["layers"]:
            cout = after[lay][0]
            assert cout == s["kept_channels"]
            assert cout % cfg.array_cols == 0 or cout == before[lay][0], (lay, cout)
            shrunk += cout < before[lay][0]
    assert shrunk > 0
    assert pruned["main"].ret_ty.shape.values[1] == mod["main"].ret_ty.shape.values[1]
    if name in ("small_residual", "tiny_cnn"):  # llvm builds of the larger nets take ~10 s
        # same values as the model with those channels zeroed (llvm builds of both)
        x = (
            np.random.default_rng(1)
            .normal(
                size=(
                    1,
                    3,
                    8 if name == "small_residual" else 16,
                    8 if name == "small_residual" else 16,
                )
            )
            .astype("float32")
        )
        np.testing.assert_allclose(_llvm(pruned, x), _llvm(zeroed, x), rtol=1e-4, atol=1e-4)


def test_filter_prune_independent_reference_tiny_cnn():
    # zero by hand what FilterPrune removed: the consumers' weights reading removed channels
    mod = from_onnx(zoo.tiny_cnn())
    report = []
    pruned = FilterPrune(0.5, "zedboard", report=report)(mod)
    spaces = {e["layers"][0]: e for e in report if "space" in e}
    removed2, removed3 = spaces["lv4"]["removed"], spaces["lv7"]["removed"]
    norm = FilterPrune(0.0, "zedboard")(mod)  # the same normalised graph, nothing removed
    layers = {lay.name: lay for lay in find_layers(norm)}
    w3 = layers["lv7"].weight.copy()
    w3[:, removed2] = 0
    wd = layers["lv11"].weight.copy()  # (256, 10): feature c*16 + p
    for c in removed3:
        wd[c * 16 : (c + 1) * 16] = 0
    from tvm_hapm.passes.prune import with_weights

    ref = with_weights(norm, {"lv7": w3, "lv11": wd}, list(layers.values()), [])
    x = np.random.default_rng(2).normal(size=(1, 3, 16, 16)).astype("float32")
    np.testing.assert_allclose(_llvm(pruned, x), _llvm(ref, x), rtol=1e-4, atol=1e-4)


def test_filter_prune_residual_and_depthwise_coupling():
    mod = from_onnx(zoo.resnet_cifar(depth=8))
    report = []
    FilterPrune(0.5, "zedboard", report=report)(mod)
    coupled = [e for e in report if "space" in e and len(e["layers"]) > 1]
    # the stem conv and the first block's second conv feed the same add; so do the projection
    # shortcuts and the last convs of later stages
    assert len(coupled) == 3
    for e in coupled:
        assert e["kept_channels"] < e["channels"]

    mod = from_onnx(zoo.mobilenet_style())
    pruned = FilterPrune(0.5, "zedboard")(mod)
    layers = find_layers(pruned)
    for prev, lay in zip(layers, layers[1:]):
        if lay.groups > 1:  # depthwise: its channels follow its producer
            cout, cin_g = lay.weight.shape[:2]
            assert cin_g == 1 and lay.groups == cout == prev.weight.shape[0]
            assert cout % 8 == 0


def test_filter_prune_refuses_unknown_operator():
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 4, 6, 6), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, relax.const(_rng_weights((16, 4, 3, 3)))))
            y = bb.emit(relax.op.nn.softmax(y, axis=1))
            y = bb.emit(relax.op.nn.conv2d(y, relax.const(_rng_weights((4, 16, 1, 1)))))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    with pytest.raises(PruneError, match=r"relax\.nn\.softmax"):
        FilterPrune(0.5, round_to=4)(bb.get())
