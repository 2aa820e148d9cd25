# A full fine-tune of IF-I-XL (4.3B parameters, every weight trained) on one 24 GB card (RTX 3090/4090, A5000, L4).
#
#   python train.py configs/i_xl_full_24gb.py --pretrained=/path/to/IF-I-XL-v1.0
#   python train.py configs/i_xl_full_24gb.py --dry_run      # the predicted peak, and which GPUs it fits
#
# Plain pure-bf16 AdamW holds four copies of the model: weights, gradients and two moments, 4 x 8 GiB, plus
# activations: a 34 GiB peak (dry run, batch 4 at 64 px). Two options, both in optim.py, bring it to ~18.4 GiB:
# - fused_backward: each weight takes its AdamW step the moment its gradient is complete, and the gradient is
#   freed at once, so no 8 GiB gradient buffer ever exists. It cannot accumulate gradients (accumulation 1), and
#   it clips by the previous step's global gradient norm (this step's is known only after every weight stepped).
# - optimizer_state="8bit": the two moments in 8-bit blocks of 256 (Dettmers et al. 2022), 8 GiB less again.
#   (factored_second_moment=True, Adafactor's row/column second moment, fits as well: about the same peak.)
# The held-out loss these cost on the CPU demo against plain AdamW is in the README (bench.py --quality).

include("i_xl.py")

model_type = "full"
fused_backward = True
gradient_accumulation_steps = 1
optimizer_state = "8bit"
learning_rate = 1e-5  # every weight moves: a quarter of the LoRA configs' rate
lr_end = 1e-6
gradient_checkpointing = "attention"
output_dir = "output/i_xl_full"
