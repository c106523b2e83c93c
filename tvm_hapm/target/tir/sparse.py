"""The compile-time sparse schedule (:class:`SparseWeights`) and the split of a long
transfer into DMA instructions (:func:`dma_runs`), shared by the emitter's DMA leaves."""

from __future__ import annotations

import numpy as np

from ..isa import MAX_TRANSFER, Instruction, Opcode
from .walk import TirLoweringError

__all__ = ["SparseWeights", "dma_runs"]


def dma_runs(opcode, sram: int, dram: int, count: int, fields: dict) -> list[Instruction]:
    """``count`` consecutive entries as transfers of at most ``MAX_TRANSFER`` rows of at most
    ``MAX_TRANSFER`` entries (as :func:`~tvm_hapm.testing.direct_codegen._load_rows`)."""
    out = []
    while count > 0:
        c = min(count, MAX_TRANSFER)
        r = min(count // c, MAX_TRANSFER)
        out.append(
            Instruction(
                opcode, sram_addr=sram, dram_addr=dram, y_size=r, x_size=c, x_stride=c, **fields
            )
        )
        sram += r * c
        dram += r * c
        count -= r * c
    return out


class SparseWeights:
    """The compile-time sparse schedule: the walker stage that knows the constant weights.

    The TIR function is scheduled on the dense block tensor ``weight[COB, CIB, KH, KW, R, C]``.
    The weights are compile-time constants, so the walker drops what an all-zero ``R x C``
    block would cost:

    * a weight DMA loads only the non-zero blocks of the region it moves, as one contiguous
      run; the DRAM weight slot holds the non-zero blocks in *load order* (output-channel
      group, input-channel chunk, then ``(cob, cib, kh, kw)``: :attr:`order`), and on chip the
      run is packed from the DMA's first entry, so weight-buffer addresses are compacted;
    * a weight DMA whose blocks are already on chip at the same place is not repeated;
    * a GEMM whose weight block is all zero is dropped (the next GEMM of its accumulator
      region takes the reset flag; a region whose GEMMs were all dropped is zeroed by a
      ``MUL 0`` ahead of its epilogue).

    Grouped and depthwise convolutions are dense convolutions with block-diagonal weights,
    so they go through the same schedule.
    """

    def __init__(self, nonzero: np.ndarray, cob_group: int, cib_chunk: int, param=None):
        self.nonzero = np.asarray(nonzero, bool)
        cob, cib = self.nonzero.shape[:2]
        dense_ids = np.arange(self.nonzero.size).reshape(self.nonzero.shape)
        order = []
        for cg0 in range(0, cob, cob_group):
            for kc0 in range(0, cib, cib_chunk):
                blk = dense_ids[cg0 : cg0 + cob_group, kc0 : kc0 + cib_chunk]
                nz = self.nonzero[cg0 : cg0 + cob_group, kc0 : kc0 + cib_chunk]
                order += blk[nz].tolist()
        #: Dense block ids (row-major over ``(COB, CIB, KH, KW)``) of the DRAM slot, in order.
        self.order = order
        #: The position of each dense block id in :attr:`order`, -1 for a zero block.
        self.position = np.full(self.nonzero.size, -1, np.int64)
        self.position[order] = np.arange(len(order))
        self.param = param  # key of the weight parameter
        self.chip: dict[int, int | None] = {}  # TIR on-chip entry -> compacted entry or None
        self.loaded: dict[int, tuple] = {}  # compacted base -> (first DRAM position, count)
        #: Entries of one half of a double-buffered weight buffer (0: not double buffered):
        #: successive loads alternate between the halves; a run already in the current half is
        #: not loaded again.
        self.half = 0
        self._current: int | None = None

    def load(self, emitter, sram, dram, rows, cols, stride, fields) -> None:
        dense = (dram + np.arange(rows)[:, None] * stride + np.arange(cols)[None, :]).reshape(-1)
        flat_nz = self.nonzero.reshape(-1)
        keep = flat_nz[dense]
        position = self.position[dense]  # (-1 where the block is zero)
        positions = position[keep]
        # The compacted DRAM order is group-major; a DMA of a whole resident tensor covers the
        # blocks in dense order, which is the same *set* of positions in another order. On chip
        # the blocks land in DRAM order, so each block's entry is its position in the run.
        first = int(positions.min()) if len(positions) else 0
        if len(positions) and not np.array_equal(
            np.sort(positions), np.arange(first, first + len(positions))
        ):
            raise TirLoweringError("the non-zero weight blocks of a DMA are not one run")
        offset = 0
        reuse = False
        if len(positions):
            run = (first, len(positions))
            if self.half:
                reuse = self._current is not None and self.loaded.get(self._current) == run
                if not reuse:
                    self._current = 0 if self._current is None else 1 - self._current
                    self.loaded[self._current] = run
                offset = self._current * self.half
            else:
                reuse = self.loaded.get(sram) == run
                self.loaded = {sram: run}
        chip = (sram + offset - first + position).tolist()
        if not keep.all():
            chip = [c if k else None for c, k in zip(chip, keep.tolist(), strict=True)]
        self.chip.update(zip(range(sram, sram + len(chip)), chip))
        if len(positions) and not reuse:
            emitter.seq += dma_runs(Opcode.LOAD, sram + offset, first, len(positions), fields)

    def chip_addr(self, tir_addr: int) -> int | None:
        return self.chip[tir_addr]
