"""What the benchmarks share: the machine record, atomic JSON output, the provenance of results
merged from several invocations, paired bootstrap intervals."""

from __future__ import annotations

import base64
import json
import os
import platform
import sys
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
if str(ROOT) not in sys.path:  # run as `python benchmarks/<name>.py` from a checkout
    sys.path.insert(0, str(ROOT))

from tvm_hapm import atomic  # noqa: E402  (after the sys.path entry)


def machine_info() -> dict:
    """CPU count, platform, versions and the load average when the run started."""
    import subprocess

    import numpy
    import tvm

    import tvm_hapm

    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False
    ).stdout.strip()
    info = {
        "package": str(Path(tvm_hapm.__file__).parent),
        "commit": commit or None,
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "tvm": tvm.__version__,
        "numpy": numpy.__version__,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    return info


def read_json(path) -> dict:
    """A results file written by :func:`write_json`."""
    return json.loads(Path(path).read_text())


def write_json(path, payload) -> Path:
    """Write ``payload`` as indented JSON, atomically (an interrupted run keeps the old file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(payload, indent=2, sort_keys=True, default=_default) + "\n"
    return atomic.write_text(path, text)


def invocations(meta: dict, file: str, work: dict) -> list:
    """Where a results file's records come from: the invocations it kept (``meta.earlier``) and
    the one that wrote it: ``file``, its machine record, seconds and ``work`` (the part of the
    run it did, e.g. its levels or its sparsities and methods).  A long run split over processes
    and merged keeps every process's record this way."""
    own = []
    if "machine" in meta:
        own = [{"file": file, "machine": meta["machine"], "seconds": meta.get("seconds"), **work}]
    return [*meta.get("earlier", []), *own]


def records_of_run(paths, belongs, out, work) -> tuple[list, list]:
    """The results files among ``paths`` written by the run being resumed or merged, in order,
    and the invocations that wrote them (:func:`invocations`, each once).

    ``belongs(settings)`` says whether a file's recorded settings are this run's, ``work(meta)``
    the part of the run its invocation did.  Missing files are skipped; a file of another run is
    refused, except ``out`` (the output being resumed), which is then started afresh."""
    records, earlier = [], []
    for path in map(Path, paths):
        if not path.exists():
            continue
        record = read_json(path)
        meta = record.get("meta", {})
        if not belongs(meta.get("settings", {})):
            if path != Path(out):
                raise SystemExit(f"{path}: written with other settings, cannot merge")
            continue
        records.append(record)
        earlier += [i for i in invocations(meta, path.name, work(meta)) if i not in earlier]
    return records, earlier


def _default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def paired_drop_interval(correct_ref, correct_new, seed: int = 0, resamples: int = 10000):
    """95% interval of ``accuracy(ref) - accuracy(new)`` in points, by a paired bootstrap over
    the test images (``scipy.stats.bootstrap``, BCa, else percentile): both models are judged on
    the same images, so the interval is that of the difference, not of each accuracy."""
    from scipy.stats import bootstrap

    a = np.asarray(correct_ref, float)
    b = np.asarray(correct_new, float)

    def diff(x, y, axis=-1):
        return 100.0 * (np.mean(x, axis=axis) - np.mean(y, axis=axis))

    if np.array_equal(a, b):  # no image changes: the interval is the point
        return [0.0, 0.0]
    for method in ("BCa", "percentile"):  # BCa is undefined when few images differ
        res = bootstrap(
            (a, b), diff, paired=True, vectorized=True, n_resamples=resamples,
            confidence_level=0.95, method=method, rng=np.random.default_rng(seed),
        )  # fmt: skip
        low, high = res.confidence_interval
        if np.isfinite(low) and np.isfinite(high):
            break
    return [float(low), float(high)]


def pack_correct(correct) -> str:
    """Per-image correctness (bools) as base64 of its packed bits: 10,000 images in 1.7 kB of
    JSON, enough to compare any two models of a results file on the same images later."""
    return base64.b64encode(np.packbits(np.asarray(correct, bool)).tobytes()).decode("ascii")


def unpack_correct(text: str, count: int) -> np.ndarray:
    """The ``count`` bools :func:`pack_correct` wrote."""
    bits = np.frombuffer(base64.b64decode(text), np.uint8)
    return np.unpackbits(bits, count=count).astype(bool)
