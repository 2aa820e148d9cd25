"""data.py on WebDataset / img2dataset tar shards: brace ranges and globs, the shard index in the scan cache, skips,
captions, batches equal to a folder's, and a training run."""

import json
import tarfile
from itertools import islice
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_data import _same, age, cfg_for, counting, encoded, noise, write_shard
from test_train import config, project, weights  # noqa: F401  (project is a fixture)

import data
import train

SIZES = [(64, 64), (96, 64), (64, 96), (80, 80), (128, 64), (100, 70), (70, 140)]


def samples() -> dict:
    """img2dataset's layout, three samples a shard: KEY.jpg + KEY.txt + KEY.json, one PNG, one broken image, one too
    small, one captioned only in its .json and one without any caption."""
    out = {f"{k:09d}": {"jpg": encoded(noise(w, h, seed=k)), "txt": f"photo {k}\nimage {k}",
                        "json": {"caption": f"unused {k}", "url": f"https://x/{k}.jpg", "key": f"{k:09d}"}}
           for k, (w, h) in enumerate(SIZES)}
    out["000000002"] = {"png": encoded(noise(64, 96, seed=2), "PNG"), "txt": "photo 2"}
    out["000000003"]["txt"] = ""  # empty: the .json's caption is used
    out["000000003"]["json"] = {"caption": "from json", "status": "success"}
    out["000000007"] = {"jpg": b"not a jpeg", "txt": "broken"}
    out["000000008"] = {"jpg": encoded(noise(32, 32)), "txt": "small", "json": {}}
    out["000000009"] = {"jpg": encoded(noise(64, 64, seed=9)), "json": {"url": "https://x/9.jpg"}}  # no caption
    return dict(sorted(out.items()))


def make_shards(root: Path, per_shard=3) -> Path:
    items = list(samples().items())
    for s in range(0, len(items), per_shard):
        write_shard(root / f"{s // per_shard:05d}.tar", dict(items[s : s + per_shard]))
    age(root)
    return root


def twin_folder(root: Path) -> Path:
    """The same images as files, each caption in its .txt (the .json-only caption too)."""
    root.mkdir()
    for key, members in samples().items():
        ext = next(e for e in members if e in ("jpg", "png"))
        (root / f"{key}.{ext}").write_bytes(members[ext])
        text = members.get("txt") or members.get("json", {}).get("caption")
        if text:
            (root / f"{key}.txt").write_text(text)
    age(root)
    return root


def shard_set(root: Path, **kw) -> dict:
    return {"type": "webdataset", "shards": str(root / "{00000..00003}.tar"), **kw}


# ---------------------------------------------------------------------------------------------
# naming shards


def test_brace_ranges_globs_and_clear_errors(tmp_path, monkeypatch):
    assert data.expand_braces("d/{00000..00002}.tar") == ["d/00000.tar", "d/00001.tar", "d/00002.tar"]
    assert data.expand_braces("{8..10}-{a,b}") == ["8-a", "8-b", "9-a", "9-b", "10-a", "10-b"]
    assert data.expand_braces("plain.tar") == ["plain.tar"]
    with pytest.raises(ValueError, match="write a range"):
        data.expand_braces("x{abc}.tar")
    root = make_shards(tmp_path / "shards")
    monkeypatch.chdir(tmp_path)  # relative patterns, as configs write them

    def paths(shards, **kw):
        (ds,) = data.load_datasets(cfg_for(tmp_path, [{"type": "webdataset", "shards": shards, **kw}]))
        return ds, data.shard_paths(ds)

    ds, found = paths("shards/{00000..00003}.tar")
    assert found == [f"shards/0000{i}.tar" for i in range(4)] and ds["id"] == "shards"
    assert ds["caption_strategy"] == "textfile"  # a shard's default: its text, not its member names
    assert paths("shards/*.tar")[1] == found
    assert paths(["shards/00003.tar", "shards/0000[01].tar", "shards/00000.tar"], id="mine")[1] == [
        "shards/00003.tar", "shards/00000.tar", "shards/00001.tar"]  # in the order named, each file once
    with pytest.raises(FileNotFoundError, match=r"2 name\(s\) match no file \(shards/00004.tar, shards/00005.tar;.*"
                                                r"use a glob such as 'data/\*.tar'"):
        paths("shards/{00000..00005}.tar")
    with pytest.raises(FileNotFoundError, match="match no file"):
        paths("elsewhere/*.tar")
    assert data.load_datasets(cfg_for(tmp_path, [shard_set(Path("elsewhere"))]), need_images=False)[0]["id"] == \
        "elsewhere"  # the dry run needs no images
    for bad, match in [({"type": "webdataset"}, "names its tar files with shards"),
                       ({"type": "webdataset", "shards": "shards/*.tar", "instance_data_dir": "shards"}, "no instance"),
                       ({"instance_data_dir": str(root), "shards": "shards/*.tar"}, "needs type='webdataset'"),
                       ({"type": "s3", "shards": "shards/*.tar"}, "only local image folders")]:
        with pytest.raises(ValueError, match=match):
            data.load_datasets(cfg_for(tmp_path, [bad]))


# ---------------------------------------------------------------------------------------------
# the index, skips, captions


def test_scan_indexes_members_by_offset_and_lists_skips(tmp_path, monkeypatch):
    root = make_shards(tmp_path / "shards")
    cfg = cfg_for(tmp_path, [shard_set(root)], train_batch_size=2)
    loader = data.make_loader(cfg)
    assert loader.report == [{"id": "shards", "found": 10, "used": 7, "shards": 4,
                              "skipped": {"not an image": 1, "too small": 1, "no caption": 1}}]
    assert (tmp_path / "out" / "skipped.txt").read_text().splitlines() == [
        f"{root}/00002.tar/000000007.jpg\tnot an image",
        f"{root}/00002.tar/000000008.jpg\ttoo small: 32x32 < minimum_image_size=64",
        f"{root}/00003.tar/000000009.jpg\tno caption: no text in 000000009.txt or in 000000009.json's 'caption'"]
    captions = {Path(e[0].split("::")[-1]).stem: e[3] for e in loader.items.entries}
    assert captions["000000000"] == ["photo 0", "image 0"] and captions["000000003"] == ["from json"]
    assert [e[1:3] for e in loader.items.entries] == [tuple(s) for s in SIZES]

    (cache_file,) = data.scan_cache_dir(cfg).glob("*.json")  # the index: each image member's bytes, by offset
    files = json.loads(cache_file.read_text())["files"]
    assert sorted(files) == [str(root / f"0000{i}.tar") for i in range(4)]
    members = [m for f in sorted(files) for m in files[f]["members"]]
    assert [m["name"] for m in members] == [f"{k:09d}.{'png' if k == 2 else 'jpg'}" for k in range(10)]
    for shard, rec in files.items():
        with open(shard, "rb") as f, tarfile.open(shard) as tar:
            for m in rec["members"]:
                f.seek(m["offset"])
                assert f.read(m["size"]) == samples()[m["name"].split(".")[0]][m["name"].split(".")[1]]
                assert m["offset"] == tar.getmember(m["name"]).offset_data
    assert members[3]["txt"] == "" and members[3]["caption"] == "from json" and members[2]["caption"] is None
    assert members[7]["probe"] == "not an image" and members[8]["probe"] == [32, 32]

    indexed, probed = counting(monkeypatch, "index_shard"), counting(monkeypatch)
    assert data.make_loader(cfg).items.entries == loader.items.entries and indexed == probed == []
    write_shard(root / "00001.tar", {"000000003": {"jpg": encoded(noise(72, 64)), "txt": "replaced"}})
    age(root / "00001.tar")
    (root / "00003.tar").write_bytes(b"this is no tar")  # unreadable: skipped and listed like a broken file
    age(root / "00003.tar")
    again = data.make_loader(cfg)
    assert [Path(p).name for p in indexed] == ["00001.tar", "00003.tar"]
    assert [p.split("::")[-1] for p in probed] == ["000000003.jpg"]  # the changed shard's one member
    assert again.report[0]["found"] == 8 and again.report[0]["skipped"]["not a tar"] == 1
    assert f"{root}/00003.tar\tnot a tar: ReadError" in (tmp_path / "out" / "skipped.txt").read_text()
    assert [e[3] for e in again.items.entries if e[1:3] == (72, 64)] == [["replaced"]]


def test_shard_caption_options(tmp_path, monkeypatch):
    root = make_shards(tmp_path / "shards")
    cfg = cfg_for(tmp_path, [shard_set(root)])
    texts = {f"{k:09d}": [f"photo {k}", f"image {k}"] for k in range(7)} | {"000000002": ["photo 2"],
                                                                           "000000003": ["from json"]}
    indexed = counting(monkeypatch, "index_shard")
    expected = ["photo 0", "image 0", "photo 1", "image 1", "photo 2", "from json", "photo 4", "image 4", "photo 5",
                "image 5", "photo 6", "image 6", "broken", "small"]  # the loader will reject the last two's images
    assert data.all_captions(cfg) == expected and len(indexed) == 4  # no scan yet: read from the shards
    data.make_loader(cfg)
    indexed.clear()
    assert data.all_captions(cfg) == expected and indexed == []  # after a scan: from its index
    for kw, caption in [({"caption_strategy": "filename"}, lambda k: [k]),  # the sample's KEY
                        ({"caption_strategy": "instanceprompt", "instance_prompt": "sks dog"}, lambda k: ["sks dog"]),
                        ({"prepend_instance_prompt": True, "instance_prompt": ["a", "b"]},
                         lambda k: [f"{p} {c}" for p in "ab" for c in texts[k]])]:
        cfg.datasets = [shard_set(root, **kw)]
        got = {Path(e[0].split("::")[-1]).stem: e[3] for e in data.make_loader(cfg).items.entries}
        assert list(got) == list(texts) + ["000000009"] * ("caption_strategy" in kw)  # 9 lacks only a caption
        assert all(got[k] == caption(k) for k in texts), kw


# ---------------------------------------------------------------------------------------------
# batches and training


def test_shard_batches_equal_folder_batches_and_resume(tmp_path):
    """The same pictures as shards and as a folder: the same entries (but their paths), the same batches pixel for
    pixel, through worker processes too, and a resume continues with the very next batch."""
    root, twin = make_shards(tmp_path / "shards"), twin_folder(tmp_path / "twin")
    opts = {"caption_strategy": "textfile", "crop": True, "crop_aspect": "random", "resolution": 64}
    shards = cfg_for(tmp_path, [shard_set(root, **opts)], train_batch_size=2)
    folder = cfg_for(tmp_path, [{"instance_data_dir": str(twin), **opts}], train_batch_size=2)
    a, b = data.make_loader(shards), data.make_loader(folder)
    assert [e[1:] for e in a.items.entries] == [e[1:] for e in b.items.entries] and len(a) == len(b)
    assert all(data.MEMBER.fullmatch(e[0]) for e in a.items.entries)
    run = list(islice(a.stream(), 3 * len(a)))  # three epochs
    _same(run, list(islice(b.stream(), 3 * len(b))))
    shards.dataloader_num_workers = 2  # workers read the members by offset too
    _same(run[: len(a)], list(data.make_loader(shards)))
    stopped = data.make_loader(shards)
    list(islice(stopped.stream(), 3))
    resumed = data.make_loader(shards)
    resumed.load_state_dict(stopped.state_dict())
    _same(run[3:8], list(islice(resumed.stream(), 5)))
    assert len({b["pixels"].shape for b in run}) > 1 and all(b["pixels"].std() > 0.3 for b in run)


def test_cli_reports_shards_like_folders(tmp_path, capsys):
    cfg = cfg_for(tmp_path, [shard_set(make_shards(tmp_path / "shards"))], train_batch_size=4)
    sheet = data.main(cfg)
    out = capsys.readouterr().out
    assert "  shards: found 10 in 4 shards, used 7, skipped {'not an image': 1, 'too small': 1, 'no caption': 1}" in out
    assert f"{tmp_path}/shards/00002.tar/000000007.jpg\tnot an image" in out and Image.open(sheet).width > 128


def test_training_on_shards_equals_training_on_the_folder(project, tmp_path):  # noqa: F811
    """A few steps of train.main on the project's pictures packed into shards (captions in KEY.txt) give the weights
    the same pictures give from their folder (captions from file names): the same entries, so the same run."""
    pictures = sorted((project / "imgs").glob("*.png"))
    caption = {p.stem: " ".join(p.stem.split("_")) for p in pictures}
    for s in range(2):
        write_shard(tmp_path / "shards" / f"{s:05d}.tar", {p.stem: {"png": p.read_bytes(), "txt": caption[p.stem],
                                                                    "json": {"key": p.stem}}
                                                           for p in pictures[4 * s : 4 * s + 4]})
    kw = dict(max_train_steps=3, checkpointing_steps=100)
    folder = config(project, tmp_path, output_dir=str(tmp_path / "folder"), **kw)
    shards = config(project, tmp_path, output_dir=str(tmp_path / "shards_run"), **kw,
                    datasets=[dict(folder.datasets[0], type="webdataset", shards=str(tmp_path / "shards" / "*.tar"),
                                   instance_data_dir=None, caption_strategy="textfile")])
    assert train.main(shards)["step"] == 3 and train.main(folder)["step"] == 3
    rows = [json.loads(line) for line in (tmp_path / "shards_run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    a, b = weights(tmp_path / "shards_run"), weights(tmp_path / "folder")
    torch.manual_seed(folder.seed)
    init = train.build(folder.unet_config).state_dict()
    assert max((a[k] - init[k]).abs().max().item() for k in a) > 1e-4  # trained
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "shards_run" / "skipped.txt").read_text() == ""
