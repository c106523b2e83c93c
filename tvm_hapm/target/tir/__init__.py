"""Lowering of accelerator layers through TIR: TE definition, schedule, TIR passes, codegen.

The flow mirrors VTA's: a layer is written with :mod:`tvm.te` on the accelerator's packed DRAM
layouts (:func:`conv2d_primfunc`, :func:`dense_primfunc`), scheduled with
:class:`tvm.s_tir.Schedule` onto the on-chip buffers and the registered tensor intrinsic
(:func:`schedule_conv2d`), transformed by the plugin's TIR passes (:func:`LowerToAccelerator`,
which runs TVM's buffer compaction and then :func:`InjectDMA`), and finally walked in execution
order by :func:`emit_program`, which turns copy intrinsics into LOAD / STORE, tensorized products
into GEMM and the epilogue loops on the accumulator into ALU instructions.  Dependency tokens are
the last codegen step (:func:`~tvm_hapm.target.dependency.insert_dependency_tokens`).

Planned tiles that do not divide the output: a convolution or a max pooling is then defined
by output regions (:func:`output_regions`: the full tiles, the last column and row of tiles,
the corner), each with its own stages, so its edge tiles are exact blocks (``tensorize``
refuses a block under the predicate a partial tile would need); the schedule runs the regions
tile after tile in the direct generator's order (:func:`merge_region_loops`) and makes their
outputs one (:func:`merge_region_outputs`).  Every accelerator layer of the Relax flow comes
from this module.

``tvm.build(mod, target="hapm_fpga")`` runs TVM's default TIR pipeline, which this module wraps:
a PrimFunc carrying the ``"hapm_fpga.kernel"`` attribute (set by :func:`schedule_conv2d`) is
compiled to an accelerator program and its body replaced by a call of the packed function
``"hapm_fpga.run_tir"`` (the simulator); every other function is compiled exactly as before.

Layouts (``R`` x ``C`` arrays)::

    data       (N, CIB, H, W, R)         int8   input-channel blocks of R
    residual   (N, COB, OH, OW, C)       int8   a fused residual add's shortcut (only then)
    weight     (COB, CIB, KH, KW, R, C)  int8   one R x C block per (cob, cib, kh, kw)
    bias_mult  (2*COB, C)                int32  row 2*cob: bias, row 2*cob+1: multipliers
                                                (3*COB rows with a residual: row 3*cob+2 K)
    out        (N, COB, OH, OW, C)       int8

The result is ``clip(((acc + bias) * mult + 2**(shift-1)) >> shift)`` with an int32 accumulator,
an int64 product and saturation to the activation range, exactly what the simulator computes.
With a fused residual the accumulator starts from ``int32(residual) * K`` instead of 0.
"""

from __future__ import annotations

from .compute import (
    DMA_LOAD,
    DMA_STORE,
    KERNEL_ATTR,
    LAYER_ATTR,
    LOWERED_ATTR,
    RUN_TIR_FUNC,
    SCHEDULE_ATTR,
    SCOPE_BUFFER,
    blocks_named,
    conv2d_primfunc,
    dense_primfunc,
    init_reads_fixed,
    layer_of,
    merge_region_outputs,
    output_regions,
    region_class,
    region_stage,
)
from .dma import InjectDMA, LowerToAccelerator, entry_elems, predicate_highs
from .emit import SparseWeights, build_program, emit_program, emit_stream
from .layers import (
    add_primfunc,
    add_program,
    clear_lowered_cache,
    conv2d_program,
    dense_as_conv,
    dense_program,
    global_avg_pool_primfunc,
    global_avg_pool_program,
    max_pool2d_primfunc,
    max_pool2d_program,
    reuse_streams,
    schedule_global_avg_pool,
    schedule_max_pool2d,
)
from .pipeline import ORIGINAL_S_TIR, OffloadHapmKernels, hapm_tir_pipeline
from .scheduling import (
    has_block,
    merge_region_loops,
    schedule_conv2d,
    scheduled_conv2d,
    tir_conv_schedule,
)
from .walk import (
    LoopNest,
    TirLoweringError,
    affine,
    buffer_scope,
    buffer_shape,
    buffer_span,
    buffer_strides,
    const_int,
    flat_index,
    is_call,
    node_key,
    node_kind,
    perfect_nest,
    strip_cast,
)

__all__ = [
    "DMA_LOAD",
    "DMA_STORE",
    "InjectDMA",
    "KERNEL_ATTR",
    "LAYER_ATTR",
    "LOWERED_ATTR",
    "LoopNest",
    "LowerToAccelerator",
    "ORIGINAL_S_TIR",
    "OffloadHapmKernels",
    "RUN_TIR_FUNC",
    "SCHEDULE_ATTR",
    "SCOPE_BUFFER",
    "SparseWeights",
    "TirLoweringError",
    "add_primfunc",
    "add_program",
    "affine",
    "blocks_named",
    "buffer_scope",
    "buffer_shape",
    "buffer_span",
    "buffer_strides",
    "build_program",
    "clear_lowered_cache",
    "const_int",
    "conv2d_primfunc",
    "conv2d_program",
    "dense_primfunc",
    "dense_as_conv",
    "dense_program",
    "emit_program",
    "emit_stream",
    "entry_elems",
    "reuse_streams",
    "flat_index",
    "global_avg_pool_primfunc",
    "global_avg_pool_program",
    "hapm_tir_pipeline",
    "has_block",
    "init_reads_fixed",
    "is_call",
    "layer_of",
    "max_pool2d_primfunc",
    "max_pool2d_program",
    "merge_region_loops",
    "merge_region_outputs",
    "node_key",
    "node_kind",
    "output_regions",
    "perfect_nest",
    "predicate_highs",
    "region_class",
    "region_stage",
    "schedule_conv2d",
    "scheduled_conv2d",
    "schedule_global_avg_pool",
    "schedule_max_pool2d",
    "strip_cast",
    "tir_conv_schedule",
]
