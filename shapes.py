"""The demo's world: its named colours, backgrounds and shapes, the drawing of captioned pictures, and a judge that
reads a picture's background colour, shape colour and shape back from its pixels.

configs/demo.py draws its dataset with `draw`; `judge` and `accuracy` tell whether a model draws what the caption
asks for (tests/test_demo.py, docs/demo.md). The judge knows nothing of the model: it looks at pixels only.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 215, 40),
           "purple": (140, 60, 180)}
BACKGROUNDS = {"white": (245, 245, 245), "black": (25, 25, 25), "gray": (128, 128, 128)}  # never a shape colour
SHAPES = ("circle", "square", "triangle")  # configs/demo_lora.py teaches a fourth: "star"
SIZES = [(64, 64), (96, 64), (64, 96), (128, 128), (160, 96), (200, 200), (256, 192), (144, 256)]
# The shape's size as a fraction of the picture's short side; the demo draws every shape this size, centred. Shapes of
# random sizes at random places (0.45-0.75 anywhere) were blobs after the demo's few minutes (docs/demo.md).
SCALE = 0.7


def caption(colour: str, shape: str, background: str) -> str:
    return f"a {colour} {shape} on a {background} background"


def parse(text: str) -> tuple[str, str, str]:
    """caption -> (colour, shape, background)."""
    words = text.split()
    return words[1], words[2], words[5]


def every_caption(shapes=(*SHAPES, "star")) -> list[str]:
    """Every colour x shape x background once: 45 captions for the three demo shapes, 60 with the star."""
    return [caption(c, s, b) for c in COLOURS for s in shapes for b in BACKGROUNDS]


def draw_one(colour: str, shape: str, background: str, size=(64, 64), rng: random.Random | None = None,
             scale=(SCALE, SCALE), centred: bool = True):
    """One picture (PIL): the shape, its size a random fraction `scale` of the short side, in the middle or
    (centred=False) at a random place."""
    from PIL import Image, ImageDraw

    rng = rng or random.Random(0)
    w, h = size
    img = Image.new("RGB", (w, h), BACKGROUNDS[background])
    s = rng.uniform(*scale) * min(w, h)
    x, y = ((w - s) / 2, (h - s) / 2) if centred else (rng.uniform(0, w - s), rng.uniform(0, h - s))
    draw, fill = ImageDraw.Draw(img), COLOURS[colour]
    if shape == "circle":
        draw.ellipse([x, y, x + s, y + s], fill=fill)
    elif shape == "square":
        draw.rectangle([x, y, x + s, y + s], fill=fill)
    elif shape == "triangle":
        draw.polygon([(x + s / 2, y), (x, y + s), (x + s, y + s)], fill=fill)
    elif shape == "star":  # five points, inner radius 0.4 of the outer
        r = [s / 2 if k % 2 == 0 else s / 5 for k in range(10)]
        draw.polygon([(x + s / 2 + r[k] * math.sin(k * math.pi / 5), y + s / 2 - r[k] * math.cos(k * math.pi / 5))
                      for k in range(10)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return img


def draw(rng: random.Random, folder: Path, n: int, shapes=SHAPES) -> list[str]:
    """n pictures with a same-named .txt caption each (JPEG and PNG alternately), in SIZES, each shape centred at
    SCALE of the short side; returns the captions."""
    folder.mkdir(parents=True, exist_ok=True)
    captions = []
    for i in range(n):
        colour, background, shape = rng.choice(list(COLOURS)), rng.choice(list(BACKGROUNDS)), rng.choice(shapes)
        img = draw_one(colour, shape, background, rng.choice(SIZES), rng)
        text = caption(colour, shape, background)
        name = folder / f"{i:04d}"
        img.save(name.with_suffix(".jpg" if i % 2 else ".png"), quality=92)
        name.with_suffix(".txt").write_text(text + "\n")
        captions.append(text)
    return captions


# ---------------------------------------------------------------------------------------------
# the judge


def _nearest(rgb, table: dict) -> str:
    return min(table, key=lambda k: sum((a - b) ** 2 for a, b in zip(rgb, table[k])))


def _flood(mask, seeds, seen):
    """The pixels of boolean [H, W] `mask` 4-connected to any of `seeds` ((y, x) in mask), marking them in `seen`."""
    H, W = mask.shape
    stack, region = list(seeds), []
    for y, x in seeds:
        seen[y, x] = True
    while stack:
        y, x = stack.pop()
        region.append((y, x))
        for v, u in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
            if 0 <= v < H and 0 <= u < W and mask[v, u] and not seen[v, u]:
                seen[v, u] = True
                stack.append((v, u))
    return region


def _largest_component(mask):
    """The largest 4-connected region of a boolean [H, W] array."""
    import numpy as np

    seen = np.zeros_like(mask)
    best: list = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if not seen[y0, x0]:
            region = _flood(mask, [(y0, x0)], seen)
            best = region if len(region) > len(best) else best
    out = np.zeros_like(mask)
    if best:
        ys, xs = zip(*best)
        out[list(ys), list(xs)] = True
    return out


def _fill_holes(mask):
    """`mask` with every region it encloses (not 4-connected to the picture's edge outside it) filled in."""
    import numpy as np

    free, H, W = ~mask, *mask.shape
    edge = [(y, x) for y in range(H) for x in range(W) if (y in (0, H - 1) or x in (0, W - 1)) and free[y, x]]
    outside = np.zeros_like(mask)
    _flood(free, edge, outside)
    return ~outside


def _points(mask, bins: int = 36) -> int:
    """How many tips a region has: peaks of its radius from its centroid around the circle (the farthest pixel in
    each of `bins` directions, smoothed over three), each at least 1.4x the lowest radius within 30 degrees of it."""
    import numpy as np

    ys, xs = np.nonzero(mask)
    dy, dx = ys - ys.mean(), xs - xs.mean()
    k = ((np.arctan2(dy, dx) + math.pi) / (2 * math.pi) * bins).astype(int) % bins
    radius = np.zeros(bins)
    np.maximum.at(radius, k, np.hypot(dy, dx) + 0.5)
    radius = (np.roll(radius, 1) + radius + np.roll(radius, -1)) / 3
    w, tips = bins // 12, []
    for i in range(bins):
        near = radius[[(i + j) % bins for j in range(-w, w + 1)]]
        if radius[i] == near.max() and radius[i] >= 1.4 * near.min() and not (tips and tips[-1] == i - 1):
            tips.append(i)
    if len(tips) > 1 and tips[0] == 0 and tips[-1] == bins - 1:  # one peak across the wrap
        tips.pop()
    return len(tips)


def _hull_area(points) -> float:
    """Area of the convex hull of [N, 2] points (monotone chain + shoelace)."""
    pts = sorted(set(map(tuple, points)))
    if len(pts) < 3:
        return 0.0

    def cross(o, a, b):
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    lower, upper = [], []
    for p in pts:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], p) <= 0:
            lower.pop()
        lower.append(p)
    for p in reversed(pts):
        while len(upper) >= 2 and cross(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    hull = lower[:-1] + upper[:-1]
    return abs(sum(hull[i][0] * hull[i - 1][1] - hull[i - 1][0] * hull[i][1] for i in range(len(hull)))) / 2


def judge(image, shapes=SHAPES) -> dict:
    """What a picture shows, from its pixels: a PIL image, a uint8 [H, W, 3] array or a [3, H, W] tensor in [-1, 1].

    background: the median of the border pixels (the outermost ring), the nearest named background. The shape: the
    largest connected region of pixels far from that background colour (> 40% of the way from it to the nearest
    named colour, at least 60 in RGB distance); its colour is their median, the nearest of every named colour
    (backgrounds too: a gray blob is no colour). Its class is read from its outline, the region with the holes it
    encloses filled (a hole of background colour is a flaw in the shape, not another shape; `holes` is the share of
    the outline it takes): `fill` (area / bounding-box area: circle 0.785, square 1, triangle 0.5, star 0.34) and
    `solidity` (area / convex-hull area: 1 for the convex three, 0.5 for a star); a star must also have five
    `points` (tips: peaks of the outline's distance from its centre), so a ragged blob is not one. A region under
    2% of the picture is no shape."""
    import numpy as np

    if hasattr(image, "detach"):  # a tensor in [-1, 1]
        x = ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).permute(1, 2, 0).numpy()
    else:
        x = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image).astype(np.float64)
    H, W, _ = x.shape
    border = np.concatenate([x[0], x[-1], x[1:-1, 0], x[1:-1, -1]])
    bg_rgb = np.median(border, axis=0)
    background = _nearest(bg_rgb, BACKGROUNDS)
    dist = np.sqrt(((x - bg_rgb) ** 2).sum(-1))
    gap = min(math.dist(bg_rgb, c) for c in COLOURS.values())
    shape = _largest_component(dist > max(60.0, 0.4 * gap))
    mask = _fill_holes(shape)  # a hole of background colour in a shape does not change what shape it is
    area = int(mask.sum())
    out = {"background": background, "colour": None, "shape": None, "fill": 0.0, "solidity": 0.0,
           "holes": 0.0, "points": 0, "area": area / (H * W)}
    if area < 0.02 * H * W:
        return out
    out["colour"] = _nearest(np.median(x[shape], axis=0), {**COLOURS, **BACKGROUNDS})
    out["holes"] = round(1 - int(shape.sum()) / area, 3)
    ys, xs = np.nonzero(mask)
    fill = area / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    corners = np.concatenate([np.stack([ys + dy, xs + dx], 1) for dy in (0, 1) for dx in (0, 1)])  # pixel squares
    solidity = area / max(_hull_area(corners), 1.0)
    out["fill"], out["solidity"] = round(float(fill), 3), round(float(solidity), 3)
    out["points"] = _points(mask)
    if "star" in shapes and solidity < 0.75 and out["points"] == 5:
        out["shape"] = "star"
    else:
        ideal = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5}
        out["shape"] = min((s for s in shapes if s != "star"), key=lambda s: abs(fill - ideal[s]))
    return out


def score(images, captions: list[str], shapes=SHAPES) -> dict:
    """The three accuracies (background, colour, shape) of images against their captions, and each verdict."""
    verdicts = [judge(im, shapes) for im in images]
    n = len(captions)
    res = {"background": 0, "colour": 0, "shape": 0}
    for v, text in zip(verdicts, captions):
        colour, shape, background = parse(text)
        res["background"] += v["background"] == background
        res["colour"] += v["colour"] == colour
        res["shape"] += v["shape"] == shape
    return {**{k: v / n for k, v in res.items()}, "verdicts": verdicts}


def _model_and_cache(unet, cache, **given):
    """(U-Net in eval mode, TextCache, its sampler options: sample.sampler_of, less those `given` not None) from a
    U-Net or an output_dir, and a TextCache or its folder (None: the demo's)."""
    import sample
    import t5cache
    from model import UNet

    path = unet if isinstance(unet, (str, Path)) else None
    if path is not None:
        unet = UNet.from_pretrained(path)
    unet = unet.eval()
    if cache is None:
        cache = Path(__file__).resolve().parent / "data" / "demo" / "t5_cache"
    if isinstance(cache, (str, Path)):
        cache = t5cache.TextCache(cache)
    return unet, cache, {**sample.sampler_of(unet, path), **{k: v for k, v in given.items() if v is not None}}


def accuracy(unet, cache=None, captions: list[str] | None = None, *, seed: int = 0, steps: int = 25,
             guidance: float = 4.0, size=(32, 32), shapes=SHAPES, batch: int = 45,
             prediction_type: str | None = None) -> dict:
    """Sample each caption once (stage I, as validation.validate does: learned-range variance, the empty negative
    prompt, `steps` and `guidance` as the demo validates) with fixed seeds and judge the pictures.
    unet: a U-Net or a trained output_dir; cache: a TextCache or its folder (default: the demo's);
    prediction_type: None for the output_dir's own (a bare U-Net: epsilon)."""
    import torch

    import sample

    unet, cache, how = _model_and_cache(unet, cache, prediction_type=prediction_type)
    captions = captions or every_caption(shapes)
    gen = torch.Generator().manual_seed(seed)
    images = []
    with torch.no_grad():
        for i in range(0, len(captions), batch):
            part = captions[i:i + batch]
            x = sample.stage1(unet, cache.get(part), cache.get([""]), height=size[1], width=size[0], steps=steps,
                              guidance=guidance, generator=gen, **how)
            images += list(x.float())
    result = score(images, captions, shapes)
    result["images"] = images
    return result


EDGE_STEP = 40  # a step of more than this (8-bit, between neighbouring pixels) in the original is an edge
FLAT_MARGIN = 3  # pixels farther than this from any edge of the original are its flat areas


def _dilate(mask, r: int):
    """Boolean [H, W] `mask` grown by r pixels (a (2r+1)^2 square)."""
    import numpy as np

    padded, grown = np.pad(mask, r), np.zeros_like(mask)
    H, W = mask.shape
    for dy in range(2 * r + 1):
        for dx in range(2 * r + 1):
            grown |= padded[dy:dy + H, dx:dx + W]
    return grown


def upscale_quality(upscale, original) -> dict:
    """How an upscale [H, W, 3] (8-bit) compares with the original: PSNR (dB) over the whole picture; `edge`, the
    energy of its gradient (sum of squared steps between neighbours) within a pixel of the original's edges,
    relative to the original's there (1 = as crisp; a blur that spreads a step over 4 pixels keeps about 1/4: the
    steps are a quarter as high and 4 times as many); `flat`, the RMS error (8-bit levels) on the flat areas, more
    than FLAT_MARGIN pixels from any edge, where grain and wrong colours show."""
    import numpy as np

    u, o = (np.asarray(a, dtype=np.float64) for a in (upscale, original))

    def energy(a):  # [H, W]: the squared steps to the right and downwards, summed over the channels
        e = np.zeros(a.shape[:2])
        e[:, :-1] += ((a[:, 1:] - a[:, :-1]) ** 2).sum(-1)
        e[:-1] += ((a[1:] - a[:-1]) ** 2).sum(-1)
        return e

    eo = energy(o)
    edges = eo > EDGE_STEP ** 2
    band, flats = _dilate(edges, 1), ~_dilate(edges, FLAT_MARGIN)
    mse = ((u - o) ** 2).mean()
    return {"psnr": 10 * math.log10(255.0 ** 2 / max(mse, 1e-10)),
            "edge": energy(u)[band].sum() / max(eo[band].sum(), 1e-10),
            "flat": math.sqrt(((u - o) ** 2).mean(-1)[flats].mean()) if flats.any() else 0.0}


SHARPER = 3.0  # the stage II demo's check: edge energy at least 3 times bilinear's (a 4x blur keeps ~1/4 of it) ...
FLAT_RMS = 4.0  # ... and at most 4 levels RMS of error on the flat areas (grain, wrong colours), which bilinear has ~1


def sharper_than_bilinear(scores: dict) -> bool:
    """upscale_scores' verdict: stage II's edges are crisp where bilinear's are blurred, and its flat areas clean."""
    ours, theirs = scores["stage2"], scores["bilinear"]
    return ours["edge"] >= SHARPER * theirs["edge"] and ours["flat"] <= FLAT_RMS


def upscale_scores(unet, folder, cache=None, *, size: int = 128, steps: int = 25, guidance: float | None = None,
                   noise_level: int | None = None, variance: str | None = None, strength: float = 1.0, seed: int = 0,
                   limit: int = 24, prediction_type: str | None = None) -> dict:
    """Stage II against bilinear on held-out pictures: each picture in `folder` whose short side is at least `size`
    is brought to `size` px on its short side (centre square), then 4x down as training does (data.resize); the
    stage II U-Net (a U-Net or an output_dir) and bilinear interpolation each bring that back up, and both are
    scored by upscale_quality against the `size` px picture. strength < 1: stage II starts from the bilinear
    upscale noised part way (IF's img2img super-resolution with it as the original) instead of from pure noise.
    noise_level, guidance: None for stage II's defaults (sample.stage2). variance, prediction_type: None for the
    output_dir's own (a bare U-Net: by its channels, and epsilon). "shifted" scores the original itself moved by one
    pixel (a quarter of a low-res pixel) right and down: crisp, in the right colours, and PSNR's measure of an upscale
    that is right but for where each edge falls within a low-res pixel.
    -> {"stage2": {"psnr", "edge", "flat"}, "bilinear": {...}, "shifted": {...}, "n"}: the means over the pictures."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from PIL import Image

    import data
    import sample

    unet, cache, how = _model_and_cache(unet, cache, variance=variance, prediction_type=prediction_type)
    kw = {} if guidance is None else {"guidance": guidance}
    if noise_level is not None:
        kw["noise_level"] = noise_level

    def big_enough(path):
        with Image.open(path) as img:
            return min(img.size) >= size

    picked = [p for p in sorted(Path(folder).iterdir()) if p.suffix.lower() in (".png", ".jpg") and big_enough(p)]
    picked = picked[:limit]
    if not picked:
        raise ValueError(f"no picture in {folder} has a short side of {size} px or more")
    gen, rows = torch.Generator().manual_seed(seed), {"stage2": [], "bilinear": [], "shifted": []}
    neg = cache.get([""])
    with torch.no_grad():
        for path in picked:
            with Image.open(path) as img:
                img = img.convert("RGB")
                w, h = img.size
                s = min(w, h)
                box = ((w - s) / 2, (h - s) / 2, (w + s) / 2, (h + s) / 2)
                high = data.resize(img, (size, size), box)
            low = data.resize(high, (size // 4, size // 4))
            low_t = sample.prepare_image(low)  # [1, 3, h, w] in [-1, 1]
            up = F.interpolate(low_t, size=(size, size), mode="bilinear", align_corners=False)
            text = cache.get([path.with_suffix(".txt").read_text().strip()])
            start = {} if strength == 1.0 else {"image": up, "strength": strength}
            x = sample.stage2(unet, low_t, text, neg, height=None if start else size, width=None if start else size,
                              steps=steps, generator=gen, **how, **start, **kw)
            rows["stage2"].append(upscale_quality(data.to_pil(x)[0], high))
            rows["bilinear"].append(upscale_quality(data.to_pil(up)[0], high))
            moved = np.pad(np.asarray(high), ((1, 0), (1, 0), (0, 0)), mode="edge")[:-1, :-1]
            rows["shifted"].append(upscale_quality(moved, high))
    mean = {k: {m: sum(r[m] for r in v) / len(v) for m in v[0]} for k, v in rows.items()}
    return {**mean, "n": len(picked)}
