"""Relax and TIR passes of the hapm_fpga flow: quantization, partitioning, lowering."""

from .lower import LoweringError, LowerToHapm
from .partition import PartitionForHapm, host_operator_report
from .pipeline import hapm_pipeline, last_compile_report, offload_passes
from .prune import (
    HardwareAwarePrune,
    MagnitudePrune,
    PruneError,
    hapm_groups,
    layer_schedule,
    prunable_layers,
    prune_report,
    pruning_masks,
)
from .prune_filter import FilterPrune

__all__ = [
    "FilterPrune",
    "HardwareAwarePrune",
    "MagnitudePrune",
    "PruneError",
    "hapm_groups",
    "layer_schedule",
    "prunable_layers",
    "prune_report",
    "pruning_masks",
    "LowerToHapm",
    "LoweringError",
    "PartitionForHapm",
    "hapm_pipeline",
    "host_operator_report",
    "last_compile_report",
    "offload_passes",
]
