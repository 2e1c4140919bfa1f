"""FO1 model code: base-VLM adapters, auxiliary encoder, region encoder, connector, the model class.

Model code does no I/O: no hub access, no file reads, no tokenizer building.
"""

from vlm_fo1.model.adapters import ADAPTERS, VLMAdapter, get_adapter
from vlm_fo1.model.modeling_fo1 import FO1ForConditionalGeneration, FO1PreTrainedModel
from vlm_fo1.model.region_encoder import HybridRegionEncoder, box_sine_embedding, pool_regions
from vlm_fo1.model.simple_fpn import SimpleFeaturePyramid

__all__ = [
    "ADAPTERS",
    "FO1ForConditionalGeneration",
    "FO1PreTrainedModel",
    "HybridRegionEncoder",
    "SimpleFeaturePyramid",
    "VLMAdapter",
    "box_sine_embedding",
    "get_adapter",
    "pool_regions",
]
