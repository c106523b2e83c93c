"""End-to-end flows on ONNX models: prune with a Relax pass, keep the result as ONNX.

The pruning passes (:mod:`tvm_hapm.passes.prune`) work on the float Relax module that TVM's ONNX
frontend produces, whose weight constants are the ONNX initializers unchanged (convolution
weights as OIHW, Gemm weights as stored).  :func:`prune_onnx` runs a pass and writes the zeros
back into the matching initializers, so the pruned model stays an ONNX file that fine-tuning
(:mod:`tvm_hapm.compress.relax_training`), other tools and ``hapm compile`` can use.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

__all__ = [
    "ENGINES",
    "PER_MAC_MAX_LAYER_SPARSITY",
    "PRUNE_METHODS",
    "RANKINGS",
    "DeployedResult",
    "Int8Accuracy",
    "evaluate_deployed",
    "filter_deploy_pass",
    "filter_fraction",
    "finetune",
    "float_accuracy",
    "int8_accuracy",
    "paired_weight_names",
    "prune_iteratively",
    "pruning_pass",
    "prune_onnx",
    "quantize_onnx",
    "recover",
    "resolve_engine",
    "simulate",
    "time_programs",
    "write_masks",
    "sparsity_of",
]

PRUNE_METHODS = ("hapm", "unstructured", "filter")
RANKINGS = ("layer", "global", "per_mac")
# per_mac ranking: no layer loses more than 7/8 of its weights (one group in eight of a
# 16-channel ResNet-20 conv stays), else the cheapest-to-prune layers would be emptied
PER_MAC_MAX_LAYER_SPARSITY = 0.875


def pruning_pass(
    method: str,
    sparsity: float,
    config=None,
    criterion: str = "l2",
    skip=(),
    per_layer=None,
    ranking: str = "layer",
    max_layer_sparsity: float | None = None,
):
    """The Relax pruning pass :func:`prune_onnx` runs for ``method`` and ``ranking`` (see
    there), to apply to an already imported module."""
    from ..passes import FilterPrune, HardwareAwarePrune, MagnitudePrune

    if ranking not in RANKINGS:
        raise ValueError(f"unknown ranking {ranking!r}; choose from {RANKINGS}")
    if ranking != "layer" and method == "filter" or ranking == "per_mac" and method != "hapm":
        raise ValueError(f"ranking {ranking!r} is not available for method {method!r}")
    if max_layer_sparsity is not None and (method != "hapm" or ranking == "layer"):
        raise ValueError("max_layer_sparsity caps the global and per_mac rankings of hapm")
    if method == "hapm":
        per_mac = ranking == "per_mac"
        return HardwareAwarePrune(
            sparsity, config=config, criterion=criterion, per_layer=per_layer, skip=skip,
            global_=ranking != "layer", cost_weighted=per_mac,
            max_layer_sparsity=(max_layer_sparsity or PER_MAC_MAX_LAYER_SPARSITY)
            if per_mac else max_layer_sparsity,
        )  # fmt: skip
    if method == "unstructured":
        return MagnitudePrune(
            sparsity, criterion=criterion, per_layer=per_layer, skip=skip,
            global_=ranking == "global",
        )  # fmt: skip
    if method == "filter":
        # masks only: the zeroed filters and the consumer weights reading them; the tensors are
        # shrunk at deployment (FilterPrune(shrink=True), see filter_deploy_pass)
        return FilterPrune(
            sparsity, config=config, criterion=criterion, per_layer=per_layer, shrink=False
        )
    raise ValueError(f"unknown pruning method {method!r}; choose from {PRUNE_METHODS}")


def paired_weight_names(model: onnx.ModelProto, layers: list) -> list[str]:
    """The ONNX weight of each prunable Relax layer: both lists are in graph order
    (:func:`tvm_hapm.compress.relax_training.prunable_weights`), so they pair by position; their
    lengths must
    agree."""
    from .relax_training import prunable_weights

    names = prunable_weights(model)
    if len(layers) != len(names):
        raise ValueError(f"{len(layers)} prunable Relax layers but {len(names)} ONNX weights")
    return names


def write_masks(model: onnx.ModelProto, pruned_mod) -> tuple[onnx.ModelProto, dict]:
    """Copy of ``model`` with the zeros of the pruned Relax module written into its weights.

    Relax layers and ONNX weights are paired by position (both in graph order, see
    :func:`tvm_hapm.compress.relax_training.prunable_weights`); each pairing is checked: same shape
    (a Gemm weight
    may be stored transposed) and the kept values unchanged.  Returns the model and the
    keep-masks by ONNX initializer name (in the initializer's layout).
    """
    from ..passes import pruning_masks
    from ..passes.prune import find_layers

    masks = pruning_masks(pruned_mod)
    layers = find_layers(pruned_mod)
    names = paired_weight_names(model, layers)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    by_name = {i.name: i for i in out.graph.initializer}
    onnx_masks = {}
    for lay, wname in zip(layers, names):
        if lay.name not in masks:
            continue
        mask, stored = masks[lay.name], lay.weight
        w = numpy_helper.to_array(by_name[wname])
        if mask.shape != w.shape and mask.ndim == 2 and mask.T.shape == w.shape:
            mask, stored = mask.T, stored.T
        if mask.shape != w.shape or not np.array_equal(np.where(mask, w, 0), stored):
            raise ValueError(
                f"pruned layer {lay.name} does not match ONNX weight {wname} {list(w.shape)}"
            )
        onnx_masks[wname] = mask
        by_name[wname].CopyFrom(
            numpy_helper.from_array(np.where(mask, w, 0).astype(w.dtype), wname)
        )
    return out, onnx_masks


def prune_onnx(
    model: onnx.ModelProto,
    method: str,
    sparsity: float,
    config=None,
    criterion: str = "l2",
    keep_first_last: bool = True,
    per_layer: dict | None = None,
    return_masks: bool = False,
    ranking: str = "layer",
    max_layer_sparsity: float | None = None,
):
    """Prune ``model`` with ``method`` (``"hapm"``, ``"unstructured"`` or ``"filter"``).

    Returns the pruned ONNX model (a copy; the input is not changed) and the pass's report, plus
    the keep-masks by ONNX weight name with ``return_masks``.  With ``keep_first_last`` (the
    usual practice, e.g. AMC) the first and the last layer stay dense: the first sees only a
    few input channels, so one hardware group there is a whole kernel tap, and the last produces
    the logits.  ``per_layer`` maps Relax layer names to their own sparsity.

    ``"filter"`` zeroes whole filters and the weights of every consumer reading them, with the
    channel coupling of :func:`~tvm_hapm.passes.FilterPrune` (residual adds prune the same
    channels in every conv feeding them); ``sparsity`` is then the fraction of *channels*
    removed per channel space. The shapes stay, so masks, fine-tuning and reconstruction work as
    for the other methods; :func:`filter_deploy_pass` removes the channels for deployment.

    ``ranking`` says where the pruning goes (``per_layer`` layers always get their own ratio):
    ``"layer"`` prunes every layer to ``sparsity``; ``"global"`` ranks the groups (or weights)
    of all layers together against one network-wide ``sparsity``; ``"per_mac"`` (HAPM only)
    ranks them by importance per multiply-accumulate saved, with no layer pruned beyond
    :data:`PER_MAC_MAX_LAYER_SPARSITY` (``HardwareAwarePrune(global_=True,
    cost_weighted=True)``): the latency-aware allocation of a network-wide weight sparsity.
    ``max_layer_sparsity`` caps every layer of a ``global`` or ``per_mac`` ranking (``per_mac``
    default :data:`PER_MAC_MAX_LAYER_SPARSITY`); a lower cap spreads the pruning over more
    layers, which costs latency but can keep accuracy (``benchmarks/hapm_vs_standard.py``
    chooses it on validation).
    """
    from tvm.relax.frontend.onnx import from_onnx

    from ..passes import prune_report
    from ..passes.prune import prunable_layers

    mod = from_onnx(model)
    names = [d["layer"] for d in prunable_layers(mod)]
    skip = [names[0], names[-1]] if keep_first_last and len(names) > 2 else []
    if method == "filter":
        skip = []  # the logits' channels are never removed; the stem's are coupled
    pruned = pruning_pass(
        method, sparsity, config, criterion, skip, per_layer, ranking, max_layer_sparsity
    )(mod)
    out, masks = write_masks(model, pruned)
    return (out, prune_report(pruned), masks) if return_masks else (out, prune_report(pruned))


def filter_fraction(model: onnx.ModelProto, sparsity: float, config=None) -> tuple[float, float]:
    """Channel fraction at which ``prune_onnx(model, "filter", ...)`` gives the weight
    sparsity nearest ``sparsity``, and that sparsity (bisection: the weight sparsity grows with
    the fraction, in steps of the array width), so that filter pruning is compared with the
    other methods at equal weight sparsity."""
    lo, hi = 0.0, 0.95
    best = None
    for _ in range(9):
        mid = (lo + hi) / 2
        got = sparsity_of(prune_onnx(model, "filter", mid, config=config)[0])
        if best is None or abs(got - sparsity) < abs(best[1] - sparsity):
            best = (mid, got)
        lo, hi = (mid, hi) if got < sparsity else (lo, mid)
    return best


def filter_deploy_pass(sparsity: float, config=None, criterion: str = "l2"):
    """The pass that removes, for deployment, the channels ``prune_onnx(..., "filter",
    sparsity)`` zeroed: ``FilterPrune(sparsity, shrink=True)`` on the fine-tuned model, whose
    zeroed channels have zero importance and are therefore the ones it removes."""
    from ..passes import FilterPrune

    return FilterPrune(sparsity, config=config, criterion=criterion, shrink=True)


def sparsity_of(model: onnx.ModelProto) -> float:
    """Fraction of zeros over the conv and Gemm weights (initializers of rank 2 or 4)."""
    total = zeros = 0
    for init in model.graph.initializer:
        a = numpy_helper.to_array(init)
        if a.ndim in (2, 4):
            total += a.size
            zeros += int((a == 0).sum())
    return zeros / max(total, 1)


ENGINES = ("auto", "torch", "tvm")


def resolve_engine(engine: str = "auto") -> str:
    """``"torch"`` or ``"tvm"``: the engine that evaluates and fine-tunes.  ``"auto"`` takes
    PyTorch when it is installed (``pip install 'tvm-hapm[torch]'``), else TVM."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    try:
        have_torch = importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):  # a broken or blocked installation
        have_torch = False
    if engine == "torch" and not have_torch:
        raise ValueError(
            "engine='torch' needs PyTorch: pip install 'tvm-hapm[torch]' (torch==2.13.0)"
        )
    if engine == "auto":
        return "torch" if have_torch else "tvm"
    return engine


def float_accuracy(model: onnx.ModelProto, x, y, engine: str = "auto") -> float:
    """Top-1 (a fraction) of the float ONNX classifier ``model``: PyTorch
    (:class:`tvm_hapm.torch.OnnxModule`) or NumPy
    (:class:`~tvm_hapm.compress.numpynet.NumpyNet`)."""
    if resolve_engine(engine) == "torch":
        from ..torch.onnx_module import OnnxModule
        from ..torch.train import accuracy

        return accuracy(OnnxModule(model), x, y)
    from .numpynet import NumpyNet

    return NumpyNet(model).accuracy(x, y)


def quantize_onnx(model: onnx.ModelProto, x_cal, config=None, percentile=None, transform=None):
    """The int8 Relax module of ``model`` at batch ``len(x_cal)``, calibrated on ``x_cal`` (one
    sample of all the images: the scales are those of any split of them into samples).

    ``transform`` is an optional Relax pass applied to the float module first (e.g.
    :func:`filter_deploy_pass`)."""
    from tvm.relax.frontend.onnx import from_onnx

    from .. import quantize
    from ..data import set_batch

    x_cal = np.ascontiguousarray(x_cal, dtype=np.float32)
    mod = from_onnx(set_batch(model, len(x_cal)))
    if transform is not None:
        mod = transform(mod)
    return quantize(mod, calibration=[x_cal], config=config, percentile=percentile)


@dataclass
class Int8Accuracy:
    """Top-1 of an int8 model; see :func:`int8_accuracy`."""

    accuracy: float  # fraction of ``correct``
    correct: np.ndarray  # bool per image (paired comparisons and bootstrap intervals)
    engine: str  # "torch" (QuantizedRunner) or "tvm" (llvm build)
    percentile: float | None
    calibration_images: int
    checked: dict | None = None  # {"images": n, "bit_exact": True} against TVM's llvm build


def int8_accuracy(
    model: onnx.ModelProto,
    x_cal,
    x,
    y,
    config=None,
    percentile=None,
    transform=None,
    engine: str = "auto",
    check: bool = False,
) -> Int8Accuracy:
    """Top-1 of ``model`` quantized for hapm_fpga (calibrated on ``x_cal``) on every image of
    ``x``.

    The quantized module is bit-exact with the accelerator (``tests/test_onnx_e2e.py``); it is
    run by :class:`tvm_hapm.torch.QuantizedRunner` (``engine="torch"``, bit-exact with TVM's
    llvm build of it, ~10x faster) or by that llvm build (``"tvm"``).  ``check`` also runs the
    first ``len(x_cal)`` images through the llvm build and raises ``RuntimeError`` unless the
    two agree bit for bit.  ``config`` and ``percentile`` are the quantizer's.
    """
    import tvm
    from tvm import relax

    engine = resolve_engine(engine)
    x = np.ascontiguousarray(x, dtype=np.float32)
    y = np.asarray(y)
    batch = len(x_cal)
    qmod = quantize_onnx(model, x_cal, config, percentile, transform)
    vm = None
    if engine == "tvm" or check:
        vm = relax.VirtualMachine(tvm.compile(qmod, target="llvm"), tvm.cpu())

    def llvm(xb):
        k = len(xb)
        if k < batch:  # the compiled batch is fixed: pad the last chunk, drop its outputs
            xb = np.concatenate([xb, np.zeros((batch - k, *xb.shape[1:]), xb.dtype)])
        return vm["main"](tvm.runtime.tensor(np.ascontiguousarray(xb))).numpy()[:k]

    checked = None
    if engine == "torch":
        from ..torch.quantized import QuantizedRunner

        logits = QuantizedRunner(qmod).predict(x)
        if check:
            n = min(batch, len(x))
            same = bool(np.array_equal(logits[:n], llvm(x[:n])))
            if not same:
                raise RuntimeError(
                    "the PyTorch run of the quantized module differs from TVM's llvm build"
                )
            checked = {"images": n, "bit_exact": same}
    else:
        logits = np.concatenate([llvm(x[k : k + batch]) for k in range(0, len(x), batch)])
    correct = logits.argmax(1) == y
    return Int8Accuracy(float(correct.mean()), correct, engine, percentile, batch, checked)


def simulate(model: onnx.ModelProto, config, x_cal, x_one, target=None, transform=None):
    """Quantize (calibrated on the first 8 images of ``x_cal``), compile for hapm_fpga and
    simulate one image.  Returns ``(latency_ms, energy_uj, cycles, per-program [(name, cycles,
    energy_uj)], GEMM instructions)``.

    The cycles and the energy depend on the layer shapes, on which weight blocks are zero and
    on which residual adds the quantizer fuses into a convolution.  That last choice depends on
    the scales (an add fuses when its shortcut's integer weight ``K`` reaches
    ``RESIDUAL_MIN_K``, :mod:`tvm_hapm.passes.quantize`), so the calibration can change the
    cycles: the same network pruned and timed with the dense network's activation scales
    instead of its own fused a different add (a random ResNet-8, 31,034 against 31,126
    cycles).  A uniform rescaling of the calibration images changes nothing."""
    import tvm
    from tvm import relax

    from ..runtime import last_run_stats

    config, q1 = _quantized_one_image(model, config, x_cal, transform)
    ex = tvm.compile(q1, target=target or f"hapm_fpga-{config.name}")
    relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x_one[:1]))
    st = last_run_stats()
    per = [(s.layer, float(s.cycles), float(s.energy_uj)) for s in st.layers]
    gemms = int(st.by_opcode.get("GEMM", 0))
    return float(st.latency_ms), float(st.energy_uj), float(st.cycles), per, gemms


def time_programs(model: onnx.ModelProto, config, x_cal, target=None, transform=None):
    """What :func:`simulate` returns, without building the host code or running an image.

    The model is quantized as :func:`simulate` quantizes it and only the offload passes run
    (:func:`tvm_hapm.passes.offload_passes`: partition and lowering, the compiler's streams);
    each accelerator program then goes through the cycle-level timing and energy models alone.
    The cycles and the energy are :func:`simulate`'s to the cycle: they depend only on the
    instructions and on which weight blocks are zero when a GEMM runs, and the compiler has
    removed every all-zero block from the stream already (``tests/test_flow.py`` checks the
    two agree).  What it saves is TVM's LLVM build of the host code, the VM's set-up and the
    functional simulation: the per-candidate cost of a search that judges candidates by
    simulation (HW-Flow's ``sim`` level).
    """
    import tvm

    from ..cost.measure import measure_program
    from ..passes import offload_passes
    from ..target.isa import Opcode

    config, q1 = _quantized_one_image(model, config, x_cal, transform)
    programs: list = []
    per, latency, gemms = [], 0.0, 0
    try:
        with tvm.target.Target(target or f"hapm_fpga-{config.name}"):
            offload_passes(config, programs)(q1)
        for prog in programs:
            m = measure_program(prog)
            per.append((prog.layer, float(m.cycles), m.energy_uj))
            latency += m.latency_ms
            gemms += sum(1 for insn in prog.instructions if insn.opcode == Opcode.GEMM)
    finally:
        programs.clear()  # the offload passes hold the list: free the programs with the call
    cycles = sum(c for _, c, _ in per)
    return float(latency), float(sum(e for _, _, e in per)), float(cycles), per, gemms


def _quantized_one_image(model: onnx.ModelProto, config, x_cal, transform=None):
    """``(config, module)``: ``model`` at batch 1, ``transform``-ed, quantized for ``config``
    calibrated on the first 8 images of ``x_cal``; what :func:`simulate` and
    :func:`time_programs` both run, so that their figures are of the same module."""
    from tvm.relax.frontend.onnx import from_onnx

    from .. import quantize
    from ..data import set_batch
    from ..target.config import get_config

    config = get_config(config)
    mod = from_onnx(set_batch(model, 1))
    if transform is not None:
        mod = transform(mod)
    return config, quantize(mod, calibration=list(x_cal[:8, None]), config=config)


@dataclass
class DeployedResult:
    """A float ONNX classifier deployed as int8 on hapm_fpga."""

    accuracy: float  # int8 top-1 in %, on the given test set
    latency_ms: float  # one image on the simulated accelerator
    energy_uj: float
    gemms: int  # GEMM instructions of one image
    cycles: int
    correct: np.ndarray | None = None  # bool per test image


def evaluate_deployed(
    model, target, x_cal, x_test, y_test, transform=None, config=None, percentile=None,
    engine: str = "auto", correct=None,
) -> DeployedResult:  # fmt: skip
    """Quantize ``model`` (calibrated on ``x_cal``), measure its int8 top-1 on the whole test
    set (:func:`int8_accuracy`) and its accelerator latency and energy for one image
    (:func:`simulate`).

    ``transform`` is an optional Relax pass applied to the float module before quantization
    (e.g. :func:`filter_deploy_pass`), for the accuracy and the latency alike.  ``config``
    (default: the target's) is the quantizer's and the accelerator's.  ``correct``: the int8
    model's top-1 hit per test image when the caller already measured it (the same model,
    calibration images, percentile and transform); only the simulation then runs.
    """
    from ..target.config import get_config

    cfg = get_config(config if config is not None else target)
    if correct is None:
        correct = int8_accuracy(
            model, x_cal, x_test, y_test, cfg, percentile, transform, engine
        ).correct
    lat, energy, cycles, _, gemms = simulate(model, cfg, x_cal, x_test, target, transform)
    return DeployedResult(100.0 * float(np.mean(correct)), lat, energy, gemms, int(cycles), correct)


def recover(
    pruned: onnx.ModelProto,
    dense: onnx.ModelProto,
    data,
    steps: int = 16,
    lr: float | None = None,
    calibration: int = 256,
    val_size: int = 200,
    seed: int = 0,
    reconstruct: bool = True,
    engine: str = "auto",
    val_data=None,
    train_config=None,
) -> tuple[onnx.ModelProto, dict]:
    """Recover the accuracy of a pruned model: least-squares reconstruction, then fine-tuning
    with the masks held fixed, keeping whichever is better on a validation split.

    ``data`` is ``(x_train, y_train)``.  The validation images are ``val_data`` when given,
    else a seeded split of ``val_size`` of ``data`` (at most a quarter) held out of both
    steps; they only choose between the reconstructed and the fine-tuned weights (a few
    fine-tuning steps on a model that reconstruction already brought close can be worse than
    none).  ``reconstruct=False`` fine-tunes the pruned model directly.

    Fine-tuning is :func:`finetune` (``steps``, ``lr``, ``engine``, ``train_config``): PyTorch
    when it is installed, else TVM's ``relax.training``; a ``train_config`` with ``distill`` > 0
    distills from ``dense``, the model reconstruction targets.
    Returns the model and a record: validation accuracies, the stage kept, seconds, the
    per-layer reconstruction record, the engine and the fine-tuning speed (images/s).
    """
    import time

    from .reconstruct import reconstruct as least_squares

    engine = resolve_engine(engine)
    x, y = data
    if val_data is None:
        order = np.random.default_rng(seed).permutation(len(x))
        n_val = min(val_size, len(x) // 4)
        val, fit = order[:n_val], order[n_val:]
        x_fit, y_fit, x_val, y_val = x[fit], y[fit], x[val], y[val]
    else:
        x_fit, y_fit = x, y
        x_val, y_val = val_data
    t0 = time.perf_counter()
    if reconstruct:
        order = np.random.default_rng(seed).permutation(len(x_fit))[:calibration]
        rebuilt, rec = least_squares(pruned, dense, x_fit[np.sort(order)], seed=seed)
    else:
        rebuilt, rec = pruned, None
    info = {
        "engine": engine,
        "val_pruned": float_accuracy(pruned, x_val, y_val, engine),
        "val_reconstructed": float_accuracy(rebuilt, x_val, y_val, engine) if reconstruct else None,
        "reconstruct_seconds": time.perf_counter() - t0,
        "reconstruction": rec,
        "finetune_steps": int(steps),
    }
    best, info["kept"] = rebuilt, "reconstructed" if reconstruct else "pruned"
    if steps > 0:
        t1 = time.perf_counter()
        tuned, history = finetune(rebuilt, (x_fit, y_fit), steps, lr, seed, engine, train_config,
                                  teacher=dense)  # fmt: skip
        info["val_finetuned"] = float_accuracy(tuned, x_val, y_val, engine)
        info["finetune_seconds"] = time.perf_counter() - t1
        info["finetune_images_per_s"] = history["images_per_s"]
        kept_val = info["val_reconstructed"] if reconstruct else info["val_pruned"]
        if info["val_finetuned"] > kept_val:
            best, info["kept"] = tuned, "finetuned"
    return best, info


def finetune(
    model: onnx.ModelProto,
    data,
    steps: int,
    lr: float | None = None,
    seed: int = 0,
    engine: str = "auto",
    train_config=None,
    teacher: onnx.ModelProto | None = None,
) -> tuple[onnx.ModelProto, dict]:
    """``steps`` optimizer steps of fine-tuning ``model`` on ``data = (x, y)`` with its zeros held
    (the masks of :func:`tvm_hapm.compress.relax_training.extract_masks`); returns the model (same
    graph, new
    values) and the training history (``images_per_s`` among its keys).

    ``engine="torch"`` (default when PyTorch is installed): :func:`tvm_hapm.torch.fit` on
    :class:`tvm_hapm.torch.OnnxModule`: batch 128, SGD with Nesterov momentum, learning rate
    ``lr`` (default 0.01) decayed to zero by a cosine, weight decay 5e-4, random crops of 2 pixels,
    batch norm in training mode; ``train_config`` (a :class:`tvm_hapm.torch.TrainConfig`)
    replaces these, its ``epochs`` set from ``steps``; with its ``distill`` > 0 the fine-tuning
    distills from ``teacher`` (an ONNX classifier of the same input).  ``engine="tvm"``:
    :func:`tvm_hapm.compress.relax_training.finetune` inside TVM (batch 32, Adam, ``lr`` default
    1e-4).
    """
    from .relax_training import extract_masks

    if resolve_engine(engine) == "tvm":
        if getattr(train_config, "distill", 0):
            raise ValueError("distillation needs the PyTorch engine (engine='torch')")
        from ..data import set_batch
        from .relax_training import finetune as tvm_finetune

        dim = model.graph.input[0].type.tensor_type.shape.dim[0]
        batch = dim.dim_value if dim.HasField("dim_value") else (dim.dim_param or 1)
        tuned, history = tvm_finetune(
            set_batch(model, 32), data, masks=extract_masks(model), epochs=1, batch_size=32,
            lr=1e-4 if lr is None else lr, seed=seed, max_steps=steps,
        )  # fmt: skip
        return set_batch(tuned, batch), history
    from dataclasses import replace

    from ..torch.masks import apply_masks
    from ..torch.onnx_module import OnnxModule
    from ..torch.train import TrainConfig, fit

    cfg = train_config or TrainConfig(
        batch_size=128, lr=0.01 if lr is None else lr, weight_decay=5e-4, crop_padding=2,
        flip=False, seed=seed,
    )  # fmt: skip
    per_epoch = max(len(data[0]) // cfg.batch_size, 1)
    cfg = replace(cfg, epochs=steps / per_epoch)
    net = apply_masks(OnnxModule(model), extract_masks(model))
    # fit refuses a distilling config without a teacher
    distill_from = OnnxModule(teacher) if cfg.distill and teacher is not None else None
    history = fit(net, data, cfg, teacher=distill_from)
    return net.to_onnx(), history


def prune_iteratively(
    model: onnx.ModelProto,
    method: str,
    sparsity: float,
    data,
    stages: int = 3,
    steps: int = 16,
    config=None,
    criterion: str = "l2",
    schedule: str = "cubic",
    seed: int = 0,
    progress=None,
    reconstruct: bool = True,
    ranking: str = "layer",
    engine: str = "auto",
    val_data=None,
    train_config=None,
    max_layer_sparsity: float | None = None,
    calibration: int = 256,
    teacher: str = "dense",
) -> tuple[onnx.ModelProto, list[dict]]:
    """Iterative prune / recover: ``stages`` rounds that raise the sparsity to ``sparsity``.

    Round ``k`` prunes the previous round's recovered model at ``s_k`` and recovers it with
    :func:`recover`: reconstruction towards the layer outputs of ``teacher``, then ``steps``
    fine-tuning steps.  ``teacher="dense"`` reconstructs every round towards the *original*
    model (right when recovery is mostly reconstruction: a reconstructed model as the next
    round's target would pass its error on); ``"previous"`` towards the model the round prunes
    (right with real fine-tuning between rounds: least squares refits every kept weight, so
    towards the dense model it would discard what the previous rounds' fine-tuning learnt, and
    towards the previous model it only compensates the round's small step).

    ``schedule`` is ``"linear"`` (``s_k = s k / n``) or ``"cubic"``
    (``s_k = s (1 - (1 - k/n)^3)``, Zhu & Gupta 2017: large steps first, while the network has
    the most redundancy).  Weights pruned in one round have zero importance in
    the next, so the masks are nested and the final mask is the last round's.  For ``"filter"``
    ``sparsity`` is the channel fraction, as in :func:`prune_onnx`; ``ranking`` is passed to
    it with ``max_layer_sparsity``; ``engine``, ``val_data``, ``train_config`` and
    ``calibration`` to :func:`recover`.

    ``stages=1`` is one prune and one recovery (what ``hapm prune --data`` runs by default).

    Returns the final model and one record per round (its sparsity target, achieved weight
    sparsity, the :func:`recover` record and the pruning pass's ``report``).
    """
    if schedule not in ("linear", "cubic"):
        raise ValueError(f"schedule must be 'linear' or 'cubic', got {schedule!r}")
    if stages < 1:
        raise ValueError(f"stages must be >= 1, got {stages}")
    if teacher not in ("dense", "previous"):
        raise ValueError(f"teacher must be 'dense' or 'previous', got {teacher!r}")
    current, rounds = model, []
    for k in range(1, stages + 1):
        frac = k / stages
        target = sparsity * (frac if schedule == "linear" else 1 - (1 - frac) ** 3)
        pruned, report = prune_onnx(
            current, method, target, config=config, criterion=criterion, ranking=ranking,
            max_layer_sparsity=max_layer_sparsity,
        )  # fmt: skip
        current, info = recover(
            pruned, model if teacher == "dense" else current, data, steps=steps, seed=seed,
            reconstruct=reconstruct, engine=engine, val_data=val_data, train_config=train_config,
            calibration=calibration,
        )  # fmt: skip
        rounds.append(
            {"round": k, "target": target, "sparsity": sparsity_of(current), **info,
             "report": report}
        )  # fmt: skip
        if progress is not None:
            progress(k, stages)
    return current, rounds
