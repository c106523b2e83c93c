"""Lowering through TIR: schedule, tensorize, DMA injection, codegen and ``tvm.build``."""

import numpy as np
import pytest
import tvm
import tvm_ffi
from tvm import te

import tvm_hapm  # noqa: F401  (registers the target and the TIR pipeline)
from tvm_hapm.runtime.driver import run_program
from tvm_hapm.runtime.simulator import Simulator
from tvm_hapm.target import isa, layout
from tvm_hapm.target import tir as htir
from tvm_hapm.target.config import get_config
from tvm_hapm.target.intrin import GEMM_MARKER, SCOPE_ACC, SCOPE_INP, SCOPE_WGT, gemv_intrin
from tvm_hapm.target.program import pack_activation
from tvm_hapm.target.schedule import ConvSchedule
from tvm_hapm.testing import direct_codegen

CFG = get_config("zedboard")


class Layer:
    """A random quantized conv2d, its packed tensors and its integer reference output."""

    def __init__(self, cfg, n, cin, h, w, cout, k, stride, pad, shift=10, clip=(0, 127), seed=0):
        rng = np.random.default_rng(seed)
        self.cfg = cfg
        self.args = (n, cin, h, w, cout, k, k, (stride, stride), (pad,) * 4, (1, 1))
        self.shift, self.clip = shift, clip
        self.x = rng.integers(-128, 128, (n, cin, h, w)).astype(np.int8)
        self.weight = rng.integers(-127, 128, (cout, cin, k, k)).astype(np.int8)
        self.bias = rng.integers(-2000, 2000, cout)
        self.mult = rng.integers(1, 3000, cout)
        self.func = htir.conv2d_primfunc(cfg, *self.args, shift=shift, clip=clip)

    def packed_inputs(self):
        R, C = self.cfg.array_rows, self.cfg.array_cols
        cout = self.weight.shape[0]
        cob = -(-cout // C)
        blocks = layout.expand_weight_blocks(self.cfg, self.weight, 1)
        bias_mult = np.zeros((2 * cob, C), np.int32)
        rows = np.zeros((cob, C), np.int32)
        rows.reshape(-1)[:cout] = self.bias
        bias_mult[0::2] = rows
        rows = np.zeros((cob, C), np.int32)
        rows.reshape(-1)[:cout] = self.mult
        bias_mult[1::2] = rows
        return [pack_activation(self.x, R), np.ascontiguousarray(blocks), bias_mult]

    def reference(self):
        """int32 accumulate, + bias, (acc * M + 2**(S-1)) >> S, clip; packed (N, COB, OH, OW, C)."""
        n, cin, h, w, cout, kh, kw, (sh, sw), (pt, pl, pb, pr), _ = self.args
        xp = np.pad(self.x.astype(np.float64), ((0, 0), (0, 0), (pt, pb), (pl, pr)))
        oh = (h + pt + pb - kh) // sh + 1
        ow = (w + pl + pr - kw) // sw + 1
        acc = np.zeros((n, cout, oh, ow), np.float64)
        for y in range(kh):
            for x in range(kw):
                window = xp[:, :, y : y + sh * (oh - 1) + 1 : sh, x : x + sw * (ow - 1) + 1 : sw]
                acc += np.einsum(
                    "nchw,oc->nohw", window, self.weight[:, :, y, x].astype(np.float64)
                )
        acc = acc.astype(np.int64) + self.bias[None, :, None, None]
        q = (acc * self.mult[None, :, None, None] + (1 << (self.shift - 1))) >> self.shift
        q = np.clip(q, *self.clip).astype(np.int8)
        return pack_activation(q, self.cfg.array_cols)

    def out_buffer(self):
        ref = self.reference()
        return np.zeros(ref.shape, np.int8)

    def codegen_program(self, schedule):
        n, cin, h, w, *_ = self.args
        prog, consts = direct_codegen.conv2d_program(
            self.cfg, "ref", (n, cin, h, w), self.weight, self.bias, self.mult, self.shift,
            self.clip, self.args[7], self.args[8], schedule=schedule,
        )  # fmt: skip
        return prog, consts


def _walk_calls(func, name):
    found = []

    def on_call(call):
        if htir.is_call(call, name):
            found.append(call)

    tvm_ffi.structural_walk(func.body, (tvm.ir.expr.Call, on_call))
    return found


def _scopes(func):
    scopes = set()

    def on_block(block):
        for buf in block.alloc_buffers:
            scopes.add(str(buf.ty.storage_scope))

    tvm_ffi.structural_walk(func.body, (tvm.s_tir.SBlock, on_block))
    return scopes


def _diff(a, b):
    for k, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return f"instruction {k}: {isa.disassemble(x)}  !=  {isa.disassemble(y)}"
    return f"lengths {len(a)} != {len(b)}"


def test_schedule_tensorizes_onto_hapm_buffers():
    layer = Layer(CFG, 1, 16, 8, 8, 32, 3, 1, 1)
    sch = htir.schedule_conv2d(layer.func, CFG)
    func = sch.mod["main"]
    assert str(func.attrs[htir.KERNEL_ATTR]) == "conv2d"
    assert tvm.s_tir.TensorIntrin.get(gemv_intrin(CFG)) is not None
    assert len(_walk_calls(func, GEMM_MARKER)) == 1  # one tensorized product in the loop nest
    assert {SCOPE_INP, SCOPE_WGT, SCOPE_ACC} <= _scopes(func)
    lowered = htir.LowerToAccelerator(CFG)(sch.mod)["main"]
    assert _walk_calls(lowered, htir.DMA_LOAD) and _walk_calls(lowered, htir.DMA_STORE)


@pytest.mark.parametrize(
    "rows, cols, act, wgt",
    [(8, 8, "int8", "int8"), (4, 32, "int16", "int8"), (16, 2, "int8", "int16")],
)
def test_intrinsic_specialised_from_one_parse_is_the_concrete_one(rows, cols, act, wgt):
    """``make_intrin`` specialises one parse per pair of data types to the array's shape: the
    result must be the intrinsic written for that shape."""
    from tvm.script import tirx as T

    from tvm_hapm.target.intrin import make_intrin

    @T.prim_func(s_tir=True)
    def desc(
        inp: T.Buffer((rows,), act, offset_factor=1, scope=SCOPE_INP),
        wgt_: T.Buffer((rows, cols), wgt, offset_factor=1, scope=SCOPE_WGT),
        acc: T.Buffer((cols,), "int32", offset_factor=1, scope=SCOPE_ACC),
    ) -> None:
        with T.sblock("root"):
            T.reads(acc[0:cols], inp[0:rows], wgt_[0:rows, 0:cols])
            T.writes(acc[0:cols])
            for c, r in T.grid(cols, rows):
                with T.sblock("update"):
                    vc, vr = T.axis.remap("SR", [c, r])
                    acc[vc] = acc[vc] + T.Cast("int32", inp[vr]) * T.Cast("int32", wgt_[vr, vc])

    @T.prim_func(s_tir=True)
    def impl(
        inp: T.Buffer((rows,), act, offset_factor=1, scope=SCOPE_INP),
        wgt_: T.Buffer((rows, cols), wgt, offset_factor=1, scope=SCOPE_WGT),
        acc: T.Buffer((cols,), "int32", offset_factor=1, scope=SCOPE_ACC),
    ) -> None:
        with T.sblock("root"):
            T.reads(acc[0:cols], inp[0:rows], wgt_[0:rows, 0:cols])
            T.writes(acc[0:cols])
            T.evaluate(
                T.call_extern(
                    "int32",
                    GEMM_MARKER,
                    inp.data,
                    inp.elem_offset,
                    wgt_.data,
                    wgt_.elem_offset,
                    acc.data,
                    acc.elem_offset,
                )  # fmt: skip
            )

    got = make_intrin(rows, cols, act, wgt)
    tvm.ir.assert_structural_equal(got[0], desc, map_free_vars=True)
    tvm.ir.assert_structural_equal(got[1], impl, map_free_vars=True)


@pytest.mark.parametrize(
    "shape",
    [
        (1, 16, 8, 8, 32, 3, 1, 1),  # 3x3, stride 1, padding 1
        (1, 16, 9, 9, 16, 3, 2, 1),  # 3x3, stride 2, padding 1
        (2, 24, 6, 6, 8, 1, 1, 0),  # 1x1, two images, a partial input-channel block
    ],
)
def test_tir_stream_equals_codegen(shape):
    layer = Layer(CFG, *shape)
    sched = htir.tir_conv_schedule(CFG, htir.layer_of(layer.func))
    sch = htir.schedule_conv2d(layer.func, CFG, sched)
    ours = htir.emit_program(sch, CFG)
    ref, _ = layer.codegen_program(sched)
    assert ours == ref.instructions, _diff(ours, ref.instructions)


def test_tir_matmul_stream_equals_codegen():
    rng = np.random.default_rng(1)
    n, k, m = 3, 40, 16
    weight = rng.integers(-127, 128, (k, m)).astype(np.int8)
    ref, _ = direct_codegen.dense_program(
        CFG, "fc", (n, k), weight, None, np.ones(m), 8, (-128, 127)
    )
    sch = htir.schedule_conv2d(htir.dense_primfunc(CFG, n, k, m, shift=8), CFG)
    ours = htir.emit_program(sch, CFG)
    assert ours == ref.instructions, _diff(ours, ref.instructions)


def test_tir_multi_chunk_schedule_matches_codegen_on_simulator():
    # Input channels in two chunks, one output block per group, half-height tiles: the
    # bias rows load before the chunk loop (the codegen loads them inside its first chunk),
    # so the streams differ; both must compute the same bits.
    layer = Layer(CFG, 1, 16, 8, 8, 16, 3, 1, 1, clip=(-20, 90))
    sched = ConvSchedule(tile_h=4, tile_w=8, cob_group=1, cib_chunk=1)
    prog = htir.build_program(CFG, htir.schedule_conv2d(layer.func, CFG, sched))
    y, _ = run_program(prog, Simulator(CFG), layer.packed_inputs() + [layer.out_buffer()])
    ref_prog, consts = layer.codegen_program(sched)
    y_ref, _ = run_program(
        ref_prog, Simulator(CFG), [layer.x, *consts, np.zeros(ref_prog.slots[-1].shape, np.int8)]
    )
    np.testing.assert_array_equal(y, pack_activation(y_ref, CFG.array_cols))
    np.testing.assert_array_equal(y, layer.reference())


@pytest.mark.parametrize(
    "shape",
    [(1, 16, 8, 8, 32, 3, 1, 1), (1, 8, 7, 7, 16, 3, 2, 1)],
)
def test_build_conv_runs_on_simulator(shape):
    layer = Layer(CFG, *shape, clip=(0, 127))
    sch = htir.schedule_conv2d(layer.func, CFG)
    lib = tvm.build(sch.mod, target="hapm_fpga")
    out = tvm.runtime.tensor(layer.out_buffer())
    lib["main"](*[tvm.runtime.tensor(a) for a in layer.packed_inputs()], out)
    np.testing.assert_array_equal(out.numpy(), layer.reference())


def test_build_matmul_runs_on_simulator():
    n, k, m = 4, 20, 24
    layer = Layer(CFG, n, k, 1, 1, m, 1, 1, 0, shift=9, clip=(-128, 127), seed=3)
    func = htir.dense_primfunc(CFG, n, k, m, shift=9)
    lib = tvm.build(htir.schedule_conv2d(func, CFG).mod, target="hapm_fpga")
    out = tvm.runtime.tensor(layer.out_buffer())
    lib["main"](*[tvm.runtime.tensor(a) for a in layer.packed_inputs()], out)
    np.testing.assert_array_equal(out.numpy(), layer.reference())


def test_llvm_build_without_kernel_is_unaffected():
    a = te.placeholder((16,), "int32", name="a")
    b = te.compute((16,), lambda i: a[i] * 3 + 1, name="b")
    mod = tvm.IRModule({"main": te.create_prim_func([a, b])})
    lib = tvm.build(mod, target="llvm")
    x = np.arange(16, dtype=np.int32)
    out = tvm.runtime.tensor(np.zeros(16, np.int32))
    lib["main"](tvm.runtime.tensor(x), out)
    np.testing.assert_array_equal(out.numpy(), x * 3 + 1)
    # The wrapped default pipeline compiles such a module to the same code as TVM's own.
    tvm.tirx.register_tir_pipeline("hapm_fpga_test.original_s_tir", htir.ORIGINAL_S_TIR)
    theirs = tvm.tirx.build(mod, "llvm", pipeline="hapm_fpga_test.original_s_tir")
    assert lib.inspect_source("ll") == theirs.inspect_source("ll")


def test_unscheduled_function_is_refused():
    func = htir.conv2d_primfunc(CFG, 1, 8, 4, 4, 8, 1, 1)
    with pytest.raises(htir.TirLoweringError, match="schedule"):
        htir.emit_program(func, CFG)


def test_unchecked_schedule_applies_the_same_primitives_without_the_type_checks():
    """The conv schedule's proxy calls each primitive's unchecked function (TVM's ``type_checked``
    wrapper costs ~0.25 ms a call) and changes the module exactly as the checked call does."""
    from tvm_hapm.target.tir.scheduling import UncheckedSchedule

    func = Layer(CFG, 1, 16, 8, 8, 32, 3, 1, 1).func
    checked = tvm.s_tir.Schedule(tvm.IRModule({"main": func}))
    fast = UncheckedSchedule(tvm.s_tir.Schedule(tvm.IRModule({"main": func})))
    assert fast.split.func is type(checked).split.__wrapped__
    for sch in (checked, fast):
        conv = sch.get_sblock("conv")
        loops = sch.get_loops(conv)
        sch.split(loops[2], [None, 4])
    tvm.ir.assert_structural_equal(fast.mod, checked.mod)
