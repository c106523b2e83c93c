"""HW-Flow search (tvm_hapm.hwflow) on Fashion-MNIST: ResNet-56 and ResNet-20.

Run: ``python benchmarks/hwflow.py [--models resnet56 resnet20] [--episodes 24]`` (ResNet-56
about 2-3 h on 2 cores), or ``--dataset digits`` for the quick variant on the bundled digits
ResNet-20.

For each network (``tvm_hapm.data.load_fashion_resnet``): the dense reference, then the RL agent
guided by each cost level (``--levels``: coarse, mid, fine), and at the fine level the greedy
latency-saliency search and two no-search baselines: ``uniform`` (the largest feasible single
ratio for every layer) and ``per_mac`` (HAPM's allocation of the largest feasible network-wide
sparsity by importance per MAC saved).  Every search has the same evaluation budget
(``--episodes``) and the same accuracy estimate: float top-1 on the 5,000-image validation
split, after least-squares reconstruction of the pruned layers, with int8-rounded weights.

Every run's winner is then fine-tuned in PyTorch (``--final-epochs`` of the 55,000 training
images, masks held), quantized to int8 (calibrated on 150 training images, with the activation
percentile chosen on validation when the network was trained) and simulated; a run whose winner
prunes every layer as an earlier run's does takes that run's recovery and figures (``final_from``
in its record: the recovery is a deterministic function of the allocation).  **The headline is
chosen on validation**: among the runs whose int8 *validation* drop against the dense int8 model
is within ``--max-drop``, the one with the largest simulated reduction of the objective.  Only
then is its int8 test accuracy (all 10,000 images, with a 95% paired-bootstrap interval of the
drop) reported; the test set plays no part in any choice.  Results are written after every run
and every calibration point (``--resume`` keeps those of a previous invocation with the same
settings but ``--levels`` and ``--baselines``: ``--levels coarse mid --resume`` adds those levels'
runs; ``--merge`` adds the runs and calibration points of invocations run in parallel, e.g.
``--baselines`` or, with ``--calibrate-only``, the calibration split over the cores, each with its
own ``--out``) to
``benchmarks/results/hwflow.json`` (``hwflow_energy.json`` with ``--objective energy``: a run of its
own, its headline the largest energy reduction); ``hwflow_<model>[_energy].png`` shows how the
headline was chosen (:func:`selection_plot`), ``hwflow_<model>[_energy]_search.png`` the candidates
of the invocation's searches.  ``--plot-only`` redraws the former from the JSON.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from common import (
    RESULTS,
    machine_info,
    paired_drop_interval,
    read_json,
    records_of_run,
    write_json,
)

from tvm_hapm import flow, hwflow
from tvm_hapm.data import (
    fashion_resnet_info,
    load_bundled_resnet20,
    load_digits,
    load_fashion_mnist,
    load_fashion_resnet,
)
from tvm_hapm.target.config import get_config


def default_out(dataset: str, objective: str) -> Path:
    """``results/hwflow[_digits][_energy].json``: one results file per dataset and objective (a
    run's settings, hence its records, differ with either)."""
    return RESULTS / f"hwflow{suffix(dataset, objective)}.json"


def suffix(dataset: str, objective: str) -> str:
    """``[_digits][_energy]``: what names a run's results file and figures beside the default
    Fashion-MNIST, latency-objective run's."""
    digits = "_digits" if dataset == "digits" else ""
    return digits + ("" if objective == "latency" else "_energy")


def load(dataset: str, name: str):
    """``(model, (x_train, y_train), (x_val, y_val), (x_test, y_test), percentile)``."""
    if dataset == "digits":
        if name != "resnet20":
            raise SystemExit("the digits variant has only resnet20")
        x_tr, y_tr, x_te, y_te = load_digits(size=32, channels=3)
        val, rest = hwflow.validation_split(len(x_tr), 150, 0)
        return (load_bundled_resnet20(1), (x_tr[rest], y_tr[rest]), (x_tr[val], y_tr[val]),
                (x_te, y_te), None)  # fmt: skip
    depth = int(name.removeprefix("resnet"))
    d = load_fashion_mnist()
    pct = fashion_resnet_info(depth)["int8_calibration"]["percentile"]
    return (load_fashion_resnet(depth, 1), (d.x_train, d.y_train), (d.x_val, d.y_val),
            (d.x_test, d.y_test), pct)  # fmt: skip


def int8(model, cfg, x_cal, data, pct, engine):
    """``flow.int8_accuracy`` calibrated as ``hwflow.finalize`` calibrates."""
    return flow.int8_accuracy(model, x_cal[: hwflow.INT8_EVAL_BATCH], *data, cfg, pct,
                              engine=engine)  # fmt: skip


def recovery(args):
    """The fine-tuning of every winner: SGD, learning rate 0.01 decayed to zero, batch 128, the
    augmentation the networks were trained with (digits: crops only)."""
    from tvm_hapm.torch import TrainConfig

    fashion = args.dataset == "fashion-mnist"
    return TrainConfig(batch_size=128, lr=0.01, weight_decay=5e-4,
                       crop_padding=4 if fashion else 2, flip=fashion, seed=args.seed)  # fmt: skip


def run_model(name, args, cfg, log=print, previous=None, checkpoint=None) -> dict:
    """Yield the model's results after each stage; ``previous``: the results of an interrupted
    invocation with the same settings (its calibration points and runs are kept);
    ``checkpoint(state)`` is called within the calibration after each of its points."""
    previous = previous or {}
    model, train, val, test, pct = load(args.dataset, name)
    x_tr = train[0]
    dense_val = int8(model, cfg, x_tr, val, pct, args.engine)
    dense_test = int8(model, cfg, x_tr, test, pct, args.engine)
    d_lat, d_en, _, _, _ = flow.simulate(model, cfg, x_tr, test[0])
    log(f"[{name}] dense: int8 val {100 * dense_val.accuracy:.2f}%  "
        f"{d_lat:.3f} ms  {d_en:.1f} uJ")  # fmt: skip
    out = {"dense": {"int8_val_accuracy": dense_val.accuracy,
                     "int8_test_accuracy": dense_test.accuracy, "sim_latency_ms": d_lat,
                     "sim_energy_uj": d_en}, "runs": dict(previous.get("runs", {}))}  # fmt: skip
    t0 = time.perf_counter()
    options = hwflow.EnvOptions(
        objective=args.objective, max_accuracy_drop=args.max_drop, level="coarse",
        seed=args.seed, reconstruct=True, recal_size=args.recal_size,
        calibration_percentile=pct, finetune_steps=args.finetune_steps, engine=args.engine,
    )  # fmt: skip
    base = hwflow.HWFlowEnv(model, train, cfg, options, val_data=val)
    log(f"[{name}] environment: {time.perf_counter() - t0:.0f} s")
    steps = int(round(args.final_epochs * (len(x_tr) // 128)))
    if args.calibrate:

        def on_point(points):
            out["budget_calibration"] = {"points": points, "search_budget": None}
            if checkpoint is not None:
                checkpoint(out)

        measured = previous.get("budget_calibration", {}).get("points", ())
        if args.calibrate_only:  # this process's share of a calibration split over processes
            out["budget_calibration"] = hwflow.calibrate_budget(
                base, args.calibrate_only, steps, dense_val.accuracy, args.seed, recovery(args),
                measured=measured, on_point=on_point,
            )  # fmt: skip
            out["budget_calibration"]["search_budget"] = None  # not from every point
            yield out
            return
        out["budget_calibration"] = hwflow.calibrate_budget(
            base, args.calibrate, steps, dense_val.accuracy, args.seed, recovery(args),
            measured=measured, on_point=on_point,
        )  # fmt: skip
        base.budget = out["budget_calibration"]["search_budget"]
        log(f"[{name}] search budget calibrated on validation: {base.budget:.2f} pt "
            f"({out['budget_calibration']['points']})")  # fmt: skip
        yield out
    runs = [("rl", lv) for lv in args.levels]
    runs += [(m, args.baseline_level) for m in args.baselines]
    results = []
    for method, level in runs:
        key = f"{method}_{level}"
        if key in out["runs"]:
            continue
        t0 = time.perf_counter()
        env = base.with_level(level)
        res = hwflow.optimize(model, train, cfg, method=method, episodes=args.episodes,
                              seed=args.seed, env=env)  # fmt: skip
        res.search_seconds = time.perf_counter() - t0
        row = res.to_dict()
        twin = same_allocation(out["runs"], res.ratios)
        if twin is not None:  # the recovery is a function of the allocation: reuse it
            row.update({k: out["runs"][twin][k] for k in FINAL_KEYS})
            row["final_from"] = twin
        else:
            f = hwflow.finalize(res, env, test, steps, True, args.seed,
                                train_config=recovery(args))  # fmt: skip
            row.update({
                "final": f,
                "latency_reduction": d_lat / f["sim_latency_ms"],
                "energy_reduction": d_en / f["sim_energy_uj"],
                "val_int8_drop": 100 * (dense_val.accuracy - f["val_int8_accuracy"]),
                "accuracy_drop": 100 * (dense_test.accuracy - f["test_int8_accuracy"]),
                "ci_accuracy_drop": paired_drop_interval(dense_test.correct,
                                                         res.int8["test"].correct),
            })  # fmt: skip
        row.update({"table_seconds": env.table_seconds, "seconds": time.perf_counter() - t0})
        out["runs"][key] = row
        results.append(res)
        log(f"[{name}] {key}: {row['latency_reduction']:.2f}x latency, "
            f"{row['energy_reduction']:.2f}x energy, int8 val drop {row['val_int8_drop']:.2f} pt "
            f"({row['seconds']:.0f} s)")  # fmt: skip
        yield out  # a checkpoint for the caller to save
    select(out, args)
    if results:  # the candidates of this invocation's searches (earlier ones keep no history)
        search_png = figure_path(args.out, name, args.dataset, args.objective, "_search")
        hwflow.pareto_plot(results, search_png)
    png = figure_path(args.out, name, args.dataset, args.objective)
    selection_plot(out, args.max_drop, png, name, args.objective)
    yield out


#: A run's figures that come from recovering its winner (the rest are its search's).
FINAL_KEYS = ("final", "latency_reduction", "energy_reduction", "val_int8_drop", "accuracy_drop",
              "ci_accuracy_drop")  # fmt: skip


def same_allocation(runs: dict, ratios: dict) -> str | None:
    """The first run in ``runs`` whose winner prunes every layer as ``ratios`` does (its
    recovery, deterministic given the allocation and the seed, need not run again), or None."""

    def key(r):
        return {k: round(float(v), 9) for k, v in r.items() if float(v) > 0}

    same = (n for n, r in runs.items() if "final_from" not in r and key(r["ratios"]) == key(ratios))
    return next(same, None)


def select(out: dict, args) -> None:
    """The headline, chosen on validation: the largest simulated reduction of the objective
    among the runs whose int8 validation drop is within the budget."""
    key = "latency_reduction" if args.objective == "latency" else "energy_reduction"
    ok = {k: r for k, r in out["runs"].items() if r["val_int8_drop"] <= args.max_drop + 1e-9}
    out["selection"] = "validation"
    out["feasible_on_validation"] = sorted(ok)
    if not ok:
        out["winner"] = None
        return
    win = max(ok, key=lambda k: (ok[k][key], k))
    out["winner"] = win
    for k in ("latency_reduction", "energy_reduction", "accuracy_drop", "ci_accuracy_drop",
              "val_int8_drop"):  # fmt: skip
        out[k] = ok[win][k]
    keys = ("latency_reduction", "energy_reduction", "val_int8_drop", "accuracy_drop",
            "ci_accuracy_drop", "search_seconds", "ratios")  # fmt: skip
    out["by_level"] = {lv: {k: out["runs"][f"rl_{lv}"][k] for k in keys}
                       for lv in hwflow.LEVELS if f"rl_{lv}" in out["runs"]}  # fmt: skip


def figure_path(out: Path, name: str, dataset: str, objective: str, kind: str = "") -> Path:
    """``hwflow_<model>[_digits][_energy][kind].png`` beside the results file ``out``."""
    return out.parent / f"hwflow_{name}{suffix(dataset, objective)}{kind}.png"


def selection_plot(state: dict, max_drop: float, path: Path, model: str, objective: str) -> Path:
    """How the headline was chosen: every run's recovered winner, its simulated latency and
    energy reduction against its int8 validation drop (what the choice sees: the runs
    :func:`select` found feasible filled, the headline starred), with the int8 test drop and its
    95% interval beside it in grey (reported after the choice)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tvm_hapm import atomic

    groups: dict = {}  # runs whose winners coincide (same recovery) share one marker
    for name, r in sorted(state["runs"].items()):
        key = tuple(round(r[k], 6) for k in ("val_int8_drop", "latency_reduction",
                                             "energy_reduction"))  # fmt: skip
        groups.setdefault(key, (r, []))[1].append(name)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.4), sharex=True)
    for ax, key, label in zip(axes, ("latency_reduction", "energy_reduction"),
                              ("latency", "energy"), strict=True):  # fmt: skip
        for i, (r, names) in enumerate(groups.values()):
            y, val, test = r[key], r["val_int8_drop"], r["accuracy_drop"]
            lo, hi = r["ci_accuracy_drop"]
            ax.errorbar([test], [y], xerr=[[test - lo], [hi - test]], fmt="none", ecolor="0.75",
                        lw=1)  # fmt: skip
            ax.scatter([test], [y], marker="|", s=80, color="0.5")
            won = state.get("winner") in names
            feasible = not set(names).isdisjoint(state["feasible_on_validation"])
            ax.scatter([val], [y], s=220 if won else 45, marker="*" if won else "o",
                       color=f"C{i}" if feasible else "none", edgecolors=f"C{i}", zorder=5,
                       label=", ".join(names))  # fmt: skip
        ax.axvline(max_drop, color="red", lw=0.8, ls="--")
        ax.axhline(2.0, color="0.6", lw=0.6, ls=":")
        ax.set_xlabel("int8 accuracy drop vs dense (points)")
        ax.set_ylabel(f"simulated {label} reduction vs dense (x)")
    axes[0].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"{model}, {objective} objective\neach run's recovered winner; colour: validation "
                 "drop (filled: within the budget, red; star: the headline), grey: test drop and "
                 "its 95% interval, reported after the choice", fontsize=8)  # fmt: skip
    fig.tight_layout()
    atomic.write_figure(path, fig)
    plt.close(fig)
    return Path(path)


BASELINES = ("greedy", "uniform", "per_mac")
#: Settings a resumed invocation may change, each with its canonical order: the levels searched
#: (``--levels coarse mid`` after ``--levels fine`` adds their runs to the ones already there)
#: and the baselines run.
RESUMABLE_CHANGES = {"levels": hwflow.LEVELS, "baselines": BASELINES}


#: Options that say where and how much of a run an invocation does, not what the run is.
NOT_SETTINGS = ("out", "resume", "merge", "models", "calibrate_only", "plot_only")


def same_run(previous: dict, settings: dict) -> bool:
    """Whether results written with ``previous`` settings belong to a run with ``settings``."""

    def fixed(s):
        return {k: v for k, v in s.items() if k not in RESUMABLE_CHANGES}

    return fixed(previous) == fixed(settings)


def resumed(paths, settings: dict, out: Path) -> tuple[dict, list]:
    """The per-model results kept from ``paths`` (the output being resumed, then files of the same
    run written in parallel) and the invocations that wrote them
    (:func:`common.records_of_run`), with ``settings`` widened to the levels and baselines they
    ran."""
    records, earlier = records_of_run(paths, lambda s: same_run(s, settings), out, work_of)
    old = {}
    for prev in records:
        for name, state in prev.items():
            if name.startswith("resnet"):
                kept = old.setdefault(name, state)
                kept["runs"] = {**state.get("runs", {}), **kept.get("runs", {})}
                # calibration points by ratio (the first file's where two measured one)
                points = {p["ratio"]: p for st in (state, kept)
                          for p in st.get("budget_calibration", {}).get("points", [])}  # fmt: skip
                if points:
                    kept["budget_calibration"] = {"points": [points[r] for r in sorted(points)]}
        before = prev["meta"]["settings"]
        for key, order in RESUMABLE_CHANGES.items():
            # a record without the key ran every one (records from before --baselines)
            ran = set(before.get(key, order)) | set(settings[key])
            settings[key] = [v for v in order if v in ran]
    return old, earlier


def work_of(meta: dict) -> dict:
    """The part of a run a results file's invocation did: its levels and baselines."""
    return {k: meta.get("settings", {}).get(k) for k in RESUMABLE_CHANGES}


def replot(path: Path) -> dict:
    """Redraw every model's :func:`selection_plot` from the records in ``path``, each with the
    accuracy budget its run was chosen with."""
    payload = read_json(path)
    meta = payload.get("meta", {})
    for name, state in payload.items():
        if name.startswith("resnet") and state.get("runs"):
            settings = meta.get("runs", {}).get(name, {}).get("settings", meta.get("settings"))
            fields = ("val_int8_drop", "accuracy_drop", "ci_accuracy_drop")
            old = any(k not in r for r in state["runs"].values() for k in fields)
            if old or not settings or "feasible_on_validation" not in state:
                raise SystemExit(f"{path}: {name}'s records predate the selection plot's fields")
            png = figure_path(path, name, settings["dataset"], settings["objective"])
            selection_plot(state, settings["max_drop"], png, name, settings["objective"])
    return payload


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", choices=("fashion-mnist", "digits"), default="fashion-mnist")
    ap.add_argument("--models", nargs="+", default=["resnet56", "resnet20"])
    ap.add_argument("--levels", nargs="+", default=["coarse", "mid", "fine"])
    ap.add_argument("--baseline-level", default="fine")
    ap.add_argument(
        "--baselines",
        nargs="*",
        default=list(BASELINES),
        choices=BASELINES,
        help="the searches and no-search baselines run at --baseline-level",
    )
    ap.add_argument("--objective", default="latency", choices=hwflow.OBJECTIVES)
    ap.add_argument("--max-drop", type=float, default=1.0)
    ap.add_argument("--episodes", type=int, default=24)
    ap.add_argument("--finetune-steps", type=int, default=0, help="per candidate, in the search")
    ap.add_argument("--final-epochs", type=float, default=1.0, help="fine-tuning of each winner")
    ap.add_argument("--calibrate", nargs="*", type=float, default=[],
                    help="uniform ratios at which to calibrate the search budget on validation "
                    "(hwflow.calibrate_budget); none: the search budget is --max-drop")  # fmt: skip
    ap.add_argument(
        "--calibrate-only",
        nargs="+",
        type=float,
        default=[],
        help="measure only these of the --calibrate points, then stop (a calibration split over "
        "processes, each with its own --out; the run then --merge's them)",
    )
    ap.add_argument("--recal-size", type=int, default=128, help="images to reconstruct on")
    ap.add_argument("--target", default="hapm_fpga-zedboard")
    ap.add_argument("--engine", default="auto", choices=("auto", "torch", "tvm"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None,
                    help="default: results/hwflow[_digits][_energy].json")  # fmt: skip
    ap.add_argument("--resume", action="store_true")
    ap.add_argument(
        "--merge",
        nargs="*",
        type=Path,
        default=[],
        help="also keep the runs and calibration points of these files, written by invocations "
        "of the same run in parallel (e.g. --baselines or --calibrate-only split over cores)",
    )
    ap.add_argument(
        "--plot-only",
        action="store_true",
        help="redraw hwflow_<model>[_energy].png from --out's records, then stop",
    )
    args = ap.parse_args(argv)
    args.out = args.out or default_out(args.dataset, args.objective)
    if args.plot_only:
        return replot(args.out)
    if not set(args.calibrate_only) <= set(args.calibrate):
        raise SystemExit("--calibrate-only: points not among --calibrate's")
    cfg = get_config(args.target)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                if k not in NOT_SETTINGS}  # fmt: skip
    payload = {"dataset": args.dataset, "selection": "validation",
               "meta": {"settings": settings, "machine": machine_info()}}  # fmt: skip
    old, payload["meta"]["earlier"] = resumed([args.out] * args.resume + args.merge, settings,
                                              args.out)  # fmt: skip
    t_all = time.perf_counter()
    for name in args.models:

        def save(state, name=name):
            payload[name] = state
            write_json(args.out, payload)

        for state in run_model(name, args, cfg, previous=old.get(name), checkpoint=save):
            save(state)
    payload["meta"]["seconds"] = time.perf_counter() - t_all
    payload["meta"]["description"] = {
        "accuracy": "int8 top-1; the search judged float top-1 on the validation split after "
        "reconstruction (int8-rounded weights); winners fine-tuned, then int8 on validation and "
        "test",
        "selection": "headline = largest simulated reduction among runs whose int8 validation "
        "drop <= max_drop; test accuracy reported afterwards",
        "latency_energy": "one image on the simulated accelerator (timing + energy model)",
        "ci_accuracy_drop": "95% paired-bootstrap interval of the int8 test drop (points)",
    }
    write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
