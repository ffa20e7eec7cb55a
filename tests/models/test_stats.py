from __future__ import annotations

from tests.conftest import tiny_ref
from vitcompress.models import load_model
from vitcompress.models.stats import model_stats


def test_macs_match_the_analytic_vit_count():
    loaded = load_model(tiny_ref("timm:vit_tiny_patch16_224"))
    stats = model_stats(loaded)
    d, tokens, hidden, patches = 192, 17, 768, 16
    per_block = tokens * (d * 3 * d + d * d + 2 * d * hidden) + 2 * tokens * tokens * d
    patch_embed = patches * 3 * 8 * 8 * d
    head = 10 * d
    assert [b.macs for b in stats.blocks] == [per_block, per_block]
    assert stats.macs == 2 * per_block + patch_embed + head
    assert stats.params == sum(p.numel() for p in loaded.model.parameters())
    assert stats.blocks[0].params == 4 * d + (3 * d * d + 3 * d) + (d * d + d) + (2 * d * hidden + hidden + d)
    assert (stats.blocks[0].num_heads, stats.blocks[0].head_dim, stats.blocks[0].mlp_hidden) == (3, 64, 768)
