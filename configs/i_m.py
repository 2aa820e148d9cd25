# Fine-tune IF stage I, medium (IF-I-M-v1.0, 400M parameters, 64 px), with a LoRA.
#
#   python train.py configs/i_m.py --pretrained=/path/to/IF-I-M-v1.0
#
# Give it two things: the base weights (`pretrained`: a folder downloaded with
# `hf download DeepFloyd/IF-I-M-v1.0` after accepting the licence on the Hub, or the Hub id itself)
# and your images (`_images` below, or your own config that does include("i_m.py") and sets `datasets`).
# The values are those of SimpleTuner's DeepFloyd guide unless a comment says otherwise.

model_flavour = "i-medium-400m"
pretrained = None  # None: the flavour's Hub repo, DeepFloyd/IF-I-M-v1.0 (needs the licence accepted and a login)

# the adapter: rank 32 on the whole attention path, text keys/values included (lora.DEFAULT_TARGETS)
model_type = "lora"  # or "full": every weight (see i_xl.py for memory figures)
lora_rank = 32
use_dora = False
use_bitfit = False

# the data: 64 px on the shorter edge, random square crops at the image's own scale; images over 256 px
# are first brought down (25% at a time) to 128 px, so a crop never shows less than a quarter of the picture's
# width; images under 64 px are skipped, never upscaled.
_images = "data/my_images"  # a folder of images (searched recursively), each with a same-named .txt caption
datasets = [{
    "id": "primary", "instance_data_dir": _images, "caption_strategy": "textfile",
    "crop": True, "crop_aspect": "square", "crop_style": "random",
    "resolution": 64, "resolution_type": "pixel",
    "minimum_image_size": 64, "maximum_image_size": 256, "target_downsample_size": 128,
    "repeats": 1,
}]
caption_dropout_probability = 0.1  # trains the empty caption too, so classifier-free guidance keeps working

# optimisation: pure bf16 on a GPU (weights, grads and AdamW states; stochastic rounding)
learning_rate = 4e-5
lr_end = 4e-6
lr_scheduler = "cosine"
lr_warmup_steps = 100
train_batch_size = 4
gradient_accumulation_steps = 1
max_train_steps = 2000
max_grad_norm = 1.0
loss_type = "hybrid"  # trains the variance channels too, so IF's learned-variance sampler stays right

# what you see while it trains, and what is kept
output_dir = "output/i_m"
checkpointing_steps = 250
checkpoints_total_limit = 3
validation_prompts = ["a photo of a corgi wearing a red scarf", "an oil painting of a lighthouse at night"]
validation_resolution = "64,96x64"
validation_steps = 250
validation_num_inference_steps = 50
validation_guidance = 7.0
