"""Model sources (timm, Hugging Face, vitcompress artifacts), ViT adapters, artifact format and statistics."""

from vitcompress.models.loader import InputSpec, LoadedModel, ModelRef, from_module
from vitcompress.models.source import as_model_ref, load_model

__all__ = ["InputSpec", "LoadedModel", "ModelRef", "as_model_ref", "from_module", "load_model"]
