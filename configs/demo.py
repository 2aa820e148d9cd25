# The demo: a tiny IF stage I trained from scratch on CPU in a few minutes, no downloads.
#
#   python train.py configs/demo.py
#
# On first use this file draws its dataset (coloured shapes on plain backgrounds, captioned
# "a red circle on a blue background", varied sizes and aspect ratios, JPEG and PNG) into data/demo/,
# and makes a tiny T5 (random weights, SentencePiece tokenizer trained on the captions) in the Hub
# layout, which train.py loads through the normal T5 path. Samples appear in output/demo/samples/.

import math
import random
from pathlib import Path

_root = Path(__file__).resolve().parent.parent / "data" / "demo"
_version = "4"  # bump when the drawing below changes: the data is then drawn again
_colours = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 215, 40),
            "purple": (140, 60, 180)}
_backgrounds = {"white": (245, 245, 245), "black": (25, 25, 25), "gray": (128, 128, 128)}  # never a shape colour
_shapes = ("circle", "square", "triangle")  # configs/demo_lora.py teaches a fourth: "star"


def _draw(rng: random.Random, folder: Path, n: int, shapes=_shapes) -> list[str]:
    """n images with a same-named .txt caption each; returns the captions."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    captions = []
    for i in range(n):
        colour, background, shape = rng.choice(list(_colours)), rng.choice(list(_backgrounds)), rng.choice(shapes)
        w, h = rng.choice([(64, 64), (96, 64), (64, 96), (128, 128), (160, 96), (200, 200), (256, 192), (144, 256)])
        img = Image.new("RGB", (w, h), _backgrounds[background])
        s = rng.uniform(0.45, 0.75) * min(w, h)  # the shape's size
        x, y = rng.uniform(0, w - s), rng.uniform(0, h - s)
        draw = ImageDraw.Draw(img)
        if shape == "circle":
            draw.ellipse([x, y, x + s, y + s], fill=_colours[colour])
        elif shape == "square":
            draw.rectangle([x, y, x + s, y + s], fill=_colours[colour])
        elif shape == "triangle":
            draw.polygon([(x + s / 2, y), (x, y + s), (x + s, y + s)], fill=_colours[colour])
        else:  # a five-pointed star
            r = [s / 2 if k % 2 == 0 else s / 5 for k in range(10)]
            draw.polygon([(x + s / 2 + r[k] * math.sin(k * math.pi / 5), y + s / 2 - r[k] * math.cos(k * math.pi / 5))
                          for k in range(10)], fill=_colours[colour])
        caption = f"a {colour} {shape} on a {background} background"
        name = folder / f"{i:04d}"
        img.save(name.with_suffix(".jpg" if i % 2 else ".png"), quality=92)
        name.with_suffix(".txt").write_text(caption + "\n")
        captions.append(caption)
    return captions


def _make_demo_data() -> None:
    if (_root / "version").is_file() and (_root / "version").read_text() == _version:
        return
    import shutil

    import t5cache

    shutil.rmtree(_root, ignore_errors=True)
    rng = random.Random(0)
    captions = _draw(rng, _root / "train", 600) + _draw(rng, _root / "heldout", 48)
    captions += _draw(rng, _root / "stars", 80, shapes=("star",))
    every = [f"a {c} {s} on a {b} background" for c in _colours for s in (*_shapes, "star") for b in _backgrounds]
    t5cache.make_tiny_t5(_root / "t5", sorted(set(captions + every)) + [""], d_model=64, layers=2, heads=4, d_ff=128,
                         tokenizer_type="word")  # one token per word: a random T5 cannot learn to spell
    (_root / "version").write_text(_version)


_make_demo_data()

# the model: a 3.3M-parameter IF-style U-Net (32 px; attention at 8x8), trained from scratch
unet_config = dict(
    block_out_channels=[32, 64, 128], layers_per_block=1, attention_head_dim=32, in_channels=3, out_channels=6,
    down_block_types=["ResnetDownsampleBlock2D", "ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"],
    up_block_types=["SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D", "ResnetUpsampleBlock2D"],
    mid_block_type="UNetMidBlock2DSimpleCrossAttn", encoder_hid_dim=64, encoder_hid_dim_type="text_proj",
    cross_attention_dim=128, addition_embed_type="text", addition_embed_type_num_heads=4,
    resnet_time_scale_shift="scale_shift", act_fn="gelu", norm_num_groups=16, cross_attention_norm="group_norm",
    sample_size=32,
)
model_type = "full"
text_encoder = str(_root / "t5")
text_cache_dir = str(_root / "t5_cache")
datasets = [{
    "id": "shapes", "instance_data_dir": str(_root / "train"), "caption_strategy": "textfile",
    "resolution": 32, "resolution_type": "pixel", "minimum_image_size": 32, "crop": False,
}, {  # 48 more pictures drawn the same way, never trained on: the held-out loss's (validation_loss_images)
    "id": "heldout", "instance_data_dir": str(_root / "heldout"), "caption_strategy": "textfile",
    "resolution": 32, "resolution_type": "pixel", "minimum_image_size": 32, "crop": False, "held_out": True,
}]

# training: fp32 on the CPU (mixed_precision="auto": 14.8 samples/s here vs 12.7 in bf16, 60 steps each, 2 cores),
# and a high learning rate for a model trained from scratch
output_dir = "output/demo"
max_train_steps = 600
train_batch_size = 8
learning_rate = 2e-3
lr_end = 1e-5
lr_warmup_steps = 50
adam_weight_decay = 0.0
caption_dropout_probability = 0.1
checkpointing_steps = 200
checkpoints_total_limit = 2
dataloader_num_workers = 1

# what you see while it trains
validation_prompts = [
    "a red circle on a white background",
    "a blue square on a black background",
    "a green triangle on a gray background",
    "a yellow circle on a black background",
    "a purple square on a white background",
]
validation_resolution = "32,48x32"
validation_steps = 200
validation_num_inference_steps = 25
validation_guidance = 4.0
validation_loss_images = 16
logging_steps = 10
resolution = "32"  # sample.py's stage I size: the demo's (stage II then upscales 4x, to 128 px)
