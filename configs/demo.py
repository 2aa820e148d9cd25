# The demo: a tiny IF stage I trained from scratch on CPU in a few minutes, no downloads.
#
#   python train.py configs/demo.py
#
# On first use this file draws its dataset (coloured shapes on plain backgrounds, captioned
# "a red circle on a blue background", pictures of varied sizes and aspect ratios with the shape in the middle,
# JPEG and PNG) into data/demo/,
# and makes a tiny T5 (random weights, SentencePiece tokenizer trained on the captions) in the Hub
# layout, which train.py loads through the normal T5 path. Samples appear in output/demo/samples/.

from pathlib import Path

import shapes  # the colours, backgrounds and shapes, the drawing and the pixel judge: shapes.py at the repo root

_root = Path(__file__).resolve().parent.parent / "data" / "demo"
_version = "5"  # bump when the drawing (shapes.draw) changes: the data is then drawn again


def _make_demo_data() -> None:
    if (_root / "version").is_file() and (_root / "version").read_text() == _version:
        return
    import random
    import shutil

    import t5cache

    shutil.rmtree(_root, ignore_errors=True)
    rng = random.Random(0)
    captions = shapes.draw(rng, _root / "train", 600) + shapes.draw(rng, _root / "heldout", 48)
    captions += shapes.draw(rng, _root / "stars", 80, shapes=("star",))
    every = shapes.every_caption()
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

# training: fp32 on the CPU (mixed_precision="auto"; it measured 15% faster than bf16 on 2 cores),
# and a high learning rate for a model trained from scratch
output_dir = "output/demo"
max_train_steps = 2000
train_batch_size = 8
learning_rate = 2e-3
lr_end = 1e-5
lr_warmup_steps = 50
adam_weight_decay = 0.0
caption_dropout_probability = 0.1
# The background is most of the picture, so its colour is the picture's mean, which plain noise hardly lets a model
# change: without offset noise backgrounds come out a tinted gray whatever the caption says (docs/demo.md). Offset
# noise on every sample, at 0.5 (much more than the usual 0.1, measured), makes the mean something it must learn;
# min-SNR weighting favours the high-t steps where colours are decided.
noise_offset = 0.5
noise_offset_probability = 1.0
snr_gamma = 5.0
checkpointing_steps = 400
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
validation_steps = 400
validation_num_inference_steps = 25
validation_guidance = 4.0
validation_loss_images = 16
logging_steps = 10
resolution = "32"  # sample.py's stage I size: the demo's (stage II then upscales 4x, to 128 px)
noise_level = 100  # sample.py, stage II: the low-res input's augmentation level (demo_ii.py trains 0-250), and
stage2_guidance = 1.0  # no guidance (demo_ii.py says why)
