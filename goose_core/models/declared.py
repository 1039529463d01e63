"""The plans a family's config class declares, for registry entries that extend them."""

from __future__ import annotations

from transformers.models.auto.configuration_auto import CONFIG_MAPPING

__all__ = ["declared_tp_plan"]


def declared_tp_plan(model_type: str) -> dict[str, str]:
    """``model_type``'s ``base_model_tp_plan`` as its config class declares it; empty when the
    installed transformers lacks the family (its entry then never matches a model)."""
    if model_type not in CONFIG_MAPPING:
        return {}
    return dict(getattr(CONFIG_MAPPING[model_type], "base_model_tp_plan", None) or {})
