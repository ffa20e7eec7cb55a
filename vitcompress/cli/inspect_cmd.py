from __future__ import annotations

from rich.table import Table

from vitcompress.cli.common import (
    JsonOpt,
    ModelArg,
    ModelFlags,
    out_console,
    print_json,
)
from vitcompress.cli.options import GENERATED, model_options


@model_options
def inspect(
    model: ModelArg,
    json_out: JsonOpt = False,
    model_flags: ModelFlags = GENERATED,
) -> None:
    """Show a ViT's structure: heads, head dim, MLP width, params and MACs (batch 1) per block,
    and its architecture settings with where each came from (checkpoint tensor, flag, timm default).
    For a sparsified artifact, each sparse layer's pattern and sparsity, and whether its zeros still
    hold the pattern.

    A timm checkpoint's tensors set the patch size, width, depth, MLP ratio, biases, tokens, input
    size and classes; the head count comes from --num-heads, the checkpoint's training args, or the
    named model when the width matches (else a warned guess of 64 channels per head).

    Examples:
      vitcompress inspect timm:deit_small_patch16_224
      vitcompress inspect timm:vit_tiny_patch16_224 --checkpoint model.safetensors --json
      vitcompress inspect timm:vit_base_patch16_224 --checkpoint small.safetensors --num-heads 4
      vitcompress inspect out/model      # a compressed artifact

    An artifact with a token-reduction schedule (`vitcompress tokens`) also shows the tokens each
    block's attention and MLP see (197->184: the block merged or pruned 13 tokens).
    """
    from dataclasses import asdict

    from vitcompress.models import load_model
    from vitcompress.models.stats import model_stats
    from vitcompress.passes.sparsify.select import sparse_layers
    from vitcompress.report import fmt_count

    loaded = load_model(model_flags.ref(model))
    stats = model_stats(loaded)
    sparse = sparse_layers(loaded.model)
    if json_out:
        print_json(
            {
                **stats.to_dict(),
                "sparse_layers": [asdict(layer) for layer in sparse],
                "settings": [s.to_dict() for s in loaded.settings],
            }
        )
        return
    c, h, w = stats.input_shape
    table = Table(
        title=f"{stats.label} ({stats.family}, input {c}x{h}x{w}, {stats.num_classes} classes, "
        f"embed dim {stats.embed_dim})"
    )
    reduced = any(b.mlp_tokens != b.tokens for b in stats.blocks)
    columns = ["block", "heads", "head dim", "attn dim", "MLP", "params", "MACs"]
    if reduced:  # a token-reduction schedule: tokens into attention -> into the MLP
        columns.insert(1, "tokens")
    for column in columns:
        table.add_column(column, justify="right")
    for b in stats.blocks:
        tokens = (
            [f"{b.tokens}->{b.mlp_tokens}" if b.tokens != b.mlp_tokens else str(b.tokens)] if reduced else []
        )
        table.add_row(
            str(b.index),
            *tokens,
            str(b.num_heads),
            str(b.head_dim),
            str(b.num_heads * b.head_dim),
            str(b.mlp_hidden),
            fmt_count(b.params),
            fmt_count(b.macs),
        )
    table.add_section()
    table.add_row("total", *[""] * (len(columns) - 3), fmt_count(stats.params), fmt_count(stats.macs))
    out_console.print(table)
    if sparse:
        zeros = sum(r.sparsity * r.shape[0] * r.shape[1] for r in sparse)
        weights = sum(r.shape[0] * r.shape[1] for r in sparse)
        sparse_table = Table(
            title=f"sparse layers: {len(sparse)}, {zeros / weights:.1%} of their weights zero"
        )
        for column in ("layer", "shape", "pattern", "sparsity", "holds"):
            sparse_table.add_column(column, justify="left" if column in ("layer", "pattern") else "right")
        for layer in sparse:
            sparse_table.add_row(
                layer.name,
                "x".join(map(str, layer.shape)),
                layer.pattern,
                f"{layer.sparsity:.1%}",
                "yes" if layer.holds else "NO",
            )
        out_console.print(sparse_table)
    if loaded.settings:
        settings = Table(title="architecture: what was inferred and from where")
        for column in ("setting", "value", "source"):
            settings.add_column(column, justify="left", overflow="fold")
        for row in loaded.settings:
            value = "x".join(map(str, row.value)) if isinstance(row.value, tuple) else str(row.value)
            settings.add_row(row.name, value, row.source)
        out_console.print(settings)
