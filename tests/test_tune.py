"""Schedule autotuning: the search space, the searches, the database and RPC measurement."""

from __future__ import annotations

import numpy as np
import pytest

import tvm_hapm
from tvm_hapm.cost.measure import LocalFarm, LocalRunner, RPCRunner, measure_program
from tvm_hapm.cost.tune import (
    ConvTask,
    OnlineModelConfig,
    TuningDatabase,
    enumerate_space,
    fine_model_prior,
    instruction_counts,
    model_guided_search,
    prune_space,
    random_search,
    schedule_features,
    schedule_fits,
)
from tvm_hapm.runtime import Simulator, SimulatorError
from tvm_hapm.target.banks import BankPlacementError
from tvm_hapm.target.config import HardwareConfig
from tvm_hapm.target.schedule import ConvSchedule
from tvm_hapm.target.tir import TirLoweringError

CFG = HardwareConfig(
    name="tune-test",
    num_arrays=2,
    array_rows=4,
    array_cols=4,
    inp_buffer_bytes=4 * 160,
    wgt_buffer_bytes=16 * 40,
    acc_buffer_bytes=16 * 120,
)


def _task(seed=0, hw=(9, 11), cin=10, cout=9):
    rng = np.random.default_rng(seed)
    w = rng.integers(-127, 128, (cout, cin, 3, 3)).astype(np.int8)
    return ConvTask("conv", CFG, (1, cin, *hw), w, padding=(1, 1, 1, 1))


def _validates(task, schedule) -> bool:
    try:
        prog = task.program(schedule)
    except (BankPlacementError, TirLoweringError):  # the lowering's own buffer checks refuse it
        return False
    dram = [np.zeros(s.dram_elems, s.dtype) for s in prog.slots]
    try:
        Simulator(CFG).validate(prog.instructions, dram)
    except SimulatorError:
        return False
    return True


def test_space_is_exactly_what_fits():
    """schedule_fits agrees with the simulator's independent address checks."""
    task = _task()
    space = enumerate_space(task)
    assert len(space) > 20
    assert task.default_schedule() in space
    assert all(_validates(task, s) for s in space[:: max(1, len(space) // 15)])
    too_big = ConvSchedule(tile_h=9, tile_w=11, cob_group=3, cib_chunk=3)
    assert not schedule_fits(task, too_big)
    assert not _validates(task, too_big)


def test_searches_find_a_schedule_no_worse_than_default_and_are_deterministic():
    task = _task()
    guided = model_guided_search(task, trials=12, seed=1)
    again = model_guided_search(task, trials=12, seed=1)
    rand = random_search(task, trials=12, seed=1)
    assert guided.best_cycles <= guided.default_cycles
    assert rand.best_cycles <= rand.default_cycles
    assert guided.history == again.history
    assert guided.trials == 13  # 12 trials + the default schedule
    # measured cycles of the winner are what the timing model says for its program
    assert measure_program(task.program(guided.best)).cycles == guided.best_cycles


def test_database_round_trip_and_keeps_the_best(tmp_path):
    task = _task()
    result = random_search(task, trials=6, seed=0)
    db = TuningDatabase(tmp_path / "db.json")
    db.commit(task, result)
    worse = random_search(task, trials=1, seed=5)
    worse.best_cycles = result.best_cycles + 1
    db.commit(task, worse)  # not better: ignored
    db.save()
    loaded = TuningDatabase(tmp_path / "db.json")
    assert loaded.lookup(task.key()) == result.best
    assert loaded.records[task.key()]["cycles"] == result.best_cycles
    assert loaded.lookup(_task(seed=1).key()) == result.best  # same shape and zero pattern
    assert loaded.lookup(_task(hw=(8, 11)).key()) is None  # another layer


def test_task_key_depends_on_the_zero_block_pattern():
    task = _task()
    pruned = _task()
    pruned.weight = pruned.weight.copy()
    pruned.weight[:4, :4] = 0  # one whole 4x4 block of every kernel position
    assert task.key() != pruned.key()
    dense_again = _task()
    dense_again.weight = dense_again.weight + 0  # same values: same key
    assert task.key() == dense_again.key()


def test_rpc_tracker_and_two_servers_measure_like_local():
    """Tuning through TVM's RPC tracker and two loopback servers gives the local records."""
    task = _task(hw=(6, 7), cin=8, cout=8)
    local = random_search(task, trials=6, seed=3, runner=LocalRunner())
    with LocalFarm(num_servers=2) as farm:
        remote = random_search(
            task, trials=6, seed=3, runner=RPCRunner("127.0.0.1", farm.port, key=farm.key)
        )
        tracker = farm.tracker
    assert remote.history == local.history
    assert tracker is not None and farm.tracker is None  # stopped on exit


def test_compile_applies_the_tuning_database(tmp_path):
    """Inside ``with database:``, tvm.compile uses the recorded schedule; results stay exact."""
    import tvm

    from tvm_hapm.passes import hapm_pipeline
    from tvm_hapm.passes.tasks import extract_tasks
    from tvm_hapm.testing import build_int_network, llvm_reference, run_vm

    mod = build_int_network(CFG, h=9, w=11)
    tasks = extract_tasks(mod, CFG)
    assert len(tasks) == 4  # three convolutions and the dense layer
    conv = tasks[0]
    result = random_search(conv, trials=8, seed=2)
    chosen = min(
        (s for s in enumerate_space(conv) if s != conv.default_schedule()),
        key=lambda s: (s.tile_h * s.tile_w, s.cob_group),
    )  # a deliberately different schedule, to see it applied
    result.best, result.best_cycles = chosen, 1
    db = TuningDatabase(tmp_path / "db.json")
    db.commit(conv, result)
    programs = []
    target = tvm_hapm.target.hapm_target(CFG)
    x = np.random.default_rng(0).integers(-128, 128, (1, 5, 9, 11)).astype(np.int8)
    with db:
        ex = tvm.compile(mod, target=target, relax_pipeline=hapm_pipeline(CFG, programs))
    assert programs[0].info["schedule"] == chosen.to_dict()
    for ref, out in zip(llvm_reference(mod, x), run_vm(ex, x)):
        np.testing.assert_array_equal(out, ref)


def test_prune_space_drops_long_streams_and_keeps_the_default():
    task = _task()
    space = enumerate_space(task)
    counts = instruction_counts(task, space)
    real = np.array([len(task.program(s).instructions) for s in space[::12]])
    np.testing.assert_allclose(counts[::12], real, rtol=0.1)  # a close closed-form count
    pruned = prune_space(task, space, 1.5)
    default = task.default_schedule()
    limit = 1.5 * instruction_counts(task, [default])[0]
    assert default in pruned and 0 < len(pruned) < len(space)
    kept = {repr(s.to_dict()) for s in pruned}
    for s, c in zip(space, counts):
        assert (repr(s.to_dict()) in kept) == (c <= limit or s == default)


def test_searches_take_a_space_and_a_measurement_table():
    """With ``measure`` a table lookup, the searches give what the runner gives; the guided search
    with an exact prior finds the optimum in its first batch."""
    task = _task()
    space = prune_space(task, enumerate_space(task), 1.5)
    runner = LocalRunner()
    table = {repr(s): c for s, c in zip(space, [measure_program(task.program(s)).cycles
                                                  for s in space])}  # fmt: skip
    default = task.default_schedule()
    table[repr(default)] = measure_program(task.program(default)).cycles
    calls = []

    def measure(schedules):
        calls.extend(schedules)
        return [table[repr(s)] for s in schedules]

    for search in (random_search, model_guided_search):
        a = search(task, 6, runner=runner, seed=4, space=space)
        b = search(task, 6, seed=4, space=space, measure=measure)
        assert a.history == b.history and a.space_size == len(space)
    calls.clear()
    exact = model_guided_search(
        task, 5, seed=0, space=space, measure=measure, init=4, epsilon=0.25,
        prior=lambda _t, ss: [table[repr(s)] for s in ss],
    )  # fmt: skip
    assert exact.best_cycles == min(table[repr(s)] for s in space)
    assert calls[1] == min(space, key=lambda s: table[repr(s)])  # first pick after the default
    # the fine model as a prior: one batched prediction of the whole space
    pred = fine_model_prior()(task, space)
    assert len(pred) == len(space) and np.all(np.asarray(pred) > 0)


@pytest.mark.parametrize("kind", ["conv2d", "conv2d_residual", "dense"])
def test_tuned_records_apply_to_every_layer_kind_tuned(tmp_path, kind):
    """extract_tasks gives a task for every conv, fused-residual conv and dense layer; a record
    for it changes that layer's emitted schedule (dense and fused-residual records used to be
    tuned and then ignored), and the network stays bit-exact against llvm."""
    import tvm
    from tvm.relax.frontend.onnx import from_onnx

    from tvm_hapm.passes import hapm_pipeline
    from tvm_hapm.passes.tasks import extract_tasks
    from tvm_hapm.target.config import get_config
    from tvm_hapm.testing import (
        build_int_network,
        llvm_reference,
        random_samples,
        residual_add_model,
        run_vm,
    )

    if kind == "conv2d_residual":
        cfg = get_config("zedboard")
        mod = tvm_hapm.quantize(from_onnx(residual_add_model()), random_samples(4, 0))
        x = random_samples(1, 7)[0]
    else:
        cfg = CFG
        mod = build_int_network(CFG, h=9, w=11)
        x = np.random.default_rng(0).integers(-128, 128, (1, 5, 9, 11)).astype(np.int8)
    (task,) = [t for t in extract_tasks(mod, cfg) if t.name.split("_", 1)[1] == kind][:1]
    assert task.residual == (kind == "conv2d_residual")
    default = task.default_schedule()
    chosen = min(
        (s for s in enumerate_space(task) if s != default),
        key=lambda s: (s.tile_h * s.tile_w, s.cob_group, s.cib_chunk, s.double_buffer),
    )
    result = random_search(task, trials=2, seed=0)
    result.best, result.best_cycles = chosen, 1
    db = TuningDatabase(tmp_path / "db.json")
    db.commit(task, result)

    def compiled(database):
        programs = []
        target = tvm_hapm.target.hapm_target(cfg)
        pipeline = hapm_pipeline(cfg, programs)
        if database is None:
            ex = tvm.compile(mod, target=target, relax_pipeline=pipeline)
        else:
            with database:
                ex = tvm.compile(mod, target=target, relax_pipeline=pipeline)
        (prog,) = [p for p in programs if p.layer == task.name]
        return ex, prog

    _, untuned = compiled(None)
    ex, tuned = compiled(db)
    assert untuned.info["schedule"] != chosen.to_dict()
    assert tuned.info["schedule"] == chosen.to_dict()
    assert tuned.instructions != untuned.instructions
    for ref, out in zip(llvm_reference(mod, x), run_vm(ex, x)):
        np.testing.assert_array_equal(out, ref)


def test_compile_skips_a_record_that_does_not_fit_with_a_warning(tmp_path):
    """A database schedule that does not fit its layer (``tile_w = -4`` once compiled every
    conv to LOAD + FINISH and zero outputs) is skipped with a warning; results stay exact."""
    import tvm

    from tvm_hapm.passes import hapm_pipeline
    from tvm_hapm.passes.tasks import extract_tasks
    from tvm_hapm.testing import build_int_network, llvm_reference, run_vm

    mod = build_int_network(CFG, h=9, w=11)
    conv = extract_tasks(mod, CFG)[0]
    result = random_search(conv, trials=2, seed=2)
    result.best = ConvSchedule(tile_h=2, tile_w=-4, cob_group=1, cib_chunk=1)
    db = TuningDatabase(tmp_path / "db.json")
    db.commit(conv, result)
    db.save()
    programs = []
    x = np.random.default_rng(0).integers(-128, 128, (1, 5, 9, 11)).astype(np.int8)
    with pytest.warns(UserWarning, match=r"layer 000_conv2d .* does not fit"):
        with TuningDatabase(tmp_path / "db.json"):
            ex = tvm.compile(mod, target="hapm_fpga", relax_pipeline=hapm_pipeline(CFG, programs))
    assert programs[0].info["schedule"] == conv.default_schedule().to_dict()
    for ref, out in zip(llvm_reference(mod, x), run_vm(ex, x)):
        np.testing.assert_array_equal(out, ref)


@pytest.mark.parametrize(
    "payload, problem",
    [
        ([], "JSON object"),
        ({"version": 1, "records": []}, "'records'"),
        ({"version": 1, "records": {"k": {"schedule": {"tile_h": 1}}}}, "'tile_w' is missing"),
        (
            {
                "version": 1,
                "records": {
                    "k": {"schedule": {"tile_h": "8", "tile_w": 1, "cob_group": 1, "cib_chunk": 1}}
                },
            },
            "'tile_h' = '8' is not an integer",
        ),  # fmt: skip
        (
            {
                "version": 1,
                "records": {
                    "k": {
                        "schedule": {
                            "tile_h": 2,
                            "tile_w": 1,
                            "cob_group": 1,
                            "cib_chunk": 1,
                            "double_buffer": 1,
                        }
                    }
                },
            },
            "'double_buffer' = 1 is not a boolean",
        ),  # fmt: skip
    ],
)
def test_malformed_databases_are_refused(tmp_path, payload, problem):
    import json

    path = tmp_path / "db.json"
    path.write_text(json.dumps(payload))
    with pytest.raises(ValueError, match=problem):
        TuningDatabase(path)


def test_the_online_model_learns_on_the_cost_models_features():
    """model_guided_search's features are the fine cost model's (features_batch) plus the mid
    model's log cycles, one row per schedule; its regressor takes its size from the config."""
    from tvm_hapm.cost.analytic import analyze_batch
    from tvm_hapm.cost.features import feature_names
    from tvm_hapm.cost.layer import BlockSparsity

    task = _task()
    space = enumerate_space(task)[:6]
    feats = schedule_features(task, space)
    assert feats.shape == (6, len(feature_names()) + 1)
    sp = BlockSparsity.from_mask(task.nonzero_blocks())
    mid = analyze_batch([(task.layer(), CFG, s, sp) for s in space]).cycles
    np.testing.assert_allclose(feats[:, -1], np.log(mid))
    assert len(set(map(tuple, feats))) == 6  # the schedules are told apart
    reg = OnlineModelConfig(trees=7, depth=2).regressor(seed=3)
    assert reg.get_params()["n_estimators"] == 7 and reg.get_params()["max_depth"] == 2
    small = model_guided_search(task, trials=6, seed=1, online=OnlineModelConfig(trees=5))
    assert small.trials == 7 and small.best_cycles <= small.default_cycles


def test_every_schedule_of_the_space_is_what_the_compiler_emits():
    """The tuner measures the compiler's own stream (TIR), which has no partial channel group or
    chunk: the space holds only divisor groups and chunks, each emitted as asked (a
    non-divisor chunk used to be measured and then compiled as another), and the stream is the
    independent direct generator's, instruction by instruction."""
    from tvm_hapm.testing import direct_codegen

    task = _task(cin=20, cout=28)  # 5 input and 7 output blocks: few divisors
    space = enumerate_space(task)
    cob, cib = task.blocks
    assert all(cob % s.cob_group == 0 and cib % s.cib_chunk == 0 for s in space)
    assert not schedule_fits(task, ConvSchedule(tile_h=3, tile_w=3, cob_group=3, cib_chunk=1))
    rng = np.random.default_rng(0)
    cout = task.weight.shape[0]
    for i in rng.choice(len(space), 6, replace=False):
        prog = task.program(space[i])
        assert prog.info["source"] == "tir"
        asked = space[i].to_dict()
        emitted = prog.info["schedule"]
        assert {k: emitted[k] for k in ("tile_h", "tile_w", "cob_group", "cib_chunk")} == {
            k: asked[k] for k in ("tile_h", "tile_w", "cob_group", "cib_chunk")
        }
        oracle, _ = direct_codegen.conv2d_program(
            CFG, "conv", task.data_shape, task.weight, None, np.ones(cout, np.int64), 1,
            CFG.act_range, padding=task.padding, schedule=space[i],
        )  # fmt: skip
        assert prog.instructions == oracle.instructions
