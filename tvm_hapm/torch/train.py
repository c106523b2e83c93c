"""Training and evaluation loops in PyTorch: the speed the project's recovery needs.

:func:`fit` trains any ``torch.nn.Module`` classifier on NumPy arrays (SGD with Nesterov momentum
or AdamW, linear warm-up then cosine decay, random-crop and flip augmentation), optionally with
pruning masks held fixed (:func:`tvm_hapm.torch.apply_masks`).  It is what the example scripts
train the shipped models with and what :func:`tvm_hapm.flow.recover` fine-tunes pruned models
with.  :func:`accuracy` and :func:`predict` run batched inference.

On the project's 2-core machine a CIFAR-style ResNet-20 on 1x32x32 inputs trains at about 500
images/s (batch 128, channels-last), against ~8 images/s for ``tvm.relax.training``.
"""

from __future__ import annotations

import io
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .. import atomic

__all__ = ["TrainConfig", "accuracy", "augment", "fit", "predict"]

OPTIMIZERS = ("sgd", "adamw")


@dataclass(frozen=True)
class TrainConfig:
    """How :func:`fit` trains.

    Parameters
    ----------
    epochs : float
        Passes over the training data (a fraction trains on part of the last pass).
    batch_size : int
        Images per step; the last incomplete batch of a pass is dropped.
    lr : float
        Peak learning rate (after warm-up).
    optimizer : {"sgd", "adamw"}
        SGD with Nesterov momentum, or AdamW.
    momentum : float
        SGD momentum.
    weight_decay : float
        L2 (SGD) or decoupled (AdamW) weight decay, on conv and linear weights only (not on
        biases and batch-norm parameters).
    warmup_epochs : float
        Linear warm-up from ``lr / 10``; then cosine decay to zero at the end.
    crop_padding : int
        Random crops of the image padded by this many zeros on every side (0: no crop).
    flip : bool
        Random horizontal flips.
    seed : int
        Seed of the data order and the augmentation.
    distill : float
        Weight of knowledge distillation from a teacher (Hinton et al., 2015; :func:`fit`'s
        ``teacher``): the loss is ``(1 - distill) * cross-entropy + distill * T^2 *
        KL(teacher || student)`` on the logits softened by the temperature ``T``; 0 trains on the
        labels only.
    temperature : float
        The softening temperature ``T`` of distillation.
    """

    epochs: float = 1.0
    batch_size: int = 128
    lr: float = 0.1
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 0.0
    crop_padding: int = 4
    flip: bool = True
    seed: int = 0
    distill: float = 0.0
    temperature: float = 4.0

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if not self.epochs > 0 or self.batch_size < 1 or not self.lr > 0:
            raise ValueError("epochs, batch_size and lr must be positive")
        if not 0.0 <= self.distill <= 1.0 or not self.temperature > 0:
            raise ValueError("distill must be in [0, 1] and temperature positive")


def augment(x: torch.Tensor, padding: int, flip: bool, gen: torch.Generator) -> torch.Tensor:
    """Random crops (``x`` zero-padded by ``padding`` pixels, cropped back to its size at a
    random offset per image) and random horizontal flips of a batch ``(N, C, H, W)``."""
    n, c, h, w = x.shape
    if padding:
        xp = F.pad(x, (padding,) * 4)
        dy = torch.randint(0, 2 * padding + 1, (n,), generator=gen)
        dx = torch.randint(0, 2 * padding + 1, (n,), generator=gen)
        rows = (dy[:, None] + torch.arange(h))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w))[:, None, None, :]
        images = torch.arange(n)[:, None, None, None]
        x = xp[images, torch.arange(c)[None, :, None, None], rows, cols]
    if flip:
        mirror = torch.rand(n, generator=gen) < 0.5
        x = torch.where(mirror[:, None, None, None], x.flip(3), x)
    return x


def _decay_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    decay, other = [], []
    for p in module.parameters():
        if p.requires_grad:
            # conv and linear weights (also under a mask's parametrization) have ndim >= 2
            (decay if p.ndim >= 2 else other).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}]


def _loss(logits, labels, teacher, xb, cfg: TrainConfig) -> torch.Tensor:
    """Cross-entropy, mixed with distillation from ``teacher`` when ``cfg.distill`` > 0."""
    loss = F.cross_entropy(logits, labels)
    if not cfg.distill:
        return loss
    with torch.no_grad():
        soft = F.softmax(teacher(xb) / cfg.temperature, dim=1)
    # T^2 keeps the soft term's gradients on the scale of the hard term's (Hinton et al.)
    kd = F.kl_div(F.log_softmax(logits / cfg.temperature, dim=1), soft, reduction="batchmean")
    return (1 - cfg.distill) * loss + cfg.distill * cfg.temperature**2 * kd


def _lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    if step < warmup:
        return peak * (0.1 + 0.9 * step / warmup)
    t = (step - warmup) / max(total - warmup, 1)
    return peak * 0.5 * (1.0 + math.cos(math.pi * t))


def fit(
    module: nn.Module,
    data,
    config: TrainConfig | None = None,
    val_data=None,
    progress: Callable[[dict], None] | None = None,
    max_steps: int | None = None,
    checkpoint=None,
    teacher: nn.Module | None = None,
) -> dict:
    """Train ``module`` in place on ``data = (x, y)`` (NumPy NCHW float32 images, int labels).

    Masks applied to the module (:func:`tvm_hapm.torch.apply_masks`) stay in force: pruned
    weights are zero in every forward pass and after training.

    Parameters
    ----------
    module : torch.nn.Module
        A classifier returning logits.
    data : tuple of numpy.ndarray
        Training images and labels.
    config : TrainConfig, optional
        The schedule (defaults of :class:`TrainConfig`).
    val_data : tuple of numpy.ndarray, optional
        ``(x, y)`` whose accuracy is measured after every epoch (eval mode).
    progress : callable, optional
        Called every 20 steps with ``{"epoch", "step", "steps", "loss", "lr"}`` and after every
        epoch with the epoch record (which has ``"epoch_done": True``).
    max_steps : int, optional
        Stop after this many steps (the schedule still spans ``config.epochs``).
    checkpoint : str or Path, optional
        A file the state (weights, optimizer, data order, history) is written to atomically
        after every epoch; when it exists, training resumes from it, with the same result as an
        uninterrupted run.  It must have been written with the same ``config``.
    teacher : torch.nn.Module, optional
        The classifier distilled from when ``config.distill`` > 0 (run in eval mode on the same
        augmented batches, not trained).

    Returns
    -------
    dict
        ``config``, ``epochs`` (per epoch: loss, train accuracy, [val accuracy], seconds,
        images/s), ``steps``, ``seconds``, ``images_per_s`` (training steps only), ``threads``.
    """
    cfg = config or TrainConfig()
    if cfg.distill and teacher is None:
        raise ValueError("TrainConfig.distill > 0 needs a teacher to distill from")
    if teacher is not None:
        teacher.to(memory_format=torch.channels_last).eval()
    x_all = torch.from_numpy(np.ascontiguousarray(data[0], dtype=np.float32))
    y_all = torch.from_numpy(np.ascontiguousarray(data[1], dtype=np.int64))
    if len(x_all) != len(y_all) or len(x_all) < cfg.batch_size:
        raise ValueError(
            f"need matching images and labels, at least batch_size={cfg.batch_size} of them; "
            f"got {len(x_all)} images and {len(y_all)} labels"
        )
    gen = torch.Generator().manual_seed(cfg.seed)
    per_epoch = len(x_all) // cfg.batch_size
    total = max(1, int(round(cfg.epochs * per_epoch)))
    if max_steps is not None:
        total_run = min(total, int(max_steps))
    else:
        total_run = total
    warmup = int(round(cfg.warmup_epochs * per_epoch))
    groups = _decay_groups(module, cfg.weight_decay)
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
    else:
        opt = torch.optim.AdamW(groups, lr=cfg.lr)
    module.to(memory_format=torch.channels_last).train()
    history = {"config": asdict(cfg), "epochs": [], "threads": torch.get_num_threads()}
    step, t_train, seen_total = 0, 0.0, 0
    epoch = 0
    if checkpoint is not None and Path(checkpoint).exists():
        state = torch.load(checkpoint, weights_only=False)
        if state["history"]["config"] != history["config"]:
            raise ValueError(f"checkpoint {checkpoint} was written with another TrainConfig")
        module.load_state_dict(state["module"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        history, step = state["history"], state["step"]
        epoch, t_train, seen_total = len(history["epochs"]), state["seconds"], state["seen"]
    while step < total_run:
        epoch += 1
        order = torch.randperm(len(x_all), generator=gen)
        losses, correct, seen, t_epoch = [], 0, 0, 0.0
        module.train()
        for b in range(per_epoch):
            if step >= total_run:
                break
            t0 = time.perf_counter()
            idx = order[b * cfg.batch_size : (b + 1) * cfg.batch_size]
            xb = augment(x_all[idx], cfg.crop_padding, cfg.flip, gen)
            xb = xb.contiguous(memory_format=torch.channels_last)
            lr = _lr_at(step, total, warmup, cfg.lr)
            for g in opt.param_groups:
                g["lr"] = lr
            logits = module(xb)
            loss = _loss(logits, y_all[idx], teacher, xb, cfg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            t_epoch += time.perf_counter() - t0
            step += 1
            losses.append(float(loss.detach()))
            correct += int((logits.argmax(1) == y_all[idx]).sum())
            seen += len(idx)
            if progress is not None and step % 20 == 0:
                progress({"epoch": epoch, "step": step, "steps": total_run, "loss": losses[-1],
                          "lr": lr})  # fmt: skip
        rec = {
            "epoch": epoch,
            "steps": step,
            "loss": float(np.mean(losses)),
            "train_accuracy": correct / max(seen, 1),
            "seconds": round(t_epoch, 2),
            "images_per_s": round(seen / t_epoch, 1) if t_epoch else 0.0,
        }
        if val_data is not None:
            rec["val_accuracy"] = accuracy(module, *val_data)
        history["epochs"].append(rec)
        t_train += t_epoch
        seen_total += seen
        if checkpoint is not None:
            state = {"module": module.state_dict(), "optimizer": opt.state_dict(),
                     "generator": gen.get_state(), "history": history, "step": step,
                     "seconds": t_train, "seen": seen_total}  # fmt: skip
            buf = io.BytesIO()
            torch.save(state, buf)
            atomic.write_bytes(checkpoint, buf.getvalue())
        if progress is not None:
            progress({**rec, "epoch_done": True})
    module.eval()
    history["steps"] = step
    history["seconds"] = round(t_train, 2)
    history["images_per_s"] = round(seen_total / t_train, 1) if t_train else 0.0
    return history


@torch.no_grad()
def predict(module: nn.Module, x, batch_size: int = 500) -> np.ndarray:
    """Logits of ``module`` (eval mode) for NumPy images ``x``, in batches."""
    was_training = module.training
    module.eval()
    outs = []
    x = np.ascontiguousarray(x, dtype=np.float32)
    for s in range(0, len(x), batch_size):
        xb = torch.from_numpy(x[s : s + batch_size]).contiguous(memory_format=torch.channels_last)
        outs.append(module(xb).float().numpy())
    module.train(was_training)
    return np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)


def accuracy(module: nn.Module, x, y, batch_size: int = 500) -> float:
    """Top-1 accuracy (a fraction) of ``module`` on NumPy images ``x`` and labels ``y``."""
    if len(x) == 0:
        raise ValueError("no images to measure accuracy on")
    return float((predict(module, x, batch_size).argmax(1) == np.asarray(y)).mean())
