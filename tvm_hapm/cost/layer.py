"""What the cost models are asked about: a convolution layer and its weight-block sparsity.

:class:`ConvLayer` describes one accelerator layer by its shapes alone (a dense layer is a 1x1
convolution of a 1x1 image, as in :func:`tvm_hapm.testing.direct_codegen.dense_program`).
:class:`BlockSparsity` describes which ``R x C`` weight blocks are all zero: a fraction, and
optionally the exact block mask (the code generator drops all-zero blocks, so the mask decides
how many GEMMs each step of the schedule issues).

The helpers :func:`layers_from_relax` and :func:`zoo_layers` extract the layers of a Relax
module (float or quantized) or of a :mod:`tvm_hapm.models.zoo` network.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from ..target.config import HardwareConfig
from ..target.schedule import conv_output_size

__all__ = [
    "BlockSparsity",
    "ConvLayer",
    "apply_block_mask",
    "block_mask",
    "layers_from_onnx",
    "layers_from_relax",
    "structural_mask",
    "zoo_layers",
]


def _pair(v) -> tuple[int, int]:
    if isinstance(v, (int, np.integer)):
        return int(v), int(v)
    v = tuple(int(x) for x in v)
    return (v[0], v[0]) if len(v) == 1 else (v[0], v[1])


def _quad(v) -> tuple[int, int, int, int]:
    if isinstance(v, (int, np.integer)):
        return (int(v),) * 4
    v = tuple(int(x) for x in v)
    if len(v) == 1:
        return v * 4
    if len(v) == 2:
        return v[0], v[1], v[0], v[1]
    return v[0], v[1], v[2], v[3]


@dataclass(frozen=True)
class ConvLayer:
    """Shapes of one NCHW / OIHW convolution (``padding`` is top, left, bottom, right)."""

    n: int
    cin: int
    h: int
    w: int
    cout: int
    kh: int
    kw: int
    strides: tuple = (1, 1)
    padding: tuple = (0, 0, 0, 0)
    dilation: tuple = (1, 1)
    groups: int = 1
    name: str = ""

    def __post_init__(self):
        object.__setattr__(self, "strides", _pair(self.strides))
        object.__setattr__(self, "dilation", _pair(self.dilation))
        object.__setattr__(self, "padding", _quad(self.padding))
        for f in ("n", "cin", "h", "w", "cout", "kh", "kw", "groups"):
            object.__setattr__(self, f, int(getattr(self, f)))
        if self.cin % self.groups or self.cout % self.groups:
            raise ValueError(f"{self}: channels not divisible by groups")
        if self.oh < 1 or self.ow < 1:
            raise ValueError(f"{self}: empty output")

    @classmethod
    def dense(cls, n: int, k: int, m: int, name: str = "") -> ConvLayer:
        """A dense layer ``(n, k) x (k, m)`` as a 1x1 convolution of a 1x1 image."""
        return cls(n, k, 1, 1, m, 1, 1, name=name)

    # ---------------------------------------------------------------- derived shapes
    @property
    def oh(self) -> int:
        pt, _, pb, _ = self.padding
        return conv_output_size(self.h, pt, pb, self.kh, self.strides[0], self.dilation[0])

    @property
    def ow(self) -> int:
        _, pl, _, pr = self.padding
        return conv_output_size(self.w, pl, pr, self.kw, self.strides[1], self.dilation[1])

    @property
    def cin_g(self) -> int:
        return self.cin // self.groups

    @property
    def depthwise(self) -> bool:
        return self.groups > 1 and self.groups == self.cin

    @property
    def macs(self) -> int:
        return self.n * self.oh * self.ow * self.cout * self.cin_g * self.kh * self.kw

    @property
    def params(self) -> int:
        return self.cout * self.cin_g * self.kh * self.kw

    def weight_shape(self) -> tuple[int, int, int, int]:
        return self.cout, self.cin_g, self.kh, self.kw

    def data_shape(self) -> tuple[int, int, int, int]:
        return self.n, self.cin, self.h, self.w

    def shape_key(self) -> tuple:
        """Shape identity (name ignored), used to exclude layers from training sets."""
        return (self.cin, self.h, self.w, self.cout, self.kh, self.kw, self.strides,
                self.padding, self.dilation, self.groups)  # fmt: skip

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for k in ("strides", "padding", "dilation"):
            d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ConvLayer:
        return cls(**d)


# ------------------------------------------------------------------------------------ blocks
def structural_mask(layer: ConvLayer, cfg: HardwareConfig) -> np.ndarray:
    """Blocks ``(COB, CIB, KH, KW)`` that hold any weight of the layer (grouped and depthwise
    convolutions are block diagonal: blocks between groups are zero by construction)."""
    return structural_blocks(layer.cout, layer.cin, layer.groups, layer.kh, layer.kw,
                       cfg.array_rows, cfg.array_cols)  # fmt: skip


@lru_cache(maxsize=4096)
def structural_blocks(cout, cin, groups, kh, kw, R, C) -> np.ndarray:
    cob, cib = -(-cout // C), -(-cin // R)
    cout_g, cin_g = cout // groups, cin // groups
    dense = np.zeros((cob * C, cib * R), bool)
    o = np.arange(cout)[:, None] // cout_g
    i = np.arange(cin)[None, :] // cin_g
    dense[:cout, :cin] = o == i
    m = dense.reshape(cob, C, cib, R).any(axis=(1, 3))
    out = np.broadcast_to(m[:, :, None, None], (cob, cib, kh, kw)).copy()
    out.flags.writeable = False  # cached: callers copy before changing it
    return out


@dataclass
class BlockSparsity:
    """All-zero ``R x C`` weight blocks of a layer.

    Parameters
    ----------
    fraction : float
        Fraction of the layer's *structural* blocks (those holding any weight, see
        :func:`structural_mask`) that are all zero.
    pattern : str
        How the zero blocks are chosen when a mask is drawn: ``"random"`` (independent blocks),
        ``"dispatch"`` (whole dispatches of ``num_arrays`` consecutive blocks of one (cob, cib)
        chunk, the HAPM pruning unit) or ``"channel"`` (all blocks of whole output-channel
        blocks).
    mask : numpy.ndarray, optional
        The exact non-zero mask ``(COB, CIB, KH, KW)``; when given, the cost models use it
        (per-step GEMM counts) instead of the fraction alone.
    per_group : sequence of float, optional
        Fraction of zero blocks per output-channel block (length COB), overriding ``fraction``
        when a mask is drawn.
    """

    fraction: float = 0.0
    pattern: str = "random"
    mask: np.ndarray | None = field(default=None, repr=False)
    per_group: tuple | None = None

    @classmethod
    def from_mask(cls, mask: np.ndarray, structural: np.ndarray | None = None) -> BlockSparsity:
        mask = np.asarray(mask, bool)
        total = int(structural.sum()) if structural is not None else mask.size
        frac = 1.0 - mask.sum() / total if total else 0.0
        return cls(fraction=float(frac), pattern="mask", mask=mask)

    @classmethod
    def from_weight(cls, layer: ConvLayer, cfg: HardwareConfig, weight: np.ndarray):
        """The block sparsity of concrete OIHW weights."""
        from ..target.layout import expand_weight_blocks

        blocks = expand_weight_blocks(cfg, np.asarray(weight), layer.groups)
        return cls.from_mask(np.any(blocks != 0, axis=(4, 5)), structural_mask(layer, cfg))


def block_mask(
    layer: ConvLayer, cfg: HardwareConfig, sparsity: BlockSparsity | float | None, rng=None
) -> np.ndarray:
    """The non-zero block mask of a layer: the sparsity's mask if it has one, else a mask drawn
    with its pattern (``rng``: a seed or ``numpy.random.Generator``)."""
    struct = structural_mask(layer, cfg)
    if sparsity is None:
        return struct
    if not isinstance(sparsity, BlockSparsity):
        sparsity = BlockSparsity(float(sparsity))
    if sparsity.mask is not None:
        return np.asarray(sparsity.mask, bool) & struct
    rng = np.random.default_rng(rng)
    cob = struct.shape[0]
    fr = (
        np.asarray(sparsity.per_group, float)
        if sparsity.per_group is not None
        else np.full(cob, sparsity.fraction)
    )
    mask = struct.copy()
    if sparsity.pattern == "channel":
        total = struct.sum()
        order = rng.permutation(cob)
        target = sparsity.fraction * total
        removed = 0
        for co in order:
            n = struct[co].sum()
            if removed + n > target + 0.5 * n:
                continue
            mask[co] = False
            removed += n
        return mask
    for co in range(cob):
        idx = np.flatnonzero(struct[co].reshape(-1))
        k = int(round(fr[co] * idx.size))
        if k <= 0:
            continue
        if sparsity.pattern == "dispatch":
            unit = max(1, cfg.num_arrays)
            groups = [idx[i : i + unit] for i in range(0, idx.size, unit)]
            chosen, removed = [], 0
            for gi in rng.permutation(len(groups)):
                if removed >= k:
                    break
                chosen.append(groups[gi])
                removed += groups[gi].size
            drop = np.concatenate(chosen) if chosen else idx[:0]
        else:
            drop = rng.choice(idx, size=k, replace=False)
        flat = mask[co].reshape(-1)
        flat[drop] = False
        mask[co] = flat.reshape(mask[co].shape)
    return mask


def apply_block_mask(
    layer: ConvLayer, cfg: HardwareConfig, weight: np.ndarray, mask: np.ndarray
) -> np.ndarray:
    """Zero the weights of OIHW ``weight`` that fall in blocks where ``mask`` is False."""
    R, C = cfg.array_rows, cfg.array_cols
    cout, cin_g = layer.cout, layer.cin_g
    cout_g = cout // layer.groups
    o = np.arange(cout)[:, None]
    i = np.arange(cin_g)[None, :]
    dense_i = (o // cout_g) * cin_g + i
    keep = mask[o // C, dense_i // R]  # (cout, cin_g, kh, kw)
    return np.where(keep, weight, 0).astype(weight.dtype)


# ------------------------------------------------------------------------------- extraction
def layers_from_relax(mod, n: int | None = None) -> list[ConvLayer]:
    """Convolution and dense layers of a Relax module, in program order.

    ``relax.nn.conv2d`` (NCHW / OIHW) becomes a :class:`ConvLayer`; ``relax.matmul`` of a 2-D
    activation ``(N, K)`` with a 2-D weight ``(K, M)`` becomes :meth:`ConvLayer.dense`.
    Works on float modules (from ``from_onnx``) and on quantized ones.
    """
    import tvm
    from tvm import relax

    found: list[ConvLayer] = []

    def shape(expr):
        return [int(v) for v in expr.ty.shape]

    @relax.expr_functor.visitor
    class _Visitor(relax.PyExprVisitor):
        def visit_call_(self, call):
            if isinstance(call.op, tvm.ir.Op):
                name = call.op.name
                if name == "relax.nn.conv2d":
                    a = call.attrs
                    if str(a.data_layout) == "NCHW" and str(a.kernel_layout) == "OIHW":
                        ds, ws = shape(call.args[0]), shape(call.args[1])
                        found.append(
                            ConvLayer(
                                ds[0] if n is None else n, ds[1], ds[2], ds[3], ws[0], ws[2],
                                ws[3], tuple(a.strides), tuple(a.padding), tuple(a.dilation),
                                int(a.groups), name=f"conv{len(found)}",
                            )
                        )  # fmt: skip
                elif name == "relax.matmul":
                    ds, ws = shape(call.args[0]), shape(call.args[1])
                    if len(ds) == 2 and len(ws) == 2:
                        nn = ds[0] if n is None else n
                        found.append(ConvLayer.dense(nn, ds[1], ws[1], name=f"dense{len(found)}"))
            super().visit_call_(call)

    visitor = _Visitor()
    for _, func in mod.functions.items():
        if isinstance(func, relax.Function):
            visitor.visit_expr(func)
    return found


def layers_from_onnx(model) -> list[ConvLayer]:
    """Layers of an ONNX model, through ``tvm.relax.frontend.onnx.from_onnx``."""
    from tvm.relax.frontend.onnx import from_onnx

    return layers_from_relax(from_onnx(model))


def zoo_layers(name: str, **kwargs) -> list[ConvLayer]:
    """Layers of a :mod:`tvm_hapm.models.zoo` network (``"resnet18_imagenet"``,
    ``"mobilenet_style"``, ...), built with ``kwargs``."""
    from ..models import zoo

    builder = getattr(zoo, name)
    layers = layers_from_onnx(builder(**kwargs))
    return [dataclasses.replace(layer, name=f"{name}/{layer.name}") for layer in layers]
