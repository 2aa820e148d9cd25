# A LoRA on top of the demo's model that teaches it a new word: "star".
#
#   python train.py configs/demo.py        # first: the base model, in output/demo
#   python train.py configs/demo_lora.py   # then: a rank-8 LoRA on 80 pictures of stars, in output/demo_lora (4 min)
#
# The text encoder already knows the word (its tokenizer was trained on every caption), but the U-Net has
# never seen a star. Validation grids compare what the LoRA draws for "star" with the base model's shapes.

include("demo.py")

pretrained = "output/demo"  # the demo's final weights (output/demo/unet)
unet_config = None
model_type = "lora"
lora_rank = 8
lora_targets = ["to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj", "conv1", "conv2"]  # + resnet convs
datasets = [dict(datasets[0], id="stars", instance_data_dir=datasets[0]["instance_data_dir"].replace("train", "stars"))]
output_dir = "output/demo_lora"
max_train_steps = 1000  # 300 steps drew ragged figures (1 of 15 five-pointed), 600: 5 of 15, 1000: 14-15 (docs/demo.md)
learning_rate = 2e-3
lr_warmup_steps = 20
checkpointing_steps = 500
validation_steps = 500
validation_loss_images = 8
validation_prompts = [
    "a red star on a white background",
    "a blue star on a black background",
    "a yellow star on a gray background",
    "a red circle on a white background",  # what the base already knew
]
