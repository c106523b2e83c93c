"""The accelerator's tensor intrinsic: one input vector through one systolic array.

A hapm_fpga GEMM instruction streams input vectors through an array holding one ``R x C``
weight block (``docs/isa.md``).  The unit of work a schedule can map onto the hardware is one
such vector product, registered with :class:`tvm.s_tir.TensorIntrin` so that
``Schedule.tensorize`` can replace a matching loop nest by it:

* description: ``acc[c] += int32(inp[r]) * int32(wgt[r, c])`` for ``c < C``, ``r < R``;
* implementation: ``T.call_extern("int32", "hapm_fpga.gemm", inp.data, inp.elem_offset,
  wgt.data, wgt.elem_offset, acc.data, acc.elem_offset)``: a marker, never compiled for the
  host, from which :func:`tvm_hapm.target.tir.emit_program` reads the buffers and the element
  offsets (hence the on-chip addresses) of each product.

The operand buffers carry the accelerator's storage scopes, so only a loop nest that reads the
on-chip input and weight buffers and accumulates in the on-chip accumulator is tensorized.
"""

from __future__ import annotations

import functools

from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

from .config import HardwareConfig

__all__ = [
    "GEMM_MARKER",
    "SCOPE_INP",
    "SCOPE_WGT",
    "SCOPE_ACC",
    "gemv_intrin",
    "gemv_intrin_name",
    "make_intrin",
]

#: Name of the extern call the intrinsic's implementation leaves in the TIR.
GEMM_MARKER = "hapm_fpga.gemm"
#: Storage scopes of the on-chip input, weight and accumulator buffers.
SCOPE_INP = "global.hapm_inp"
SCOPE_WGT = "global.hapm_wgt"
SCOPE_ACC = "global.hapm_acc"


def gemv_intrin_name(cfg: HardwareConfig) -> str:
    """The registered name of ``cfg``'s intrinsic, e.g. ``"hapm_fpga.gemv_8x8_int8"``."""
    return f"hapm_fpga.gemv_{cfg.array_rows}x{cfg.array_cols}_{cfg.act_dtype}_{cfg.weight_dtype}"


@functools.cache
def _symbolic_intrin(act_dtype: str, wgt_dtype: str):
    """Description and implementation with the array's shape as parameters ``rows, cols``.

    Parsed once per pair of data types: TVMScript's parser inspects the caller's stack and
    source, ~50 ms a function, which a search over random array shapes (the cost model's
    samples) paid for every new shape."""

    @T.prim_func(s_tir=True)
    def desc(i: T.handle, w: T.handle, a: T.handle, rows: T.int32, cols: T.int32) -> None:
        inp = T.match_buffer(i, (rows,), act_dtype, offset_factor=1, scope=SCOPE_INP)
        wgt = T.match_buffer(w, (rows, cols), wgt_dtype, offset_factor=1, scope=SCOPE_WGT)
        acc = T.match_buffer(a, (cols,), "int32", offset_factor=1, scope=SCOPE_ACC)
        with T.sblock("root"):
            T.reads(acc[0:cols], inp[0:rows], wgt[0:rows, 0:cols])
            T.writes(acc[0:cols])
            for c, r in T.grid(cols, rows):
                with T.sblock("update"):
                    vc, vr = T.axis.remap("SR", [c, r])
                    acc[vc] = acc[vc] + T.Cast("int32", inp[vr]) * T.Cast("int32", wgt[vr, vc])

    @T.prim_func(s_tir=True)
    def impl(i: T.handle, w: T.handle, a: T.handle, rows: T.int32, cols: T.int32) -> None:
        inp = T.match_buffer(i, (rows,), act_dtype, offset_factor=1, scope=SCOPE_INP)
        wgt = T.match_buffer(w, (rows, cols), wgt_dtype, offset_factor=1, scope=SCOPE_WGT)
        acc = T.match_buffer(a, (cols,), "int32", offset_factor=1, scope=SCOPE_ACC)
        with T.sblock("root"):
            T.reads(acc[0:cols], inp[0:rows], wgt[0:rows, 0:cols])
            T.writes(acc[0:cols])
            T.evaluate(
                T.call_extern(
                    "int32",
                    GEMM_MARKER,
                    inp.data,
                    inp.elem_offset,
                    wgt.data,
                    wgt.elem_offset,
                    acc.data,
                    acc.elem_offset,
                )
            )

    return desc, impl


def make_intrin(rows: int, cols: int, act_dtype: str, wgt_dtype: str):
    """``(description, implementation)`` of the intrinsic of ``rows x cols`` arrays: the
    symbolic pair of :func:`_symbolic_intrin` specialised to the shape."""
    funcs = []
    for func in _symbolic_intrin(act_dtype, wgt_dtype):
        r, c = func.params[3:]
        funcs.append(func.specialize({r: rows, c: cols}))
    return tuple(funcs)


def gemv_intrin(cfg: HardwareConfig) -> str:
    """Register (once) the tensor intrinsic of ``cfg``'s arrays and return its name."""
    name = gemv_intrin_name(cfg)
    if TensorIntrin.get(name, allow_missing=True) is None:
        desc, impl = make_intrin(cfg.array_rows, cfg.array_cols, cfg.act_dtype, cfg.weight_dtype)
        TensorIntrin.register(name, desc, impl)
    return name
