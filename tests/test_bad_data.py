"""A fuzz set of bad data for each source: every bad sample is skipped and counted once under its reason (naming
file and line), every good one is read, and a WebDataset shard cut at any byte keeps the samples before the cut."""

from __future__ import annotations

import io
import tarfile

import pytest
import torch
from PIL import Image

from lcm.data.folder import ImageFolderSource
from lcm.data.transforms import ImageTransform
from lcm.data.webdataset import WebDatasetSource

RES = 16


def _png(seed: int = 0) -> bytes:
    pixels = (torch.rand(20, 24, 3, generator=torch.Generator().manual_seed(seed)) * 255).to(torch.uint8).numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_image_folder_fuzz_set(tmp_path):
    good = _png()
    files = {"ok.png": good, "ok2.png": _png(1), "corrupt.png": b"\x89PNG garbage", "half.png": good[:60]}
    files |= {"empty.png": b"", "caption.png": good, "space.png": good, "number.png": good}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    lines = [
        '\ufeff{"file_name": "ok.png", "text": "first line with a byte-order mark"}'.encode(),
        b'{"file_name": "ok2.png", "text": "caf\xff broken utf-8"}',  # line 2: invalid UTF-8
        b"not json at all",  # line 3
        b'["a", "list"]',  # line 4
        b'{"file_name": "absent.png", "text": "no such file"}',
        b'{"file_name": "caption.png", "text": ""}',
        b'{"file_name": "space.png", "text": "   "}',
        b'{"file_name": "number.png", "text": 7}',
        b'{"text": "no file name"}',  # line 9
        b'{"file_name": "corrupt.png", "text": "corrupt"}',
        b'{"file_name": "half.png", "text": "truncated"}',
        b'{"file_name": "empty.png", "text": "zero bytes"}',
        b'{"file_name": "ok2.png", "text": "good"}',
        b"\xc3\x28 {}",  # line 14: invalid UTF-8 again
        b"",
    ]
    (tmp_path / "metadata.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    source = ImageFolderSource(tmp_path, ImageTransform(RES))
    read = [source[i] for i in range(len(source))]
    assert [s["caption"] for s in read if s is not None] == ["first line with a byte-order mark", "good"]
    assert source.skipped.counts == {
        "invalid metadata line": 5,
        "missing image file": 1,
        "empty caption": 2,
        "non-text caption": 1,
        "unreadable image": 3,
    }
    report = source.skipped.report()
    assert report.startswith("skipped 12 samples: 5 invalid metadata line (metadata.jsonl:2, metadata.jsonl:3, ")
    assert "3 unreadable image (corrupt.png, half.png, empty.png)" in report


def test_hf_dataset_fuzz_set(tmp_path):
    datasets = pytest.importorskip("datasets")
    from lcm.data.hf import HFDatasetSource

    good = _png()
    rows = [
        (good, "good"),
        (b"garbage", "corrupt image"),
        (good[:50], "truncated image"),
        (b"", "zero bytes"),
        (good, None),
        (good, ""),
        (good, "  "),
        (_png(2), "also good"),
    ]
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    images = [{"bytes": data, "path": None} for data, _ in rows]
    datasets.Dataset.from_dict({"image": images, "text": [t for _, t in rows]}, features=features).save_to_disk(
        str(tmp_path / "ds")
    )
    source = HFDatasetSource(tmp_path / "ds", ImageTransform(RES))
    read = [source[i] for i in range(len(source))]
    assert [s["caption"] for s in read if s is not None] == ["good", "also good"]
    assert source.skipped.counts == {"unreadable image": 3, "missing caption": 1, "empty caption": 2}
    assert "3 unreadable image (row 1, row 2, row 3)" in source.skipped.report()


def _shard(path) -> list[tuple[str, int, int, int]]:
    """Five two-member samples; returns (key, header offset, data end) of each member."""
    with tarfile.open(path, "w") as tar:
        for i in range(5):
            for ext, data in (("png", _png(i)), ("txt", f"caption {i}".encode())):
                info = tarfile.TarInfo(f"s{i}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    with tarfile.open(path) as tar:
        return [(m.name.split(".")[0], m.offset, m.offset_data + m.size) for m in tar.getmembers()]


def test_webdataset_cut_at_any_byte_keeps_complete_samples_and_counts_the_rest(tmp_path):
    full = tmp_path / "full.tar"
    members = _shard(full)
    data = full.read_bytes()
    end = members[-1][2]
    cuts = sorted({*range(0, end, 97), *(m[1] + 100 for m in members), *(m[2] for m in members), end - 1})
    for cut in cuts:
        shard = tmp_path / "cut.tar"
        shard.write_bytes(data[:cut])
        source = WebDatasetSource(str(shard), ImageTransform(RES), shuffle_shards=False)
        captions = [s["caption"] for s in source]
        complete = [
            key for key in dict.fromkeys(m[0] for m in members) if all(e <= cut for k, _, e in members if k == key)
        ]
        # the samples whose every member lies before the cut are all read, however the cut falls
        assert captions[: len(complete)] == [f"caption {k[1:]}" for k in complete], cut
        counts = source.skipped.counts
        started = {m[0] for m in members if m[1] < cut}  # samples with at least one header begun before the cut
        skipped = counts.get("truncated sample", 0) + counts.get("missing caption", 0)
        assert len(captions) + skipped <= len(started), cut  # nothing is counted twice
        if cut < end:
            assert counts.get("truncated shard") == 1, (cut, counts)
            assert "unreadable shard" not in counts
        cut_member = next((m for m in members if m[1] + 512 <= cut < m[2]), None)
        if cut_member is not None:  # the cut falls in a member's data: that sample is the one truncated sample
            assert counts.get("truncated sample") == 1, (cut, counts)
            assert len(captions) + skipped == len(started), cut
        assert " sample" not in source.skipped.summary().split(";")[-1] or not counts.get("truncated shard")
