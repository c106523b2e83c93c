"""The RTL against exact arithmetic and the Python simulator on GEMMs with extreme products:
the two-MACs-per-DSP packing of the arrays (hapm_pe2) must not lose a bit when every product of
a column is (-128) * (-128) = 2^14, or when neighbouring columns hold -128 and 127."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from tvm_hapm.rtl import RtlSimulator, cosimulate
from tvm_hapm.runtime.driver import pack_dram
from tvm_hapm.target.config import get_config
from tvm_hapm.target.dependency import insert_dependency_tokens
from tvm_hapm.target.isa import Buffer, Instruction, Opcode
from tvm_hapm.target.program import Program, Slot

pytestmark = pytest.mark.skipif(
    shutil.which("verilator") is None, reason="verilator is not installed"
)


def gemm_extremes(cfg, vectors=3):
    """A program of four GEMMs per array (blocks of -128; of -128 and 127 in alternate columns,
    both ways; random) over input vectors of -128 (and one random), stored as int32, its DRAM
    slots and the exact result."""
    R, C, A = cfg.array_rows, cfg.array_cols, cfg.num_arrays
    rng = np.random.default_rng(5)
    blocks = np.full((4, R, C), -128, np.int8)
    blocks[1][:, 1::2] = 127
    blocks[2][:, 0::2] = 127
    blocks[3] = rng.integers(-128, 128, (R, C))
    x = np.full((vectors, R), -128, np.int8)
    x[-1] = rng.integers(-128, 128, R)

    def load(buf, slot, count):
        return Instruction(Opcode.LOAD, buffer=buf, dram_slot=slot, elem_bits_code=0,
                           y_size=1, x_size=count, x_stride=count)  # fmt: skip

    seq = [load(Buffer.INP, 0, vectors), load(Buffer.WGT, 1, 4)]
    # array k's results go into its accumulator bank k, stored after array k-1's
    for b in range(4):
        for k in range(A):
            seq.append(Instruction(Opcode.GEMM, reset=1, array=k, wgt_addr=b, inp_addr=0,
                                   acc_addr=k * cfg.acc_bank_depth + b * vectors, outer=1,
                                   inner=vectors, inp_si=1, acc_si=1))  # fmt: skip
    per_array = [x.astype(np.int64) @ blocks[b].astype(np.int64) for b in range(4)]
    expect = per_array * A  # every array computes the same four products
    entries = len(expect) * vectors
    for k in range(A):
        seq.append(Instruction(Opcode.STORE, buffer=Buffer.ACC, dram_slot=2, elem_bits_code=2,
                               sram_addr=k * cfg.acc_bank_depth, dram_addr=k * 4 * vectors,
                               y_size=1, x_size=4 * vectors, x_stride=4 * vectors))  # fmt: skip
    seq.append(Instruction(Opcode.FINISH))
    slots = [
        Slot("x", "input", "int8", (vectors * R,)),
        Slot("w", "const", "int8", (4 * R * C,)),
        Slot("y", "output", "int32", (entries * C,)),
    ]
    prog = Program("gemm_extremes", cfg, slots, insert_dependency_tokens(seq), 0, {})
    dram = pack_dram(prog, [x.ravel(), blocks.ravel(), np.zeros(entries * C, np.int32)])
    return prog, dram, np.concatenate([e.ravel() for e in expect])


def _check(preset):
    cfg = get_config(preset)
    prog, dram, expect = gemm_extremes(cfg)
    assert expect.max() == cfg.array_rows * 2**14  # a whole column of (-128) * (-128)
    rtl = RtlSimulator(cfg)
    result = cosimulate(prog, dram, rtl=rtl)
    assert result.bit_exact, result.mismatches
    rtl.run(prog.instructions, dram)
    np.testing.assert_array_equal(dram[2].view(np.int32)[: expect.size], expect)


def test_extreme_products_on_zedboard():
    _check("zedboard")


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["zybo-z7-10", "zcu104"])
def test_extreme_products_on_the_other_presets(preset):
    _check(preset)
