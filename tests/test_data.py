"""Tests of service.engine.data: CIFAR-10 loading and caching, normalisation and batch sources.

Everything runs on tiny images written into tmp_path except ``test_real_cifar10``, which needs the
real copy named by GRADDIAG_DATA_DIR (skipped when unset, failed when CI is set).
"""

from __future__ import annotations

import pickle
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets.cifar
from PIL import Image

from graddiag.models.spec import Spec
from graddiag.service.engine import data as data_mod
from graddiag.service.engine.data import (
    CIFAR10_CLASSES,
    CIFAR10_MEAN,
    CIFAR10_STD,
    DatasetCache,
    DataUnavailableError,
    ImageSet,
    load_cifar10,
    make_source,
)

CPU = torch.device("cpu")


# --------------------------------------------------------------------------------------------
# Helpers


def _class_colour(label: int, channel: int) -> int:
    # Flat, well-separated colours survive JPEG compression within a few levels.
    return (40 * label + 70 * channel + 10) % 250


def _write_image_folder(root: Path, classes: list[str], per_class: dict[str, int], ext: str = ".png") -> None:
    for split, n in per_class.items():
        for label, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                rgb = np.zeros((32, 32, 3), dtype=np.uint8)
                for c in range(3):
                    rgb[..., c] = _class_colour(label, c)
                Image.fromarray(rgb).save(folder / f"{i:04d}{ext}")


def _expected_pixels(label: int) -> torch.Tensor:
    return torch.tensor([_class_colour(label, c) for c in range(3)], dtype=torch.uint8)


def _write_batches_py(root: Path, per_batch: int = 4) -> tuple[np.ndarray, list[int]]:
    """A tiny cifar-10-batches-py in torchvision's pickle format; returns the train data (N, 3072)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    all_data, all_labels = [], []
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = [int(x) for x in rng.integers(0, 10, size=per_batch)]
        with open(folder / name, "wb") as f:
            pickle.dump({"batch_label": name, "data": data, "labels": labels}, f)
        if name != "test_batch":
            all_data.append(data)
            all_labels.extend(labels)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": list(CIFAR10_CLASSES), "num_vis": 3072}, f)
    return np.concatenate(all_data), all_labels


@pytest.fixture
def skip_md5(monkeypatch):
    """Let torchvision accept the fake batches: their md5 sums cannot match the official ones.

    Only the test bypasses the check; data.py always goes through torchvision's own integrity
    checks (see test_batches_py_md5_check_is_kept).
    """
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)


@pytest.fixture
def folder_data(tmp_path):
    root = tmp_path / "data"
    _write_image_folder(root, ["cat", "dog", "zebra"], {"train": 5, "test": 2})
    return root


def _tiny_sets(n_train: int = 64, n_test: int = 40) -> tuple[ImageSet, ImageSet]:
    gen = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (n_train, 3, 32, 32), dtype=torch.uint8, generator=gen)
    images[:, 0, 0, 0] = torch.arange(n_train, dtype=torch.uint8)  # lets a test trace a batch row
    train = ImageSet(images, torch.randint(0, 10, (n_train,), generator=gen))
    test = ImageSet(
        torch.randint(0, 256, (n_test, 3, 32, 32), dtype=torch.uint8, generator=gen),
        torch.arange(n_test, dtype=torch.int64) % 10,
    )
    return train, test


# --------------------------------------------------------------------------------------------
# Class-folder layout


def test_image_folder_loads_whatever_classes_exist(folder_data, tmp_path):
    train, test = load_cifar10(folder_data, tmp_path / "cache")
    assert train.images.shape == (15, 3, 32, 32) and train.images.dtype == torch.uint8
    assert test.images.shape == (6, 3, 32, 32)
    assert train.labels.dtype == torch.int64
    # Alphabetical folder order gives the labels: cat=0, dog=1, zebra=2.
    assert train.labels.tolist() == [0] * 5 + [1] * 5 + [2] * 5
    for images, labels in ((train.images, train.labels), (test.images, test.labels)):
        for img, label in zip(images, labels, strict=True):
            assert torch.equal(img[:, 0, 0], _expected_pixels(int(label)))
            assert torch.equal(img, img[:, :1, :1].expand(3, 32, 32))  # PNG is lossless


def test_image_folder_jpeg_grayscale_and_pil_only_formats(tmp_path):
    root = tmp_path / "data"
    _write_image_folder(root, ["a", "b"], {"train": 2, "test": 1}, ext=".jpg")
    # A grayscale JPEG must come out as 3 channels; BMP is only decodable through the PIL fallback.
    Image.fromarray(np.full((32, 32), 77, dtype=np.uint8)).save(root / "train" / "a" / "gray.jpg")
    Image.fromarray(np.full((32, 32, 3), 200, dtype=np.uint8)).save(root / "train" / "b" / "x.bmp")
    train, test = load_cifar10(root, tmp_path / "cache")
    assert train.images.shape == (6, 3, 32, 32) and test.images.shape == (2, 3, 32, 32)
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    for img, label in zip(train.images[:2], train.labels[:2], strict=True):
        diff = (img.int() - _expected_pixels(int(label)).int().view(3, 1, 1)).abs()
        assert int(diff.max()) <= 4  # JPEG tolerance
    gray = train.images[2]  # sorted file order: 0000.jpg, 0001.jpg, gray.jpg
    assert gray.shape == (3, 32, 32) and (gray.int() - 77).abs().max() <= 2
    assert torch.equal(train.images[5], torch.full((3, 32, 32), 200, dtype=torch.uint8))


def test_image_folder_rejects_wrong_size_and_mismatched_classes(tmp_path):
    root = tmp_path / "data"
    _write_image_folder(root, ["a", "b"], {"train": 1, "test": 1})
    Image.fromarray(np.zeros((40, 32, 3), dtype=np.uint8)).save(root / "train" / "a" / "big.png")
    with pytest.raises(DataUnavailableError, match=r"big\.png is 32x40 pixels"):
        load_cifar10(root, tmp_path / "cache")

    root2 = tmp_path / "data2"
    _write_image_folder(root2, ["a", "b"], {"train": 1})
    _write_image_folder(root2, ["a", "c"], {"test": 1})
    with pytest.raises(DataUnavailableError, match="different class folders"):
        load_cifar10(root2, tmp_path / "cache")


def test_corrupt_image_is_named(tmp_path):
    root = tmp_path / "data"
    _write_image_folder(root, ["a"], {"train": 1, "test": 1})
    (root / "train" / "a" / "broken.png").write_bytes(b"not an image")
    with pytest.raises(DataUnavailableError, match=r"cannot decode image .*broken\.png"):
        load_cifar10(root, tmp_path / "cache")


# --------------------------------------------------------------------------------------------
# The cache


def _count_decodes(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = data_mod._decode_image_folder

    def counting(root):
        calls.append(1)
        return real(root)

    monkeypatch.setattr(data_mod, "_decode_image_folder", counting)
    return calls


def test_second_load_reads_the_cache_without_decoding(folder_data, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    train1, test1 = load_cifar10(folder_data, cache)
    files = list(cache.glob("*.pt"))
    assert len(files) == 1 and files[0].name.startswith("cifar10-image-folder-")

    def fail(*args, **kwargs):
        raise AssertionError("decoded although a valid cache exists")

    monkeypatch.setattr(data_mod, "_decode_image_folder", fail)
    monkeypatch.setattr(data_mod, "_decode_files", fail)
    train2, test2 = load_cifar10(str(folder_data), str(cache))  # str paths are accepted too
    assert torch.equal(train1.images, train2.images) and torch.equal(train1.labels, train2.labels)
    assert torch.equal(test1.images, test2.images) and torch.equal(test1.labels, test2.labels)


def test_cache_is_rebuilt_when_the_source_changes(folder_data, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    calls = _count_decodes(monkeypatch)
    load_cifar10(folder_data, cache)
    load_cifar10(folder_data, cache)
    assert len(calls) == 1
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(folder_data / "train" / "dog" / "new.png")
    train, _ = load_cifar10(folder_data, cache)
    assert len(calls) == 2 and len(train) == 16


def test_corrupt_cache_file_is_rebuilt(folder_data, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    expected, _ = load_cifar10(folder_data, cache)
    # The loaded tensors map the cache file, which this test damages in place: keep a copy of them.
    expected = ImageSet(expected.images.clone(), expected.labels.clone())
    (path,) = cache.glob("*.pt")
    calls = _count_decodes(monkeypatch)
    for damage in (b"garbage", path.read_bytes()[: path.stat().st_size // 2]):
        path.write_bytes(damage)
        train, _ = load_cifar10(folder_data, cache)
        assert torch.equal(train.images, expected.images)
        # The rebuilt file is complete again and readable on its own.
        payload = torch.load(path, weights_only=True)
        assert torch.equal(payload["train_images"], expected.images)
    assert len(calls) == 2


def test_cache_of_other_data_is_not_trusted(folder_data, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    load_cifar10(folder_data, cache)
    (path,) = cache.glob("*.pt")
    payload = torch.load(path, weights_only=True)
    payload["key"] = "something else"
    torch.save(payload, path)
    calls = _count_decodes(monkeypatch)
    load_cifar10(folder_data, cache)
    assert len(calls) == 1


def test_cache_write_is_atomic(folder_data, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    real_save = torch.save

    def crash_midway(obj, f, *args, **kwargs):
        f.write(b"half a cache file")
        raise KeyboardInterrupt  # like being killed mid-write: BaseException, not Exception

    monkeypatch.setattr(torch, "save", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        load_cifar10(folder_data, cache)
    assert list(cache.iterdir()) == []  # neither a partial cache nor a stray temp file

    def disk_full(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    train, _ = load_cifar10(folder_data, cache)  # a failed cache write only costs a warning
    assert len(train) == 15 and list(cache.iterdir()) == []

    monkeypatch.setattr(torch, "save", real_save)
    load_cifar10(folder_data, cache)
    assert [p.suffix for p in cache.iterdir()] == [".pt"]


def test_cache_dir_is_separate_from_a_read_only_data_dir(folder_data, tmp_path):
    for path in [folder_data, *folder_data.rglob("*")]:
        path.chmod(0o555 if path.is_dir() else 0o444)
    try:
        train, _ = load_cifar10(folder_data, tmp_path / "new" / "cache")
        assert len(train) == 15 and len(list((tmp_path / "new" / "cache").glob("*.pt"))) == 1
    finally:
        for path in [folder_data, *folder_data.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)


def test_dataset_cache_loads_once(folder_data, tmp_path, monkeypatch):
    calls: list[object] = []
    real = data_mod.load_cifar10

    def counting(data_dir, cache_dir, **kwargs):
        calls.append(data_dir)
        return real(data_dir, cache_dir, **kwargs)

    monkeypatch.setattr(data_mod, "load_cifar10", counting)
    cache = DatasetCache(folder_data, tmp_path / "cache")
    first = cache.get()
    assert cache.get() is first and len(calls) == 1

    missing = DatasetCache(None, tmp_path / "cache")
    for _ in range(2):  # a failure is not remembered: each get() tries again
        with pytest.raises(DataUnavailableError):
            missing.get()


# --------------------------------------------------------------------------------------------
# Official python-batches layout


@pytest.mark.parametrize("point_at", ["parent", "batches-folder"])
def test_batches_py_layout(tmp_path, skip_md5, point_at):
    train_data, train_labels = _write_batches_py(tmp_path / "data")
    data_dir = tmp_path / "data" if point_at == "parent" else tmp_path / "data" / "cifar-10-batches-py"
    train, test = load_cifar10(data_dir, tmp_path / "cache")
    assert train.images.shape == (20, 3, 32, 32) and test.images.shape == (4, 3, 32, 32)
    # The pickles store each image as 1024 red, then green, then blue values (row-major).
    assert torch.equal(train.images, torch.from_numpy(train_data).view(20, 3, 32, 32))
    assert train.labels.tolist() == train_labels
    assert next((tmp_path / "cache").glob("cifar10-batches-py-*.pt"))


def test_batches_py_both_spellings_share_one_cache(tmp_path, skip_md5, monkeypatch):
    _write_batches_py(tmp_path / "data")
    load_cifar10(tmp_path / "data", tmp_path / "cache")

    def fail(*args, **kwargs):
        raise AssertionError("decoded again")

    monkeypatch.setattr(data_mod, "_decode_batches_py", fail)
    load_cifar10(tmp_path / "data" / "cifar-10-batches-py", tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 1


def test_batches_py_md5_check_is_kept(tmp_path):
    # Without the test's bypass torchvision rejects the fake files, and the error says so.
    _write_batches_py(tmp_path / "data")
    with pytest.raises(DataUnavailableError, match="integrity check") as info:
        load_cifar10(tmp_path / "data", tmp_path / "cache")
    assert "GRADDIAG_DATA_DIR" in str(info.value)


def test_download_failure_is_reported(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", offline)
    with pytest.raises(DataUnavailableError, match=r"Downloading CIFAR-10 failed.*unreachable"):
        load_cifar10(tmp_path / "empty", tmp_path / "cache", download=True)


def test_download_goes_into_data_dir(tmp_path, monkeypatch, skip_md5):
    roots: list[str] = []

    def fake_download(url, download_root, **kwargs):
        roots.append(download_root)
        _write_batches_py(Path(download_root))

    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", fake_download)
    # check_integrity is bypassed, so torchvision's "already there?" test must see missing files.
    monkeypatch.setattr(torchvision.datasets.cifar.CIFAR10, "_check_integrity", _files_exist)
    train, _ = load_cifar10(tmp_path / "dl", tmp_path / "cache", download=True)
    assert roots == [str(tmp_path / "dl")] and len(train) == 20
    # The cache is keyed by the downloaded files, so the next load (without download) reuses it.
    monkeypatch.setattr(data_mod, "_decode_batches_py", _raise_decoded)
    load_cifar10(tmp_path / "dl", tmp_path / "cache")


def _files_exist(self) -> bool:
    return (Path(self.root) / "cifar-10-batches-py" / "test_batch").is_file()


def _raise_decoded(*args, **kwargs):
    raise AssertionError("decoded again")


# --------------------------------------------------------------------------------------------
# Missing data


def test_missing_data_dir_message(tmp_path):
    with pytest.raises(DataUnavailableError) as info:
        load_cifar10(None, tmp_path / "cache")
    message = str(info.value)
    for needle in ("No CIFAR-10 data directory", "GRADDIAG_DATA_DIR", "--data-dir", "cifar-10-batches-py"):
        assert needle in message
    assert "train/<class>/*.jpg" in message and "test/<class>/*.jpg" in message
    assert isinstance(info.value, RuntimeError)


@pytest.mark.parametrize("make", ["empty", "absent", "only-train"])
def test_unrecognised_data_dir_message(tmp_path, make):
    data_dir = tmp_path / "somewhere"
    if make != "absent":
        data_dir.mkdir()
    if make == "only-train":
        (data_dir / "train" / "cat").mkdir(parents=True)
    with pytest.raises(DataUnavailableError) as info:
        load_cifar10(data_dir, tmp_path / "cache")
    message = str(info.value)
    assert f"not found in {data_dir}" in message
    assert f"{data_dir}/cifar-10-batches-py" in message and f"{data_dir}/train/<class>/*.jpg" in message
    assert "GRADDIAG_DATA_DIR" in message and "--data-dir" in message
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())


def test_image_set_validates_its_tensors():
    with pytest.raises(ValueError, match="uint8"):
        ImageSet(torch.zeros(2, 3, 32, 32), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="labels"):
        ImageSet(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), torch.zeros(3, dtype=torch.int64))


# --------------------------------------------------------------------------------------------
# CIFAR-10 batch source


def test_normalisation_is_the_cifar10_affine_map():
    # One test image holding every uint8 value in every channel: the held-out sample is that image.
    image = (torch.arange(3 * 32 * 32) % 256).to(torch.uint8).view(1, 3, 32, 32)
    test = ImageSet(image, torch.zeros(1, dtype=torch.int64))
    source = make_source(Spec(), data=(_tiny_sets()[0], test), device=CPU, eval_samples=1)
    x, y = source.heldout()
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    assert x.dtype == torch.float32 and y.tolist() == [0]
    assert torch.allclose(x, (image.float() / 255 - mean) / std, atol=1e-6)


def test_normalised_batches_have_zero_mean_unit_std():
    # uint8 pixels uniform on mean ± sqrt(3)·std (in 0..255 units) have exactly the CIFAR-10
    # channel statistics, so normalised batches must come out with mean 0 and std 1.
    gen = torch.Generator().manual_seed(0)
    n = 2048
    channels = []
    for m, s in zip(CIFAR10_MEAN, CIFAR10_STD, strict=True):
        lo, hi = 255 * (m - 3**0.5 * s), 255 * (m + 3**0.5 * s)
        channels.append(torch.empty(n, 1, 32, 32).uniform_(lo, hi, generator=gen))
    images = torch.cat(channels, dim=1).round().clamp(0, 255).to(torch.uint8)
    train = ImageSet(images, torch.zeros(n, dtype=torch.int64))
    source = make_source(Spec(batch_size=1024), data=(train, train), device=CPU, eval_samples=10)
    x, y = source.batch(0)
    assert x.dtype == torch.float32 and x.shape == (1024, 3, 32, 32) and y.dtype == torch.int64
    per_channel = x.transpose(0, 1).reshape(3, -1)
    assert torch.allclose(per_channel.mean(dim=1), torch.zeros(3), atol=0.02)
    assert torch.allclose(per_channel.std(dim=1), torch.ones(3), atol=0.02)


def test_cifar_batches_are_deterministic_by_seed_and_step():
    data = _tiny_sets()
    a = make_source(Spec(seed=1, batch_size=16), data=data, device=CPU, eval_samples=10)
    b = make_source(Spec(seed=1, batch_size=16), data=data, device=CPU, eval_samples=10)
    c = make_source(Spec(seed=2, batch_size=16), data=data, device=CPU, eval_samples=10)
    # Random access: the batch of a step does not depend on which steps were drawn before.
    later_first = [b.batch(s) for s in (3, 2, 1, 0)][::-1]
    for step in range(4):
        xa, ya = a.batch(step)
        assert torch.equal(xa, later_first[step][0]) and torch.equal(ya, later_first[step][1])
        assert not torch.equal(xa, c.batch(step)[0])
    assert not torch.equal(a.batch(0)[0], a.batch(1)[0])
    # Labels travel with their images: _tiny_sets stores each train image's index in its first pixel.
    xa, ya = a.batch(5)
    first_pixel = (xa[:, 0, 0, 0] * CIFAR10_STD[0] + CIFAR10_MEAN[0]) * 255
    idx = first_pixel.round().long()
    assert torch.equal(data[0].labels[idx], ya)


def test_cifar_batches_leave_the_global_rng_alone():
    source = make_source(Spec(), data=_tiny_sets(), device=CPU, eval_samples=10)
    state = torch.get_rng_state()
    source.batch(0)
    source.heldout()
    assert torch.equal(state, torch.get_rng_state())


def test_cifar_heldout_is_fixed_across_seeds_and_mixes_classes():
    data = _tiny_sets(n_test=40)
    a = make_source(Spec(seed=1), data=data, device=CPU, eval_samples=20)
    b = make_source(Spec(seed=99), data=data, device=CPU, eval_samples=20)
    (xa, ya), (xb, yb) = a.heldout(), b.heldout()
    assert xa.shape == (20, 3, 32, 32) and xa.dtype == torch.float32 and ya.shape == (20,)
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert a.heldout()[0] is xa  # computed once
    assert ya.tolist() != data[1].labels[:20].tolist()  # a seeded pick, not the first N
    everything = make_source(Spec(), data=data, device=CPU, eval_samples=10_000).heldout()
    assert everything[0].shape[0] == 40  # capped at the test split


def test_make_source_requires_data_for_cifar10():
    with pytest.raises(ValueError, match="cifar10"):
        make_source(Spec(dataset="cifar10"), data=None, device=CPU, eval_samples=10)
    with pytest.raises(ValueError, match="eval_samples"):
        make_source(Spec(dataset="synthetic"), data=None, device=CPU, eval_samples=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batches_match_cpu():
    data = _tiny_sets()
    cuda = torch.device("cuda")
    for dataset in ("cifar10", "synthetic"):
        spec = Spec(dataset=dataset, seed=3, batch_size=32)
        on_gpu = make_source(spec, data=data, device=cuda, eval_samples=10)
        on_cpu = make_source(spec, data=data, device=CPU, eval_samples=10)
        x, y = on_gpu.batch(7)
        assert x.device.type == "cuda" and y.device.type == "cuda"
        assert torch.allclose(x.cpu(), on_cpu.batch(7)[0], atol=1e-6)
        assert torch.equal(y.cpu(), on_cpu.batch(7)[1])
        assert on_gpu.heldout()[0].device.type == "cuda"


# --------------------------------------------------------------------------------------------
# Synthetic source


def test_synthetic_batches():
    a = make_source(Spec(dataset="synthetic", seed=5, batch_size=64), data=None, device=CPU, eval_samples=50)
    b = make_source(Spec(dataset="synthetic", seed=5, batch_size=64), data=_tiny_sets(), device=CPU, eval_samples=50)
    c = make_source(Spec(dataset="synthetic", seed=6, batch_size=64), data=None, device=CPU, eval_samples=50)
    x, y = a.batch(3)
    assert x.shape == (64, 3, 32, 32) and x.dtype == torch.float32
    assert y.shape == (64,) and y.dtype == torch.int64 and int(y.min()) >= 0 and int(y.max()) <= 9
    assert torch.equal(x, b.batch(3)[0]) and torch.equal(y, b.batch(3)[1])
    assert not torch.equal(x, c.batch(3)[0]) and not torch.equal(x, a.batch(4)[0])
    assert abs(float(x.mean())) < 0.02 and abs(float(x.std()) - 1) < 0.02
    hx, hy = a.heldout()
    assert hx.shape == (50, 3, 32, 32) and hy.shape == (50,)
    assert torch.equal(hx, c.heldout()[0]) and torch.equal(hy, c.heldout()[1])
    assert not any(torch.equal(hx[:1], a.batch(s)[0][:1]) for s in range(3))


# --------------------------------------------------------------------------------------------
# The real copy


@pytest.fixture(scope="session")
def real_cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cifar10-cache")


@pytest.mark.slow
def test_real_cifar10(cifar10_dir, real_cache_dir, capsys):
    # Its own cache directory, so the first load really decodes whatever ran before.
    real_data_dir = cifar10_dir
    started = time.perf_counter()
    train, test = load_cifar10(real_data_dir, real_cache_dir)
    first = time.perf_counter() - started
    started = time.perf_counter()
    train2, test2 = DatasetCache(real_data_dir, real_cache_dir).get()
    cached = time.perf_counter() - started
    with capsys.disabled():
        print(f"\nCIFAR-10 first load {first:.2f} s, cached load {cached:.3f} s")
    assert cached < 1.0
    assert torch.equal(train.images, train2.images) and torch.equal(test.labels, test2.labels)

    assert train.images.shape == (50_000, 3, 32, 32) and test.images.shape == (10_000, 3, 32, 32)
    assert torch.bincount(train.labels, minlength=10).tolist() == [5_000] * 10
    assert torch.bincount(test.labels, minlength=10).tolist() == [1_000] * 10
    if (real_data_dir / "train").is_dir():
        from torchvision.datasets import ImageFolder

        assert tuple(ImageFolder(str(real_data_dir / "train")).classes) == CIFAR10_CLASSES
        assert tuple(ImageFolder(str(real_data_dir / "test")).classes) == CIFAR10_CLASSES

    # The whole test split, normalised, has roughly zero mean and unit std per channel.
    source = make_source(Spec(), data=(train, test), device=CPU, eval_samples=10_000)
    x, y = source.heldout()
    assert x.shape == (10_000, 3, 32, 32) and sorted(set(y.tolist())) == list(range(10))
    per_channel = x.transpose(0, 1).reshape(3, -1)
    assert per_channel.mean(dim=1).abs().max() < 0.05
    assert (per_channel.std(dim=1) - 1).abs().max() < 0.05
    xb, yb = source.batch(0)
    assert xb.shape == (128, 3, 32, 32) and yb.shape == (128,)


# --------------------------------------------------------------------------------------------
# Workers share one decoded copy

_MAPPED_CHILD = """
import json, os, sys
from graddiag.service.engine.data import DatasetCache
train, test = DatasetCache(sys.argv[1], sys.argv[2]).get()
address = train.images.data_ptr()
for line in open("/proc/self/maps"):
    fields = line.split()
    start, end = (int(x, 16) for x in fields[0].split("-"))
    if start <= address < end:
        print("MAPPED:" + json.dumps({"path": fields[5] if len(fields) > 5 else "", "inode": int(fields[4])}))
"""


def _mapping_of(address: int) -> str:
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        start, end = (int(x, 16) for x in fields[0].split("-"))
        if start <= address < end:
            return fields[5] if len(fields) > 5 else ""
    return ""


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/self/maps (Linux)")
def test_two_workers_map_the_same_cache_file(folder_data, tmp_path):
    import json
    import subprocess
    import sys

    cache = tmp_path / "cache"
    train, _ = load_cifar10(folder_data, cache)  # decodes, writes the cache, then maps it
    (path,) = cache.glob("*.pt")
    assert _mapping_of(train.images.data_ptr()) == str(path.resolve())
    seen = []
    for _ in range(2):
        done = subprocess.run(
            [sys.executable, "-c", _MAPPED_CHILD, str(folder_data), str(cache)],
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        )
        (line,) = [x for x in done.stdout.splitlines() if x.startswith("MAPPED:")]
        seen.append(json.loads(line.removeprefix("MAPPED:")))
    # Both workers' images are pages of one file (one inode): the page cache holds them once.
    assert seen[0] == seen[1] == {"path": str(path.resolve()), "inode": path.stat().st_ino}
