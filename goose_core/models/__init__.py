"""The one home of family knowledge: one module per family that needs more than its config declares.

``family.py`` holds the record (:class:`Family`: a tensor-parallel half and a pipeline half),
``registry.py`` the explicit list of goose's families; ``gpt2.py``, ``bloom.py``, ``opt.py`` and
``stablelm.py`` carry both halves, ``falcon.py`` the pipeline half, ``gemma4_text.py`` pipeline parts
with what it refuses; ``pipeline_parts.py`` is one table of the pipeline parts of the standard-shaped
families that declare no ``base_model_pp_plan``, and of the families the split refuses.
"""

from goose_core.models.family import Family, PipelineLayout, PipelineParts, TensorParallelAdapter
from goose_core.models.registry import FAMILIES, family, register_family

__all__ = ["FAMILIES", "Family", "PipelineLayout", "PipelineParts", "TensorParallelAdapter", "family",
           "register_family"]
