import gzip
import struct

import numpy as np
import pytest
import torch

from lcm.data import fashion_mnist as fm
from lcm.data.captions import CLASS_PHRASES, TEMPLATES, CaptionSet, class_prompts
from lcm.data.sources import open_data

HAVE_DEBIAN = (fm.DEBIAN_DIR / "t10k-images-idx3-ubyte.gz").is_file()


def _idx(array: np.ndarray) -> bytes:
    return struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def test_read_idx_parses_header_and_shape():
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    np.testing.assert_array_equal(fm.read_idx(_idx(arr)), arr)


@pytest.mark.parametrize(
    "raw,match",
    [
        (b"\x00\x00", "too short"),
        (b"\x12\x34\x08\x01" + b"\x00" * 8, "bad magic"),
        (_idx(np.zeros((5, 28, 28), np.uint8))[:-10], "header promises"),
        (_idx(np.zeros((5, 28, 28), np.uint8)) + b"\x00", "header promises"),
    ],
    ids=["short", "magic", "truncated", "trailing"],
)
def test_read_idx_refuses_bad_files(raw, match):
    with pytest.raises(fm.IDXError, match=match):
        fm.read_idx(raw, "x")


def test_truncated_file_in_data_dir_is_a_clear_error(tmp_path):
    raw = _idx(np.zeros((100, 28, 28), np.uint8))
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(raw)[:-40])  # cut-off gzip stream
    with pytest.raises(fm.IDXError, match="truncated or corrupt"):
        fm.load_fashion_mnist("test", tmp_path)


def test_truncated_idx_payload_names_the_file(tmp_path):
    raw = _idx(np.zeros((100, 28, 28), np.uint8))[:-100]
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(raw)
    with pytest.raises(fm.IDXError, match=r"t10k-images-idx3-ubyte.*header promises"):
        fm.load_fashion_mnist("test", tmp_path)


def test_wrong_content_fails_the_checksum(tmp_path):
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(_idx(np.zeros((3, 28, 28), np.uint8)))
    with pytest.raises(fm.IDXError, match="checksum"):
        fm.load_fashion_mnist("test", tmp_path)


def test_missing_files_name_all_three_options(tmp_path):
    with pytest.raises(fm.IDXError) as err:
        fm.load_fashion_mnist("test", tmp_path)
    message = str(err.value)
    assert "--data-dir" in message and "dataset-fashion-mnist" in message and "download" in message


def test_bad_split():
    with pytest.raises(ValueError, match="split"):
        fm.load_fashion_mnist("valid")


@pytest.mark.skipif(not HAVE_DEBIAN, reason="needs the Debian package dataset-fashion-mnist")
def test_test_split_from_debian_package(tmp_path):
    data = fm.load_fashion_mnist("test", download=False)
    assert data.images.shape == (10000, 1, 32, 32) and data.images.dtype == torch.float32
    assert data.images.min() == -1.0 and data.images.max() == 1.0
    assert torch.all(data.images[:, :, :2] == -1) and torch.all(data.images[:, :, :, -2:] == -1)  # padding
    assert torch.bincount(data.labels).tolist() == [1000] * 10
    # the same files through --data-dir (gzipped as shipped) give the same tensors
    for kind in ("images", "labels"):
        stem = fm.FILES[("test", kind)][0]
        (tmp_path / f"{stem}.gz").write_bytes((fm.DEBIAN_DIR / f"{stem}.gz").read_bytes())
    again = fm.load_fashion_mnist("test", tmp_path)
    assert torch.equal(again.images, data.images) and torch.equal(again.labels, data.labels)


@pytest.mark.skipif(not HAVE_DEBIAN, reason="needs the Debian package dataset-fashion-mnist")
def test_open_data_fashion_classes_at_native_size():
    data = open_data("fashion-mnist:0,7", resolution=512, channels=3, split="test")
    assert isinstance(data, fm.FashionCaptionDataset) and len(data) == 2000
    assert set(data.labels.tolist()) == {0, 7}
    same = fm.FashionCaptionDataset("test", None, [0, 7])
    assert torch.equal(data[5]["pixel_values"], same[5]["pixel_values"]) and data[5]["caption"] == same[5]["caption"]
    assert data[0]["pixel_values"].shape == (1, 32, 32)  # never resized to the requested resolution


def test_caption_set_structure():
    captions = CaptionSet()
    assert captions.captions[0] == ""
    assert len(captions) == 1 + len(CLASS_PHRASES) * len(CLASS_PHRASES[0]) * len(TEMPLATES)
    assert "a photo of a sneaker" in captions.captions and "running shoe" in captions.captions
    for label, indices in enumerate(captions.by_class):
        assert all(any(p in captions.captions[i] for p in CLASS_PHRASES[label]) for i in indices)
    assert class_prompts()[7] == "a photo of a sneaker"


def test_caption_sampling_and_dropout():
    captions = CaptionSet()
    labels = torch.arange(10).repeat(50)
    g = torch.Generator().manual_seed(0)
    idx = captions.sample(labels, 0.0, g)
    for label, i in zip(labels.tolist(), idx.tolist(), strict=True):
        assert i in captions.by_class[label]
    assert torch.all(captions.sample(labels, 1.0, g) == 0)
    dropped = (captions.sample(labels.repeat(20), 0.1, g) == 0).float().mean().item()
    assert 0.07 < dropped < 0.13
