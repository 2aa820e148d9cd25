# Fine-tune IF stage II, medium (IF-II-M-v1.0, 450M parameters, 64 -> 256 px), with a LoRA.
#
#   python train.py configs/ii_m.py --pretrained=/path/to/IF-II-M-v1.0
#
# Stage II learns to restore detail: each 256 px training crop is brought down 4x to 64 px, upsampled back,
# noised at a random augmentation level in [0, 1000) (the level is the model's class label, as in IF's own
# training) and fed beside the noisy target. Validation grids upscale `num_eval_images` dataset pictures.
# Train it on the same images as stage I; sample the cascade with
#   python sample.py configs/i_m.py --pretrained=... --lora=output/i_m/pytorch_lora_weights.safetensors \
#       --stage2=/path/to/IF-II-M-v1.0 --stage2_lora=output/ii_m/pytorch_lora_weights.safetensors --prompt="..."

include("i_m.py")

model_flavour = "ii-medium-450m"
# The same rules as stage I, 4x larger: 256 px crops, images over 1024 px first brought down to 512 px,
# images under 256 px skipped (they would be upscaled, and stage II would learn to reproduce the blur).
datasets = [dict(datasets[0], resolution=256, minimum_image_size=256, maximum_image_size=1024,
                 target_downsample_size=512)]
noise_aug_range = (0, 1000)
output_dir = "output/ii_m"
validation_resolution = "256"  # the upscaled size; its low-res input is 64 px
validation_guidance = None  # stage II's own (4), not i_m.py's 7
validation_prompts = []  # stage II validates on held-out pictures (their own captions), not on prompts
num_eval_images = 4
