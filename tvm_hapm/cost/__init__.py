"""Cost models of the hapm_fpga accelerator: coarse, mid (analytical) and fine (XGBoost).

See ``docs/cost_model.md``.  Quick use::

    from tvm_hapm.cost import ConvLayer, MidModel, load_bundled_fine_model
    layer = ConvLayer(1, 64, 56, 56, 64, 3, 3, padding=1)
    cost = load_bundled_fine_model().predict(layer, get_config("zedboard"), sparsity=0.5)
    cost.cycles, cost.energy_uj
"""

from .analytic import Analysis, analyze, default_schedule
from .features import FEATURE_SCHEMA_VERSION, feature_names, features
from .layer import (
    BlockSparsity,
    ConvLayer,
    apply_block_mask,
    block_mask,
    layers_from_onnx,
    layers_from_relax,
    structural_mask,
    zoo_layers,
)
from .models import (
    BUNDLED_FINE_MODEL,
    CoarseModel,
    Cost,
    CostModel,
    FineModel,
    MidModel,
    SchemaVersionError,
    load_bundled_fine_model,
)

__all__ = [
    "BUNDLED_FINE_MODEL",
    "FEATURE_SCHEMA_VERSION",
    "Analysis",
    "BlockSparsity",
    "CoarseModel",
    "ConvLayer",
    "Cost",
    "CostModel",
    "FineModel",
    "MidModel",
    "SchemaVersionError",
    "analyze",
    "apply_block_mask",
    "block_mask",
    "default_schedule",
    "feature_names",
    "load_bundled_fine_model",
    "features",
    "layers_from_onnx",
    "layers_from_relax",
    "structural_mask",
    "zoo_layers",
]
