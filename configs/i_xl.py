# Fine-tune IF stage I, extra large (IF-I-XL-v1.0, 4.3B parameters, 64 px), with a LoRA.
#
#   python train.py configs/i_xl.py --pretrained=/path/to/IF-I-XL-v1.0
#   python train.py configs/i_xl.py --model_type=full    # every weight, pure bf16
#
# Everything as in i_m.py (read that file). The XL model's activations are large: checkpointing the
# attention layers (recomputed in backward) costs about 5% more time and saves most of their memory;
# "full" checkpointing saves the most, for a full fine-tune.

include("i_m.py")

model_flavour = "i-xlarge-4.3b"
gradient_checkpointing = "attention"
output_dir = "output/i_xl"
