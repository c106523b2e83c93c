"""SHA-256 of the accelerator programs of reference networks: a check that a change of the
compiler left every stream byte-identical.

Run from the repository root::

    python benchmarks/stream_hashes.py                 # all three cases, about a minute
    python benchmarks/stream_hashes.py --cases resnet20-zedboard resnet20-zcu104

Each case quantizes its network with two calibration samples drawn by
``np.random.default_rng(0).standard_normal`` and runs the offload passes
(:func:`tvm_hapm.passes.offload_passes`) for one preset.  Two digests are printed per case:

* ``bytes``: SHA-256 of the concatenated ``Program.to_bytes()`` of every accelerator layer, in
  order (metadata, slots, instruction streams and each program's own digest);
* ``streams``: SHA-256 of the concatenated encoded instruction streams alone
  (``isa.encode_stream``), which does not change when only the metadata does.

These are the figures quoted as "stream SHA-256 unchanged" in the compile-speed commits
(``docs/compile_time.md``).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time

import numpy as np
from common import ROOT  # noqa: F401  (puts the checkout first on sys.path)
from tvm.relax.frontend.onnx import from_onnx

import tvm_hapm
from tvm_hapm.passes import offload_passes
from tvm_hapm.target import isa
from tvm_hapm.target.config import get_config


def _resnet18():
    from tvm_hapm.models import resnet18_imagenet

    return resnet18_imagenet(input_hw=(224, 224))


def _resnet20_fashion():
    from tvm_hapm.data import load_fashion_resnet

    return load_fashion_resnet(20)


#: case -> (network factory, preset)
CASES = {
    "resnet18-zedboard": (_resnet18, "hapm_fpga-zedboard"),
    "resnet20-zedboard": (_resnet20_fashion, "hapm_fpga-zedboard"),
    "resnet20-zcu104": (_resnet20_fashion, "hapm_fpga-zcu104"),
}


def stream_hashes(model, preset: str) -> dict:
    """The digests of one network on one preset (see the module docstring).

    Parameters
    ----------
    model : onnx.ModelProto
        A single-input float network.
    preset : str
        A hapm_fpga target name.

    Returns
    -------
    dict
        ``bytes`` and ``streams`` (hex digests), ``programs``, ``instructions`` and
        ``offload_seconds``.
    """
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    rng = np.random.default_rng(0)
    calibration = [rng.standard_normal(shape).astype(np.float32) for _ in range(2)]
    qmod = tvm_hapm.quantize(from_onnx(model), calibration)
    programs: list = []
    t0 = time.perf_counter()
    offload_passes(get_config(preset), programs)(qmod)
    seconds = time.perf_counter() - t0
    return {
        "bytes": hashlib.sha256(b"".join(p.to_bytes() for p in programs)).hexdigest(),
        "streams": hashlib.sha256(
            b"".join(isa.encode_stream(p.instructions) for p in programs)
        ).hexdigest(),
        "programs": len(programs),
        "instructions": sum(len(p.instructions) for p in programs),
        "offload_seconds": round(seconds, 2),
    }


def main(argv: list[str] | None = None) -> int:
    """Print the digests of the chosen cases.

    Parameters
    ----------
    argv : list of str, optional
        Command-line arguments (default ``sys.argv[1:]``).

    Returns
    -------
    int
        Exit status.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    args = parser.parse_args(argv)
    for case in args.cases:
        make, preset = CASES[case]
        h = stream_hashes(make(), preset)
        print(
            f"{case}: {h['programs']} programs, {h['instructions']:,} instructions, "
            f"offload {h['offload_seconds']} s\n  bytes   {h['bytes']}\n  streams {h['streams']}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
