"""Image folders and tar shards -> IF training batches: captions, aspect buckets, progressive downsampling, crops.

    python data.py CONFIG [--key=value ...]   # scan, report skips and buckets, throughput, contact sheet

Where images come from: a folder (instance_data_dir), or WebDataset tar shards (type='webdataset', shards=...: KEY.jpg
+ KEY.txt + KEY.json per sample, as img2dataset writes them), whose members are read in place, by their offset.

What happens to one image (sizes in pixels; `crop_box` and `load_item` are the whole story):
  scan     decode once (JPEGs at 1/8 scale) to weed out broken files; EXIF-oriented size; captions. Remembered per
           file (scan_cache_dir), so a rerun decodes only new or changed files; under torchrun the ranks share it
  bucket   (w, h) from crop_aspect: square | preserve (its own aspect) | closest / random (crop_aspect_buckets);
           crop_aspect shapes a crop, so (as in SimpleTuner) without `crop` every bucket has its image's own aspect;
           shorter edge = resolution (pixel) or area = resolution^2 (area); sides multiples of 8 for stage I,
           of 32 for stage II (so its 4x smaller partner is a valid stage I size); aspect <= max_aspect_ratio
  box      the source region that becomes the sample. With `crop`: a bucket-sized window at native scale, or,
           when the image's edge exceeds maximum_image_size, after bringing it to target_downsample_size.
           Without `crop`: the whole image scaled to cover the bucket (the rounding remainder is cut off)
  pixels   decode, EXIF orientation, RGB, progressive downsampling to the bucket
  stage II low_res = the high-res sample itself, brought down 4x by the same progressive path
Batches: each comes from one bucket of one dataset. An epoch's batch list is a pure function of (seed, epoch)
and each sample's randomness (crop offset, caption) of (seed, epoch, position in the epoch), so a resumed
run, another worker count or another rank count never changes what a step sees.
Pictures: `to_pil` and `image_grid` (a labelled grid) draw the contact sheet here, and sample.py's and
train.py's grids.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import math
import os
import random
import re
import tarfile
import time
import warnings
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps

from config import Config, parse_args

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}

# One dataset's keys (SimpleTuner's names) and their defaults.
DEFAULTS = {
    "id": None,  # name in reports (default: the folder's name, or the name of the folder holding the shards)
    "type": "local",  # local: an image folder (instance_data_dir) | webdataset: tar shards (shards)
    "instance_data_dir": None,  # required for type local: a folder, searched recursively for IMAGE_EXTS
    # required for type webdataset: uncompressed .tar files, a pattern or a list of them, with brace ranges and globs
    # ("data/{00000..00099}.tar", "data/*.tar"); each sample is KEY.<image ext> + KEY.txt and/or KEY.json ("caption")
    "shards": None,
    "resolution": None,  # None: 64 for stage I, 256 for stage II
    "resolution_type": "pixel",  # pixel: shorter edge; area (or pixel_area): side of the square of equal area
    "crop": False,  # True: a bucket-sized window at native scale; False: the whole image resized into its bucket
    # square | preserve | closest | random (the last two pick from crop_aspect_buckets). The shape of the crop, so
    # with crop=False it is ignored and each image keeps its own aspect (SimpleTuner's meaning of the option)
    "crop_aspect": "preserve",
    "crop_aspect_buckets": [0.5, 2 / 3, 0.75, 1.0, 4 / 3, 1.5, 2.0],  # width/height choices
    "crop_style": "random",  # random | center | corner (top-left)
    "minimum_image_size": None,  # images whose edge (see resolution_type) is smaller are skipped; None: resolution
    "maximum_image_size": None,  # with crop: an image whose edge exceeds this is first brought down to...
    "target_downsample_size": None,  # ...this edge, so a crop keeps >= resolution/target of the scene
    # filename (stem, _ -> space) | textfile (x.txt: a caption a line) | instanceprompt. For shards: filename is the
    # sample's KEY, textfile (their default) is KEY.txt, else KEY.json's "caption"
    "caption_strategy": "filename",
    "instance_prompt": None,  # str or list of str
    "prepend_instance_prompt": False,  # caption = f"{instance_prompt} {caption}"
    "repeats": 0,  # extra passes per epoch (SimpleTuner: 0 means each image once)
    "probability": None,  # share of each epoch's batches relative to the others' (1 if unset); none set: by size
    "held_out": False,  # True: never trained on; its images are the first validation pictures (validation_loss_images)
    # True: SimpleTuner's "parent-teacher" regularisation: these images train the LoRA to keep the base model's own
    # prediction (train.py; batches say which samples are such, under "regularisation")
    "is_regularisation_data": False,
}
CHOICES = {"resolution_type": ("pixel", "area"), "crop_aspect": ("square", "preserve", "closest", "random"),
           "crop_style": ("random", "center", "corner"), "caption_strategy": ("filename", "textfile", "instanceprompt")}

# Progressive downsampling, as SimpleTuner's DeepFloyd guide documents it (docs/if.md, section 5.6): a downscale by
# more than 1.5x proceeds in x0.75 steps, then one final resize. Every step is PIL's LANCZOS: the sharpest of its
# filters, and antialiased (its kernel widens with the ratio), so even one big step would not alias; the steps give
# the gentler result the guide describes.
DOWNSCALE_MAX_RATIO = 1.5
DOWNSCALE_STEP = 0.75
# Fast path (BOX-then-LANCZOS): JPEGs decode at 1/2..1/8 scale (libjpeg DCT scaling, PIL `draft`), other formats
# are box-averaged by an integer factor, both only while FAST_MARGIN x the target's resolution per side is left for
# the LANCZOS steps. 1.5 keeps the result > 44 dB PSNR from the exact path on 3000x2000 photo-like JPEGs (bound: 35)
# and decodes a 3000x2000 JPEG for a 64 px bucket at 1/8 scale, several times faster than a full decode.
FAST_MARGIN = 1.5
BACKGROUND = (255, 255, 255)  # transparency is composited on white: cut-outs and logos are drawn for white pages
# Bigger images are skipped as decompression bombs. PIL's default, checked explicitly in open_image, so PIL's global
# Image.MAX_IMAGE_PIXELS is neither relied on nor changed.
MAX_IMAGE_PIXELS = 89_478_485
# Bucket sides are multiples of 8 for stage I (IF-I's U-Net halves 64 px three times) and of 32 for stage II, so that
# its 4x smaller low-res partner is itself a valid stage I size.
BUCKET_MULTIPLE = {1: 8, 2: 32}


# ---------------------------------------------------------------------------------------------
# configuration


def parse_resolutions(spec) -> list[tuple[int, int]]:
    """'64,96,64x96,96x64' -> [(64, 64), (96, 96), (64, 96), (96, 64)]: (width, height); one number = square."""
    out = []
    for part in str(spec).replace(" ", "").lower().split(","):
        w, x, h = part.partition("x")
        try:
            size = (int(w), int(h if x else w))
        except ValueError:
            size = (0, 0)
        if min(size) <= 0:
            raise ValueError(f"bad resolution {part!r} in {spec!r}: use S or WxH, e.g. '64,96x64'")
        out.append(size)
    return out


def _read_backend_json(path: str) -> list:
    entries = json.loads(Path(path).read_text())
    if not isinstance(entries, list):
        raise ValueError(f"{path}: a multidatabackend.json holds a list of dataset entries")
    return [e for e in entries if not (e.get("disable") or e.get("disabled"))]


def text_cache_dir_from(cfg: Config) -> str | None:
    """cfg.text_cache_dir, else the `cache_dir` of a multidatabackend.json's text_embeds entry (the default one)."""
    if cfg.text_cache_dir or not isinstance(cfg.datasets, str):
        return cfg.text_cache_dir
    embeds = [e for e in _read_backend_json(cfg.datasets) if e.get("dataset_type") == "text_embeds"]
    embeds.sort(key=lambda e: not e.get("default"))
    return embeds[0].get("cache_dir") if embeds else None


def load_datasets(cfg: Config, need_images: bool = True) -> list[dict]:
    """cfg.datasets (a list of dicts or a multidatabackend.json path) -> checked dicts with DEFAULTS filled in.
    need_images=False accepts a missing instance_data_dir or shards that match nothing (the dry run needs only the
    sizes)."""
    from_json = isinstance(cfg.datasets, str)
    raw = _read_backend_json(cfg.datasets) if from_json else cfg.datasets
    out = []
    for i, entry in enumerate(raw):
        kind = entry.get("dataset_type", "image")
        if kind in ("text_embeds", "image_embeds"):
            continue  # caches, not images (text_cache_dir_from reads the text cache's place)
        name = entry.get("id", f"#{i}")
        if kind != "image" or entry.get("type", "local") not in ("local", "webdataset"):
            raise ValueError(f"dataset {name!r}: only local image folders (type 'local') and tar shards (type "
                             f"'webdataset') are supported, with dataset_type 'image'; got type={entry.get('type')!r}, "
                             f"dataset_type={kind!r}")
        unknown = set(entry) - set(DEFAULTS) - {"dataset_type", "disable", "disabled"}
        if unknown and not from_json:  # a SimpleTuner json carries keys for other trainers' features: ignored
            raise ValueError(f"dataset {name!r}: unknown keys {sorted(unknown)}; known: {sorted(DEFAULTS)}")
        ds = {**DEFAULTS, **{k: v for k, v in entry.items() if k in DEFAULTS}}
        shards = ds["type"] == "webdataset"
        if shards and "caption_strategy" not in entry:
            ds["caption_strategy"] = "textfile"  # a shard's member names are keys (000000001): its text is the caption
        if ds["resolution_type"] == "pixel_area":
            ds["resolution_type"] = "area"  # SimpleTuner's name for what we call area
        ds["resolution"] = int(ds["resolution"] or (256 if cfg.stage == 2 else 64))
        ds["repeats"] = int(ds["repeats"])
        if ds["minimum_image_size"] is None:
            ds["minimum_image_size"] = ds["resolution"]  # never upsample unless asked to
        folder = ds["instance_data_dir"]
        if shards and (folder is not None or not ds["shards"]):
            raise ValueError(f"dataset {name!r}: a type='webdataset' entry names its tar files with shards=... (e.g. "
                             "'data/{00000..00099}.tar'), and has no instance_data_dir")
        if not shards and ds["shards"] is not None:
            raise ValueError(f"dataset {name!r}: shards=... needs type='webdataset' (a folder has instance_data_dir)")
        if need_images and not shards and (not folder or not Path(folder).is_dir()):
            raise FileNotFoundError(f"dataset {name!r}: instance_data_dir {folder!r} is not a folder")
        ds["id"] = str(ds["id"] or (Path(_patterns(ds)[0]).parent if shards else Path(folder or name)).name or name)
        if need_images and shards:
            shard_paths(ds)  # raises if a name or glob matches no file
        for key, allowed in CHOICES.items():
            if ds[key] not in allowed:
                raise ValueError(f"dataset {ds['id']!r}: {key}={ds[key]!r}; choose one of {allowed}")
        for bad, why in [((ds["maximum_image_size"] is None) != (ds["target_downsample_size"] is None),
                          "maximum_image_size and target_downsample_size go together"),
                         (not ds["instance_prompt"] and (ds["caption_strategy"] == "instanceprompt"
                                                         or ds["prepend_instance_prompt"]),
                          "caption_strategy='instanceprompt' and prepend_instance_prompt need instance_prompt"),
                         (ds["repeats"] < 0 or (ds["probability"] or 0) < 0, "repeats and probability must be >= 0")]:
            if bad:
                raise ValueError(f"dataset {ds['id']!r}: {why}")
        out.append(ds)
    if not out:
        raise ValueError("no image datasets configured: set `datasets` to a list of dicts with instance_data_dir (or "
                         "type='webdataset' and shards)")
    return out


def _patterns(ds: dict) -> list[str]:
    return [ds["shards"]] if isinstance(ds["shards"], str) else [str(p) for p in ds["shards"]]


def expand_braces(pattern: str) -> list[str]:
    """'d/{000..002}.tar' -> ['d/000.tar', 'd/001.tar', 'd/002.tar']: a numeric range keeps its first number's width
    (zero padding, as webdataset and img2dataset name shards); '{a,b}' lists alternatives; left to right."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    if r := re.fullmatch(r"(\d+)\.\.(\d+)", m[1]):
        items = [str(k).zfill(len(r[1])) for k in range(int(r[1]), int(r[2]) + 1)]
    elif "," in m[1]:
        items = m[1].split(",")
    else:
        raise ValueError(f"shards {pattern!r}: cannot expand {m[0]}; write a range {{00000..00099}} or a list {{a,b}}")
    return [x for item in items for x in expand_braces(pattern[: m.start()] + item + pattern[m.end() :])]


def shard_paths(ds: dict) -> list[str]:
    """The tar files of a webdataset entry, in the order its `shards` names them: brace ranges expanded, then globs
    (*, ?, [...]) matched, each glob's matches sorted. A plain name must exist and a glob must match something: a
    typo in a range is an error, not a quietly smaller dataset."""
    out, missing = [], []
    for name in (n for pattern in _patterns(ds) for n in expand_braces(pattern)):
        found = sorted(glob.glob(name, recursive=True)) if re.search(r"[*?[]", name) else [name] * os.path.isfile(name)
        out += found
        missing += [] if found else [name]
    if missing:
        raise FileNotFoundError(
            f"dataset {ds['id']!r}: shards {ds['shards']!r}: {len(missing)} name(s) match no file "
            f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}; relative to {os.getcwd()}). Fix the path "
            "or the range, or use a glob such as 'data/*.tar' to take whatever shards exist.")
    return list(dict.fromkeys(out))


# ---------------------------------------------------------------------------------------------
# captions


def list_images(ds: dict) -> list[Path]:
    return sorted(p for p in Path(ds["instance_data_dir"]).rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())


def _lines(text: str | None) -> list[str]:
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


def captions_for(path, ds: dict, text: list[str] | str | None = None) -> list[str] | str:
    """Every caption `path` can train with (one is picked per use), or the reason it has none. `text`: a tar member's
    captions (member_text) or why it has none; a file's come from its same-named .txt, read only if needed."""
    prompts = ds["instance_prompt"]
    prompts = [prompts] if isinstance(prompts, str) else list(prompts or [])
    if ds["caption_strategy"] == "instanceprompt":
        return prompts
    if ds["caption_strategy"] == "filename":
        caps = [" ".join(Path(path).stem.replace("_", " ").split())]
    elif text is not None:
        caps = text
    else:
        txt = Path(path).with_suffix(".txt")
        if not txt.is_file():
            return f"no caption: {txt.name} is missing"
        caps = _lines(txt.read_text(errors="replace")) or f"no caption: {txt.name} is empty"
    if isinstance(caps, str):
        return caps
    return [f"{p} {c}" for p in prompts for c in caps] if ds["prepend_instance_prompt"] else caps


def member_text(row: dict) -> list[str] | str:
    """A shard sample's captions: its KEY.txt, a caption a line as in a folder; else its KEY.json's "caption" (one
    caption, as img2dataset writes it); or why it has none."""
    key = row["name"].rsplit(".", 1)[0]
    if _lines(row["txt"]):
        return _lines(row["txt"])
    if isinstance(row["caption"], str) and row["caption"].strip():
        return [row["caption"].strip()]
    return f"no caption: no text in {key}.txt or in {key}.json's 'caption'"


def all_captions(cfg: Config) -> list[str]:
    """Every caption the loader can produce, deduplicated, in a stable order (for prebuilding the T5 cache).
    Read without decoding images, so it also holds the captions of images the loader will reject. A shard's
    captions come from the scan cache when it is up to date, else from the shard's caption members."""
    seen: dict[str, None] = {}
    for ds in load_datasets(cfg):
        if ds["type"] == "webdataset":
            cached, rows = _read_cache(_cache_file(scan_cache_dir(cfg), ds)), []
            for shard in shard_paths(ds):
                members = (_fresh(cached, shard) or {"members": index_shard(shard)})["members"]
                rows += members if isinstance(members, list) else []  # else: the shard is unreadable
            caps = [captions_for(row["name"], ds, member_text(row)) for row in rows]
        else:
            caps = [captions_for(path, ds) for path in list_images(ds)]
        for c in caps:
            seen.update(dict.fromkeys(c if isinstance(c, list) else []))
    return list(seen)


# ---------------------------------------------------------------------------------------------
# decoding and resizing


# A tar member as an image's path: "SHARD::OFFSET::SIZE::NAME", its bytes being SIZE bytes at OFFSET in the SHARD file
# (tarfile's offset_data and size), so it is read with one seek, never extracted. NAME is the member's name in the tar.
MEMBER = re.compile(r"(.+?)::(\d+)::(\d+)::(.+)")


def member_path(shard: str, row: dict) -> str:
    return f"{shard}::{row['offset']}::{row['size']}::{row['name']}"


def _member(path) -> tuple[str, int, int] | None:
    """(shard, offset, size) of a member_path, None for a file's path."""
    m = MEMBER.fullmatch(path) if isinstance(path, str) else None
    return (m[1], int(m[2]), int(m[3])) if m else None


def open_image(path) -> Image.Image:
    """Image.open (header only) of a file or a member_path, with the decompression-bomb guard applied explicitly."""
    if member := _member(path):
        with open(member[0], "rb") as f:
            f.seek(member[1])
            path = io.BytesIO(f.read(member[2]))  # short if the shard is truncated: then decoding fails
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # we raise our own error below
        img = Image.open(path)
    if img.width * img.height > MAX_IMAGE_PIXELS:
        img.close()
        raise Image.DecompressionBombError(f"{img.width}x{img.height} is over {MAX_IMAGE_PIXELS} pixels")
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """Any mode -> RGB. 16/32-bit grey is scaled (not clipped); transparency is composited on BACKGROUND."""
    if img.mode.startswith("I"):  # I, I;16, I;16B...: 16-bit samples, 65535 -> 255
        img = Image.fromarray((np.asarray(img, np.float64) / 257).clip(0, 255).round().astype(np.uint8))
    if "transparency" in img.info or img.mode in ("LA", "PA", "RGBA"):
        img = Image.alpha_composite(Image.new("RGBA", img.size, BACKGROUND + (255,)), img.convert("RGBA"))
    return img.convert("RGB")  # L, 1, P, CMYK (PIL undoes Adobe's inversion), YCbCr...


def probe(path) -> tuple[int, int] | str:
    """EXIF-oriented (w, h) of a decodable image (a file or a member_path), or why it is skipped. Decodes it whole
    (JPEGs at 1/8 scale: libjpeg still reads every byte, so truncation is still caught) to catch what a header does
    not show."""
    member = _member(path)
    if (member[2] if member else os.path.getsize(path)) == 0:
        return "empty file"
    try:
        with open_image(path) as img:
            full = img.size
            img.draft(img.mode, (1, 1))  # JPEG only; a no-op for other formats
            drafted = img.size
            out = to_rgb(ImageOps.exif_transpose(img))  # first frame of an animation
        return full[::-1] if out.size != drafted else full
    except Image.DecompressionBombError as e:
        return f"decompression bomb: {e}"
    except Image.UnidentifiedImageError:
        return "not an image"
    except Exception as e:  # noqa: BLE001 - any decoder failure means: skip this file, say why
        kind = "truncated" if "truncated" in str(e) else "unreadable"
        return f"{kind}: {type(e).__name__}: {e}"


def progressive_sizes(src, dst) -> list[tuple[int, int]]:
    """The sizes a resize from `src` to `dst` (w, h) passes through: x0.75 steps while more than 1.5x too big
    (ceil, so no step shrinks by more than 1/0.75), then `dst` itself."""
    (w, h), out = src, []
    while max(w / dst[0], h / dst[1]) > DOWNSCALE_MAX_RATIO:
        w, h = max(math.ceil(w * DOWNSCALE_STEP), dst[0]), max(math.ceil(h * DOWNSCALE_STEP), dst[1])
        out.append((w, h))
    return out + [tuple(dst)]


def resize(img: Image.Image, size, box=None) -> Image.Image:
    """Progressive LANCZOS resize of `img`'s `box` (float source pixels; None: all of it) to `size` (w, h).
    The first step reads through `box`, so pixels just outside it still feed the filter at its edges."""
    box = tuple(box or (0, 0, *img.size))
    src = (box[2] - box[0], box[3] - box[1])
    if src == tuple(size) and all(float(v).is_integer() for v in box):
        return img.crop(tuple(int(v) for v in box))  # a native-scale crop: no resampling at all
    for step in progressive_sizes(src, size):
        img, box = img.resize(step, Image.LANCZOS, box=box), None
    return img


def load_item(path, size, box=None, fast=True) -> Image.Image:
    """The pixels of one sample: `path`'s region `box` (EXIF-oriented source pixels; None: the whole image) as an
    RGB image of `size` (w, h). fast=False is the exact path: full decode, then progressive LANCZOS. fast=True
    first shrinks cheaply (JPEG draft, else integer box average) while FAST_MARGIN x `size` remains."""
    with open_image(path) as img:
        f = 1.0
        if fast:
            bw, bh = (box[2] - box[0], box[3] - box[1]) if box else (min(img.size),) * 2
            s = FAST_MARGIN * max(size[0] / bw, size[1] / bh)  # smallest decode scale allowed
            w0, drafted = img.width, img.draft(img.mode, (math.ceil(img.width * s), math.ceil(img.height * s)))
            f = drafted[1][2] / w0 if drafted else 1.0  # exactly 1/2, 1/4 or 1/8, on both sides alike
        img = to_rgb(ImageOps.exif_transpose(img))
    box = [v * f for v in box] if box else [0, 0, *img.size]
    k = int(min((box[2] - box[0]) / size[0], (box[3] - box[1]) / size[1]) / FAST_MARGIN) if fast else 1
    if k >= 2:  # box-average k x k blocks of the (integer-widened) region, keeping the exact sub-box
        ibox = (int(box[0]), int(box[1]), min(math.ceil(box[2]), img.width), min(math.ceil(box[3]), img.height))
        img = img.reduce(k, box=ibox)
        box = [(box[0] - ibox[0]) / k, (box[1] - ibox[1]) / k, (box[2] - ibox[0]) / k, (box[3] - ibox[1]) / k]
    return resize(img, size, box)


def load_naive(path, size, box=None) -> Image.Image:
    """Baseline for bench.py: full decode and one LANCZOS resize."""
    with Image.open(path) as img:
        return ImageOps.exif_transpose(img).convert("RGB").resize(tuple(size), Image.LANCZOS, box=box)


def psnr(a: Image.Image, b: Image.Image) -> float:
    """Peak signal-to-noise ratio in dB between two 8-bit images."""
    mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255**2 / mse))


# ---------------------------------------------------------------------------------------------
# buckets and crops


def _edge(w, h, ds) -> float:
    """An image's size in the unit of `resolution`: shorter edge (pixel) or side of the equal-area square."""
    return min(w, h) if ds["resolution_type"] == "pixel" else math.sqrt(w * h)


def bucket_size(aspect, resolution, resolution_type="pixel", multiple=8, max_aspect=4.0) -> tuple[int, int]:
    """(w, h) of the bucket for width/height `aspect` (capped at max_aspect), sides multiples of `multiple`."""
    a = min(max(aspect, 1 / max_aspect), max_aspect)
    if resolution_type == "pixel":
        w, h = (resolution * a, resolution) if a >= 1 else (resolution, resolution / a)
    else:
        w, h = resolution * math.sqrt(a), resolution / math.sqrt(a)
    w, h = (max(multiple, round(x / multiple) * multiple) for x in (w, h))
    if max(w, h) > max_aspect * min(w, h):  # rounding went past the cap: shorten the long side
        w, h = (w - multiple, h) if w > h else (w, h - multiple)
    return w, h


def largest_bucket(cfg: Config) -> tuple[int, int]:
    """(w, h) of the largest bucket (by area) the config's datasets can produce, read from the config alone: the
    size a memory estimate must plan for. Without datasets: the stage's native square (64 or 256 px)."""
    stage = cfg.stage
    datasets = load_datasets(cfg, need_images=False) if cfg.datasets else [{**DEFAULTS, "crop": False,
                                                                           "resolution": 256 if stage == 2 else 64}]
    sizes = []
    for ds in datasets:
        rule = crop_aspect_in_effect(ds)
        aspects = {"square": [1.0], "preserve": [1.0, cfg.max_aspect_ratio]}.get(rule, ds["crop_aspect_buckets"])
        sizes += [bucket_size(a, ds["resolution"], ds["resolution_type"], BUCKET_MULTIPLE[stage], cfg.max_aspect_ratio)
                  for a in aspects]
    return max(sizes, key=lambda wh: wh[0] * wh[1])


def crop_aspect_in_effect(ds) -> str:
    """ds's crop_aspect, or 'preserve' without crop (the option shapes a crop: see DEFAULTS)."""
    return ds["crop_aspect"] if ds["crop"] else "preserve"


def bucket_aspect(ds, w, h) -> float:
    """The aspect (w/h) an image's bucket gets. crop_aspect='random' is drawn by the sampler for training; asked
    here (a validation picture), it is the closest of crop_aspect_buckets."""
    rule = crop_aspect_in_effect(ds)
    if rule == "square":
        return 1.0
    if rule in ("closest", "random"):
        return min(ds["crop_aspect_buckets"], key=lambda a: abs(math.log(a * h / w)))
    return w / h


def crop_box(size, bucket, ds: dict, rng: random.Random) -> tuple[float, float, float, float]:
    """The region (x0, y0, x1, y1) of a `size` (w, h) image, in its pixels, that becomes the `bucket` sample.
    Offsets are whole pixels at the working scale, so a native-scale crop needs no resampling."""
    (w, h), (bw, bh) = size, bucket
    scale = cover = max(bw / w, bh / h)  # the scale at which the image just covers the bucket
    if ds["crop"]:
        big = ds["maximum_image_size"] is not None and _edge(w, h, ds) > ds["maximum_image_size"]
        scale = max(ds["target_downsample_size"] / _edge(w, h, ds) if big else 1.0, cover)  # never leave a gap
    slack_x, slack_y = int(w * scale - bw + 1e-6), int(h * scale - bh + 1e-6)
    if ds["crop_style"] == "random":
        x, y = rng.randint(0, slack_x), rng.randint(0, slack_y)
    elif ds["crop_style"] == "center":
        x, y = slack_x // 2, slack_y // 2
    else:
        x = y = 0
    return x / scale, y / scale, (x + bw) / scale, (y + bh) / scale


# ---------------------------------------------------------------------------------------------
# scanning, items, batches


# The scan cache: one JSON file per dataset source in scan_cache_dir, {"version", "source", "files": {absolute path:
# record}}. A record is {"size", "mtime_ns", "probe"} for an image file (probe: [w, h] or why it is skipped), and
# {"size", "mtime_ns", "members"} for a shard, members being its image members {"name", "offset", "size", "probe",
# "txt", "caption"} (the raw text of KEY.txt and KEY.json's "caption", or null) or why the shard is unreadable.
SCAN_CACHE_VERSION = 1
# A file modified less than this before a scan began is probed again by the next one, not trusted to its cached
# record: a rewrite of the same size within the filesystem's timestamp granularity (2 s on FAT) keeps its mtime.
RACY_NS = 2 * 10**9


def scan_cache_dir(cfg: Config) -> Path:
    """scan/ in the text cache's folder (t5cache.default_cache_dir): every rank reads that folder already, and runs
    on the same images share it whatever their output_dir (the records are facts about files, not about a run)."""
    import t5cache  # which folder is the text cache is t5cache's to say

    return Path(t5cache.default_cache_dir(cfg)) / "scan"


def _source(ds: dict) -> str:
    return os.path.abspath(ds["instance_data_dir"]) if ds["type"] == "local" else \
        json.dumps([os.path.abspath(p) for p in _patterns(ds)])


def _cache_file(cache_dir, ds: dict) -> Path:
    return Path(cache_dir) / f"{hashlib.sha1(_source(ds).encode()).hexdigest()[:16]}.json"


def _read_cache(file: Path) -> dict:
    """{absolute path: record} from a scan cache file; {} if there is none, or an unreadable or older one."""
    try:
        saved = json.loads(file.read_text())
    except (OSError, ValueError):
        return {}
    return saved["files"] if isinstance(saved, dict) and saved.get("version") == SCAN_CACHE_VERSION else {}


def _write_cache(file: Path, ds: dict, files: dict) -> None:
    """Atomically (a temporary file, then os.replace): a reader, or a crash, never meets half a file."""
    tmp = file.with_name(f"{file.name}.{os.getpid()}.tmp")
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({"version": SCAN_CACHE_VERSION, "source": _source(ds), "files": files}))
        os.replace(tmp, file)
    except OSError as e:
        print(f"warning: could not write the scan cache {file} ({e}): the next run scans these images again")


def _stamp(path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def _fresh(cached: dict, path, stamp=None) -> dict | None:
    """path's cached record if the file has the size and mtime it had then, else None."""
    rec = cached.get(os.path.abspath(path))
    return rec if rec and (rec["size"], rec["mtime_ns"]) == (stamp or _stamp(path)) else None


def index_shard(path) -> list[dict] | str:
    """A tar shard's image members, in the tar's order, as scan records (probe still None), or why it is unreadable.
    Samples follow WebDataset's rule: a member's KEY is its name up to the first dot of its last part, and the
    members of one KEY are one sample; a sample's first member whose extension is in IMAGE_EXTS is its image. Reads
    headers and the small .txt/.json members only (tarfile seeks over the rest)."""
    def text(tar, info):
        return tar.extractfile(info).read().decode("utf-8", "replace") if info else None

    try:
        with tarfile.open(path, "r:") as tar:  # "r:": uncompressed only, since members are read by offset
            samples = {}  # KEY -> {extension: TarInfo}
            for info in tar:
                folder, _, name = info.name.rpartition("/")
                stem, dot, ext = name.partition(".")
                if info.isfile() and dot:
                    samples.setdefault(f"{folder}/{stem}", {}).setdefault(ext.lower(), info)
            rows = []
            for parts in samples.values():
                image = next((info for ext, info in parts.items() if f".{ext}" in IMAGE_EXTS), None)
                if image is None:
                    continue
                try:
                    caption = json.loads(text(tar, parts.get("json")) or "{}").get("caption")
                except (ValueError, AttributeError):  # not JSON, or not an object
                    caption = None
                rows.append({"name": image.name, "offset": image.offset_data, "size": image.size, "probe": None,
                             "txt": text(tar, parts.get("txt")), "caption": caption})
            return rows
    except (tarfile.TarError, OSError, EOFError) as e:
        return f"not a tar: {type(e).__name__}: {e} (shards must be uncompressed .tar files)"


def _images(path: str, rec: dict) -> list[tuple[str, str, dict]]:
    """(path for open_image, name for people, the dict holding its probe) of each image a scan record holds."""
    if "members" not in rec:
        return [(path, path, rec)]
    if isinstance(rec["members"], str):
        return []
    return [(member_path(path, m), f"{path}/{m['name']}", m) for m in rec["members"]]


def _distributed(world_size: int) -> bool:
    return world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()


def _shared(fn, todo: list, rank: int, world_size: int, desc: str) -> dict:
    """{x: fn(x) for x in todo}, on a thread pool (PIL decodes without holding the GIL). With a process group up,
    rank r computes todo[r::world_size] and the ranks swap results (all_gather_object), so every rank must call this;
    what another rank's view left out (a file it does not list) a rank computes itself."""
    from tqdm import tqdm

    mine = todo[rank::world_size] if _distributed(world_size) else todo
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        out = dict(zip(mine, tqdm(pool.map(fn, mine), total=len(mine), desc=desc,
                                  disable=rank != 0 or len(mine) < 500)))
    if _distributed(world_size):
        parts = [None] * world_size
        torch.distributed.all_gather_object(parts, out)
        for part in parts:
            out.update(part)
        out.update({x: fn(x) for x in todo if x not in out})
    return out


def scan(datasets: list[dict], output_dir: str, rank=0, world_size=1, cache_dir=None) -> tuple[list, list, list]:
    """Find, probe and caption every image. Returns entries (path, w, h, captions, dataset index), the skipped
    (path, reason) list (rank 0 writes it to output_dir/skipped.txt) and a per-dataset report. A tar member's path
    is a member_path; in skipped.txt it is SHARD/NAME.

    cache_dir (the Loader passes scan_cache_dir; None: no cache) keeps, per file, keyed by its path, size and
    mtime_ns, what decoding told: its EXIF-oriented size or why it is unusable, and a shard's index (each image
    member's offset, size and probe, its KEY.txt and KEY.json caption). Only facts about files are kept: captions
    (caption_strategy, instance_prompt...) and minimum_image_size are applied anew each run, from the files' .txt
    or the cached text, so a changed option never meets a stale result, and runs with other options share the
    cache. A rerun decodes only new or changed files (and shards), and deleted ones drop out of the cache. Under
    torchrun (a process group up, world_size > 1) each rank indexes and probes its share of what is new and the
    ranks merge the results, so every rank returns the same entries in the same order; rank 0 writes the cache."""
    start, cached, files = time.time_ns(), [], []
    for ds in datasets:
        cached.append(_read_cache(_cache_file(cache_dir, ds)) if cache_dir else {})
        files.append(shard_paths(ds) if ds["type"] == "webdataset" else [str(p) for p in list_images(ds)])
    stamps = {p: _stamp(p) for paths in files for p in paths}
    records = [{p: _fresh(c, p, stamps[p]) for p in paths} for c, paths in zip(cached, files)]  # None: new or changed
    new_shards = [p for ds, recs in zip(datasets, records) if ds["type"] == "webdataset" for p, r in recs.items()
                  if r is None]
    index = _shared(index_shard, list(dict.fromkeys(new_shards)), rank, world_size, "index shards")
    for ds, recs in zip(datasets, records):
        for p, rec in recs.items():
            size, mtime = stamps[p]
            recs[p] = rec or {"size": size, "mtime_ns": mtime,
                              **({"members": index[p]} if ds["type"] == "webdataset" else {"probe": None})}
    todo = [ref for recs in records for p, rec in recs.items() for ref, _, slot in _images(p, rec)
            if slot["probe"] is None]
    probed = _shared(probe, list(dict.fromkeys(todo)), rank, world_size, "scan")

    entries, skipped, report = [], [], []
    for d, (ds, recs) in enumerate(zip(datasets, records)):
        reasons, found = Counter(), 0
        for p, rec in recs.items():
            if isinstance(rec.get("members"), str):  # an unreadable shard counts as one skipped file
                found += 1
                skipped.append((p, rec["members"]))
                reasons[rec["members"].split(":")[0]] += 1
            for ref, name, slot in _images(p, rec):
                found += 1
                if slot["probe"] is None:
                    slot["probe"] = probed[ref]
                size = slot["probe"]
                cap = captions_for(slot["name"], ds, member_text(slot)) if "members" in rec else captions_for(p, ds)
                reason = size if isinstance(size, str) else cap if isinstance(cap, str) else None
                if reason is None and _edge(*size, ds) < ds["minimum_image_size"]:
                    reason = f"too small: {size[0]}x{size[1]} < minimum_image_size={ds['minimum_image_size']}"
                if reason:
                    skipped.append((name, reason))
                    reasons[reason.split(":")[0]] += 1
                else:
                    entries.append((ref, *size, cap, d))
        report.append({"id": ds["id"], "found": found, "used": found - sum(reasons.values()), "skipped": dict(reasons),
                       **({"shards": len(recs)} if ds["type"] == "webdataset" else {})})
    out = Path(output_dir) / "skipped.txt"
    if rank == 0:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("".join(f"{p}\t{r}\n" for p, r in skipped))
        for ds, recs, old in zip(datasets, records, cached) if cache_dir else ():
            keep = {os.path.abspath(p): rec for p, rec in recs.items() if rec["mtime_ns"] < start - RACY_NS}
            if keep != old:  # a rerun that found nothing new leaves the file as it was
                _write_cache(_cache_file(cache_dir, ds), ds, keep)
    if _distributed(world_size):
        digests = [None] * world_size
        torch.distributed.all_gather_object(digests, hashlib.sha1(json.dumps(entries).encode()).hexdigest())
        if len(set(digests)) > 1:
            raise RuntimeError("the ranks found different images in the same datasets: every process must see the "
                               "same files (shared storage, or identical copies at the same paths)")
    for ds, r in zip(datasets, report):
        if r["used"] == 0:
            why = f"all {r['found']} skipped ({r['skipped']}), see {out}" if r["found"] else "none found"
            where = ds["instance_data_dir"] if ds["type"] == "local" else f"shards {ds['shards']!r}"
            look = f"instance_data_dir (searched recursively for {sorted(IMAGE_EXTS)})" if ds["type"] == "local" else \
                "shards (uncompressed tars of KEY.jpg/.png/.webp with KEY.txt or KEY.json, as img2dataset writes)"
            raise ValueError(f"dataset {ds['id']!r} has no usable images under {where}: {why}. Fix or replace those "
                             f"files, or lower minimum_image_size, or check caption_strategy and {look}.")
    return entries, skipped, report


class Items:
    """Map-style dataset whose index is a request (entry, bucket_w, bucket_h, rng key) from the sampler."""

    def __init__(self, entries, datasets, stage):
        self.entries, self.datasets, self.stage = entries, datasets, stage

    def __getitem__(self, request) -> dict:
        i, bw, bh, key = request
        path, w, h, caps, d = self.entries[i]
        rng = random.Random(key)  # seeded by (seed, epoch, position): independent of workers
        img = load_item(path, (bw, bh), crop_box((w, h), (bw, bh), self.datasets[d], rng))
        item = {"pixels": _chw(img), "caption": caps[rng.randrange(len(caps))],
                "regularisation": bool(self.datasets[d]["is_regularisation_data"])}
        if self.stage == 2:
            item["low_res"] = _chw(resize(img, (bw // 4, bh // 4)))
        return item


def _chw(img: Image.Image) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float in [-1, 1], in numpy: the worker's one thread, no torch thread pool."""
    return torch.from_numpy(np.asarray(img, np.float32).transpose(2, 0, 1) / 127.5 - 1)


class Loader:
    """Batches {'pixels': [B,3,H,W] in [-1,1], 'captions': [str] * B, 'regularisation': [B] bool (the sample is of
    an is_regularisation_data dataset), stage II also 'low_res' [B,3,H/4,W/4]}.

    Two ways to draw them. `for batch in loader` (iter()) is PyTorch's convention: the rest of the current epoch,
    then it stops; the next iter() continues with the next epoch (in new worker processes). `loader.stream()`
    yields batches forever, across epochs, from one DataLoader whose workers start once (the training loop's way).
    len(loader) is the number of batches per epoch. state_dict() counts the batches either has handed out (not the
    ones workers prefetched), and a new Loader given it by load_state_dict continues, through either, with exactly
    the next batch.

    The sampler. Each dataset's slots (each image 1 + repeats times) are grouped by bucket, shuffled per epoch,
    and cut into global batches of train_batch_size x world_size; rank r takes the r-th slice of each, so ranks
    get distinct samples and the same number of steps. A bucket's last partial global batch is filled by
    repeating that bucket's first images of the epoch (so a bucket, or a dataset, smaller than one global batch
    still trains; a one-line note says how many samples per epoch are such repeats). With `probability` set, a
    dataset contributes its share of the epoch's batches (cycling its own shuffled passes, or a part of one).
    crop_aspect='random' (with crop) deals a fixed multiset of aspects (cycling crop_aspect_buckets) to the
    dataset's slots anew each epoch, so the number of batches never changes.
    """

    def __init__(self, cfg: Config, rank=0, world_size=1):
        self.seed, self.rank, self.batch_size, self.world = cfg.seed, rank, cfg.train_batch_size, world_size
        self.num_workers = cfg.dataloader_num_workers
        self.datasets = load_datasets(cfg)
        entries, self.skipped, self.report = scan(self.datasets, cfg.output_dir, rank, world_size, scan_cache_dir(cfg))
        self.items = Items(entries, self.datasets, cfg.stage)
        self.multiple, self.max_aspect = BUCKET_MULTIPLE[cfg.stage], cfg.max_aspect_ratio
        # Validation pictures: one seeded order of every usable image (the same for any rank and world size), those
        # of held_out datasets first; the first validation_loss_images of it are held out, never trained on.
        order = random.Random(f"{cfg.seed}:held-out").sample(range(len(entries)), len(entries))
        self.eval_order = sorted(order, key=lambda i: not self.datasets[entries[i][4]]["held_out"])
        self.held_out = self.eval_order[: cfg.validation_loss_images]
        held = set(self.held_out)
        self.slots = [[] for _ in self.datasets]  # per dataset: [(entry, bucket)], fixed for the whole run
        for i, (_, w, h, _, d) in enumerate(entries):
            ds = self.datasets[d]
            for _ in range(1 + ds["repeats"]) if i not in held and not ds["held_out"] else ():
                n = len(self.slots[d])
                a = ds["crop_aspect_buckets"][n % len(ds["crop_aspect_buckets"])] \
                    if crop_aspect_in_effect(ds) == "random" else bucket_aspect(ds, w, h)
                self.slots[d].append((i, self._bucket(ds, a)))
        if all(ds["held_out"] for ds in self.datasets):
            raise ValueError("every dataset has held_out=True: nothing is left to train on")
        for ds, slots in zip(self.datasets, self.slots):
            if not slots and not ds["held_out"]:
                raise ValueError(f"validation_loss_images={cfg.validation_loss_images} holds out every usable image of "
                                 f"dataset {ds['id']!r}, leaving nothing to train on: lower validation_loss_images")
        g = self.batch_size * world_size
        counts = [Counter(b for _, b in slots) for slots in self.slots]
        sizes = [sum(math.ceil(c / g) for c in cnt.values()) for cnt in counts]  # global batches per pass
        self.quota = _quota(sizes, [ds["probability"] for ds in self.datasets])
        self.steps_per_epoch = sum(self.quota)
        hist = sum(counts, Counter())
        self.buckets = {f"{w}x{h}": hist[w, h] for w, h in sorted(hist)}  # samples per pass, by bucket
        self.epoch = self.step = 0
        self._plan_cache = (None, None)
        if rank == 0:
            pad = sum(sizes) * g - sum(hist.values())
            why = sum((Counter(r["skipped"]) for r in self.report), Counter())
            print(f"data: {len(entries)} images used, {len(self.skipped)} skipped {dict(why) if why else ''} (list in "
                  f"{Path(cfg.output_dir) / 'skipped.txt'}); {len(self.buckets)} buckets, {len(self)} steps per epoch"
                  + (f"; {pad} repeats fill up small buckets' batches of {g}" if pad else ""))

    def __len__(self) -> int:
        return self.steps_per_epoch

    def _bucket(self, ds: dict, aspect: float) -> tuple[int, int]:
        return bucket_size(aspect, ds["resolution"], ds["resolution_type"], self.multiple, self.max_aspect)

    def eval_request(self, i: int, size: tuple[int, int] | None = None) -> tuple:
        """A request (for `items[...]`) of entry i for validation: at `size` (w, h), else at its bucket (crop_aspect
        'random': the closest of crop_aspect_buckets), prepared as training prepares it, with a fixed crop and
        caption choice, so every validation sees the same picture."""
        _, w, h, _, d = self.items.entries[i]
        ds = self.datasets[d]
        return (i, *(size or self._bucket(ds, bucket_aspect(ds, w, h))), f"{self.seed}:held-out:{i}")

    def _pass(self, d: int, rnd: random.Random) -> list[list]:
        """One shuffled pass over dataset d: global batches of (entry, bucket), each from a single bucket."""
        slots, g = self.slots[d], self.batch_size * self.world
        buckets = [b for _, b in slots]
        if crop_aspect_in_effect(self.datasets[d]) == "random":
            rnd.shuffle(buckets)
        groups = defaultdict(list)
        for (entry, _), b in zip(slots, buckets):
            groups[b].append(entry)
        out = []
        for b in sorted(groups):
            es = groups[b]
            rnd.shuffle(es)
            es = [es[i % len(es)] for i in range(math.ceil(len(es) / g) * g)]  # fill the last batch by repeating
            out += [[(e, b) for e in es[i : i + g]] for i in range(0, len(es), g)]
        rnd.shuffle(out)
        return out

    def plan(self, epoch: int) -> list[list[tuple]]:
        """This rank's batches of `epoch`, as lists of requests (entry, w, h, rng key)."""
        if self._plan_cache[0] != epoch:
            rnd = random.Random(f"{self.seed}:epoch:{epoch}")
            batches = []
            for d, q in enumerate(self.quota):
                mine = []
                while len(mine) < q:
                    mine += self._pass(d, rnd)
                batches += mine[:q]
            rnd.shuffle(batches)
            B, g = self.batch_size, self.batch_size * self.world
            lo = self.rank * B
            plan = [[(e, *b, f"{self.seed}:{epoch}:{j * g + lo + k}") for k, (e, b) in enumerate(batch[lo : lo + B])]
                    for j, batch in enumerate(batches)]
            self._plan_cache = (epoch, plan)
        return self._plan_cache[1]

    def _requests(self, epoch, step):
        while True:
            yield from self.plan(epoch)[step:]
            epoch, step = epoch + 1, 0

    def _collate(self, requests):
        """`requests` (batches of requests) through one DataLoader; each batch is counted as it is handed out, so
        prefetched but unused batches are not counted and a resume continues with the first batch not seen."""
        loader = torch.utils.data.DataLoader(self.items, batch_sampler=requests, num_workers=self.num_workers)
        for batch in loader:
            self.step += 1
            if self.step == self.steps_per_epoch:
                self.epoch, self.step = self.epoch + 1, 0
            batch["captions"] = batch.pop("caption")  # a list of B strings once collated
            yield batch

    def __iter__(self):
        """The rest of the current epoch, then stop (the next iter() goes on with the next epoch)."""
        return self._collate(self.plan(self.epoch)[self.step :])

    def stream(self):
        """Batches forever, epoch after epoch, from one DataLoader: its workers are not restarted at each epoch."""
        return self._collate(self._requests(self.epoch, self.step))

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "seed": self.seed, "steps_per_epoch": self.steps_per_epoch}

    def load_state_dict(self, state: dict) -> None:
        """Continue after the batches `state` counted: the next iter() or stream() starts there."""
        if state.get("steps_per_epoch") != self.steps_per_epoch or state.get("seed") != self.seed:
            print(f"warning: data changed since the checkpoint ({state} vs {self.state_dict()}): "
                  "resumed batches will differ from the original run's")
        self.epoch, self.step = state["epoch"], state["step"] % self.steps_per_epoch


def _quota(sizes: list[int], probabilities: list) -> list[int]:
    """Batches per epoch for each dataset: its own pass, or its `probability` share of the same total."""
    if all(p is None for p in probabilities):
        return sizes
    # SimpleTuner's default probability is 1; a dataset with nothing to train (held_out) gets no share
    w = [0.0 if n == 0 else 1.0 if p is None else float(p) for n, p in zip(sizes, probabilities)]
    exact = [sum(sizes) * x / sum(w) for x in w]
    q = [int(x) for x in exact]
    for i in sorted(range(len(w)), key=lambda i: q[i] - exact[i])[: sum(sizes) - sum(q)]:
        q[i] += 1  # largest remainders
    return q


def make_loader(cfg: Config, rank=0, world_size=1) -> Loader:
    return Loader(cfg, rank, world_size)


def class_dataset(cfg: Config) -> dict:
    """Prior preservation's dataset: class_data_dir, every image captioned class_prompt, at the resolution and with
    the crop options of the first trained dataset, so class and instance images are prepared alike."""
    first = next(ds for ds in load_datasets(cfg) if not ds["held_out"])
    same = ("resolution", "resolution_type", "crop", "crop_aspect", "crop_aspect_buckets", "crop_style",
            "maximum_image_size", "target_downsample_size")
    return {"id": "class images", "instance_data_dir": cfg.class_data_dir, "caption_strategy": "instanceprompt",
            "instance_prompt": cfg.class_prompt, **{k: first[k] for k in same}}


def make_class_loader(cfg: Config, rank=0, world_size=1) -> Loader:
    """A second Loader over class_dataset(cfg), streamed beside the instance loader one batch for one: its own
    seeded plan and its own state_dict, so a resume continues both exactly. Its skipped.txt is output_dir/class/'s;
    its scan cache is the instance loader's."""
    import dataclasses

    import t5cache

    own = dataclasses.replace(cfg, datasets=[class_dataset(cfg)], validation_loss_images=0,
                              output_dir=str(Path(cfg.output_dir) / "class"),
                              text_cache_dir=t5cache.default_cache_dir(cfg))
    return Loader(own, rank, world_size)


# ---------------------------------------------------------------------------------------------
# pictures: tensors -> PIL, labelled grids (validation grids, sample.py's grid, the contact sheet)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[B, 3, H, W] in [-1, 1] -> B RGB PIL images, rounded as diffusers' pt -> pil does (in float32)."""
    x = ((images.detach().float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    return [Image.fromarray(a) for a in x.permute(0, 2, 3, 1).cpu().numpy()]


def _wrap(draw, text: str, font, width: int, max_lines: int = 4) -> list[str]:
    """Greedy word wrap to `width` pixels; overlong words are cut, the last line ends in '...' if text is left."""
    lines, line = [], ""
    for word in text.split():
        while draw.textlength(word, font=font) > width and len(word) > 1:
            word = word[:-1]
        if line and draw.textlength(f"{line} {word}", font=font) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    lines.append(line)
    return lines[:max_lines - 1] + ["..."] if len(lines) > max_lines else lines


def image_grid(images, labels=None, cols: int | None = None, min_width: int = 128, pad: int = 4) -> Image.Image:
    """A white sheet of `images` (PIL images, or a [B, 3, H, W] tensor in [-1, 1]), `cols` per row, each with
    its label wrapped under it. Small images are enlarged (nearest, by an integer factor) to `min_width`, so
    64 px samples and their labels stay readable. -> PIL image."""
    images = to_pil(images) if isinstance(images, torch.Tensor) else list(images)
    labels = list(labels) if labels is not None else [""] * len(images)
    if len(labels) != len(images):
        raise ValueError(f"image_grid: {len(images)} images but {len(labels)} labels")
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    scale = max(1, math.ceil(min_width / max(im.width for im in images)))
    cw, ch = max(im.width for im in images) * scale, max(im.height for im in images) * scale
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    wrapped = [_wrap(measure, label, font, cw) for label in labels]
    line_h = measure.textbbox((0, 0), "Ag", font=font)[3] + 2
    text_h = max(len(w) for w in wrapped) * line_h if any(labels) else 0
    sheet = Image.new("RGB", (pad + cols * (cw + pad), pad + rows * (ch + text_h + pad)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (im, lines) in enumerate(zip(images, wrapped)):
        r, c = divmod(i, cols)
        x0, y0 = pad + c * (cw + pad), pad + r * (ch + text_h + pad)
        sheet.paste(im.convert("RGB").resize((im.width * scale, im.height * scale), Image.NEAREST), (x0, y0))
        for j, line in enumerate(lines):
            draw.text((x0, y0 + ch + j * line_h), line, fill="black", font=font)
    return sheet


# ---------------------------------------------------------------------------------------------
# command line: report, throughput, contact sheet


def main(cfg: Config) -> Path:
    """Report the datasets, measure throughput, write the contact sheet; -> its path."""
    loader = make_loader(cfg)
    for r in loader.report:
        shards = f" in {r['shards']} shards" if "shards" in r else ""
        print(f"  {r['id']}: found {r['found']}{shards}, used {r['used']}, skipped {r['skipped'] or 'none'}")
    for path, reason in loader.skipped[:10]:
        print(f"    {path}\t{reason}")
    print("buckets (samples per epoch):", ", ".join(f"{k}: {n}" for k, n in loader.buckets.items()))
    requests = [r for batch in loader.plan(0) for r in batch][:32]
    t = time.perf_counter()
    for r in requests:
        loader.items[r]
    per_core = len(requests) / (time.perf_counter() - t)
    stream = loader.stream()  # one DataLoader whatever the number of batches
    batches = [next(stream)]  # worker start-up is not throughput
    t = time.perf_counter()
    batches += [next(stream) for _ in range(max(4, 128 // cfg.train_batch_size))]
    rate = (len(batches) - 1) * cfg.train_batch_size / (time.perf_counter() - t)
    stream.close()  # its workers end now, not whenever the generator is collected
    print(f"throughput: {per_core:.1f} samples/s on one core, {rate:.1f} with {cfg.dataloader_num_workers} workers")
    images, labels, pairs = [], [], "low_res" in batches[0]
    for b in batches[: math.ceil(24 / cfg.train_batch_size)]:
        h, w = b["pixels"].shape[2:]
        for i, (hi, caption) in enumerate(zip(to_pil(b["pixels"]), b["captions"])):
            if pairs:  # stage II: the low-res partner, enlarged 4x (nearest: its pixels stay visible), left of it
                images.append(to_pil(b["low_res"][i : i + 1])[0].resize((w, h), Image.NEAREST))
                labels.append(f"low-res {w // 4}x{h // 4}")
            images.append(hi)
            labels.append(f"{w}x{h} {caption}")
    cols = 2 * math.ceil(math.sqrt(len(images) / 2)) if pairs else None  # even: each pair on one row
    sheet = Path(cfg.output_dir) / "contact_sheet.png"
    image_grid(images, labels, cols).save(sheet)
    print(f"contact sheet: {sheet}")
    return sheet


if __name__ == "__main__":
    main(parse_args(usage="usage: python data.py CONFIG [--key=value ...]  (dataset report + contact sheet)"))
