# Fine-tune IF stage II, large (IF-II-L-v1.0, 1.2B parameters, 64 -> 256 px), with a LoRA.
#
#   python train.py configs/ii_l.py --pretrained=/path/to/IF-II-L-v1.0
#
# Everything as in ii_m.py (read that file); only the model and the output folder change.

include("ii_m.py")

model_flavour = "ii-large-1.2b"
gradient_checkpointing = "attention"
output_dir = "output/ii_l"
