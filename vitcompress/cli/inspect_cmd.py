from __future__ import annotations

from rich.table import Table

from vitcompress.cli.common import (
    CheckpointOpt,
    ImgSizeOpt,
    InChansOpt,
    JsonOpt,
    ModelArg,
    NumClassesOpt,
    TrustOpt,
    model_ref,
    out_console,
    print_json,
)


def inspect(
    model: ModelArg,
    checkpoint: CheckpointOpt = None,
    num_classes: NumClassesOpt = None,
    img_size: ImgSizeOpt = None,
    in_chans: InChansOpt = None,
    trust_checkpoint: TrustOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Show a ViT's structure: heads, head dim, MLP width, params and MACs (batch 1) per block.

    Examples:
      vitcompress inspect timm:deit_small_patch16_224
      vitcompress inspect timm:vit_tiny_patch16_224 --checkpoint model.safetensors --json
      vitcompress inspect out/model      # a compressed artifact
    """
    from vitcompress.models import load_model
    from vitcompress.models.stats import model_stats
    from vitcompress.report import fmt_count

    stats = model_stats(
        load_model(model_ref(model, checkpoint, num_classes, img_size, in_chans, trust_checkpoint))
    )
    if json_out:
        print_json(stats.to_dict())
        return
    c, h, w = stats.input_shape
    table = Table(
        title=f"{stats.label} ({stats.family}, input {c}x{h}x{w}, {stats.num_classes} classes, "
        f"embed dim {stats.embed_dim})"
    )
    for column in ("block", "heads", "head dim", "attn dim", "MLP", "params", "MACs"):
        table.add_column(column, justify="right")
    for b in stats.blocks:
        table.add_row(
            str(b.index),
            str(b.num_heads),
            str(b.head_dim),
            str(b.num_heads * b.head_dim),
            str(b.mlp_hidden),
            fmt_count(b.params),
            fmt_count(b.macs),
        )
    table.add_section()
    table.add_row("total", "", "", "", "", fmt_count(stats.params), fmt_count(stats.macs))
    out_console.print(table)
