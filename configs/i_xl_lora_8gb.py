# A LoRA on IF-I-XL (4.3B parameters) on an 8 GB card: the cache, the training and the sampling.
#
#   python train.py configs/i_xl_lora_8gb.py --pretrained=/path/to/IF-I-XL-v1.0
#   python train.py configs/i_xl_lora_8gb.py --dry_run      # each phase's predicted peak
#   python sample.py configs/i_xl_lora_8gb.py --lora=output/i_xl_lora_8gb/pytorch_lora_weights.safetensors \
#       --prompt="a photo of a corgi wearing a red scarf"
#
# A LoRA trains few weights, but holds the whole frozen base: 8 GiB in bf16, so 8 and 12 GB cards were out.
# - quantise_base: the frozen U-Net weights in int8 with a scale per output channel (quant.py), rebuilt in bf16
#   layer by layer for the forward and the backward: 4 GiB. The adapters train in bf16 as usual, and the LoRA file
#   is the ordinary one (it loads in diffusers on the bf16 model). Validation and sample.py use the int8 base too.
# - text_encoder_dtype="int8": T5-XXL (9.5 GB in bf16) in int8 for the text cache and for sample.py's prompts,
#   so the encoder fits the same card; T5 is freed before the U-Net loads.
# The held-out loss the int8 base costs on the CPU demo is in the README (bench.py --quality).

include("i_xl.py")

model_type = "lora"
lora_rank = 32
quantise_base = True
text_encoder_dtype = "int8"
gradient_checkpointing = "full"  # the least activation memory; +20-50% time
output_dir = "output/i_xl_lora_8gb"
