# Fine-tune IF stage I, large (IF-I-L-v1.0, 900M parameters, 64 px), with a LoRA.
#
#   python train.py configs/i_l.py --pretrained=/path/to/IF-I-L-v1.0
#
# Everything as in i_m.py (read that file); only the model and the output folder change.

include("i_m.py")

model_flavour = "i-large-900m"
output_dir = "output/i_l"
