"""Image–caption sources: transform policy, skip accounting, image folders, WebDataset shards, HF datasets, and
how a data string is read (parse_data_spec, open_data).

All data is built in ``tmp_path`` with PIL; nothing is downloaded.
"""

from __future__ import annotations

import functools
import http.server
import io
import json
import shutil
import tarfile
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from lcm.data import hf, webdataset
from lcm.data.base import SkipCounter, collate_skip_none
from lcm.data.folder import ImageFolderSource, PlainImageFolder
from lcm.data.hf import HFDatasetSource
from lcm.data.loader import batch_stream
from lcm.data.sources import DataKind, DataSpec, build_source, open_data, parse_data_spec
from lcm.data.transforms import ImageTransform
from lcm.data.webdataset import WebDatasetSource, expand_braces, group_samples

RES = 16


def noise_image(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    """A random RGB image converted to ``mode``, so crops at different offsets differ."""
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")
    return image if mode == "RGB" else image.convert(mode)


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def check_pixels(tensor: torch.Tensor, channels: int = 3) -> None:
    assert tensor.dtype == torch.float32
    assert tuple(tensor.shape) == (channels, RES, RES)
    assert tensor.min() >= -1.0 and tensor.max() <= 1.0


# --------------------------------------------------------------------------------------------------------------------
# ImageTransform


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "P", "1", "CMYK", "I;16"])
@pytest.mark.parametrize("size", [(40, 24), (24, 40), (16, 16), (8, 12)])
def test_transform_shape_and_range(mode, size):
    image = noise_image(*size) if mode != "I;16" else Image.fromarray(np.full(size[::-1], 65535, np.uint16))
    image = image.convert(mode) if mode not in ("RGB", "I;16") else image
    for channels in (3, 1):
        check_pixels(ImageTransform(RES, channels=channels)(image), channels)


def test_transform_values_alpha_palette_and_16_bit():
    white = torch.ones(3, RES, RES)
    transparent = Image.new("RGBA", (RES, RES), (0, 0, 0, 0))  # black under full transparency
    assert torch.equal(ImageTransform(RES)(transparent), white)
    palette = Image.new("RGB", (RES, RES), (255, 0, 0)).convert("P")
    assert torch.equal(ImageTransform(RES)(palette)[0], torch.ones(RES, RES))
    deep = Image.fromarray(np.full((RES, RES), 32896, np.uint16))  # mid-grey in 16 bits, 128 in 8 bits
    expected = torch.full((1, RES, RES), 128.0) / 127.5 - 1  # the same float32 arithmetic as the transform
    assert torch.equal(ImageTransform(RES, channels=1)(deep), expected)
    black = ImageTransform(RES, channels=1)(Image.new("L", (RES, RES), 0))
    assert torch.equal(black, -torch.ones(1, RES, RES))


def test_transform_resizes_shorter_side_then_center_crops():
    # A white band over the middle half of a 64×16 image: the centre crop sees only white.
    array = np.zeros((16, 64, 3), np.uint8)
    array[:, 16:48] = 255
    assert torch.equal(ImageTransform(RES)(Image.fromarray(array)), torch.ones(3, RES, RES))
    # Transposed and downscaled (64×16 → 32×8), the crop is still inside the band; the sides are black.
    tall = Image.fromarray(np.ascontiguousarray(array.transpose(1, 0, 2)))
    assert torch.equal(ImageTransform(8)(tall), torch.ones(3, 8, 8))
    corner = ImageTransform(8, center_crop=False)(tall, torch.Generator().manual_seed(0))
    assert corner.shape == (3, 8, 8)


def test_center_crop_deterministic_random_crop_seeded():
    image = noise_image(64, 16)
    center = ImageTransform(RES)
    assert torch.equal(center(image, torch.Generator().manual_seed(1)), center(image, torch.Generator().manual_seed(2)))
    rand = ImageTransform(RES, center_crop=False, random_flip=True)
    first = rand(image, torch.Generator().manual_seed(7))
    assert torch.equal(first, rand(image, torch.Generator().manual_seed(7)))
    outputs = {rand(image, torch.Generator().manual_seed(seed)).sum().item() for seed in range(8)}
    assert len(outputs) > 1


def test_transform_rejects_bad_settings():
    with pytest.raises(ValueError, match="resolution"):
        ImageTransform(0)
    with pytest.raises(ValueError, match="channels"):
        ImageTransform(RES, channels=2)


# --------------------------------------------------------------------------------------------------------------------
# SkipCounter and collate


def test_skip_counter_summary_dedup_and_merge():
    counter = SkipCounter()
    assert counter.summary() == "skipped 0 samples"
    assert counter.add("unreadable image", "a.png")
    assert not counter.add("unreadable image", "a.png")  # the same sample met again in a later epoch
    counter.add("unreadable image", "b.png")
    counter.add("missing caption", "c.png")
    assert counter.total == 3
    assert counter.summary() == "skipped 3 samples: 2 unreadable image, 1 missing caption"
    other = SkipCounter()
    other.add("missing caption", "c.png")
    other.add("empty caption", "d.png")
    counter.update(other)
    assert counter.counts == {"unreadable image": 2, "missing caption": 1, "empty caption": 1}
    assert counter.examples("unreadable image") == ["a.png", "b.png"]


def test_collate_skip_none():
    sample = {"pixel_values": torch.zeros(3, RES, RES), "caption": "x"}
    batch = collate_skip_none([sample, None, sample])
    assert batch["pixel_values"].shape == (2, 3, RES, RES)
    assert batch["caption"] == ["x", "x"] and batch["num_skipped"] == 1
    assert collate_skip_none([None, None]) is None


# --------------------------------------------------------------------------------------------------------------------
# ImageFolderSource


def make_image_folder(root: Path) -> Path:
    """5 good images, 1 corrupt file, 1 missing file, 1 empty caption; nested folders and mixed modes."""
    rows = []
    for i in range(5):
        name = f"sub/dir{i % 2}/img{i}.png" if i % 2 else f"img{i}.jpg"
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        noise_image(20 + 4 * i, 24, mode=("RGB", "RGBA", "L", "P", "RGB")[i], seed=i).save(root / name)
        rows.append({"file_name": name, "text": f"caption {i}"})
    (root / "corrupt.png").write_bytes(np.random.default_rng(0).bytes(300))
    rows.append({"file_name": "corrupt.png", "text": "corrupt"})
    rows.append({"file_name": "missing.png", "text": "missing"})
    noise_image(20, 20).save(root / "nocaption.png")
    rows.append({"file_name": "nocaption.png", "text": "   "})
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return root


def test_image_folder_skips_bad_rows_through_dataloader(tmp_path):
    source = ImageFolderSource(make_image_folder(tmp_path), ImageTransform(RES))
    assert len(source) == 6  # the corrupt image is only found when it is decoded
    assert source.skipped.counts == {"missing image file": 1, "empty caption": 1}
    loader = DataLoader(source, batch_size=4, shuffle=False, num_workers=0, collate_fn=collate_skip_none)
    batches = [batch for batch in loader if batch is not None]
    captions = [caption for batch in batches for caption in batch["caption"]]
    assert captions == [f"caption {i}" for i in range(5)]
    for batch in batches:
        for pixels in batch["pixel_values"]:
            check_pixels(pixels)
    assert sum(batch["num_skipped"] for batch in batches) == 1
    assert source.skipped.total == 3
    assert source.skipped.summary() == "skipped 3 samples: 1 empty caption, 1 missing image file, 1 unreadable image"
    list(loader)  # a second epoch meets the corrupt file again without counting it twice
    assert source.skipped.total == 3


def test_image_folder_caption_column_choice_and_seeded_items(tmp_path):
    noise_image(40, 24).save(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "caption": ["one", "two"]}) + "\n")
    transform = ImageTransform(RES, center_crop=False, random_flip=True)
    source = ImageFolderSource(tmp_path, transform, seed=3)
    assert source.caption_column == "caption"
    first, again = source[0], source[0]
    assert torch.equal(first["pixel_values"], again["pixel_values"]) and first["caption"] == again["caption"]
    assert first["caption"] in ("one", "two")
    with pytest.raises(ValueError, match="caption column 'prompt' not found; available columns: caption, file_name"):
        ImageFolderSource(tmp_path, transform, caption_column="prompt")


def test_image_folder_without_metadata_explains_layout(tmp_path):
    noise_image(20, 20).save(tmp_path / "a.png")
    with pytest.raises(ValueError, match=r"no metadata\.jsonl.*file_name"):
        ImageFolderSource(tmp_path, ImageTransform(RES))
    with pytest.raises(ValueError, match="does not exist"):
        ImageFolderSource(tmp_path / "nope", ImageTransform(RES))


# --------------------------------------------------------------------------------------------------------------------
# WebDataset


def write_shard(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def make_shards(root: Path) -> list[str]:
    """Two shards, 6 samples: 4 good, one without a caption, one with a corrupt image. Returns the good captions."""
    jpg, png = encode(noise_image(30, 20), "JPEG"), encode(noise_image(20, 36, "RGBA"))
    write_shard(
        root / "shard-000.tar",
        [
            ("__meta__", b"ignored"),
            ("s000.jpg", jpg),
            ("s000.txt", b"a red fox\n"),
            ("s001.txt", "caf\u00e9 scene".encode()),
            ("s001.png", png),
            ("s002.jpg", jpg),  # no caption, last of the shard
        ],
    )
    write_shard(
        root / "shard-001.tar",
        [
            ("part/s003.png", png),
            ("part/s003.txt", b"a blue bird"),
            ("s004.jpg", b"\xff\xd8 not really a jpeg"),
            ("s004.txt", b"corrupt"),
            ("s005.json", json.dumps({"caption": "from json", "width": 30}).encode()),
            ("s005.jpeg", jpg),  # last sample of the shard must not be lost at the shard end
        ],
    )
    return ["a red fox", "caf\u00e9 scene", "a blue bird", "from json"]


def test_webdataset_reads_brace_pattern_and_skips(tmp_path):
    expected = make_shards(tmp_path)
    source = WebDatasetSource(str(tmp_path / "shard-{000..001}.tar"), ImageTransform(RES), shuffle_shards=False)
    assert source.shards == [str(tmp_path / "shard-000.tar"), str(tmp_path / "shard-001.tar")]
    loader = DataLoader(source, batch_size=3, num_workers=0, collate_fn=collate_skip_none)
    batches = list(loader)
    assert [caption for batch in batches for caption in batch["caption"]] == expected
    assert all(pixels.shape == (3, RES, RES) for batch in batches for pixels in batch["pixel_values"])
    assert source.skipped.summary() == "skipped 2 samples: 1 missing caption, 1 unreadable image"


def test_webdataset_splits_over_ranks_and_workers(tmp_path, monkeypatch):
    expected = set(make_shards(tmp_path))
    pattern = str(tmp_path / "shard-{000..001}.tar")

    def captions(**kwargs) -> list[str]:
        source = WebDatasetSource(pattern, ImageTransform(RES), seed=5, **kwargs)
        source.set_epoch(2)
        return [sample["caption"] for sample in source]

    by_rank = [captions(rank=rank, world_size=2) for rank in range(2)]
    assert all(by_rank) and set(by_rank[0]).isdisjoint(by_rank[1]) and set(by_rank[0]) | set(by_rank[1]) == expected
    # 2 ranks × 2 workers > 2 shards: every reader streams both shards and keeps its own share of samples.
    shares = []
    for rank in range(2):
        for worker in range(2):
            monkeypatch.setattr(webdataset, "get_worker_info", lambda w=worker: SimpleNamespace(id=w, num_workers=2))
            shares.append(captions(rank=rank, world_size=2))
    assert sum(len(share) for share in shares) == len(expected) and set().union(*shares) == expected


def test_webdataset_shuffle_is_seeded_and_repeat_continues(tmp_path):
    make_shards(tmp_path)
    pattern = str(tmp_path / "shard-{000..001}.tar")

    def order(seed: int) -> list[str]:
        return [s["caption"] for s in WebDatasetSource(pattern, ImageTransform(RES), seed=seed, shuffle_buffer=3)]

    assert order(1) == order(1)
    assert len({tuple(order(seed)) for seed in range(6)}) > 1
    endless = iter(WebDatasetSource(pattern, ImageTransform(RES), repeat=True))
    assert len([next(endless) for _ in range(10)]) == 10


def test_webdataset_bad_shards(tmp_path):
    make_shards(tmp_path)
    (tmp_path / "a.tar").write_bytes((tmp_path / "shard-000.tar").read_bytes()[:700])  # truncated
    with pytest.raises(ValueError, match=r"1 of 2 WebDataset shards do not exist, first: .*b\.tar"):
        WebDatasetSource(str(tmp_path / "{a,b}.tar"), ImageTransform(RES))
    source = WebDatasetSource(str(tmp_path / "a.tar"), ImageTransform(RES))
    list(source)
    assert source.skipped.counts.get("truncated shard") == 1  # opened, then cut off: not "unreadable"


def test_group_samples_keys_and_extensions():
    members = [("./d/x.seg.PNG", b"1"), ("d/x.txt", b"2"), (".hidden", b""), ("y.txt", b"3"), ("y.txt", b"4")]
    assert list(group_samples(members)) == [
        ("d/x", {"seg.png": b"1", "txt": b"2"}),
        ("y", {"txt": b"3"}),
        ("y", {"txt": b"4"}),
    ]


def test_expand_braces():
    assert expand_braces("s-{000..002}.tar") == ["s-000.tar", "s-001.tar", "s-002.tar"]
    assert expand_braces("{a,b}/{8..10}") == ["a/8", "a/9", "a/10", "b/8", "b/9", "b/10"]
    assert expand_braces("x{0..6..3}") == ["x0", "x3", "x6"]
    assert expand_braces("{3..1}") == ["3", "2", "1"]
    assert expand_braces("{a,{b,c}d}") == ["a", "bd", "cd"]
    assert expand_braces("a{x}b") == ["a{x}b"]
    assert expand_braces("p.tar::q{1,2}.tar") == ["p.tar", "q1.tar", "q2.tar"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    for bad in ("{0..2", "a}b", "{0..4..0}"):
        with pytest.raises(ValueError):
            expand_braces(bad)


# --------------------------------------------------------------------------------------------------------------------
# Hugging Face datasets


def make_saved_dataset(path: Path):
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    images = [{"bytes": encode(noise_image(24, 20, seed=i)), "path": None} for i in range(4)]
    images.append({"bytes": b"not an image", "path": None})
    texts = ["one", "two", "", None, "five"]
    datasets.Dataset.from_dict({"image": images, "text": texts}, features=features).save_to_disk(str(path))
    return datasets


def test_hf_dataset_from_disk(tmp_path):
    make_saved_dataset(tmp_path / "ds")
    source = HFDatasetSource(tmp_path / "ds", ImageTransform(RES, channels=1))
    assert len(source) == 3
    batches = list(DataLoader(source, batch_size=3, collate_fn=collate_skip_none))
    assert batches[0]["caption"] == ["one", "two"] and batches[0]["pixel_values"].shape == (2, 1, RES, RES)
    assert source.skipped.summary() == "skipped 3 samples: 1 empty caption, 1 missing caption, 1 unreadable image"
    with pytest.raises(ValueError, match="image column 'img' not found; available columns: image, text"):
        HFDatasetSource(tmp_path / "ds", ImageTransform(RES), image_column="img")


# --------------------------------------------------------------------------------------------------------------------
# build_source


def test_build_source_dispatch(tmp_path):
    (tmp_path / "folder").mkdir()
    folder = make_image_folder(tmp_path / "folder")
    assert isinstance(build_source(str(folder), resolution=RES), ImageFolderSource)
    (tmp_path / "split" / "train").mkdir(parents=True)
    make_image_folder(tmp_path / "split" / "train")
    assert isinstance(build_source(tmp_path / "split", resolution=RES), ImageFolderSource)
    make_shards(tmp_path)
    tar = build_source(str(tmp_path / "shard-000.tar"), resolution=RES, random_flip=True)
    assert isinstance(tar, WebDatasetSource) and tar.transform.random_flip
    assert len(build_source(str(tmp_path / "shard-{000..001}.tar"), resolution=RES).shards) == 2
    assert isinstance(build_source("https://example.com/data/{00..02}.tar", resolution=RES), WebDatasetSource)
    with pytest.raises(ValueError, match=r"^--data .*nope: no such file or directory$"):
        build_source(str(tmp_path / "nope"), resolution=RES)
    with pytest.raises(ValueError, match="has no metadata.jsonl"):
        build_source(str(tmp_path / "split" / "train" / "sub"), resolution=RES)


def test_build_source_hf_dataset(tmp_path, monkeypatch):
    datasets = make_saved_dataset(tmp_path / "ds")
    assert isinstance(build_source(str(tmp_path / "ds"), resolution=RES), HFDatasetSource)
    hub = datasets.load_from_disk(str(tmp_path / "ds")).rename_column("text", "caption")
    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split: calls.append((name, split)) or hub)
    source = build_source("someone/captions", resolution=RES, split="train")
    assert isinstance(source, HFDatasetSource) and source.caption_column == "caption"
    assert calls == [("someone/captions", "train")]


def test_build_source_without_datasets_package(tmp_path, monkeypatch):
    monkeypatch.setattr(hf, "import_datasets", lambda: (_ for _ in ()).throw(ValueError("pip install datasets")))
    with pytest.raises(ValueError, match=r"someone/captions: no such file or directory .*pip install datasets"):
        build_source("someone/captions", resolution=RES)


def test_webdataset_http_and_pipe_urls(tmp_path):
    expected = make_shards(tmp_path)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/shard-{{000..001}}.tar"
        source = build_source(url, resolution=RES)
        assert sorted(sample["caption"] for sample in source) == sorted(expected)
        missing = WebDatasetSource(url.replace("shard-", "absent-"), ImageTransform(RES))
        assert list(missing) == [] and missing.skipped.counts == {"unreadable shard": 2}
    finally:
        server.shutdown()
        server.server_close()
    if shutil.which("cat"):
        piped = WebDatasetSource(f"pipe:cat {tmp_path / 'shard-001.tar'}", ImageTransform(RES))
        assert [sample["caption"] for sample in piped] == expected[2:]


def make_numbered_shards(root: Path, shards: int = 6, per_shard: int = 2) -> str:
    """``shards`` shards of ``per_shard`` samples captioned ``"<shard>-<sample>"``; returns their brace pattern."""
    png = encode(noise_image(RES, RES))
    for shard in range(shards):
        members = []
        for sample in range(per_shard):
            members += [(f"k{sample}.png", png), (f"k{sample}.txt", f"{shard}-{sample}".encode())]
        write_shard(root / f"n-{shard:02d}.tar", members)
    return str(root / f"n-{{00..{shards - 1:02d}}}.tar")


def test_webdataset_shard_order_changes_per_epoch_and_is_seeded(tmp_path):
    pattern = make_numbered_shards(tmp_path)
    source = WebDatasetSource(pattern, ImageTransform(RES), seed=3)
    first, second = source.shard_order(0), source.shard_order(1)
    assert first != second and sorted(first) == sorted(second) == sorted(source.shards)
    again = WebDatasetSource(pattern, ImageTransform(RES), seed=3)
    assert [again.shard_order(epoch) for epoch in range(3)] == [source.shard_order(epoch) for epoch in range(3)]
    other = WebDatasetSource(pattern, ImageTransform(RES), seed=4)
    assert [other.shard_order(epoch) for epoch in range(3)] != [source.shard_order(epoch) for epoch in range(3)]


def test_batch_stream_reshuffles_webdataset_shards_each_epoch(tmp_path):
    pattern = make_numbered_shards(tmp_path)

    def captions(start: int = 0, n: int = 24) -> list[str]:
        stream = batch_stream(WebDatasetSource(pattern, ImageTransform(RES), seed=3), 1, collate_skip_none, start=start)
        return [next(stream)["caption"][0] for _ in range(n)]

    seen = captions()
    epochs = [seen[:12], seen[12:]]
    assert epochs[0] != epochs[1] and sorted(epochs[0]) == sorted(epochs[1])
    for epoch in epochs:  # within a shard the samples keep their order
        shards = [caption.split("-")[0] for caption in epoch]
        assert shards[::2] == shards[1::2] and [caption.split("-")[1] for caption in epoch] == ["0", "1"] * 6
    order = WebDatasetSource(pattern, ImageTransform(RES), seed=3).shard_order
    for epoch, captions_of_epoch in enumerate(epochs):
        assert [c.split("-")[0] for c in captions_of_epoch[::2]] == [
            str(int(Path(url).stem[2:])) for url in order(epoch)
        ]
    assert captions() == seen  # the same seed gives the same order
    assert captions(start=5, n=19) == seen[5:]  # and a resumed run sees it from where it stopped


# --------------------------------------------------------------------------------------------------------------------
# parse_data_spec / open_data


def test_parse_data_spec_kinds(tmp_path, monkeypatch):
    assert parse_data_spec("fashion-mnist") == DataSpec(DataKind.FASHION, "fashion-mnist")
    assert parse_data_spec(" fashion-mnist:0,3,7 ") == DataSpec(DataKind.FASHION, "fashion-mnist", (0, 3, 7))
    make_shards(tmp_path)
    tar = str(tmp_path / "shard-000.tar")
    assert parse_data_spec(tar) == DataSpec(DataKind.WEBDATASET, tar)
    for text in (
        str(tmp_path / "shard-{000..001}.tar"),
        "https://example.com/data/{00..02}.tar",
        "https://example.com/one.tar.gz?download=1",
        f"pipe:cat {tar}",
        "a.tar::b.tar",
    ):
        assert parse_data_spec(text) == DataSpec(DataKind.WEBDATASET, text)
    (tmp_path / "folder").mkdir()
    assert parse_data_spec(tmp_path / "folder") == DataSpec(DataKind.FOLDER, str(tmp_path / "folder"))
    monkeypatch.setenv("HOME", str(tmp_path))
    assert parse_data_spec("~/folder") == DataSpec(DataKind.FOLDER, str(tmp_path / "folder"))
    assert parse_data_spec("~/shard-000.tar") == DataSpec(DataKind.WEBDATASET, tar)
    monkeypatch.chdir(tmp_path)
    assert parse_data_spec("someone/captions") == DataSpec(DataKind.HUB, "someone/captions")
    assert parse_data_spec("folder").kind is DataKind.FOLDER  # an existing folder wins over a Hub name


@pytest.mark.parametrize("text", ["./nope", "nope/a/b", "/definitely/not/here", "missing.tar", "./x/missing.tgz"])
def test_parse_data_spec_missing_local_path(tmp_path, monkeypatch, text):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=rf"^--data {text}: no such file or directory$"):
        parse_data_spec(text)


@pytest.mark.parametrize("text", ["fashion-mnist:", "fashion-mnist:a", "fashion-mnist:10", "fashion-mnist:1,,2"])
def test_parse_data_spec_bad_class_list(text):
    with pytest.raises(ValueError, match=rf"^--data {text}: classes must be comma-separated labels 0-9"):
        parse_data_spec(text)


def test_parse_data_spec_refuses_empty_and_non_tar_files(tmp_path):
    with pytest.raises(ValueError, match="--data is empty"):
        parse_data_spec("  ")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="not a .tar shard"):
        parse_data_spec(str(tmp_path / "notes.txt"))


def test_open_data_plain_image_folder_without_captions(tmp_path):
    root = tmp_path / "plain"
    (root / "sub").mkdir(parents=True)
    noise_image(40, 24, seed=1).save(root / "b.png")
    noise_image(24, 40, mode="L", seed=2).save(root / "sub" / "a.JPG")
    (root / "c.png").write_bytes(b"not an image")
    (root / "notes.txt").write_text("not an image file")
    with pytest.raises(ValueError, match="has no metadata.jsonl"):
        open_data(str(root), resolution=RES)  # captions are required by default
    data = open_data(str(root), resolution=RES, captions_required=False)
    assert isinstance(data, PlainImageFolder) and len(data) == 3
    samples = [data[i] for i in range(len(data))]
    assert samples[1] is None and data.skipped.counts == {"unreadable image": 1}  # sorted: b, c, sub/a
    assert samples[0]["caption"] == samples[2]["caption"] == ""
    assert torch.equal(samples[0]["pixel_values"], ImageTransform(RES)(noise_image(40, 24, seed=1)))
    check_pixels(samples[2]["pixel_values"])
    batch = collate_skip_none(samples)
    assert batch["caption"] == ["", ""] and batch["num_skipped"] == 1
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no image files"):
        open_data(str(tmp_path / "empty"), resolution=RES, captions_required=False)


def test_open_data_prefers_captions_when_a_folder_has_them(tmp_path):
    folder = make_image_folder(tmp_path)
    assert isinstance(open_data(str(folder), resolution=RES, captions_required=False), ImageFolderSource)
    spec = parse_data_spec(str(folder))
    assert isinstance(open_data(spec, resolution=RES), ImageFolderSource)
