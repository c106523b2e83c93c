"""Autotuning of the accelerator's convolution schedules, and the tuning database.

The knobs of a convolution are the fields of
:class:`~tvm_hapm.target.schedule.ConvSchedule`: the output tile (rows x columns), how many
output-channel blocks are computed together (``cob_group``: the blocks one dispatch of the
parallel arrays consumes) and how many input-channel blocks are resident (``cib_chunk``).  A
candidate is *measured* by generating its instruction stream and running the timing model
(:mod:`tvm_hapm.cost.measure`: in this process, in worker processes, or on RPC servers).

Two searches share one measurement budget:

* :func:`random_search`: candidates drawn uniformly from the valid space;
* :func:`model_guided_search`: like TVM MetaSchedule's ``XGBModel`` loop, an XGBoost model of the
  candidates measured so far ranks the unmeasured space; the best predicted candidates, plus a
  few random ones, are measured next.  With a ``prior`` (:func:`fine_model_prior`: the fine cost
  model's prediction of every candidate, one batched call for the whole space) the search starts
  from the prior's ranking and the online model learns the prior's error (a residual in log
  cycles) instead of the cycles themselves.

:func:`prune_space` drops degenerate candidates (instruction streams far longer than the
compiler default's, by the closed-form instruction count of :mod:`tvm_hapm.cost.analytic`);
every search takes an optional ``measure`` callable (schedules -> cycles), e.g. a table of
measurements cached on disk.

Results go into a :class:`TuningDatabase` (JSON).  Inside ``with database:``,
``tvm.compile(mod, target="hapm_fpga")`` uses the best recorded schedule of every layer it finds.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import threading
import warnings
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

import numpy as np

from .. import atomic
from ..target.config import HardwareConfig
from ..target.isa import MAX_LOOP, MAX_OUTER_STRIDE
from ..target.schedule import (
    ConvSchedule,
    conv_acc_fits,
    conv_footprint,
    conv_output_size,
    plan_conv,
    residual_rows,
)

__all__ = [
    "ConvTask",
    "OnlineModelConfig",
    "TuneResult",
    "TuningDatabase",
    "current_database",
    "enumerate_space",
    "schedule_features",
    "schedule_fits",
    "random_search",
    "model_guided_search",
    "fine_model_prior",
    "instruction_counts",
    "prune_space",
]

_KNOBS = ("tile_h", "tile_w", "cob_group", "cib_chunk", "double_buffer")


@dataclass
class ConvTask:
    """One convolution (or dense layer as a 1x1 convolution) to tune on one config.

    ``weight`` is the integer OIHW weight: its all-zero ``R x C`` blocks are skipped by the
    compiler, so the sparsity pattern is part of the task.  ``residual`` marks a convolution
    with a fused residual add (a second input and resident constant rows: its own task).
    """

    name: str
    config: HardwareConfig
    data_shape: tuple
    weight: np.ndarray
    strides: tuple = (1, 1)
    padding: tuple = (0, 0, 0, 0)
    dilation: tuple = (1, 1)
    groups: int = 1
    residual: bool = False

    def __post_init__(self):
        self.data_shape = tuple(int(v) for v in self.data_shape)
        self.strides = tuple(int(v) for v in self.strides)
        self.padding = tuple(int(v) for v in self.padding)
        self.dilation = tuple(int(v) for v in self.dilation)
        self._nonzero_of = None  # (weight the mask was computed from, mask)

    def nonzero_blocks(self) -> np.ndarray:
        """Boolean ``(COB, CIB, KH, KW)`` mask of the weight's non-zero ``R x C`` blocks
        (computed once per weight array object: assign a new array to ``weight`` rather than
        modifying it in place)."""
        from ..target.layout import expand_weight_blocks

        cached = self._nonzero_of
        if cached is None or cached[0] is not self.weight:
            blocks = expand_weight_blocks(self.config, self.weight, self.groups)
            cached = self._nonzero_of = (self.weight, np.any(blocks != 0, axis=(4, 5)))
        return cached[1]

    def layer(self):
        """The task as a :class:`~tvm_hapm.cost.layer.ConvLayer` (for the cost models)."""
        from .layer import ConvLayer

        n, cin, h, w = self.data_shape
        cout, _, kh, kw = self.weight.shape
        return ConvLayer(
            n, cin, h, w, cout, kh, kw, self.strides, self.padding, self.dilation, self.groups,
            name=self.name,
        )  # fmt: skip

    # geometry ---------------------------------------------------------------------------
    @property
    def out_hw(self) -> tuple[int, int]:
        _, _, h, w = self.data_shape
        _, _, kh, kw = self.weight.shape
        pt, pl, pb, pr = self.padding
        (sh, sw), (dh, dw) = self.strides, self.dilation
        return conv_output_size(h, pt, pb, kh, sh, dh), conv_output_size(w, pl, pr, kw, sw, dw)

    @property
    def blocks(self) -> tuple[int, int]:
        """(output-channel blocks, input-channel blocks)."""
        cfg = self.config
        cin = self.data_shape[1]
        return -(-self.weight.shape[0] // cfg.array_cols), -(-cin // cfg.array_rows)

    def key(self) -> str:
        """Stable identity: config, geometry and the weight's zero-block pattern."""
        nonzero = np.packbits(self.nonzero_blocks().reshape(-1))
        text = json.dumps(
            [
                self.config.to_dict(),
                self.data_shape,
                list(self.weight.shape),
                self.strides,
                self.padding,
                self.dilation,
                self.groups,
                *(["residual"] if self.residual else []),  # the keys of plain convs unchanged
            ],
            sort_keys=True,
        )
        return hashlib.sha256(text.encode() + nonzero.tobytes()).hexdigest()[:24]

    def default_schedule(self) -> ConvSchedule:
        _, _, h, w = self.data_shape
        _, _, kh, kw = self.weight.shape
        cob, cib = self.blocks
        return plan_conv(
            self.config, h, w, *self.out_hw, kh, kw, self.strides, self.dilation, cib, cob,
            residual=self.residual,
        )  # fmt: skip

    def program(self, schedule: ConvSchedule):
        """The instruction stream of this task under ``schedule`` (constants irrelevant to time)."""
        from ..target.tir import conv2d_program

        lo, hi = self.config.act_range
        cout = self.weight.shape[0]
        prog, _ = conv2d_program(
            self.config,
            self.name,
            self.data_shape,
            self.weight,
            None,
            np.ones(self.weight.shape[0], np.int64),
            1,
            (lo, hi),
            strides=self.strides,
            padding=self.padding,
            dilation=self.dilation,
            groups=self.groups,
            schedule=schedule,
            residual=np.ones(cout, np.int64) if self.residual else None,
        )
        return prog


def schedule_fits(task: ConvTask, s: ConvSchedule) -> bool:
    """Whether ``s`` fits the buffers (``schedule.conv_footprint``, the rule the compiler plans
    by) and the instruction fields, and is what the compiler emits: its output-channel group
    and input-channel chunk divide the block counts (the TIR route has no partial group or
    chunk; it would compile another schedule than the one measured)."""
    cfg = task.config
    _, _, kh, kw = task.weight.shape
    oh, ow = task.out_hw
    cob, cib = task.blocks
    if not (1 <= s.tile_h <= min(oh, MAX_LOOP) and 1 <= s.tile_w <= min(ow, MAX_LOOP)):
        return False
    if not (1 <= s.cob_group <= cob and 1 <= s.cib_chunk <= cib):
        return False
    if cob % s.cob_group or cib % s.cib_chunk:  # what the compiler would emit is another schedule
        return False
    resident = int(task.nonzero_blocks().sum()) <= cfg.wgt_depth
    rows = residual_rows(cob, task.residual)
    inp, _, wgt = conv_footprint(s, kh, kw, task.strides, task.dilation, resident, rows)
    tw_in = (s.tile_w - 1) * task.strides[1] + (kw - 1) * task.dilation[1] + 1
    return (
        inp <= cfg.inp_depth
        and conv_acc_fits(cfg, s, rows)
        and wgt <= cfg.wgt_depth
        and task.strides[0] * tw_in <= MAX_OUTER_STRIDE
    )


def _candidates(limit: int) -> list[int]:
    """The powers of two below ``limit``, and ``limit`` halved (rounding up) repeatedly: the
    sizes ``plan_conv`` shrinks through, so the default schedule is on the grid."""
    vals = set()
    p = 1
    while p < limit:
        vals.add(p)
        p *= 2
    v = limit
    while v > 1:
        vals.add(v)
        v = -(-v // 2)
    vals.add(1)
    return sorted(vals)


def enumerate_space(task: ConvTask) -> list[ConvSchedule]:
    """All valid schedules on the knob grid (tiles: see :func:`_candidates`; chunks: the
    divisors of the input-channel blocks; groups: the divisors of the output-channel blocks up
    to twice the arrays; double buffering on or off)."""
    oh, ow = task.out_hw
    cob, cib = task.blocks
    groups = [g for g in range(1, min(cob, 2 * task.config.num_arrays) + 1) if cob % g == 0]
    extra = {f.name: f.default for f in fields(ConvSchedule) if f.name not in _KNOBS}
    space = []
    for th, tw, g, k, db in itertools.product(
        _candidates(min(oh, MAX_LOOP)),
        _candidates(min(ow, MAX_LOOP)),
        groups,
        [k for k in range(1, cib + 1) if cib % k == 0],
        (True, False),
    ):
        s = ConvSchedule(tile_h=th, tile_w=tw, cob_group=g, cib_chunk=k, double_buffer=db, **extra)
        if schedule_fits(task, s):
            space.append(s)
    return space


def instruction_counts(task: ConvTask, schedules: list[ConvSchedule]) -> np.ndarray:
    """Length of each schedule's instruction stream by the closed-form count of the mid model
    (:func:`tvm_hapm.cost.analytic.analyze_batch`, ``counts["instructions"]``; no code is
    generated)."""
    from .analytic import analyze_batch
    from .layer import BlockSparsity

    layer, sp = task.layer(), BlockSparsity.from_mask(task.nonzero_blocks())
    ba = analyze_batch([(layer, task.config, s, sp) for s in schedules])
    return ba.counts["instructions"]


def prune_space(
    task: ConvTask, space: list[ConvSchedule], max_instruction_ratio: float = 1.5
) -> list[ConvSchedule]:
    """The candidates of ``space`` whose instruction stream is at most
    ``max_instruction_ratio`` times as long as the compiler default's
    (:func:`instruction_counts`).

    Every instruction pays a fixed issue and DRAM-latency cost, and the longer streams are the
    tiny-tile / tiny-chunk corners of the grid (up to ~50x the default's length): they are never
    competitive and dominate the cost of measuring the grid (code generation time is linear in
    the stream length).  The default schedule is always kept.
    """
    default = task.default_schedule()
    counts = instruction_counts(task, [default, *space])
    limit = max_instruction_ratio * counts[0]
    return [s for s, c in zip(space, counts[1:]) if c <= limit or s == default]


def fine_model_prior(model=None):
    """``prior(task, schedules) -> predicted cycles`` of the fine cost model (default: the
    bundled one), one batched prediction for all the schedules, for
    :func:`model_guided_search`."""

    def prior(task: ConvTask, schedules: list[ConvSchedule]) -> np.ndarray:
        from .layer import BlockSparsity
        from .models import load_bundled_fine_model

        m = model if model is not None else load_bundled_fine_model()
        layer, sp = task.layer(), BlockSparsity.from_mask(task.nonzero_blocks())
        return m.predict_batch([(layer, task.config, s, sp) for s in schedules])[:, 0]

    return prior


@dataclass(frozen=True)
class OnlineModelConfig:
    """The online model of :func:`model_guided_search`: gradient-boosted trees (XGBoost) on the
    cost model's feature vector of each schedule (:func:`~tvm_hapm.cost.features.features_batch`,
    the fine model's features) and the mid model's predicted cycles, refitted after every batch
    of measurements.

    Attributes
    ----------
    trees, depth, eta : int, int, float
        Boosting rounds, tree depth and learning rate (small: a few dozen measurements).
    """

    trees: int = 60
    depth: int = 4
    eta: float = 0.3

    def regressor(self, seed: int):
        """A fresh ``xgboost.XGBRegressor`` of this size (single-threaded, seeded)."""
        import xgboost as xgb

        return xgb.XGBRegressor(
            n_estimators=self.trees, max_depth=self.depth, learning_rate=self.eta,
            random_state=seed, n_jobs=1,
        )  # fmt: skip


def schedule_features(task: ConvTask, schedules: list[ConvSchedule]) -> np.ndarray:
    """The cost model's features of ``task`` under each schedule (one row each), with the mid
    model's log cycles as the last column: what :func:`model_guided_search` learns on."""
    from .features import features_batch
    from .layer import BlockSparsity

    layer, sp = task.layer(), BlockSparsity.from_mask(task.nonzero_blocks())
    feats, mids = features_batch([(layer, task.config, s, sp) for s in schedules])
    return np.column_stack([feats, np.log(np.maximum(mids[:, 0], 1.0))])


@dataclass
class TuneResult:
    task: str
    best: ConvSchedule
    best_cycles: int
    default_cycles: int
    history: list = field(default_factory=list)  # (schedule dict, cycles) in measurement order
    space_size: int = 0

    @property
    def trials(self) -> int:
        return len(self.history)


def _measure(task: ConvTask, schedules: list[ConvSchedule], runner) -> list[int]:
    programs = [task.program(s).to_bytes() for s in schedules]
    results = runner.run(programs)
    return [r.cycles if not r.error else np.iinfo(np.int64).max for r in results]


def _result(task, history, default_cycles, space_size) -> TuneResult:
    best_s, best_c = min(history, key=lambda hc: (hc[1], json.dumps(hc[0], sort_keys=True)))
    return TuneResult(
        task.name, ConvSchedule(**best_s), int(best_c), int(default_cycles), history, space_size
    )


def _measurer(task, runner, measure):
    """``measure(schedules) -> cycles``: the given callable, else the runner's measurement."""
    if measure is not None:
        return measure
    from .measure import LocalRunner

    runner = runner or LocalRunner()
    return lambda schedules: _measure(task, schedules, runner)


def random_search(
    task: ConvTask, trials: int, runner=None, seed: int = 0, space=None, measure=None
) -> TuneResult:
    """Measure ``trials`` schedules drawn uniformly (without replacement) from the space
    (``space``: default :func:`enumerate_space`; ``measure``: ``schedules -> cycles``, default
    the ``runner``'s measurement)."""
    measure = _measurer(task, runner, measure)
    space = enumerate_space(task) if space is None else list(space)
    default = task.default_schedule()
    rng = np.random.default_rng(seed)
    picks = rng.permutation(len(space))[: max(0, min(trials, len(space)))]
    chosen = [space[i] for i in picks]
    cycles = measure([default, *chosen])
    history = [(s.to_dict(), c) for s, c in zip(chosen, cycles[1:])]
    history.append((default.to_dict(), cycles[0]))
    return _result(task, history, cycles[0], len(space))


def model_guided_search(
    task: ConvTask,
    trials: int,
    runner=None,
    seed: int = 0,
    batch: int = 4,
    init: int = 4,
    epsilon: float = 0.25,
    prior=None,
    space=None,
    measure=None,
    online: OnlineModelConfig = OnlineModelConfig(),
) -> TuneResult:
    """Measure ``trials`` schedules chosen by an XGBoost model refitted after every batch.

    Parameters
    ----------
    prior : callable, optional
        ``prior(task, schedules) -> predicted cycles`` ranking the space before any
        measurement (e.g. :func:`fine_model_prior`); without it the first ``init`` picks are
        random.  With it, the online model is fitted to ``log(measured / prior)`` (the prior's
        error, from ``init`` measurements on) and ranks by ``prior * exp(predicted error)``.
    epsilon : float
        Fraction of each batch drawn at random (exploration).
    space, measure
        As for :func:`random_search`.
    online : OnlineModelConfig
        The online model, fitted on :func:`schedule_features`.
    """
    measure = _measurer(task, runner, measure)
    space = enumerate_space(task) if space is None else list(space)
    default = task.default_schedule()
    rng = np.random.default_rng(seed)
    feats = schedule_features(task, space)
    measured: dict[int, int] = {}
    default_cycles = measure([default])[0]
    budget = min(trials, len(space))
    base = None
    if prior is not None:
        base = np.log(np.maximum(np.asarray(prior(task, space), dtype=np.float64), 1.0))
        feats = np.column_stack([feats, base])
    scores = base
    while len(measured) < budget:
        todo = [i for i in range(len(space)) if i not in measured]
        n = min(batch if measured else init, budget - len(measured))
        if scores is None and not measured:
            picks = list(rng.choice(todo, size=n, replace=False))
        else:
            fit_from = init if base is not None else 2
            if len(measured) >= fit_from:
                idx = np.array(sorted(measured))
                y = np.log([measured[i] for i in idx])
                model = online.regressor(seed)
                if base is None:
                    model.fit(feats[idx], y)
                    scores = model.predict(feats)
                else:
                    model.fit(feats[idx], y - base[idx])
                    scores = base + model.predict(feats)
            order = [i for i in np.argsort(scores, kind="stable") if i not in measured]
            n_random = int(round(n * epsilon)) if len(order) > n else 0
            picks = order[: n - n_random]
            rest = [i for i in todo if i not in picks]
            if n_random and rest:
                picks += list(rng.choice(rest, size=min(n_random, len(rest)), replace=False))
        for i, c in zip(picks, measure([space[i] for i in picks])):
            measured[int(i)] = c
    history = [(space[i].to_dict(), c) for i, c in measured.items()]
    history.append((default.to_dict(), default_cycles))
    return _result(task, history, default_cycles, len(space))


# ------------------------------------------------------------------------------- database
_CURRENT: list = []
_LOCK = threading.Lock()


def current_database():
    """The innermost :class:`TuningDatabase` entered with ``with``, or ``None``."""
    with _LOCK:
        return _CURRENT[-1] if _CURRENT else None


class TuningDatabase:
    """Best schedules per task key, kept in a JSON file.

    Use as a context manager to make ``tvm.compile(..., target="hapm_fpga")`` apply it::

        with TuningDatabase("tuning.json"):
            ex = tvm.compile(qmod, target="hapm_fpga")
    """

    VERSION = 1

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path is not None else None
        self.records: dict[str, dict] = {}
        if self.path is not None and self.path.exists():
            data = json.loads(self.path.read_text())
            if not isinstance(data, dict):
                raise ValueError(f"{self.path}: a tuning database is a JSON object, not "
                                 f"{type(data).__name__}")  # fmt: skip
            if data.get("version") != self.VERSION:
                raise ValueError(
                    f"{self.path}: tuning database version {data.get('version')} "
                    f"(this tvm-hapm reads version {self.VERSION})"
                )
            records = data.get("records")
            if not isinstance(records, dict):
                raise ValueError(f"{self.path}: 'records' must be an object of task records")
            for key, rec in records.items():
                _check_record(self.path, key, rec)
            self.records = records

    def commit(self, task: ConvTask, result: TuneResult) -> None:
        """Record ``result`` if it beats what the database has for the task."""
        key = task.key()
        old = self.records.get(key)
        if old is None or result.best_cycles < old["cycles"]:
            self.records[key] = {
                "layer": task.name,
                "config": task.config.name,
                "schedule": result.best.to_dict(),
                "cycles": int(result.best_cycles),
                "default_cycles": int(result.default_cycles),
                "trials": result.trials,
            }

    def lookup(self, key: str) -> ConvSchedule | None:
        """The recorded schedule of a task key, unchecked (see :meth:`schedule_for`)."""
        rec = self.records.get(key)
        if rec is None:
            return None
        names = {f.name for f in fields(ConvSchedule)}
        return ConvSchedule(**{k: v for k, v in rec["schedule"].items() if k in names})

    def schedule_for(self, task: ConvTask) -> ConvSchedule | None:
        """The recorded schedule of ``task`` if it fits the layer and the hardware
        (:func:`schedule_fits`); a record that does not is skipped with a warning naming the
        layer, and the compiler plans the layer itself."""
        sched = self.lookup(task.key())
        if sched is None or schedule_fits(task, sched):
            return sched
        warnings.warn(
            f"tuning database{f' {self.path}' if self.path else ''}: the schedule recorded for "
            f"layer {task.name} ({sched.to_dict()}) does not fit it on {task.config.name}; "
            f"using the compiler's own plan",
            stacklevel=2,
        )
        return None

    def save(self, path: str | Path | None = None) -> Path:
        path = Path(path) if path is not None else self.path
        if path is None:
            raise ValueError("no path to save the tuning database to")
        payload = {"version": self.VERSION, "records": dict(sorted(self.records.items()))}
        atomic.write_text(path, json.dumps(payload, indent=1, sort_keys=True))
        return path

    def __enter__(self) -> TuningDatabase:
        with _LOCK:
            _CURRENT.append(self)
        return self

    def __exit__(self, *exc) -> None:
        with _LOCK:
            _CURRENT.remove(self)


def _check_record(path, key, rec) -> None:
    """Refuse a database record whose schedule is not a set of integer knobs."""
    sched = rec.get("schedule") if isinstance(rec, dict) else None
    if not isinstance(sched, dict):
        raise ValueError(f"{path}: record {key!r} has no 'schedule' object")
    for f in fields(ConvSchedule):
        if f.name not in sched and f.default is MISSING:
            raise ValueError(f"{path}: record {key!r}: schedule field {f.name!r} is missing")
        value = sched.get(f.name, f.default)
        is_flag = f.type in (bool, "bool")
        ok = isinstance(value, bool) if is_flag else type(value) is int
        if not ok:
            raise ValueError(
                f"{path}: record {key!r}: schedule field {f.name!r} = {value!r} is not "
                f"{'a boolean' if is_flag else 'an integer'}"
            )
