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


# --------------------------------------------------------------------------- image folders, read lazily


def _grey_folder(root, per_class=12, classes=10, seed=0):
    """`classes` x `per_class` grey PNGs of mixed sizes (20-60 px); returns the files by class."""
    rng = np.random.default_rng(seed)
    files = {}
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True)
        files[c] = []
        for i in range(per_class):
            h, w = (int(v) for v in rng.integers(20, 61, size=2))
            path = root / f"c{c}" / f"{i:03d}.png"
            Image.fromarray(rng.integers(0, 256, size=(h, w), dtype=np.uint8), "L").save(path)
            files[c].append(str(path))
    return files


class _Counter:
    """Counts PIL's file opens (header reads) and pixel decodes, by file."""

    def __init__(self, monkeypatch):
        from PIL import ImageFile

        self.opened: list[str] = []
        self.decoded = 0
        real_open, real_load = Image.open, ImageFile.ImageFile.load

        def counting_open(fp, *args, **kwargs):
            self.opened.append(str(fp))
            return real_open(fp, *args, **kwargs)

        def counting_load(image):
            if getattr(image, "tile", None):  # pixels still to decode
                self.decoded += 1
            return real_load(image)

        monkeypatch.setattr(Image, "open", counting_open)
        monkeypatch.setattr(ImageFile.ImageFile, "load", counting_load)


def test_folder_limit_applies_before_any_decoding(tmp_path, monkeypatch):
    files = _grey_folder(tmp_path / "imgs")
    count = _Counter(monkeypatch)
    spec = DataSpec(source="folder", path=tmp_path / "imgs", limit=20, seed=3, num_workers=0)
    data = load_dataset(spec, RGB32, 10)
    assert len(data) == 20 and np.bincount(data.labels).tolist() == [2] * 10  # stratified
    chosen = set(data.raw.files)
    # loading read the 20 chosen files' headers, nothing else, and decoded no pixels
    assert sorted(count.opened) == sorted(chosen) and count.decoded == 0
    assert chosen <= {f for fs in files.values() for f in fs}
    x, y = next(data.batches(8))
    assert x.shape == (8, 3, 32, 32) and count.decoded == 8  # one batch: 8 images decoded
    assert sum(len(b[1]) for b in data.batches(8)) == 20 and count.decoded == 28
    assert len(count.opened) == 20 + 28 and set(count.opened) == chosen
    # random access (what distillation does) decodes only the indices asked for
    x, y = data.take(np.array([5, 17]))
    assert x.shape == (2, 3, 32, 32) and count.decoded == 30 and y.tolist() == data.labels[[5, 17]].tolist()
    # the same limit and seed choose the same files; another seed others
    again = load_dataset(spec, RGB32, 10)
    other = load_dataset(spec.model_copy(update={"seed": 4}), RGB32, 10)
    assert again.raw.files == data.raw.files and other.raw.files != data.raw.files


def test_folder_images_of_any_size_go_through_timms_transform(tmp_path):
    """Each image is resized and centre-cropped on its own (not to the first image's size), exactly
    as timm's eval transform does it, then normalized with the model's mean/std."""
    from timm.data import create_transform

    _grey_folder(tmp_path / "imgs", per_class=3, classes=2)
    spec = InputSpec(3, 32, 32, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bicubic", 0.875, "center")
    data = load_dataset(DataSpec(source="folder", path=tmp_path / "imgs", num_workers=0), spec, 2)
    assert len({tuple(s) for s in data.raw.sizes.tolist()}) == 6  # six sizes
    timm_eval = create_transform(
        input_size=(3, 32, 32), interpolation="bicubic", crop_pct=0.875, crop_mode="center",
        mean=spec.mean, std=spec.std,
    )  # fmt: skip
    x, _ = next(data.batches(6))
    for i, file in enumerate(data.raw.files):
        with Image.open(file) as image:
            expected = timm_eval(image.convert("RGB"))
        assert torch.allclose(x[i], expected, atol=1e-5), file
    applied = data.preprocessing()
    assert (
        applied["crop_pct"] == 0.875 and applied["mean"] == spec.mean and applied["source_modes"] == {"L": 6}
    )
    assert applied["resize"].startswith("per image, bicubic: resized to 32x32 / crop_pct 0.875 (center)")


def test_folder_batches_with_workers_match_inline_and_name_bad_files(tmp_path):
    _grey_folder(tmp_path / "imgs", per_class=10, classes=3)
    spec = DataSpec(source="folder", path=tmp_path / "imgs")
    inline = load_dataset(spec.model_copy(update={"num_workers": 0}), RGB32, 3)
    workers = load_dataset(spec.model_copy(update={"num_workers": 2}), RGB32, 3)
    a = list(inline.batches(8, shuffle=True, seed=5))
    b = list(workers.batches(8, shuffle=True, seed=5))
    assert [len(y) for _, y in b] == [8, 8, 8, 6]
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b, strict=True))
    assert len(list(workers.batches(8, limit_batches=2))) == 2
    # a file whose header reads but whose pixels do not: named when its batch is decoded
    bad = tmp_path / "imgs" / "c1" / "zz-truncated.png"
    Image.new("L", (40, 40), 7).save(bad)
    bad.write_bytes(bad.read_bytes()[:60])
    broken = load_dataset(spec.model_copy(update={"num_workers": 2}), RGB32, 3)
    with pytest.raises(DataError, match=r"1 image\(s\) could not be decoded: .*zz-truncated.png"):
        list(broken.batches(8))


def test_folder_decoding_runs_in_threads_and_never_forks(tmp_path, monkeypatch):
    """A forked DataLoader worker crashed the suite's process (SIGSEGV) once OpenVINO had run in it;
    decoding now runs in this process's threads, so nothing may fork or start a process."""
    import multiprocessing
    import os
    import threading

    from vitcompress.data.folder import FolderItems

    def refuse(*_a, **_k):
        raise AssertionError("folder decoding started a process")

    monkeypatch.setattr(os, "fork", refuse)
    monkeypatch.setattr(multiprocessing.Process, "start", refuse)
    seen: set[str] = set()
    getitem = FolderItems.__getitem__

    def recording(self, index):
        seen.add(threading.current_thread().name)
        return getitem(self, index)

    monkeypatch.setattr(FolderItems, "__getitem__", recording)
    _grey_folder(tmp_path / "imgs", per_class=10, classes=3)
    spec = DataSpec(source="folder", path=tmp_path / "imgs", num_workers=2)
    batches = list(load_dataset(spec, RGB32, 3).batches(4))
    assert [len(y) for _, y in batches] == [4] * 7 + [2]
    assert seen and all(name.startswith("vitcompress-decode") for name in seen) and len(seen) <= 2
    seen.clear()
    list(load_dataset(spec.model_copy(update={"num_workers": 0}), RGB32, 3).batches(4))
    assert seen == {threading.current_thread().name}  # 0: inline


def test_folder_subsets_and_holdout_stay_lazy(tmp_path):
    from vitcompress.data import holdout

    _grey_folder(tmp_path / "imgs", per_class=6, classes=4)
    data = load_dataset(DataSpec(source="folder", path=tmp_path / "imgs", num_workers=0), RGB32, 4)
    rest, held = holdout(data, 8, seed=0)
    assert len(rest) == 16 and len(held) == 8 and np.bincount(held.labels).tolist() == [2] * 4
    assert set(rest.indices.tolist()).isdisjoint(held.indices.tolist())
    assert held.raw.files == tuple(data.raw.files[i] for i in held.indices)
    x, y = held.take(np.arange(8))
    full, full_y = data.take(held.indices)
    assert torch.equal(x, full) and torch.equal(y, full_y) and held.lazy


def test_modes_are_reported_as_they_are(tmp_path, caplog):
    """A folder of mode-L PNGs is grey, replicated for an RGB model; not '3 channels, RGB converted'."""
    grey = tmp_path / "grey"
    _grey_folder(grey, per_class=2, classes=2)
    with caplog.at_level(logging.INFO, logger="vitcompress.data"):
        load_dataset(DataSpec(source="folder", path=grey), RGB32, 2)
    assert "modes L (8-bit grey) x4: grey replicated to RGB" in caplog.text
    assert "RGB converted" not in caplog.text and "3 channel(s)" not in caplog.text
    mixed = tmp_path / "mixed"
    for c in ("a", "b"):
        (mixed / c).mkdir(parents=True)
        Image.new("RGB", (16, 16), (255, 0, 0)).save(mixed / c / "rgb.png")
        Image.new("RGBA", (16, 16), (0, 0, 255, 10)).save(mixed / c / "rgba.png")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="vitcompress.data"):
        data = load_dataset(DataSpec(source="folder", path=mixed, num_workers=0), GREY28, 2)
    assert "RGB x2: RGB converted to luminance (ITU-R 601)" in caplog.text
    assert "RGBA (RGB + alpha) x2: alpha dropped, RGB converted to luminance" in caplog.text
    x, _ = data.take(np.array([0, 1]))  # rgb.png (pure red), rgba.png (pure blue): luminance
    pixels = (x[:, 0, 14, 14] * 0.5 + 0.5) * 255
    assert pixels.tolist() == pytest.approx([76, 29], abs=1)  # ITU-R 601: 0.299 R, 0.114 B
    # 16-bit grey is brought to 8 bits by its range, not clipped at 255 (PIL's own conversion)
    deep = tmp_path / "deep" / "x"
    deep.mkdir(parents=True)
    Image.fromarray(np.full((28, 28), 32896, dtype=np.uint16)).save(deep / "a.png")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="vitcompress.data"):
        data = load_dataset(DataSpec(source="folder", path=deep.parent, num_workers=0), GREY28, 1)
    assert "scaled from 16 to 8 bits" in caplog.text
    x, _ = data.take(np.array([0]))
    assert float(x.mean() * 0.5 + 0.5) * 255 == pytest.approx(128, abs=0.5)


def test_split_names_are_said_correctly(tmp_path, caplog):
    assert DataSpec(source="digits", split="test").describe() == "digits (test)"
    assert DataSpec(source="digits", split="test", limit=5).describe() == "digits (test, 5 samples)"
    folder = DataSpec(source="folder", path=tmp_path)
    assert folder.describe() == f"folder {tmp_path}" and "train" not in folder.describe()
    assert DataSpec(source="synthetic", num_samples=7).describe() == "synthetic (7 samples)"
    # a folder whose sub-directories are splits: they would be taken as classes, said so
    for split in ("train", "test"):
        (tmp_path / split / "cat").mkdir(parents=True)
        Image.new("RGB", (12, 12)).save(tmp_path / split / "cat" / "a.png")
    with caplog.at_level(logging.WARNING, logger="vitcompress.data"):
        load_dataset(folder, RGB32, 2)
    assert "sub-directories test, train are taken as classes" in caplog.text
    assert f"point the data path at one of them (e.g. {tmp_path / 'test'})" in caplog.text


def test_pixel_range_and_crop_are_overridable_per_source():
    raw255 = load_dataset(
        DataSpec(source="digits", limit=10, input_range="0-255", mean=[0.0] * 3, std=[1.0] * 3), RGB32, 10
    )
    x, _ = next(raw255.batches(10))
    assert float(x.max()) > 200 and raw255.preprocess.spec.input_range == "0-255"
    with pytest.raises(ValueError, match="input_range"):
        DataSpec(source="digits", input_range="0-2")
    with pytest.raises(ValueError, match="crop_pct"):
        DataSpec(source="digits", crop_pct=1.5)
    from vitcompress.data import resolve_input

    spec = resolve_input(RGB32, DataSpec(source="digits", crop_pct=0.5, crop_mode="squash"))
    assert (spec.crop_pct, spec.crop_mode, spec.mean) == (0.5, "squash", RGB32.mean)


def test_models_declare_their_crop_and_hf_processors_map_to_it(tmp_path, hf_vit_dir):
    import json
    import shutil

    from tests.conftest import tiny_ref
    from vitcompress.models import ModelRef, load_model
    from vitcompress.models.loader import _hf_preprocessing

    vit = load_model(tiny_ref("timm:vit_tiny_patch16_224")).input
    assert (vit.crop_pct, vit.crop_mode, vit.input_range) == (0.9, "center", "0-1")  # timm's data config
    assert InputSpec.from_dict({**vit.to_dict(), "a_newer_field": 1}) == vit
    old = {k: v for k, v in vit.to_dict().items() if k not in ("crop_pct", "crop_mode", "input_range")}
    assert InputSpec.from_dict(old).crop_pct == 1.0  # files from before: resized whole, as they were
    deit = {
        "do_resize": True, "size": {"height": 256, "width": 256}, "resample": 3,
        "do_center_crop": True, "crop_size": {"height": 224, "width": 224},
        "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225],
    }  # fmt: skip
    assert _hf_preprocessing(deit, 3) == {
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
        "interpolation": "bicubic",
        "crop_pct": 224 / 256,
        "crop_mode": "squash",
        "input_range": "0-1",
    }
    raw = _hf_preprocessing({"do_rescale": False, "do_normalize": False, "size": {"shortest_edge": 32}}, 3)
    assert (raw["input_range"], raw["mean"], raw["std"], raw["crop_mode"]) == (
        "0-255",
        (0.0,) * 3,
        (1.0,) * 3,
        "center",
    )
    folder = tmp_path / "hf"
    shutil.copytree(hf_vit_dir, folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(deit))
    assert load_model(ModelRef(f"hf:{folder}")).input.crop_pct == pytest.approx(0.875)


def test_a_missing_or_extra_class_folder_is_named_with_the_fix(tmp_path):
    from PIL import Image

    from vitcompress.data import DataSpec, load_dataset
    from vitcompress.errors import DataError
    from vitcompress.models import ModelRef, load_model

    loaded = load_model(
        ModelRef(
            "timm:vit_tiny_patch16_224", num_classes=3, img_size=32, kwargs={"depth": 1, "patch_size": 8}
        )
    )
    for name in ("ant", "bee"):
        (tmp_path / "two" / name).mkdir(parents=True)
        Image.new("L", (8, 8)).save(tmp_path / "two" / name / "a.png")
    with pytest.raises(DataError, match="has 2 classes, the model has 3") as missing:
        load_dataset(DataSpec.parse(str(tmp_path / "two")), loaded.input, 3)
    assert "add an empty folder for each class" in (missing.value.hint or "")
    assert "ant, bee" in (missing.value.hint or "")

    (tmp_path / "two" / "cat").mkdir()  # the fix: an empty folder keeps the labels in line
    assert len(load_dataset(DataSpec.parse(str(tmp_path / "two")), loaded.input, 3)) == 2
    (tmp_path / "two" / "notes").mkdir()
    with pytest.raises(DataError, match=r"has 4 classes \(cat, notes hold\(s\) no images"):
        load_dataset(DataSpec.parse(str(tmp_path / "two")), loaded.input, 3)
