"""Data layer: real Fashion-MNIST and digits, image folders, stratified subsets, preprocessing, bad input."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from vitcompress.data import FASHION_MNIST_DIR, DataSpec, load_dataset, load_raw
from vitcompress.errors import DataError
from vitcompress.models.loader import InputSpec

GREY28 = InputSpec(1, 28, 28, (0.5,), (0.5,))
RGB32 = InputSpec(3, 32, 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "bicubic")

needs_fmnist = pytest.mark.skipif(
    not (FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file(),
    reason="dataset-fashion-mnist not installed",
)


@needs_fmnist
def test_fashion_mnist_test_split_is_real_and_stratified():
    full = load_raw(DataSpec(source="fashion-mnist", split="test"), GREY28, 10)
    assert full.images.shape == (10000, 28, 28) and full.images.dtype == np.uint8
    assert np.bincount(full.labels).tolist() == [1000] * 10
    subset = load_dataset(DataSpec(source="fashion-mnist", split="test", limit=200, seed=1), GREY28, 10)
    assert len(subset) == 200 and np.bincount(subset.raw.labels).tolist() == [20] * 10
    x, _ = next(subset.batches(64))
    assert x.shape == (64, 1, 28, 28) and x.dtype == torch.float32
    # normalized with the model's mean/std: uint8 0 -> (0 - 0.5) / 0.5
    assert float(x.min()) == -1.0 and float(x.max()) <= 1.0
    again = load_dataset(DataSpec(source="fashion-mnist", split="test", limit=200, seed=1), GREY28, 10)
    assert np.array_equal(again.raw.labels, subset.raw.labels)
    other = load_dataset(DataSpec(source="fashion-mnist", split="test", limit=200, seed=2), GREY28, 10)
    assert not np.array_equal(other.raw.images, subset.raw.images)


def test_digits_splits_are_disjoint_and_resized_for_the_model(caplog):
    train = load_raw(DataSpec(source="digits"), RGB32, 10)
    test = load_raw(DataSpec(source="digits", split="test"), RGB32, 10)
    assert len(train) + len(test) == 1797 and len(test) == 359

    def as_rows(raw):
        return {r.tobytes() + bytes([int(label)]) for r, label in zip(raw.images, raw.labels, strict=True)}

    assert len(as_rows(train) & as_rows(test)) <= 5  # the data set itself holds a few duplicate images
    with caplog.at_level(logging.INFO, logger="vitcompress.data"):
        data = load_dataset(DataSpec(source="digits", split="test"), RGB32, 10)
    assert "resized from 8x8 to the model's 32x32" in caplog.text
    assert "grey replicated to RGB" in caplog.text
    x, _ = next(data.batches(8))
    assert x.shape == (8, 3, 32, 32)
    assert torch.equal(x[:, 0], x[:, 1])


def test_resize_off_makes_a_size_mismatch_an_error():
    with pytest.raises(DataError, match="data images are 8x8, the model takes 32x32"):
        load_dataset(DataSpec(source="digits", resize=False), RGB32, 10)


def test_label_count_must_match_the_model():
    with pytest.raises(DataError, match="digits train has 10 classes, the model has 5"):
        load_dataset(DataSpec(source="digits"), RGB32, 5)


def _folder(root, sizes=(12, 12)):
    for c, colour in (("cat", (200, 10, 10)), ("dog", (10, 10, 200))):
        (root / c).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", sizes, colour).save(root / c / f"{i}.png")
    return root


def test_image_folder_skips_corrupt_images_with_a_count(tmp_path, caplog):
    root = _folder(tmp_path / "imgs")
    (root / "cat" / "broken.jpg").write_bytes(b"not a jpeg")
    (root / "dog" / "notes.txt").write_text("ignored: not an image suffix")
    with caplog.at_level(logging.WARNING, logger="vitcompress.data"):
        data = load_dataset(DataSpec.parse(str(root)), RGB32.__class__(3, 12, 12, (0.0,) * 3, (1.0,) * 3), 2)
    assert "skipped 1 unreadable image(s), e.g. broken.jpg" in caplog.text
    assert len(data) == 6 and data.raw.classes == ("cat", "dog")
    x, y = next(data.batches(6))
    assert y.tolist() == [0, 0, 0, 1, 1, 1]
    assert x[0, 0, 0, 0].item() == pytest.approx(200 / 255) and x[3, 2, 0, 0].item() == pytest.approx(
        200 / 255
    )


def test_empty_or_missing_folders_fail_clearly(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class sub-directories"):
        load_dataset(DataSpec(source="folder", path=tmp_path / "empty"), RGB32, 2)
    (tmp_path / "noimg" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="holds no readable images"):
        load_dataset(DataSpec(source="folder", path=tmp_path / "noimg"), RGB32, 1)
    with pytest.raises(DataError, match="neither a known data set nor a directory"):
        DataSpec.parse("fashion-mnst")
    with pytest.raises(DataError, match="did you mean 'fashion-mnist'"):
        DataSpec.parse("fashion-mnst")


def test_corrupt_idx_files_are_named(tmp_path):
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(b"garbage")
    with pytest.raises(DataError, match="not a readable gzip IDX file"):
        load_raw(DataSpec(source="fashion-mnist", split="test", path=tmp_path), GREY28, 10)
    with pytest.raises(DataError, match="install the Debian package dataset-fashion-mnist"):
        load_raw(DataSpec(source="fashion-mnist", path=tmp_path / "nowhere"), GREY28, 10)


def test_synthetic_data_is_deterministic_and_fits_the_model():
    a = load_dataset(DataSpec(source="synthetic", num_samples=20, seed=4), RGB32, 10)
    b = load_dataset(DataSpec(source="synthetic", num_samples=20, seed=4), RGB32, 10)
    assert np.array_equal(a.raw.images, b.raw.images) and a.raw.images.shape == (20, 32, 32, 3)
    batches = list(a.batches(8, shuffle=True, seed=1))
    assert [len(y) for _, y in batches] == [8, 8, 4]
    assert sorted(torch.cat([y for _, y in batches]).tolist()) == sorted(a.raw.labels.tolist())


def test_preprocessing_can_be_overridden_and_is_checked():
    spec = DataSpec(source="digits", limit=10, mean=[0.0] * 3, std=[1.0] * 3, interpolation="bilinear")
    data = load_dataset(spec, RGB32, 10)
    x, _ = next(data.batches(10))
    assert float(x.min()) >= 0.0 and data.preprocess.spec.mean == (0.0, 0.0, 0.0)  # bicubic would overshoot
    assert data.preprocess.spec.interpolation == "bilinear"
    with pytest.raises(DataError, match="data mean has 1 values, the model takes 3 channels"):
        load_dataset(DataSpec(source="digits", mean=[0.5]), RGB32, 10)
    with pytest.raises(DataError, match="data std must be positive"):
        load_dataset(DataSpec(source="digits", std=[1.0, 0.0, 1.0]), RGB32, 10)
