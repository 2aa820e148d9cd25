#!/usr/bin/env bash
# The README's sampling pictures, from the demo's models: run the README's Quick start first
# (python train.py configs/demo.py; python train.py configs/demo_ii.py), then this from the repository root.
set -euo pipefail
out=docs/examples
tmp=$(mktemp -d)
python - "$tmp" <<'PY'
import random
import sys
from pathlib import Path
from PIL import Image, ImageDraw
import shapes  # the demo's own drawing

tmp = Path(sys.argv[1])
picture = shapes.draw_one("red", "circle", "white", (32, 32), random.Random(1), scale=(0.6, 0.6))
picture.save(tmp / "picture.png")
mask = Image.new("L", (32, 32), 0)
ImageDraw.Draw(mask).rectangle([0, 0, 31, 15], fill=255)  # repaint the top half
mask.save(tmp / "mask.png")
PY
run() { name=$1; shift; python sample.py configs/demo.py --pretrained=output/demo --output_dir="$tmp/$name" --seed=1 "$@"; cp "$tmp/$name/samples/grid.png" "$out/$name.png"; }
run img2img --image="$tmp/picture.png" --prompt="a blue circle on a black background" --strength=0.7 --num_images=2
run inpainting --image="$tmp/picture.png" --mask="$tmp/mask.png" --prompt="a red circle on a white background" --num_images=2 --steps=25
run upscale --stage2=output/demo_ii --upscale_only --image="$tmp/picture.png" --prompt="a red circle on a white background"
run cascade --stage2=output/demo_ii --prompt="a yellow triangle on a black background" --num_images=2
rm -rf "$tmp"
