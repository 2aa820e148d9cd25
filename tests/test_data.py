"""data.py: sizes, buckets, decoding, captions, the scan cache, the resumable DDP-aware sampler, stage II pairs,
labelled grids. (Tar shards: tests/test_shards.py.)"""

import io
import json
import os
import random
import struct
import tarfile
import time
import zlib
from collections import Counter
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

import data
from config import Config


def noise(w, h, seed=0, mode="RGB"):
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    return img if mode == "RGB" else img.convert(mode)


def folder(tmp_path, name, sizes, fmt="png", captions=None):
    """A folder of noise images named img_<i>.<fmt> (caption 'img <i>' by filename)."""
    d = tmp_path / name
    d.mkdir()
    for i, (w, h) in enumerate(sizes):
        noise(w, h, seed=i).save(d / f"{name}_{i}.{fmt}")
        if captions:
            (d / f"{name}_{i}.txt").write_text(captions[i])
    return d


def cfg_for(tmp_path, datasets, **kw):
    return Config(datasets=datasets, output_dir=str(tmp_path / "out"), dataloader_num_workers=0, **kw)


def encoded(img, fmt="JPEG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def write_shard(path, samples: dict) -> Path:
    """A tar in img2dataset's layout: for each KEY its members {extension: bytes, str (text) or dict (JSON)}."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for key, members in samples.items():
            for ext, body in members.items():
                body = json.dumps(body).encode() if isinstance(body, dict) else body
                body = body.encode() if isinstance(body, str) else body
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime = len(body), 1_700_000_000
                tar.addfile(info, io.BytesIO(body))
    return path


def age(*roots):
    """Date every file under `roots` an hour back: the scan cache keeps no record of a file modified just before
    (data.RACY_NS), so tests that expect a rerun to decode nothing need files older than that."""
    then = time.time() - 3600
    for root in roots:
        for f in [root] if root.is_file() else [f for f in root.rglob("*") if f.is_file()]:
            os.utime(f, (then, then))


def uint8(x):  # [-1, 1] tensor (3, H, W) -> PIL image
    return Image.fromarray(((x + 1) * 127.5).round().byte().permute(1, 2, 0).numpy())


# ---------------------------------------------------------------------------------------------
# sizes


def test_parse_resolutions():
    assert data.parse_resolutions("64,96,64x96,96x64") == [(64, 64), (96, 96), (64, 96), (96, 64)]
    assert data.parse_resolutions(64) == [(64, 64)]
    with pytest.raises(ValueError, match="WxH"):
        data.parse_resolutions("64,9x")


@pytest.mark.parametrize("multiple", [8, 32])
@pytest.mark.parametrize("rtype", ["pixel", "area"])
def test_bucket_sizes(multiple, rtype):
    res = 64 if multiple == 8 else 256
    for aspect in [0.1, 0.25, 0.5, 0.77, 1.0, 1.3, 1.5, 2.0, 3.9, 10.0]:
        w, h = data.bucket_size(aspect, res, rtype, multiple, 4.0)
        assert w % multiple == 0 and h % multiple == 0
        assert max(w, h) / min(w, h) <= 4.0
        if rtype == "pixel":
            assert min(w, h) == res
        else:
            assert abs(w * h / res**2 - 1) < 0.3
    assert data.bucket_size(1.5, 64) == (96, 64) and data.bucket_size(2 / 3, 64) == (64, 96)


def test_progressive_sizes_rule():
    def ratio(a, b):
        return max(a[0] / b[0], a[1] / b[1])

    for src, dst in [((3000, 2000), (96, 64)), ((257, 300), (64, 64)), ((95, 64), (64, 64)), ((48, 48), (64, 64))]:
        steps = [src] + data.progressive_sizes(src, dst)
        assert steps[-1] == dst
        for a, b in zip(steps[:-2], steps[1:-1]):  # x0.75 steps (never more than 1/0.75)...
            assert ratio(a, b) <= 1 / 0.75 + 1e-9 and ratio(a, dst) > 1.5  # ...only while more than 1.5x too big
        assert ratio(steps[-2], dst) <= 1.5  # then one final resize
    assert len(data.progressive_sizes((3000, 2000), (96, 64))) == 12  # 31x: 11 steps to 1.34x, then the last


def test_pipeline_resizes_progressively(tmp_path, monkeypatch):
    """The exact path really resizes in those steps: record every Image.resize it makes."""
    noise(1200, 800).save(tmp_path / "a.png")
    seen, resize = [], Image.Image.resize
    monkeypatch.setattr(Image.Image, "resize", lambda self, size, *a, **k: seen.append((self.size, size))
                        or resize(self, size, *a, **k))
    out = data.load_item(tmp_path / "a.png", (96, 64), (0, 0, 1200, 800), fast=False)
    assert out.size == (96, 64) and seen[0][0] == (1200, 800) and seen[-1][1] == (96, 64)
    for (src, dst), (nxt, _) in zip(seen[:-1], seen[1:]):
        assert dst == nxt and src[0] / dst[0] <= 1 / 0.75 + 1e-9 and src[0] / 96 > 1.5  # each step feeds the next
    assert seen[-1][0][0] / 96 <= 1.5 and len(seen) == len(data.progressive_sizes((1200, 800), (96, 64)))


def test_fast_path_quality(tmp_path):
    """JPEG draft + box reduce stays far inside the 35 dB bound vs the exact full-decode path."""
    smooth = np.asarray(noise(150, 100).resize((1500, 1000), Image.BICUBIC))  # photo-like: detail at all scales
    img = Image.fromarray((0.5 * smooth + 0.5 * np.asarray(noise(1500, 1000, seed=3))).astype(np.uint8))
    img.save(tmp_path / "a.jpg", quality=90)
    for size in [(96, 64), (384, 256)]:
        box = data.crop_box((1500, 1000), size, {**data.DEFAULTS, "crop_style": "center"}, random.Random(0))
        fast, exact = (data.load_item(tmp_path / "a.jpg", size, box, fast=f) for f in (True, False))
        assert fast.size == exact.size == size
        assert data.psnr(fast, exact) > 35


def test_max_target_precrop_rule(tmp_path):
    ds = {**data.DEFAULTS, "crop": True, "crop_style": "center", "maximum_image_size": 256,
          "target_downsample_size": 128, "resolution": 64, "minimum_image_size": 64}
    rng = random.Random(0)
    img = noise(200, 150)
    img.save(tmp_path / "a.png")
    for style in ["random", "center", "corner"]:  # a native-scale crop is the source's pixels, untouched
        box = data.crop_box((200, 150), (96, 64), {**ds, "crop_style": style}, rng)
        assert box[0] == int(box[0]) and box[1] == int(box[1]) and (style != "corner" or box[:2] == (0, 0))
        assert style != "center" or box[:2] == (52, 43)
        out = data.load_item(tmp_path / "a.png", (96, 64), box)
        assert np.array_equal(np.asarray(out), np.asarray(img.crop(tuple(int(v) for v in box))))
    for w, h in [(256, 300), (300, 256), (200, 900), (64, 64)]:  # shorter edge <= max: a crop at native scale
        x0, y0, x1, y1 = data.crop_box((w, h), (64, 64), ds, rng)
        assert (x1 - x0, y1 - y0) == (64, 64) and x0 == int(x0)
    for w, h in [(257, 300), (3000, 2000)]:  # shorter edge > max: as if first brought to 128 px
        x0, y0, x1, y1 = data.crop_box((w, h), (64, 64), ds, rng)
        assert x1 - x0 == pytest.approx(64 * min(w, h) / 128)
    x0, y0, x1, y1 = data.crop_box((3000, 2000), (96, 64), {**ds, "crop": False}, rng)  # no crop: resize to cover
    assert (x1 - x0, y1 - y0) == (3000, 2000)


# ---------------------------------------------------------------------------------------------
# decoding, skipping


def bomb_png(path, w=30000, h=30000):
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * 10)) + chunk(b"IEND", b""))


def test_modes_formats_and_broken_files(tmp_path):
    d = tmp_path / "mix"
    d.mkdir()
    noise(80, 64).save(d / "rgb.jpg")
    noise(80, 64).convert("CMYK").save(d / "cmyk.jpg")
    noise(80, 64, mode="L").save(d / "grey.png")
    noise(80, 64, mode="1").save(d / "bits.bmp")
    noise(80, 64).save(d / "tiff.tif")
    noise(80, 64).save(d / "web.webp")
    Image.new("RGBA", (80, 64), (255, 0, 0, 0)).save(d / "clear.png")  # fully transparent -> BACKGROUND
    Image.new("LA", (80, 64), (0, 0)).save(d / "la.png")
    p = Image.new("P", (80, 64), 0)
    p.putpalette([0, 0, 0] * 256)
    p.save(d / "pal.png", transparency=0)
    Image.fromarray(np.full((64, 80), 32896, np.uint16)).save(d / "deep.png")  # 16-bit grey, 32896 / 257 = 128
    frames = [Image.new("RGB", (80, 64), c) for c in ("blue", "red")]
    frames[0].save(d / "anim.gif", save_all=True, append_images=frames[1:])
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: stored 80x64, seen 64x80
    noise(80, 64).save(d / "rotated.jpg", exif=exif)
    (d / "empty.png").write_bytes(b"")
    (d / "text.jpg").write_text("not an image at all")
    buf = io.BytesIO()
    noise(200, 200).save(buf, "JPEG")
    (d / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    buf = io.BytesIO()
    noise(200, 200).save(buf, "PNG")
    (d / "cut.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    bomb_png(d / "bomb.png")
    noise(40, 80).save(d / "small.png")
    (d / "notes.txt").write_text("ignored: not an image extension")

    assert data.probe(d / "rotated.jpg") == (64, 80)
    assert data.to_rgb(Image.open(d / "clear.png")).getpixel((0, 0)) == data.BACKGROUND
    assert data.to_rgb(Image.open(d / "pal.png")).getpixel((0, 0)) == data.BACKGROUND
    assert data.to_rgb(Image.open(d / "la.png")).getpixel((0, 0)) == data.BACKGROUND
    assert data.to_rgb(Image.open(d / "deep.png")).getpixel((0, 0)) == (128, 128, 128)
    assert data.to_rgb(Image.open(d / "anim.gif")).getpixel((0, 0)) == (0, 0, 255)  # first frame

    cfg = cfg_for(tmp_path, [{"instance_data_dir": str(d), "resolution": 64}], train_batch_size=2)
    loader = data.make_loader(cfg)
    reasons = {p.split("/")[-1]: r for p, r in loader.skipped}
    assert set(reasons) == {"empty.png", "text.jpg", "cut.jpg", "cut.png", "bomb.png", "small.png"}
    assert reasons["empty.png"] == "empty file" and reasons["text.jpg"] == "not an image"
    assert reasons["cut.jpg"].startswith("truncated") and reasons["bomb.png"].startswith("decompression bomb")
    assert reasons["small.png"].startswith("too small") and not reasons["cut.png"].startswith("too small")
    lines = (tmp_path / "out" / "skipped.txt").read_text().splitlines()
    assert sorted(line.split("\t")[0].split("/")[-1] for line in lines) == sorted(reasons)
    assert loader.report[0] == {"id": "mix", "found": 18, "used": 12, "skipped": Counter(
        r.split(":")[0] for r in reasons.values())}
    for batch in loader:
        assert batch["pixels"].dtype == torch.float32 and batch["pixels"].shape[1] == 3


def test_all_broken_is_a_clear_error(tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    (d / "a.jpg").write_bytes(b"")
    (d / "b.png").write_text("nope")
    with pytest.raises(ValueError, match=r"no usable images.*all 2 skipped.*skipped.txt"):
        data.make_loader(cfg_for(tmp_path, [{"instance_data_dir": str(d)}]))
    assert len((tmp_path / "out" / "skipped.txt").read_text().splitlines()) == 2
    (tmp_path / "none").mkdir()
    with pytest.raises(ValueError, match="none found"):
        data.make_loader(cfg_for(tmp_path, [{"instance_data_dir": str(tmp_path / "none")}]))
    with pytest.raises(FileNotFoundError, match="instance_data_dir"):
        data.make_loader(cfg_for(tmp_path, [{"instance_data_dir": str(tmp_path / "missing")}]))
    with pytest.raises(ValueError, match="unknown keys"):
        data.make_loader(cfg_for(tmp_path, [{"instance_data_dir": str(d), "resoluton": 64}]))


# ---------------------------------------------------------------------------------------------
# the scan cache


def counting(monkeypatch, name="probe") -> list:
    """Every argument data.<name> (probe or index_shard) is called with, from now on."""
    calls, real = [], getattr(data, name)
    monkeypatch.setattr(data, name, lambda path: calls.append(str(path)) or real(path))
    return calls


def test_scan_cache_decodes_only_new_or_changed_files(tmp_path, monkeypatch):
    d = folder(tmp_path, "a", [(64, 64), (96, 64), (80, 120), (200, 64), (40, 40)], captions=["one", "two\nthree",
                                                                                                "four", "", "five"])
    (d / "broken.jpg").write_text("not a jpeg")
    age(d)
    cfg = cfg_for(tmp_path, [{"instance_data_dir": str(d), "caption_strategy": "textfile"}])
    cache, out = tmp_path / "cache", str(tmp_path / "out")

    def scan(cache_dir=cache):
        return data.scan(data.load_datasets(cfg), out, cache_dir=cache_dir)

    probed = counting(monkeypatch)
    uncached = scan(None)
    assert len(probed) == 6
    probed.clear()
    assert scan() == uncached and len(probed) == 6  # the first scan with a cache decodes everything...
    probed.clear()
    assert scan() == uncached and probed == []  # ...a rerun nothing, and returns the very same
    (cache_file,) = cache.glob("*.json")
    saved = json.loads(cache_file.read_text())
    assert saved["version"] == data.SCAN_CACHE_VERSION and saved["source"] == str(d)
    assert saved["files"][str(d / "a_1.png")]["probe"] == [96, 64]
    assert saved["files"][str(d / "broken.jpg")]["probe"] == "not an image"

    noise(72, 64, seed=7).save(d / "a_0.png")  # changed (its size on disk too), and a new file
    os.utime(d / "a_2.png")  # touched only: same bytes, new mtime
    noise(64, 64).save(d / "new.png")
    (d / "new.txt").write_text("six")
    (d / "a_1.png").unlink()  # deleted
    age(d / "a_0.png", d / "new.png")  # a_2.png stays "just modified": probed now, and again next time
    probed.clear()
    again = scan()
    assert sorted(Path(p).name for p in probed) == ["a_0.png", "a_2.png", "new.png"]
    assert again == scan(None)
    entries = {Path(e[0]).name: e[1:3] for e in again[0]}
    assert entries["a_0.png"] == (72, 64) and "a_1.png" not in entries and entries["new.png"] == (64, 64)
    saved = json.loads(cache_file.read_text())["files"]
    assert str(d / "a_1.png") not in saved and str(d / "a_2.png") not in saved and str(d / "new.png") in saved
    probed.clear()
    scan()
    assert [Path(p).name for p in probed] == ["a_2.png"]  # modified just before the last scan: not trusted yet

    # the cache holds what decoding told, not captions or verdicts: other options never meet stale results
    for ds in ({"caption_strategy": "instanceprompt", "instance_prompt": "a dog"}, {"minimum_image_size": 80},
               {"caption_strategy": "filename", "prepend_instance_prompt": True, "instance_prompt": "sks"}):
        cfg.datasets = [{"instance_data_dir": str(d), **ds}]
        probed.clear()
        got = scan()
        assert [Path(p).name for p in probed] == ["a_2.png"]  # only the file modified just before the last scan
        assert got == scan(None)
    assert {e[3][0] for e in got[0]} == {"sks a 0", "sks a 2", "sks a 3", "sks new"}  # a_4 is too small

    cache_file.write_text("{not json")  # an unreadable cache is rebuilt, not an error
    probed.clear()
    assert scan() == scan(None)
    assert len(probed) == 2 * 6


def test_loader_keeps_its_scan_in_the_text_cache_folder(tmp_path, monkeypatch):
    d = folder(tmp_path, "a", SIZES)
    age(d)
    cfg = cfg_for(tmp_path, [{"instance_data_dir": str(d)}], train_batch_size=2, text_cache_dir=str(tmp_path / "t5"))
    first = data.make_loader(cfg)
    assert data.scan_cache_dir(cfg) == tmp_path / "t5" / "scan" and len(list((tmp_path / "t5" / "scan").glob("*"))) == 1
    probed = counting(monkeypatch)
    cfg.output_dir = str(tmp_path / "another_run")  # another run on the same images reads the same records
    second = data.make_loader(cfg)
    assert probed == [] and second.items.entries == first.items.entries
    _same(list(first), list(second))


def _scan_rank(rank, datasets, out, cache_dir, root):
    """One of two gloo processes (torch.multiprocessing.spawn): scan, and write what it decoded and found."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{root}/rendezvous", rank=rank, world_size=2)
    calls = {"probe": [], "index_shard": []}
    for name, seen in calls.items():
        real = getattr(data, name)
        setattr(data, name, lambda path, real=real, seen=seen: seen.append(path) or real(path))
    entries, skipped, report = data.scan(datasets, out, rank, 2, cache_dir)
    Path(root, f"rank{rank}.json").write_text(json.dumps({"entries": entries, "skipped": skipped, **calls}))
    torch.distributed.destroy_process_group()


def test_two_gloo_processes_share_the_scan(tmp_path, monkeypatch):
    """Each rank decodes its half of the new images (folder files and shard members) and indexes half the shards;
    both end with the same entries, in the same order, as one process scanning alone; the rerun decodes nothing."""
    d = folder(tmp_path, "a", [(64, 64), (96, 64), (80, 120), (70, 70), (100, 64), (64, 90), (40, 40)])
    for s in range(2):
        write_shard(tmp_path / "shards" / f"{s:05d}.tar", {f"{s}{k:03d}": {"jpg": encoded(noise(64 + 8 * k, 64, k)),
                                                                             "txt": f"shard {s} image {k}"}
                                                           for k in range(3)})
    age(d, tmp_path / "shards")
    shards = {"type": "webdataset", "shards": str(tmp_path / "shards" / "{00000..00001}.tar")}
    datasets = data.load_datasets(cfg_for(tmp_path, [{"instance_data_dir": str(d)}, shards]))
    alone = data.scan(datasets, str(tmp_path / "alone"))
    torch.multiprocessing.spawn(_scan_rank, (datasets, str(tmp_path / "out"), str(tmp_path / "cache"), str(tmp_path)),
                                nprocs=2)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    everything = [e[0] for e in alone[0]] + [p for p, _ in alone[1]]
    assert len(everything) == 7 + 6
    for kind, total in (("probe", everything), ("index_shard", ["00000.tar", "00001.tar"])):
        mine = [set(r[kind]) for r in ranks]
        assert not mine[0] & mine[1] and abs(len(mine[0]) - len(mine[1])) <= 1  # halves, no file twice
        assert {Path(p.split("::")[0]).name if kind == "index_shard" else p for p in mine[0] | mine[1]} == set(total)
    for r in ranks:
        assert r["entries"] == json.loads(json.dumps(alone[0])) and r["skipped"] == json.loads(json.dumps(alone[1]))
    probed = counting(monkeypatch)
    assert data.scan(datasets, str(tmp_path / "out"), cache_dir=tmp_path / "cache") == alone and probed == []


# ---------------------------------------------------------------------------------------------
# batches


SIZES = [(64, 64), (96, 64), (64, 96), (100, 70), (70, 140), (300, 200), (80, 80), (128, 64)]


def test_batches_buckets_and_range(tmp_path):
    d = folder(tmp_path, "a", SIZES * 2)
    loader = data.make_loader(cfg_for(tmp_path, [{"instance_data_dir": str(d)}], train_batch_size=2))
    assert loader.buckets == {"64x64": 4, "96x64": 4, "64x96": 2, "88x64": 2, "64x128": 2, "128x64": 2}
    assert len(loader) == loader.steps_per_epoch == 8
    shapes = Counter()
    for batch in loader:
        x = batch["pixels"]
        assert x.shape[0] == 2 and x.shape[2] % 8 == 0 and x.shape[3] % 8 == 0
        assert x.min() >= -1 and x.max() <= 1 and x.min() < -0.9 and x.max() > 0.9
        shapes[f"{x.shape[3]}x{x.shape[2]}"] += 2
    assert shapes == Counter(loader.buckets)


@pytest.mark.parametrize("crop_aspect", ["square", "preserve", "closest", "random"])
def test_crop_aspect_applies_only_with_crop(tmp_path, crop_aspect):
    """SimpleTuner's meaning: crop_aspect shapes the crop, so with crop=False every image keeps its own aspect (capped
    by max_aspect_ratio) and is resized whole into its bucket, whatever crop_aspect says."""
    d = tmp_path / "a"
    d.mkdir()
    expected = {}  # caption -> bucket (w, h)
    for i, (size, bucket) in enumerate([((64, 64), (64, 64)), ((96, 64), (96, 64)), ((64, 96), (64, 96)),
                                        ((300, 200), (96, 64)), ((70, 140), (64, 128)),
                                        ((400, 64), (256, 64))]):  # 6.25:1, capped at max_aspect_ratio=4
        noise(*size, seed=i).save(d / f"a_{i}.png")
        expected[f"a {i}"] = bucket
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: stored 120x80, seen as an 80x120 portrait
    noise(120, 80, seed=9).save(d / "portrait.jpg", exif=exif)
    expected["portrait"] = (64, 96)
    ds = {"instance_data_dir": str(d), "crop_aspect": crop_aspect, "crop_style": "center"}
    loader = data.make_loader(cfg_for(tmp_path, [ds], train_batch_size=1))
    assert loader.buckets == dict(Counter(f"{w}x{h}" for w, h in expected.values()))
    for batch in islice(loader.stream(), 2 * len(loader)):  # two epochs: crop_aspect='random' deals anew each one
        (caption,) = batch["captions"]
        assert batch["pixels"].shape[2:] == expected[caption][::-1]
        if caption == "portrait":  # the whole image, upright, nothing cut off
            whole = data.resize(ImageOps.exif_transpose(Image.open(d / "portrait.jpg")).convert("RGB"), (64, 96))
            assert np.array_equal(np.asarray(uint8(batch["pixels"][0])), np.asarray(whole))
    cropped = data.make_loader(cfg_for(tmp_path, [dict(ds, crop=True)], train_batch_size=1))
    if crop_aspect == "square":  # with crop the option applies: every image gives a square crop
        assert cropped.buckets == {"64x64": 7}
    elif crop_aspect == "preserve":
        assert cropped.buckets == loader.buckets
    else:  # from crop_aspect_buckets, which end at 2:1
        assert "256x64" not in cropped.buckets and sum(cropped.buckets.values()) == 7


def test_captions_per_strategy(tmp_path):
    a = folder(tmp_path, "a", SIZES[:4], captions=["one\ntwo", "three", "", "four"])  # a_2 has an empty caption file
    (a / "a_3.txt").unlink()  # ...and a_3 none
    b = folder(tmp_path, "b", SIZES[:2])
    c = folder(tmp_path, "c", SIZES[:2])
    sets = [{"instance_data_dir": str(a), "caption_strategy": "textfile", "crop_aspect": "square"},
            {"instance_data_dir": str(b), "caption_strategy": "filename", "prepend_instance_prompt": True,
             "instance_prompt": ["sks", "zwx"], "crop_aspect": "square"},
            {"instance_data_dir": str(c), "caption_strategy": "instanceprompt", "instance_prompt": "a photo",
             "crop_aspect": "square"}]
    cfg = cfg_for(tmp_path, sets, train_batch_size=1)
    expected = ["one", "two", "three", "sks b 0", "zwx b 0", "sks b 1", "zwx b 1", "a photo"]
    assert data.all_captions(cfg) == expected
    loader = data.make_loader(cfg)
    assert sorted(r for _, r in loader.skipped) == ["no caption: a_2.txt is empty", "no caption: a_3.txt is missing"]
    seen = Counter(c for batch in islice(loader.stream(), 20 * len(loader)) for c in batch["captions"])
    assert set(seen) == set(expected)  # every caption the cache holds is used, and nothing else
    assert seen["a photo"] == 40 and seen["one"] + seen["two"] == 20 and min(seen.values()) > 3


def test_repeats_and_probability(tmp_path):
    a = folder(tmp_path, "a", [(64, 64)] * 4)
    b = folder(tmp_path, "b", [(64, 64)] * 12)
    cfg = cfg_for(tmp_path, [{"instance_data_dir": str(a), "repeats": 2}, {"instance_data_dir": str(b)}],
                  train_batch_size=4)
    loader = data.make_loader(cfg)
    assert len(loader) == 6
    seen = Counter(c for batch in loader for c in batch["captions"])
    assert seen == Counter({f"a {i}": 3 for i in range(4)} | {f"b {i}": 1 for i in range(12)})

    cfg.datasets = [{"instance_data_dir": str(a), "probability": 3}, {"instance_data_dir": str(b), "probability": 1}]
    loader = data.make_loader(cfg)
    assert loader.quota == [3, 1] and len(loader) == 4  # 1 + 3 batches a pass, shared 3:1
    seen = Counter(c[0] for batch in islice(loader.stream(), 10 * len(loader)) for c in batch["captions"])
    assert seen == {"a": 120, "b": 40}
    per_image = Counter(c for batch in loader for c in batch["captions"] if c[0] == "a")
    assert set(per_image.values()) == {3}  # a's three batches a epoch: three shuffled passes over its 4 images


def test_small_bucket_and_tiny_dataset(tmp_path):
    d = folder(tmp_path, "a", [(64, 64), (64, 64), (64, 64), (96, 64)])
    loader = data.make_loader(cfg_for(tmp_path, [{"instance_data_dir": str(d)}], train_batch_size=4))
    assert len(loader) == 2
    batches = list(loader)
    sizes = sorted(tuple(b["pixels"].shape) for b in batches)
    assert sizes == [(4, 3, 64, 64), (4, 3, 64, 96)]
    small, tiny = sorted((b["captions"] for b in batches), key=lambda c: c[0] == "a 3")
    assert tiny == ["a 3"] * 4  # a one-image bucket fills its batch with itself
    assert set(small) == {"a 0", "a 1", "a 2"} and len(small) == 4  # three images + the first one again


def _take(batches, n):
    return list(islice(batches, n))


def _same(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        assert x["captions"] == y["captions"] and torch.equal(x["pixels"], y["pixels"])


def _resume_cfg(tmp_path):
    d = folder(tmp_path, "a", SIZES * 2, captions=["x\ny\nz"] * 16)
    return cfg_for(tmp_path, [{"instance_data_dir": str(d), "crop": True, "crop_aspect": "random"}],
                   train_batch_size=2)


@pytest.mark.parametrize("workers", [0, 2])
def test_same_seed_same_batches_and_exact_resume(tmp_path, workers):
    cfg = _resume_cfg(tmp_path)
    n = len(data.make_loader(cfg))
    run = _take(data.make_loader(cfg).stream(), 2 * n + 4)  # more than two epochs, in-process
    cfg.dataloader_num_workers = workers
    _same(run, _take(data.make_loader(cfg).stream(), len(run)))  # worker processes change nothing
    stop = n + 3  # mid-epoch: the second epoch's 4th batch is next
    by_stream = data.make_loader(cfg)
    _take(by_stream.stream(), stop)
    by_iter = data.make_loader(cfg)
    assert len(list(by_iter)) == n and len(_take(by_iter, 3)) == 3  # an epoch, then a loop left after 3 batches
    for probe in (by_stream, by_iter):
        state = probe.state_dict()
        assert state["epoch"] == 1 and state["step"] == 3
        for api in ("stream", "iter"):
            resumed = data.make_loader(cfg)
            resumed.load_state_dict(json.loads(json.dumps(state)))
            if api == "stream":
                _same(run[stop:], _take(resumed.stream(), len(run) - stop))
            else:  # the rest of the second epoch, then all of the third
                _same(run[stop : 2 * n], list(resumed))
                _same(run[2 * n : 3 * n][:4], _take(resumed, 4))
    cfg.seed += 1
    other = _take(data.make_loader(cfg).stream(), 9)
    assert any(x["captions"] != y["captions"] for x, y in zip(run, other))


def test_iter_is_one_epoch_and_stream_one_dataloader(tmp_path, monkeypatch):
    """`for batch in loader` ends with the epoch (PyTorch's convention); stream() crosses epochs in one DataLoader,
    so its workers are started once."""
    made = []

    class Counted(torch.utils.data.DataLoader):
        def __init__(self, *args, **kwargs):
            made.append(1)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(torch.utils.data, "DataLoader", Counted)
    cfg = _resume_cfg(tmp_path)
    loader = data.make_loader(cfg)
    n = len(loader)
    assert len(_take(loader, n + 1)) == n  # stops at the end of the epoch instead of running on
    assert loader.state_dict()["epoch"] == 1 and loader.state_dict()["step"] == 0
    second = list(loader)  # the next iter(): the next epoch, whole
    assert len(second) == n and loader.state_dict()["epoch"] == 2 and len(made) == 2
    made.clear()
    streamed = _take(data.make_loader(cfg).stream(), 3 * n + 1)
    assert len(made) == 1  # one DataLoader for three epochs and more
    _same(second, streamed[n : 2 * n])


def test_two_ranks_disjoint_equal_steps(tmp_path):
    d = folder(tmp_path, "a", [(64, 64)] * 16 + [(96, 64)] * 8)
    cfg = cfg_for(tmp_path, [{"instance_data_dir": str(d)}], train_batch_size=2)
    ranks = [data.make_loader(cfg, rank=r, world_size=2) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 6
    seen = [[c for b in r for c in b["captions"]] for r in ranks]
    assert len(set(seen[0])) == len(seen[0]) == 12 and not set(seen[0]) & set(seen[1])
    assert set(seen[0]) | set(seen[1]) == {f"a {i}" for i in range(24)}
    single = data.make_loader(cfg)  # one process, twice the steps: the same multiset of samples
    assert len(single) == 12 and sorted(c for b in single for c in b["captions"]) == sorted(seen[0] + seen[1])


def test_stage2_low_res_is_the_downsampled_crop(tmp_path):
    d = folder(tmp_path, "a", [(300, 200), (200, 200), (96, 130), (160, 90)])
    cfg = cfg_for(tmp_path, [{"instance_data_dir": str(d), "resolution": 64, "crop": True}],
                  train_batch_size=1, model_flavour="ii-medium-450m")
    for batch in data.make_loader(cfg):
        hi, lo = batch["pixels"], batch["low_res"]
        assert hi.shape[2] % 32 == 0 and hi.shape[3] % 32 == 0 and lo.shape[2:] == (hi.shape[2] // 4, hi.shape[3] // 4)
        assert lo.min() >= -1 and lo.max() <= 1
        expect = data.resize(uint8(hi[0]), (hi.shape[3] // 4, hi.shape[2] // 4))
        assert np.array_equal(np.asarray(uint8(lo[0])), np.asarray(expect))


def test_simpletuner_multidatabackend_json(tmp_path):
    d = folder(tmp_path, "primary", [(300, 200), (64, 64), (500, 400), (40, 40)])
    backend = [
        {"id": "primary-dataset", "type": "local", "instance_data_dir": str(d), "crop": True,
         "crop_aspect": "square", "crop_style": "random", "resolution": 64, "resolution_type": "pixel",
         "minimum_image_size": 64, "maximum_image_size": 256, "target_downsample_size": 128,
         "prepend_instance_prompt": False, "instance_prompt": "Your Subject Trigger Phrase or Word",
         "caption_strategy": "instanceprompt", "repeats": 1, "cache_dir_vae": "/ignored"},
        {"id": "an example backend for text embeds.", "dataset_type": "text_embeds", "default": True,
         "disable": False, "type": "local", "cache_dir": str(tmp_path / "cache" / "text")},
        {"id": "off", "type": "aws", "disable": True},
    ]
    path = tmp_path / "multidatabackend.json"
    path.write_text(json.dumps(backend))
    cfg = cfg_for(tmp_path, str(path), train_batch_size=2)
    (ds,) = data.load_datasets(cfg)
    assert ds["id"] == "primary-dataset" and ds["maximum_image_size"] == 256 and ds["repeats"] == 1
    assert data.text_cache_dir_from(cfg) == str(tmp_path / "cache" / "text")
    assert data.all_captions(cfg) == ["Your Subject Trigger Phrase or Word"]
    loader = data.make_loader(cfg)
    assert loader.buckets == {"64x64": 6}
    assert [r for _, r in loader.skipped] == ["too small: 40x40 < minimum_image_size=64"]
    batch = next(iter(loader))
    assert batch["pixels"].shape == (2, 3, 64, 64)
    backend[2]["disable"] = False
    path.write_text(json.dumps(backend))
    with pytest.raises(ValueError, match="only local"):
        data.load_datasets(cfg)


# ---------------------------------------------------------------------------------------------
# pictures: to_pil, image_grid, the contact sheet


def test_to_pil_rounds_like_diffusers():
    from diffusers.image_processor import VaeImageProcessor

    x = torch.rand(2, 3, 5, 7, generator=torch.Generator().manual_seed(0)) * 2.2 - 1.1
    ref = VaeImageProcessor.numpy_to_pil((x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy())
    for a, b in zip(data.to_pil(x), ref):
        assert a.tobytes() == b.tobytes()


def test_image_grid_layout():
    x = torch.rand(5, 3, 32, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    grid = data.image_grid(x, [f"image {i}" for i in range(5)], cols=3)
    cw, ch = 48 * 3, 32 * 3  # enlarged by 3, the least integer factor reaching min_width=128
    assert grid.width == 4 + 3 * (cw + 4) and grid.height > 4 + 2 * (ch + 4)  # 3 columns, 2 rows, label lines
    cell = grid.crop((4 + cw + 4, 4, 4 + 2 * cw + 4, 4 + ch))  # the second image, pixels kept sharp
    assert cell.tobytes() == data.to_pil(x[1:2])[0].resize((cw, ch), Image.NEAREST).tobytes()
    assert data.image_grid(x[:4]).width == 4 + 2 * (cw + 4)  # no cols: a square-ish grid
    with pytest.raises(ValueError, match="5 images but 2 labels"):
        data.image_grid(x, ["a", "b"])


@pytest.mark.parametrize("stage", [1, 2])
def test_cli_contact_sheet(tmp_path, stage):
    """python data.py CONFIG: the report and a contact sheet; stage II shows each low-res partner left of its sample."""
    d = folder(tmp_path, "a", [(64, 64)] * 4)
    flavour = {1: {}, 2: {"model_flavour": "ii-medium-450m"}}[stage]
    cfg = cfg_for(tmp_path, [{"instance_data_dir": str(d), "resolution": 64}], train_batch_size=4, **flavour)
    sheet = Image.open(data.main(cfg))
    first = next(data.make_loader(cfg).stream())  # the sheet's first cells: the same seed, the same batch
    cells = [data.to_pil(first["pixels"][:1])[0]]
    if stage == 2:
        cells.insert(0, data.to_pil(first["low_res"][:1])[0].resize((64, 64), Image.NEAREST))
    cols = {1: 5, 2: 10}[stage]  # 24 samples: sqrt-ish; stage II: 24 pairs, an even count per row
    assert sheet.width == 4 + cols * (128 + 4)
    for k, cell in enumerate(cells):  # enlarged to 128 px (nearest)
        got = sheet.crop((4 + k * 132, 4, 4 + k * 132 + 128, 4 + 128))
        assert got.tobytes() == cell.resize((128, 128), Image.NEAREST).tobytes()
