"""Recovery fine-tuning inside TVM (``tvm.relax.training``) with pruning masks held fixed.

``finetune(model, (x, y), masks, ...)`` takes an ONNX model (``onnx.ModelProto`` or a path),
builds a Relax training module from it and trains it with TVM's own trainer compiled for llvm;
it returns an ONNX model of the same structure whose initializers hold the fine-tuned values,
plus a history (per-epoch loss and accuracy, images/s, compile time). ``evaluate`` measures
accuracy through ``from_onnx`` + ``tvm.compile`` (llvm). Only ONNX in / ONNX out is supported
(a Relax ``IRModule`` argument raises ``TypeError``): the pruning passes work on the Relax
module ``from_onnx`` makes from the returned model, and the ONNX initializer names give masks
stable keys.

How the training module is built
--------------------------------
* Trainable parameters: the weights and biases of ``Conv``/``ConvTranspose``/``Gemm``/``MatMul``
  (initializer inputs 1 and 2) and the affine ``scale``/``bias`` of ``BatchNormalization``.
  They become graph inputs, so ``from_onnx`` makes them parameters of the Relax function.
* BatchNormalization stays in **inference mode**: running mean and variance are frozen
  constants (``DecomposeOpsForInference`` turns BN into elementwise ops before
  ``SetupTrainer``), only gamma/beta train. This is the usual choice for recovery fine-tuning
  with small batches, and keeps conv weights that are zero exactly zero after BN folding.
* Every other initializer (shape constants, clip bounds, ...) stays a constant.
* Loss: softmax cross-entropy (``relax.training.loss.CrossEntropyLoss``); optimizer:
  ``"adam"`` (``relax.training.optimizer.Adam``) or ``"sgd"`` (``MomentumSGD``). The learning
  rate is fixed (it is a constant of the compiled optimizer function).
* Batches have a static shape: each epoch uses a fresh permutation and drops the last
  ``len(x) % batch_size`` samples.

Masks
-----
A mask is a boolean (or 0/1) array of the weight's shape; ``True`` means "kept". Keys are
either the ONNX initializer name (``"conv3.weight"``) or an ``int``: the position of the
weight in :func:`prunable_weights` order (``Conv``/``ConvTranspose``/``Gemm``/``MatMul`` weights in
graph order, which is also the order of the layers in the Relax module ``from_onnx`` makes).
Masked weights are zeroed before training and re-zeroed after every optimizer step, so they
stay exactly zero. :func:`extract_masks` returns the masks implied by a pruned model
(positions where weights are exactly zero).

Speed
-----
Measured for ResNet-20 (``load_bundled_resnet20``, 3x32x32, 270k parameters) on 2 cores that
were shared with other jobs: **~9.3 images/s at batch 32** (load average 1.5; ~6.5 images/s at
load 3; batch 64: ~8.5 images/s at load 3), compile ~7 s, i.e. ~2.5 minutes per epoch of the
1347 training digits. Recovery is fast in steps, though: 60 % magnitude pruning takes the
bundled ResNet-20 from 99.6 % to 52 %, and 12 steps of batch 32 bring it back to 95 %. A
tiny CNN (16x16 input) trains at ~600 images/s. Why ResNet-20 is slow:

* TVM's llvm pipeline (``relax.get_pipeline("default")`` / ``backend.cpu_generic``)
  legalizes ``conv2d`` and its gradients (``conv2d_transpose``-style data gradient, weight
  gradient) to plain TOPI loop nests and applies **no schedule**: ``dlight`` has CPU rules
  only for GEMV and reductions, and ``static_shape_tuning_pipeline`` needs MetaSchedule
  tuning of every kernel (minutes per kernel here; see docs/tvm-notes.md). Even inference of
  ResNet-20 runs at only ~24 images/s this way (NumPy im2col + BLAS trains at ~35 images/s).
* The wheel has no BLAS/DNNL offload (no ``tvm.contrib.cblas`` global functions).
* ``ConvertLayout`` to NHWC speeds inference up ~1.5x, but ``conv2d``'s gradient only
  supports NCHW (``_op_gradient.conv2d_grad`` asserts it), so training cannot use it.
* ``parallel=True`` (fuse + ``parallel`` the outer spatial loops of every kernel) applies to
  every block but gave no measurable gain (9.25 vs 9.34 images/s at load 1.5) at 3x the
  compile time.
* Larger batches help a little (batch 64: ~1.3x the images/s of batch 32).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

__all__ = [
    "evaluate",
    "extract_masks",
    "finetune",
    "prunable_weights",
    "trainable_parameters",
]

#: initializer input positions that are trainable, per ONNX op type
_TRAINABLE_INPUTS = {
    "Conv": (1, 2),
    "ConvTranspose": (1, 2),
    "Gemm": (1, 2),
    "MatMul": (1,),
    "BatchNormalization": (1, 2),
}
_WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def _load(model) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    if isinstance(model, str | Path):
        return onnx.load(str(model))
    raise TypeError(
        f"expected an onnx.ModelProto or a path to an .onnx file, got {type(model).__name__}; "
        "Relax modules are not accepted: fine-tune the ONNX model and import the result with "
        "tvm.relax.frontend.onnx.from_onnx (the ONNX graph is what names the parameters)"
    )


def prunable_weights(model) -> list[str]:
    """Names of the prunable weights (Conv/ConvTranspose/Gemm/MatMul input 1) in graph order.

    Parameters
    ----------
    model : onnx.ModelProto or path

    Returns
    -------
    list of str
        Initializer names; position ``i`` is what an ``int`` mask key ``i`` refers to.
    """
    model = _load(model)
    inits = {t.name for t in model.graph.initializer}
    out = []
    for node in model.graph.node:
        if node.op_type in _WEIGHT_OPS and len(node.input) > 1:
            name = node.input[1]
            if name in inits and name not in out:
                out.append(name)
    return out


def trainable_parameters(model) -> list[str]:
    """Names of the initializers :func:`finetune` trains (see the module docstring)."""
    model = _load(model)
    inits = {t.name: t for t in model.graph.initializer}
    out = []
    for node in model.graph.node:
        for i in _TRAINABLE_INPUTS.get(node.op_type, ()):
            if i < len(node.input) and node.input[i] in inits and node.input[i] not in out:
                if inits[node.input[i]].data_type == onnx.TensorProto.FLOAT:
                    out.append(node.input[i])
    return out


def extract_masks(model, min_sparsity=0.0) -> dict[str, np.ndarray]:
    """Masks of a pruned model: ``True`` where a prunable weight is non-zero.

    Parameters
    ----------
    model : onnx.ModelProto or path
    min_sparsity : float
        Only weights whose fraction of exact zeros is strictly greater than this are returned
        (the default returns every weight that has at least one zero).

    Returns
    -------
    dict of str to numpy.ndarray
        Initializer name -> boolean mask of the weight's shape.
    """
    model = _load(model)
    inits = {t.name: t for t in model.graph.initializer}
    masks = {}
    for name in prunable_weights(model):
        w = numpy_helper.to_array(inits[name])
        zero = float(np.mean(w == 0))
        if zero > min_sparsity and zero > 0:
            masks[name] = w != 0
    return masks


def _normalize_masks(model, masks) -> dict[str, np.ndarray]:
    if not masks:
        return {}
    order = prunable_weights(model)
    shapes = {t.name: tuple(t.dims) for t in model.graph.initializer}
    out = {}
    for key, m in masks.items():
        if isinstance(key, int | np.integer):
            if not 0 <= key < len(order):
                raise KeyError(f"mask index {key} out of range (model has {len(order)} weights)")
            name = order[key]
        else:
            name = str(key)
            if name not in shapes:
                raise KeyError(f"mask key {name!r} is not an initializer of the model")
        m = np.asarray(m).astype(bool)
        if m.shape != shapes[name]:
            raise ValueError(f"mask {name!r} has shape {m.shape}, weight has {shapes[name]}")
        out[name] = m
    return out


def _split_params(model: onnx.ModelProto, names: list[str], batch: int):
    """Copy of ``model`` with ``names`` turned from initializers into graph inputs."""
    from tvm_hapm.data import set_batch

    m = set_batch(model, batch)
    inits = {t.name: t for t in m.graph.initializer}
    values = [numpy_helper.to_array(inits[n]).astype(np.float32) for n in names]
    m.graph.input.extend(
        helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, list(inits[n].dims)) for n in names
    )
    keep = [t for t in m.graph.initializer if t.name not in set(names)]
    del m.graph.initializer[:]
    m.graph.initializer.extend(keep)
    return m, values


def _parallelize(mod):
    """Parallelize the leading spatial loops of every block of every PrimFunc (best effort)."""
    import tvm
    from tvm import s_tir, tirx

    out = tvm.IRModule(mod.functions, attrs=mod.attrs)
    for gv, func in mod.functions_items():
        if not isinstance(func, tirx.PrimFunc):
            continue
        try:
            sch = s_tir.Schedule(tvm.IRModule({"main": func}))
            for block in sch.get_child_blocks(sch.get_sblock("root")) if _has_root(sch) else []:
                _parallel_block(sch, block)
            out[gv] = sch.mod["main"].with_attrs(func.attrs) if func.attrs else sch.mod["main"]
        except Exception:
            continue
    return out


def _has_root(sch):
    try:
        sch.get_sblock("root")
    except Exception:
        return False
    return True


def _parallel_block(sch, block):
    from tvm.tirx import IterVar

    loops = sch.get_loops(block)
    sref = sch.get(block)
    spatial = []
    for loop, iv in zip(loops, sref.iter_vars):
        if iv.iter_type != IterVar.DataPar:
            break
        spatial.append(loop)
    if len(loops) != len(sref.iter_vars) or not spatial:
        return
    fused = sch.fuse(*spatial[:2]) if len(spatial) >= 2 else spatial[0]
    sch.parallel(fused)


def _adam_class(adam):
    """``Adam`` whose ``init`` works in TVM 0.27 (upstream passes a TVM type to ``np.ones``)."""
    import tvm

    class _Adam(adam):
        def init(self, params):
            params = params if isinstance(params, list) else [params]
            self._set_params_and_dtype(params)
            dt = str(params[0].ty.dtype.dtype)

            def zeros(p):
                return tvm.runtime.tensor(np.zeros([int(d) for d in p.ty.shape], dt))

            self.state = (
                tvm.runtime.tensor(np.zeros((), "int64")),  # num_steps
                tvm.runtime.tensor(np.ones((), dt)),  # beta_0_prod
                tvm.runtime.tensor(np.ones((), dt)),  # beta_1_prod
                *(zeros(p) for p in self.param_list),  # first moments
                *(zeros(p) for p in self.param_list),  # second moments
            )
            return self

    return _Adam


def _build_trainer(model, names, masks, batch, num_classes, optimizer, lr, momentum, wd, par):
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx
    from tvm.relax.training import SetupTrainer, Trainer
    from tvm.relax.training.loss import CrossEntropyLoss
    from tvm.relax.training.optimizer import Adam, MomentumSGD

    split, values = _split_params(model, names, batch)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Renaming name conv0.weight to conv0_weight"
        mod = from_onnx(split)
    mod = relax.transform.DecomposeOpsForInference()(mod)
    func = mod["main"].without_attr("num_input").with_attr("global_symbol", "backbone")
    backbone = tvm.IRModule({"backbone": func}).with_attrs(
        {"param_num": len(names), "state_num": 0}
    )
    if optimizer == "adam":
        opt = _adam_class(Adam)(lr, weight_decay=wd)
    elif optimizer == "sgd":
        opt = MomentumSGD(lr, momentum, weight_decay=wd)
    else:
        raise ValueError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")
    loss_args = [
        relax.TensorType((batch, num_classes), "float32"),
        relax.TensorType((batch,), "int64"),
    ]
    train_mod = SetupTrainer(CrossEntropyLoss(reduction="mean"), opt, loss_args)(backbone)
    t0 = time.perf_counter()
    to_build = train_mod.without_attr("optim_state")
    if par:
        seq = tvm.transform.Sequential(
            [
                relax.transform.AnnotateTIROpPattern(),
                relax.transform.FoldConstant(),
                relax.transform.FuseOps(),
                relax.transform.FuseTIR(),
            ]
        )
        to_build = _parallelize(seq(to_build))
    ex = tvm.compile(to_build, target="llvm")
    compile_s = time.perf_counter() - t0
    vm = relax.VirtualMachine(ex, tvm.cpu())
    trainer = Trainer(train_mod, vm, tvm.cpu())
    for i, n in enumerate(names):
        if n in masks:
            values[i] = values[i] * masks[n]
    trainer.load_params(values)
    return trainer, compile_s


def _num_classes(model: onnx.ModelProto) -> int:
    dims = model.graph.output[0].type.tensor_type.shape.dim
    return int(dims[-1].dim_value)


def finetune(
    model,
    data,
    masks: dict | None = None,
    epochs: int = 1,
    batch_size: int = 32,
    lr: float = 1e-3,
    seed: int = 0,
    progress: Callable[[dict], None] | None = None,
    optimizer: str = "adam",
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    eval_data=None,
    parallel: bool = False,
    max_steps: int | None = None,
):
    """Fine-tune an ONNX classifier inside TVM with ``tvm.relax.training``, masks held fixed.

    Parameters
    ----------
    model : onnx.ModelProto or path
        Float classifier with one input (batch first) and one logits output.
    data : tuple of numpy.ndarray
        ``(x_train, y_train)``: float32 inputs and integer labels.
    masks : dict, optional
        Pruning masks (see the module docstring for the key convention); ``True`` = kept.
        Pass ``extract_masks(model)`` to keep the zeros of an already pruned model.
    epochs, batch_size, lr, seed : int, int, float, int
        Training schedule; the last partial batch of each epoch is dropped.
    progress : callable, optional
        Called after every step with ``{"epoch", "step", "loss"}`` and after every epoch with
        the epoch record (which has ``"epoch_done": True``).
    optimizer : {"adam", "sgd"}
        ``Adam`` or ``MomentumSGD`` (with ``momentum``) of ``tvm.relax.training.optimizer``.
    weight_decay : float
        L2 weight decay applied by the optimizer to every trainable parameter.
    eval_data : tuple of numpy.ndarray, optional
        ``(x, y)`` evaluated (with the trainer's own forward function) after every epoch.
    parallel : bool
        Parallelize the outer spatial loops of every TIR kernel before building (see "Speed";
        off by default: no measurable gain on the 2-core machine, 3x compile time).
    max_steps : int, optional
        Stop after this many optimizer steps in total (for quick checks and benchmarks).

    Returns
    -------
    model : onnx.ModelProto
        Copy of the input with the trained initializers replaced (same graph).
    history : dict
        ``epochs`` (list of ``{"epoch", "loss", "train_accuracy", ["eval_accuracy"],
        "seconds", "images_per_s"}``), ``images_per_s`` (all steps), ``compile_seconds``,
        ``steps``, ``trainable`` (parameter names), ``masked`` (names of masked weights).
    """
    model = _load(model)
    x, y = data
    x = np.ascontiguousarray(x, dtype=np.float32)
    y = np.ascontiguousarray(y, dtype=np.int64)
    if len(x) < batch_size:
        raise ValueError(f"need at least batch_size={batch_size} samples, got {len(x)}")
    masks = _normalize_masks(model, masks)
    names = trainable_parameters(model)
    num_classes = _num_classes(model)
    trainer, compile_s = _build_trainer(
        model, names, masks, batch_size, num_classes, optimizer, lr, momentum, weight_decay,
        parallel,
    )  # fmt: skip
    masked = [(i, n, masks[n].astype(np.float32)) for i, n in enumerate(names) if n in masks]
    rng = np.random.default_rng(seed)
    history = {"epochs": [], "compile_seconds": round(compile_s, 2), "trainable": names}
    history["masked"] = [n for _, n, _ in masked]
    steps, train_seconds, images = 0, 0.0, 0
    for epoch in range(epochs):
        order = rng.permutation(len(x))
        losses, correct, seen = [], 0, 0
        t_epoch = 0.0
        for s in range(0, len(x) - batch_size + 1, batch_size):
            if max_steps is not None and steps >= max_steps:
                break
            idx = order[s : s + batch_size]
            t0 = time.perf_counter()
            loss = float(trainer.update(x[idx], y[idx]).numpy())
            if masked:
                params = list(trainer._params)
                for i, _, m in masked:
                    params[i] = params[i].numpy() * m
                trainer.load_params(params)
            t_epoch += time.perf_counter() - t0
            steps += 1
            losses.append(loss)
            seen += len(idx)
            if progress is not None:
                progress({"epoch": epoch + 1, "step": steps, "loss": loss})
        if not losses:
            break
        # training accuracy after the epoch, on the samples of this epoch (forward only)
        for s in range(0, seen, batch_size):
            idx = order[s : s + batch_size]
            pred = trainer.predict(x[idx]).numpy().argmax(1)
            correct += int((pred == y[idx]).sum())
        rec = {
            "epoch": epoch + 1,
            "loss": float(np.mean(losses)),
            "train_accuracy": correct / seen,
            "seconds": round(t_epoch, 2),
            "images_per_s": round(seen / t_epoch, 2),
        }
        if eval_data is not None:
            rec["eval_accuracy"] = _trainer_accuracy(trainer, *eval_data, batch_size)
        history["epochs"].append(rec)
        if progress is not None:
            progress({**rec, "epoch_done": True})
        train_seconds += t_epoch
        images += seen
    history["steps"] = steps
    history["images_per_s"] = round(images / train_seconds, 2) if train_seconds else 0.0
    trained = {n: trainer._params[i].numpy() for i, n in enumerate(names)}
    for _, n, m in masked:
        trained[n] = trained[n] * m
    return with_initializers(model, trained), history


def _trainer_accuracy(trainer, x, y, batch):
    x = np.ascontiguousarray(x, dtype=np.float32)
    correct, n = 0, len(x)
    for s in range(0, n, batch):
        xb = x[s : s + batch]
        k = len(xb)
        if k < batch:
            xb = np.concatenate([xb, np.zeros((batch - k, *x.shape[1:]), np.float32)])
        pred = trainer.predict(xb).numpy().argmax(1)[:k]
        correct += int((pred == np.asarray(y[s : s + k])).sum())
    return correct / n


def with_initializers(model: onnx.ModelProto, values: dict[str, np.ndarray]):
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for t in out.graph.initializer:
        if t.name in values:
            t.CopyFrom(numpy_helper.from_array(values[t.name].astype(np.float32), t.name))
    return out


def evaluate(model, x, y, batch_size: int | None = None, return_logits: bool = False):
    """Top-1 accuracy of an ONNX classifier through TVM (``from_onnx`` + ``tvm.compile`` llvm).

    Parameters
    ----------
    model : onnx.ModelProto or path
    x, y : numpy.ndarray
        Inputs (batch first) and integer labels.
    batch_size : int, optional
        Compiled batch size (default: all of ``x`` in one call); the last batch is zero-padded.
    return_logits : bool
        Also return the logits.

    Returns
    -------
    float or (float, numpy.ndarray)
    """
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    from tvm_hapm.data import set_batch

    model = _load(model)
    x = np.ascontiguousarray(x, dtype=np.float32)
    batch = len(x) if batch_size is None else min(batch_size, len(x))
    ex = tvm.compile(from_onnx(set_batch(model, batch)), target="llvm")
    vm = relax.VirtualMachine(ex, tvm.cpu())
    outs = []
    for s in range(0, len(x), batch):
        xb = x[s : s + batch]
        k = len(xb)
        if k < batch:
            xb = np.concatenate([xb, np.zeros((batch - k, *x.shape[1:]), np.float32)])
        outs.append(vm["main"](tvm.runtime.tensor(xb)).numpy()[:k])
    logits = np.concatenate(outs)
    acc = float((logits.argmax(1) == np.asarray(y)).mean())
    return (acc, logits) if return_logits else acc
