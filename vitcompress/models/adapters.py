"""ViT adapters: one per model family, each knowing where that family keeps its blocks and shapes.

The compression passes never touch a family's attributes directly: they ask the adapter for the
blocks, the attention and MLP linears, and tell it the new head count and head size after an edit.
Families are registered explicitly in `FAMILIES`; `adapter_for` raises on a model none of them knows.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from vitcompress.errors import UnsupportedModelError


@dataclass(frozen=True)
class AttentionInfo:
    module: nn.Module
    num_heads: int
    head_dim: int
    qkv: tuple[nn.Linear, ...]  # one fused linear (timm) or three (Hugging Face q, k, v)
    proj: nn.Linear

    @property
    def attn_dim(self) -> int:
        return self.num_heads * self.head_dim


@dataclass(frozen=True)
class MlpInfo:
    fc1: nn.Linear
    fc2: nn.Linear

    @property
    def hidden(self) -> int:
        return self.fc1.out_features


@dataclass(frozen=True)
class BlockInfo:
    index: int
    name: str  # module path, e.g. "blocks.3"
    module: nn.Module
    attn: AttentionInfo
    mlp: MlpInfo


class ViTAdapter(ABC):
    """What every pass may rely on for one family."""

    family: str

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        # nn.Module attributes are dynamic; the adapter is where we know what each family holds.
        self.m: Any = model

    @abstractmethod
    def blocks(self) -> list[BlockInfo]: ...

    @abstractmethod
    def set_attention_shape(self, block_index: int, num_heads: int, head_dim: int) -> None:
        """Record a block's new head count and head size after its linears were resized."""

    @property
    @abstractmethod
    def embed_dim(self) -> int: ...

    @property
    @abstractmethod
    def head_names(self) -> tuple[str, ...]:
        """Module paths of the classifier head(s); protected from pruning by default."""

    @property
    @abstractmethod
    def patch_embed_name(self) -> str: ...

    @property
    @abstractmethod
    def num_prefix_tokens(self) -> int:
        """Class (and distillation) tokens in front of the patch tokens."""

    @property
    @abstractmethod
    def num_tokens(self) -> int:
        """Tokens every block sees: the patches plus the prefix tokens."""

    @abstractmethod
    def set_embed_dim(self, embed_dim: int) -> None:
        """Record a new residual (embedding) width after the embedding channels were pruned."""

    @property
    def patch_conv(self) -> nn.Conv2d:
        """The patch-embedding convolution: the first producer of the residual stream."""
        for module in self.model.get_submodule(self.patch_embed_name).modules():
            if isinstance(module, nn.Conv2d):
                return module
        raise UnsupportedModelError(f"{self.family}: no Conv2d under {self.patch_embed_name}")

    def structure(self) -> list[dict[str, int]]:
        return [
            {
                "num_heads": b.attn.num_heads,
                "head_dim": b.attn.head_dim,
                "attn_dim": b.attn.attn_dim,
                "mlp_hidden": b.mlp.hidden,
            }
            for b in self.blocks()
        ]

    def module_name(self, module: nn.Module) -> str:
        for name, candidate in self.model.named_modules():
            if candidate is module:
                return name
        raise KeyError(f"module not part of the {self.family} model")


class TimmViTAdapter(ViTAdapter):
    """timm `VisionTransformer` and its subclasses (ViT, DeiT, DeiT distilled with its dist token)."""

    family = "timm-vit"

    @staticmethod
    def matches(model: nn.Module) -> bool:
        from timm.models.vision_transformer import VisionTransformer

        return isinstance(model, VisionTransformer)

    def blocks(self) -> list[BlockInfo]:
        infos = []
        for i, block in enumerate(self.m.blocks):
            attn = block.attn
            infos.append(
                BlockInfo(
                    index=i,
                    name=f"blocks.{i}",
                    module=block,
                    attn=AttentionInfo(attn, attn.num_heads, attn.head_dim, (attn.qkv,), attn.proj),
                    mlp=MlpInfo(block.mlp.fc1, block.mlp.fc2),
                )
            )
        return infos

    def set_attention_shape(self, block_index: int, num_heads: int, head_dim: int) -> None:
        attn = self.m.blocks[block_index].attn
        attn.num_heads = num_heads
        attn.head_dim = head_dim
        attn.attn_dim = num_heads * head_dim
        attn.scale = head_dim**-0.5

    @property
    def embed_dim(self) -> int:
        return int(self.m.embed_dim)

    @property
    def head_names(self) -> tuple[str, ...]:
        return ("head", "head_dist") if hasattr(self.model, "head_dist") else ("head",)

    @property
    def patch_embed_name(self) -> str:
        return "patch_embed"

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.m.num_prefix_tokens)

    @property
    def num_tokens(self) -> int:
        return int(self.m.patch_embed.num_patches) + self.num_prefix_tokens

    def set_embed_dim(self, embed_dim: int) -> None:
        for attr in ("embed_dim", "num_features", "head_hidden_size"):
            if hasattr(self.m, attr):
                setattr(self.m, attr, embed_dim)


class HFViTAdapter(ViTAdapter):
    """Hugging Face ViT and DeiT (transformers >= 5 layout: `layers[i].attention.{q,k,v,o}_proj`).

    The model is the vitcompress wrapper whose `.net` is the transformers model.
    """

    family = "hf-vit"

    @staticmethod
    def matches(model: nn.Module) -> bool:
        net = getattr(model, "net", None)
        return net is not None and getattr(getattr(net, "config", None), "model_type", None) in (
            "vit",
            "deit",
        )

    @property
    def _backbone(self) -> Any:
        net = self.m.net
        return net.deit if hasattr(net, "deit") else net.vit

    @property
    def _prefix(self) -> str:
        return "net.deit" if hasattr(self.m.net, "deit") else "net.vit"

    def blocks(self) -> list[BlockInfo]:
        infos = []
        for i, layer in enumerate(self._backbone.layers):
            attn = layer.attention
            infos.append(
                BlockInfo(
                    index=i,
                    name=f"{self._prefix}.layers.{i}",
                    module=layer,
                    attn=AttentionInfo(
                        attn,
                        attn.q_proj.out_features // attn.head_dim,
                        attn.head_dim,
                        (attn.q_proj, attn.k_proj, attn.v_proj),
                        attn.o_proj,
                    ),
                    mlp=MlpInfo(layer.mlp.fc1, layer.mlp.fc2),
                )
            )
        return infos

    def set_attention_shape(self, block_index: int, num_heads: int, head_dim: int) -> None:
        attn = self._backbone.layers[block_index].attention
        attn.num_attention_heads = num_heads
        attn.head_dim = head_dim
        attn.scaling = head_dim**-0.5

    @property
    def embed_dim(self) -> int:
        return int(self.m.net.config.hidden_size)

    @property
    def head_names(self) -> tuple[str, ...]:
        net = self.m.net
        if hasattr(net, "distillation_classifier"):
            return ("net.cls_classifier", "net.distillation_classifier")
        return ("net.classifier",)

    @property
    def patch_embed_name(self) -> str:
        return f"{self._prefix}.embeddings.patch_embeddings"

    @property
    def num_prefix_tokens(self) -> int:
        return 2 if hasattr(self._backbone.embeddings, "distillation_token") else 1

    @property
    def num_tokens(self) -> int:
        return int(self._backbone.embeddings.patch_embeddings.num_patches) + self.num_prefix_tokens

    def set_embed_dim(self, embed_dim: int) -> None:
        self.m.net.config.hidden_size = embed_dim


@dataclass(frozen=True)
class ModelFamily:
    name: str
    description: str
    matches: Callable[[nn.Module], bool]
    adapter: type[ViTAdapter]


FAMILIES: dict[str, ModelFamily] = {
    f.name: f
    for f in (
        ModelFamily(
            "timm-vit",
            "timm VisionTransformer: vit_*, deit_*, deit_*_distilled_* and relatives",
            TimmViTAdapter.matches,
            TimmViTAdapter,
        ),
        ModelFamily(
            "hf-vit",
            "Hugging Face ViTForImageClassification, DeiTForImageClassification(WithTeacher)",
            HFViTAdapter.matches,
            HFViTAdapter,
        ),
    )
}


def adapter_for(model: nn.Module) -> ViTAdapter:
    for family in FAMILIES.values():
        if family.matches(model):
            return family.adapter(model)
    raise UnsupportedModelError(
        f"{type(model).__name__} is not a vision transformer family vitcompress supports",
        hint="supported: " + "; ".join(f.description for f in FAMILIES.values()),
    )
