"""Model sources (timm, Hugging Face, vitcompress artifacts), ViT adapters, artifact format and statistics."""

from vitcompress.models.loader import InputSpec, LoadedModel, ModelRef, load_model

__all__ = ["InputSpec", "LoadedModel", "ModelRef", "load_model"]
