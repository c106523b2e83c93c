"""Training data of the fine cost model: simulator measurements over sampled layers.

A *sample* is ``(layer, config, schedule, block mask)``; its *measurement* compiles the layer as
the compiler does, through TIR (:func:`tvm_hapm.target.tir.conv2d_program`; random int8/int16
weights with the sample's all-zero blocks, random bias, ``choose_multiplier`` requantization,
ReLU) and runs the timing and energy models on the instruction stream.  No functional
simulation is needed: the timing of a program depends only on its instructions (all-zero blocks
are dropped at compile time, so the bypass never fires).

:func:`sample_spec` draws sample ``i`` of a seeded stream from ``numpy.random.default_rng([seed,
i])``: the stream is deterministic and extending it never changes earlier samples.
:func:`generate` measures a range of the stream in parallel (all cores by default), shows a rich
progress bar and appends to a ``.jsonl`` cache, skipping sample ids already there (resumable).
The sampling is documented in ``docs/cost_model.md``.
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from ..passes.qops import choose_multiplier
from ..target.config import PRESETS, HardwareConfig, HardwareConfigError
from ..target.schedule import ConvSchedule, ScheduleError, largest_divisor, plan_conv
from .analytic import analyze, default_schedule, schedule_dict
from .layer import BlockSparsity, ConvLayer, apply_block_mask, block_mask, structural_mask

__all__ = [
    "DEFAULT_EXCLUDE",
    "default_cache",
    "excluded_shapes",
    "generate",
    "load_samples",
    "measure",
    "sample_spec",
    "source_fingerprint",
    "spec_objects",
]

#: Networks whose layer shapes are kept out of the bundled model's training data.
DEFAULT_EXCLUDE = ("resnet18_imagenet", "mobilenet_style")

#: Samples whose estimated instruction count exceeds this are redrawn (generation time).
MAX_INSTRUCTIONS = 6000

_KERNELS = (1, 1, 3, 3, 3, 5, 7)
_CHANNELS = (3, 4, 8, 13, 16, 24, 27, 32, 37, 48, 53, 64, 96, 128, 160, 256, 384, 512)
_SPATIAL = (1, 2, 3, 4, 5, 7, 8, 10, 13, 14, 16, 20, 28, 32, 40, 56, 64, 112)


def source_fingerprint() -> str:
    """Hash of the sources a measurement depends on: the code generator (TIR), schedules, ISA
    and program container (``tvm_hapm/target`` and its subpackages) and the timing and energy
    models.  Caches of measurements are keyed by it, so a change of the compiler or of the
    timing model never reuses stale records."""
    import hashlib

    root = Path(__file__).resolve().parents[1]
    files = sorted((root / "target").rglob("*.py"))
    files += [root / "runtime" / "timing.py", root / "runtime" / "energy.py"]
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:12]


def default_cache() -> Path:
    """``~/.cache/tvm_hapm/cost_samples_<source fingerprint>.jsonl``."""
    return Path.home() / ".cache" / "tvm_hapm" / f"cost_samples_{source_fingerprint()}.jsonl"


def excluded_shapes(names=DEFAULT_EXCLUDE) -> set:
    """Shape keys of every conv/dense layer of the named zoo networks (default arguments; the
    MobileNet-style net also with even channels and at 224x224 and 112x112 inputs)."""
    from .layer import zoo_layers

    keys = set()
    for name in names:
        variants = [{}]
        if name == "mobilenet_style":
            variants = [
                {},
                {"odd_channels": False},
                {"input_hw": (224, 224)},
                {"input_hw": (112, 112)},
                {"input_hw": (224, 224), "odd_channels": False},
            ]
        if name == "resnet18_imagenet":
            variants = [{}, {"input_hw": (112, 112)}]
        for kw in variants:
            keys |= {layer.shape_key() for layer in zoo_layers(name, **kw)}
    return keys


# ------------------------------------------------------------------------------------ sampling
def _random_config(rng) -> HardwareConfig:
    if rng.random() < 0.5:
        return PRESETS[list(PRESETS)[rng.integers(len(PRESETS))]]
    R = int(rng.choice([4, 8, 8, 16, 16, 32]))
    C = int(rng.choice([4, 8, 8, 16, 16, 32]))
    A = int(rng.integers(1, 9))
    act = 8 if rng.random() < 0.85 else 16
    wbits = 8 if rng.random() < 0.85 else 16

    def buf(entry):
        size = int(2 ** rng.integers(13, 20))  # 8 KB .. 512 KB
        return max(size - size % entry, 2 * entry)

    return HardwareConfig(
        name="sampled",
        num_arrays=A,
        array_rows=R,
        array_cols=C,
        act_bits=act,
        weight_bits=wbits,
        inp_buffer_bytes=buf(R * act // 8),
        wgt_buffer_bytes=buf(R * C * wbits // 8),
        acc_buffer_bytes=buf(C * 4),
        dram_bytes_per_cycle=int(rng.choice([4, 8, 8, 16, 16, 32])),
        dram_latency_cycles=int(rng.choice([16, 32, 32, 64])),
        clock_mhz=float(rng.choice([100.0, 125.0, 200.0])),
    )


def _random_layer(rng) -> ConvLayer:
    kind = rng.random()
    if kind < 0.08:  # dense
        return ConvLayer.dense(1, int(rng.choice(_CHANNELS)), int(rng.choice(_CHANNELS)))
    k = int(rng.choice(_KERNELS))
    s = 1 if rng.random() < 0.7 else 2
    h = int(rng.choice(_SPATIAL))
    w = h if rng.random() < 0.7 else int(rng.choice(_SPATIAL))
    pad = k // 2 if rng.random() < 0.85 else 0
    if kind < 0.25:  # depthwise
        c = int(rng.choice(_CHANNELS))
        return ConvLayer(1, c, h, w, c, k, k, (s, s), (pad,) * 4, groups=c)
    cin = int(rng.choice(_CHANNELS)) if rng.random() < 0.85 else int(rng.integers(1, 513))
    cout = int(rng.choice(_CHANNELS)) if rng.random() < 0.85 else int(rng.integers(1, 513))
    groups = 1
    if rng.random() < 0.05:
        for g in (2, 4):
            if cin % g == 0 and cout % g == 0:
                groups = g
    return ConvLayer(1, cin, h, w, cout, k, k, (s, s), (pad,) * 4, groups=groups)


def _random_schedule(rng, layer, cfg) -> ConvSchedule:
    # double buffering on (the compiler's default, 65%) or off (then planned for whole buffers)
    double = rng.random() < 0.65
    base = default_schedule(layer, cfg)
    if not double:
        R, C = cfg.array_rows, cfg.array_cols
        base = plan_conv(
            cfg, layer.h, layer.w, layer.oh, layer.ow, layer.kh, layer.kw, layer.strides,
            layer.dilation, -(-layer.cin // R), -(-layer.cout // C), double_buffer=False,
        )  # fmt: skip
    if rng.random() < 0.4:
        return base
    knobs = schedule_dict(base)
    for name in ("tile_h", "tile_w", "cob_group", "cib_chunk"):
        v = knobs[name]
        if v > 1 and rng.random() < 0.6:
            knobs[name] = int(rng.integers(max(1, v // 8), v + 1))
    # the compiler emits groups and chunks that divide the block counts, nothing else
    # (schedule.largest_divisor): a sample measures a schedule it can produce
    knobs["cob_group"] = largest_divisor(-(-layer.cout // cfg.array_cols), knobs["cob_group"])
    knobs["cib_chunk"] = largest_divisor(-(-layer.cin // cfg.array_rows), knobs["cib_chunk"])
    return ConvSchedule(**knobs)


def _random_sparsity(rng) -> BlockSparsity:
    if rng.random() < 0.25:
        return BlockSparsity(0.0)
    pattern = str(rng.choice(["random", "random", "dispatch", "channel"]))
    return BlockSparsity(float(rng.uniform(0.0, 0.9)), pattern)


def sample_spec(seed: int, i: int, exclude: set | None = None, max_tries: int = 200) -> dict:
    """Sample ``i`` of the stream ``seed``: a JSON-able dict with the layer, config, schedule,
    sparsity and the measurement seed.  Layers whose shape key is in ``exclude`` are redrawn."""
    rng = np.random.default_rng([seed, i])
    for _ in range(max_tries):
        try:
            layer = _random_layer(rng)
            if exclude and layer.shape_key() in exclude:
                continue
            cfg = _random_config(rng)
            sched = _random_schedule(rng, layer, cfg)
            sp = _random_sparsity(rng)
        except (ValueError, ScheduleError, HardwareConfigError):
            continue
        est = analyze(layer, cfg, sched, sp.fraction).counts["instructions"]
        if est > MAX_INSTRUCTIONS:
            continue
        return {
            "id": int(i),
            "layer": layer.to_dict(),
            "config": cfg.to_dict(),
            "schedule": schedule_dict(sched),
            "sparsity": {"fraction": sp.fraction, "pattern": sp.pattern},
            "mseed": int(rng.integers(1 << 31)),
        }
    raise RuntimeError(f"no valid sample after {max_tries} draws (seed {seed}, i {i})")


def spec_objects(spec: dict):
    """``(layer, config, schedule, mask)`` of a spec (the mask is drawn from its seed)."""
    layer = ConvLayer.from_dict(spec["layer"])
    cfg = HardwareConfig.from_dict(spec["config"])
    sched = ConvSchedule(**spec["schedule"])
    sp = BlockSparsity(spec["sparsity"]["fraction"], spec["sparsity"]["pattern"])
    mask = block_mask(layer, cfg, sp, np.random.default_rng([spec["mseed"], 0]))
    return layer, cfg, sched, mask


# --------------------------------------------------------------------------------- measurement
def random_weights(layer: ConvLayer, cfg: HardwareConfig, mask: np.ndarray, rng) -> np.ndarray:
    """OIHW integer weights, non-zero everywhere except in the blocks ``mask`` clears."""
    hi = cfg.weight_range[1]
    mag = rng.integers(1, hi + 1, layer.weight_shape())
    sign = rng.choice(np.array([-1, 1]), layer.weight_shape())
    w = (mag * sign).astype(cfg.weight_dtype)
    return apply_block_mask(layer, cfg, w, mask)


def measure(
    layer: ConvLayer,
    cfg: HardwareConfig,
    schedule: ConvSchedule | None = None,
    mask: np.ndarray | None = None,
    seed: int = 0,
) -> dict:
    """Compile the layer through TIR (:func:`tvm_hapm.target.tir.conv2d_program`, the compiler's
    one path) and run the timing and energy models.

    Returns cycles, energy (uJ), instruction count, MACs, DRAM bytes and the wall seconds of
    code generation (``compile_s``) and of the timing + energy models (``simulate_s``).
    """
    from ..runtime.energy import EnergyModel
    from ..runtime.timing import TimingModel
    from ..target.tir import conv2d_program

    rng = np.random.default_rng(seed)
    if mask is None:
        mask = structural_mask(layer, cfg)
    weight = random_weights(layer, cfg, mask, rng)
    bias = rng.integers(-1000, 1000, layer.cout).astype(np.int32)
    mult, shift = choose_multiplier(rng.uniform(0.001, 0.004, layer.cout))
    hi = cfg.act_range[1]
    t0 = time.perf_counter()
    prog, _ = conv2d_program(
        cfg, layer.name or "layer", layer.data_shape(), weight, bias, mult, shift, (0, hi),
        layer.strides, layer.padding, layer.dilation, layer.groups, schedule=schedule,
    )  # fmt: skip
    t1 = time.perf_counter()
    res = TimingModel(cfg).run(prog.instructions)
    energy = EnergyModel(cfg).estimate(res).total_uj
    t2 = time.perf_counter()
    return {
        "cycles": int(res.cycles),
        "energy_uj": float(energy),
        "instructions": len(prog.instructions),
        "macs": int(res.macs),
        "dram_bytes": int(res.dram_bytes),
        "nonzero_blocks": int(prog.info["nonzero_blocks"]),
        "compile_s": t1 - t0,
        "simulate_s": t2 - t1,
    }


def measure_spec(spec: dict) -> dict:
    layer, cfg, sched, mask = spec_objects(spec)
    out = dict(spec)
    try:
        out["result"] = measure(layer, cfg, sched, mask, seed=spec["mseed"])
    except Exception as err:
        out["error"] = f"{type(err).__name__}: {err}"
    return out


def _measure_chunk(specs: list[dict]) -> list[dict]:
    return [measure_spec(s) for s in specs]


def load_samples(path: str | Path) -> list[dict]:
    """Every record of a ``.jsonl`` cache (a truncated last line is ignored)."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def generate(
    path: str | Path,
    n: int,
    seed: int = 0,
    start: int = 0,
    exclude: set | None = None,
    workers: int | None = None,
    chunk: int = 8,
    progress: bool = True,
) -> list[dict]:
    """Measure samples ``start .. start+n-1`` of stream ``seed`` into the ``.jsonl`` at ``path``.

    Samples already in the file are skipped (resume); new records are appended as chunks
    finish.  Returns every record of ids ``start .. start+n-1``, sorted by id.  ``workers``:
    processes (default: all cores; 1 runs in this process).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    have = {r["id"]: r for r in load_samples(path)}
    todo = [i for i in range(start, start + n) if i not in have]
    specs = [sample_spec(seed, i, exclude) for i in todo]
    chunks = [specs[j : j + chunk] for j in range(0, len(specs), chunk)]
    workers = workers or os.cpu_count() or 1

    def write(records):
        with path.open("a") as fh:
            for r in records:
                fh.write(json.dumps(r, sort_keys=True) + "\n")
                have[r["id"]] = r

    bar = None
    if progress and specs:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        bar = Progress(
            "[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), TimeRemainingColumn(),
        )  # fmt: skip
        bar.start()
        task = bar.add_task(f"simulating {len(specs)} samples", total=len(specs))
    try:
        if workers <= 1 or len(chunks) <= 1:
            for c in chunks:
                write(_measure_chunk(c))
                if bar:
                    bar.advance(task, len(c))
        else:
            with ProcessPoolExecutor(workers) as pool:
                for recs in pool.map(_measure_chunk, chunks):
                    write(recs)
                    if bar:
                        bar.advance(task, len(recs))
    finally:
        if bar:
            bar.stop()
    return [have[i] for i in range(start, start + n) if i in have]
