"""Lowering the ``hapm_fpga.*`` composite functions to accelerator programs.

:func:`LowerToHapm` is this plugin's counterpart of ``relax.transform.RunCodegen``: for every call
of a composite function made by :func:`~tvm_hapm.passes.partition.PartitionForHapm`, it reads the
layer's parameters out of the function, generates its instruction stream and replaces the call
with::

    R.call_dps_packed("hapm_fpga.run", (program_bytes, *inputs, *layer_constants), out_type)

Every layer is lowered through TIR, the one production route: convolutions and dense layers by
:func:`tvm_hapm.target.tir.conv2d_program` (TIR definition, ``s_tir`` schedule with the tensor
intrinsic, the plugin's TIR passes, the TIR walker with the compile-time sparse schedule), the
residual add by :func:`tvm_hapm.target.tir.add_program`, global average pooling by
:func:`tvm_hapm.target.tir.global_avg_pool_program` and max pooling by
:func:`tvm_hapm.target.tir.max_pool2d_program`.  Planned tiles that do not divide a convolution's
or a max pooling's output are the exact edge tiles of their own output regions (no predicate
for ``tensorize`` to refuse), and the last, shorter tile of an add or of global average
pooling (ALU instructions only) is a predicated tile the walker shortens.  So no layer falls
back to the direct generator :mod:`tvm_hapm.testing.direct_codegen` any more: it stays the tests'
independent oracle, with the same streams, instruction by instruction.  Every program's
``info["source"]`` is ``"tir"``.

The program bytes and the packed weights are Relax constants, so they are saved with the
executable (``export_library``) and the executable runs wherever :mod:`tvm_hapm` is imported.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from ..runtime.driver import RUN_FUNC
from ..target import tir
from ..target.config import HardwareConfig, get_config
from ..target.gc_pause import paused_gc
from .partition import COMPOSITE_PREFIX, read_composite
from .qops import RequantChain, rounds_half_up

__all__ = ["LowerToHapm", "LoweringError"]


class LoweringError(ValueError):
    """A model the accelerator pipeline refuses, e.g. a float model that was never quantized."""


def _const(expr) -> np.ndarray:
    if isinstance(expr, tvm.ir.GenericConst):
        return expr.value.numpy()
    raise LoweringError(f"expected a constant, got {type(expr).__name__}")


def _prim(expr) -> int:
    return int(expr.value) if hasattr(expr, "value") else int(expr)


def _shape(expr):
    return [int(v) for v in expr.ty.shape.values]


def conv_kwargs_of(attrs) -> dict:
    """Geometry keyword arguments of a Relax conv2d call's attributes."""
    return {
        "strides": [int(v) for v in attrs.strides],
        "padding": [int(v) for v in attrs.padding],
        "dilation": [int(v) for v in attrs.dilation],
        "groups": int(attrs.groups),
    }


def _tuned_schedule(cfg, name, data_shape, weight, geometry, residual=False):
    """The schedule the active tuning database records for this layer (a convolution, with a
    fused residual or not, or a dense layer as its 1x1 convolution: the tasks
    :func:`~tvm_hapm.passes.tasks.extract_tasks` gives), if any and if it fits (a record that
    does not is skipped with a warning)."""
    from ..cost.tune import ConvTask, current_database

    db = current_database()
    if db is None:
        return None
    return db.schedule_for(ConvTask(name, cfg, data_shape, weight, **geometry, residual=residual))


def _program_for(cfg: HardwareConfig, kind: str, func: relax.Function, args, name, index):
    try:
        part = read_composite(func, cfg)  # the pattern's named parts
        requant = RequantChain.read(part) if "requant_mult" in part else None
    except ValueError as err:
        raise LoweringError(f"{name}: {err}") from None
    # Map the composite's parameters to the call's arguments.
    arg_of = dict(zip(func.params, args))

    def bias():
        return _const(part["bias"]).reshape(-1) if "bias" in part else None

    if kind in ("conv2d", "conv2d_residual"):
        conv = part["conv"]
        data, weight = conv.args[0], _const(conv.args[1])
        fused = kind == "conv2d_residual"
        geometry = conv_kwargs_of(conv.attrs)
        conv_args = (cfg, name, _shape(data), weight, bias(), *requant)
        conv_kwargs = {
            **geometry,
            "layer_index": index,
            "residual": _const(part["residual_k"]).reshape(-1) if fused else None,
            "schedule": _tuned_schedule(cfg, name, _shape(data), weight, geometry, fused),
        }
        prog, consts = tir.conv2d_program(*conv_args, **conv_kwargs)
        inputs = [arg_of[data], arg_of[part["residual"]]] if fused else [arg_of[data]]
    elif kind == "dense":
        mm = part["dense"]
        data, weight = mm.args[0], _const(mm.args[1])
        tuned = _tuned_schedule(cfg, name, *tir.dense_as_conv(_shape(data), weight), {})
        prog, consts = tir.dense_program(
            cfg, name, _shape(data), weight, bias(), *requant, index, schedule=tuned
        )
        inputs = [arg_of[data]]
    elif kind == "add":
        # clip((int32(a) * Ma + int32(b) * Mb + 2**(S-1)) >> S), qops.emit_add
        lhs, rhs = part["lhs"], part["rhs"]
        shift = int(_const(part["shift"]))
        if not rounds_half_up(int(_const(part["round"])), shift):
            raise LoweringError(f"{name}: the add's rescale does not round half up")
        clip = (_prim(part["clip"].args[1]), _prim(part["clip"].args[2]))
        mult_a, mult_b = int(_const(part["mult_a"])), int(_const(part["mult_b"]))
        add_args = (cfg, name, _shape(lhs), mult_a, mult_b, shift, clip, index)
        prog, consts = tir.add_program(*add_args)
        inputs = [arg_of[lhs], arg_of[rhs]]
    elif kind == "global_avg_pool":
        data = part["data"]
        mult, shift, clip = requant
        gap_args = (cfg, name, _shape(data), int(mult[0]), shift, clip, index)
        prog, consts = tir.global_avg_pool_program(*gap_args)
        inputs = [arg_of[data]]
    elif kind == "max_pool2d":
        pool = part["pool"]
        a = pool.attrs
        data = pool.args[0]
        pool_args = (
            cfg,
            name,
            _shape(data),
            [int(v) for v in a.pool_size],
            [int(v) for v in a.strides],
            [int(v) for v in a.padding],
            [int(v) for v in a.dilation],
            index,
        )
        prog, consts = tir.max_pool2d_program(*pool_args)
        inputs = [arg_of[data]]
    else:
        raise LoweringError(f"no lowering for composite {kind!r}")
    return prog, inputs, consts


def LowerToHapm(config: HardwareConfig | None = None, programs: list | None = None):  # noqa: N802
    """Replace calls of ``hapm_fpga.*`` composite functions by accelerator program calls.

    Parameters
    ----------
    config : HardwareConfig, optional
        The accelerator; defaults to the current target's config.
    programs : list, optional
        If given, every generated :class:`~tvm_hapm.target.program.Program` is appended to it
        (used by ``hapm compile`` to write the instruction streams).

    Returns
    -------
    pass : tvm.transform.Pass
    """

    @tvm.transform.module_pass(opt_level=0, name="LowerToHapm")
    @paused_gc()  # the programs' instructions live to the end: see target.gc_pause
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        cfg = get_config(config)
        composites = {}
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function) and func.attrs is not None:
                comp = func.attrs.get("Composite") if "Composite" in func.attrs else None
                if comp is not None and str(comp).startswith(COMPOSITE_PREFIX):
                    composites[gv] = (str(comp)[len(COMPOSITE_PREFIX) :], func)
        if not composites:
            return mod
        counter = [0]

        @relax.expr_functor.mutator
        class _Rewriter(relax.PyExprMutator):
            def visit_call_(self, call):
                call = super().visit_call_(call)
                if isinstance(call.op, relax.GlobalVar) and call.op in composites:
                    kind, func = composites[call.op]
                    index = counter[0]
                    counter[0] += 1
                    name = f"{index:03d}_{kind}"
                    prog, inputs, consts = _program_for(cfg, kind, func, call.args, name, index)
                    if programs is not None:
                        programs.append(prog)
                    blob = np.frombuffer(prog.to_bytes(), dtype=np.uint8).copy()
                    args = [relax.const(blob, "uint8"), *inputs]
                    args += [relax.const(c, str(c.dtype)) for c in consts]
                    return relax.call_dps_packed(RUN_FUNC, relax.Tuple(args), call.ty)
                return call

        rewriter = _Rewriter(mod)
        with tir.reuse_streams():  # repeated layers are emitted once per compile
            for gv, func in list(mod.functions_items()):
                if isinstance(func, relax.Function) and gv not in composites:
                    rewriter.builder_.update_func(gv, rewriter.visit_expr(func))
        out = rewriter.builder_.get()
        out = relax.transform.DeadCodeElimination()(out)
        return out

    return _pass
