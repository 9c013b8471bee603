"""A tiny fake CIFAR-10 in the official python-batches format, and its tar.gz archive as the download serves it."""

from __future__ import annotations

import hashlib
import io
import pickle
import tarfile
from pathlib import Path

import numpy as np

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def write_batches_py(root: Path, per_batch: int = 16) -> Path:
    """`root/cifar-10-batches-py` with five training batches and a test batch of `per_batch` random images."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = [int(x) for x in rng.integers(0, 10, size=per_batch)]
        (folder / name).write_bytes(pickle.dumps({"batch_label": name, "data": data, "labels": labels}))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": list(CLASSES), "num_vis": 3072}))
    return folder


def fake_archive(tmp: Path) -> tuple[bytes, str]:
    """(the tar.gz bytes of a fake cifar-10-batches-py, their MD5), shaped like the official archive."""
    write_batches_py(tmp)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(tmp / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    data = buffer.getvalue()
    return data, hashlib.md5(data, usedforsecurity=False).hexdigest()
