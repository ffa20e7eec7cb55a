"""`vitcompress prune`: the real command, its artifact, its JSON, and its one-line errors."""

from __future__ import annotations

import json

import pytest

TINY = ["--num-classes", "10", "--img-size", "32"]


def test_prune_writes_an_artifact_that_inspect_reads(cli, tmp_path):
    out = tmp_path / "pruned"
    result = cli(
        "prune", "timm:vit_tiny_patch16_224", *TINY, "--heads", "0.34", "--mlp", "0.5", "--out", out, "--json"
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    record = next(r for r in data["ledger"] if r["kind"] == "prune")
    assert [b["num_heads"] for b in record["details"]["blocks"]] == [2] * 12
    assert [b["mlp_hidden"] for b in record["details"]["blocks"]] == [384] * 12
    load = data["ledger"][0]
    assert record["params"] < 0.6 * load["params"] and record["macs"] < 0.6 * load["macs"]
    assert (out / "prune" / "model.safetensors").is_file()
    assert (out / "recipe.resolved.yaml").read_text().count("kind: prune") == 1

    shown = cli("inspect", out, "--json")
    assert shown.exit_code == 0, shown.output
    blocks = json.loads(shown.stdout)["blocks"]
    assert [(b["num_heads"], b["head_dim"], b["mlp_hidden"]) for b in blocks] == [(2, 64, 384)] * 12


def test_prune_with_bench_records_size_and_latency_before_and_after(cli, tmp_path):
    out = tmp_path / "b"
    result = cli(
        "prune", "timm:vit_tiny_patch16_224", *TINY, "--target-macs", "0.5", "--bench", "--out", out, "--json"
    )
    assert result.exit_code == 0, result.output
    ledger = {r["kind"]: r for r in json.loads(result.stdout)["ledger"]}
    assert abs(ledger["prune"]["macs"] / ledger["load"]["macs"] - 0.5) <= 0.02
    assert ledger["export"]["size_bytes"] > 0 and ledger["validate"]["latency_p50_ms"] > 0
    assert ledger["validate"]["details"]["speedup_vs_baseline"] > 0
    assert (out / "baseline.onnx").stat().st_size > ledger["export"]["size_bytes"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--heads", "1.0"], "--heads: Input should be less than 1"),
        (["--heads", "0.9"], "heads=0.9 would leave 0 of 3 heads in block 0"),
        (["--mlp", "0.5", "--importance", "taylor"], "--importance taylor needs --data"),
        (["--mlp", "0.5", "--protect", "blocks.99"], "protect: 'blocks.99' matches no module"),
        (
            ["--mlp", "0.5", "--data", "fashion-mnst", "--importance", "taylor"],
            "did you mean 'fashion-mnist'",
        ),
        (["--embed", "0.25"], "shrinks the protected patch embedding"),
        ([], "nothing to prune"),
    ],
)
def test_bad_prune_input_is_one_line_exit_2(cli, tmp_path, args, message):
    result = cli("prune", "timm:vit_tiny_patch16_224", *TINY, "--out", tmp_path / "x", *args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert "Traceback" not in result.output
