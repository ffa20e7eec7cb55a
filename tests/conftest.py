"""Shared fixtures: tiny models of every supported family, so each test runs in seconds."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")
# No pause between the turns of interleaved timings: the suite reads no timing closely enough to need
# it, and it would add ~0.4 s to every validate (tests/test_bench.py checks the pause itself).
os.environ.setdefault("VITCOMPRESS_SETTLE_S", "0")


@pytest.fixture(autouse=True)
def _default_sigchld():
    """Give SIGCHLD back its default after each test. A torch DataLoader with workers (folder data)
    installs a Python SIGCHLD handler and never removes it; later in the same long-lived test
    process, a child killed by a test (test_faults) delivered SIGCHLD to that handler and the kernel
    killed pytest with SIGSEGV (si_code SI_KERNEL: the signal frame could not be set up), seen after
    ~350 tests once OpenVINO/NNCF ran in-process. A CLI run is one short process: not affected."""
    import signal

    yield
    if signal.getsignal(signal.SIGCHLD) not in (signal.SIG_DFL, None):
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)

# Tiny variants: 2 blocks, 32x32 input, 8x8 patches (16 patches + prefix tokens).
TINY_TIMM = {"img_size": 32, "num_classes": 10, "kwargs": {"depth": 2, "patch_size": 8}}
TIMM_FAMILY = ["timm:vit_tiny_patch16_224", "timm:deit_tiny_distilled_patch16_224"]


def tiny_ref(source: str, **overrides):
    from vitcompress.models import ModelRef

    return ModelRef(source, **{**TINY_TIMM, **overrides})


@pytest.fixture(scope="session")
def hf_vit_dir(tmp_path_factory) -> Path:
    return save_hf(tmp_path_factory.mktemp("hf_vit"), "ViTForImageClassification")


@pytest.fixture(scope="session")
def hf_deit_dir(tmp_path_factory) -> Path:
    return save_hf(tmp_path_factory.mktemp("hf_deit"), "DeiTForImageClassificationWithTeacher")


def save_hf(directory: Path, architecture: str, **config: object) -> Path:
    """A random-init Hugging Face ViT/DeiT folder (config.json + safetensors), small by default."""
    import torch
    import transformers

    torch.manual_seed(0)
    config_cls = transformers.ViTConfig if architecture.startswith("ViT") else transformers.DeiTConfig
    settings = {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 128,
        "image_size": 32,
        "patch_size": 8,
        "num_labels": 10,
        **config,
    }
    model = getattr(transformers, architecture)(config_cls(architectures=[architecture], **settings))
    model.save_pretrained(directory, safe_serialization=True)
    return directory


@pytest.fixture
def cli():
    """Run the real command through Typer's CliRunner; returns the Result (exit_code, stdout, stderr)."""
    from typer.testing import CliRunner

    from vitcompress.cli import app

    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)

    return invoke
