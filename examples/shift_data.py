"""Write a shifted copy of a data bundle, as deployment data might drift (README, "What it tells you").

    python examples/shift_data.py --contrast 0.5 -o low_contrast.safetensors

Reads the bundled 3,000 Fashion-MNIST test images, scales every image's contrast about its own mean by
--contrast (0.5: half) and rotates it by --rotate degrees, and saves a bundle with the same labels and class names.
"""

import argparse
import json
from pathlib import Path

import torch
import torchvision.transforms.functional as TF
from safetensors import safe_open
from safetensors.torch import save_file

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--contrast", type=float, default=1.0)
parser.add_argument("--rotate", type=float, default=0.0)
parser.add_argument("-o", "--output", type=Path, required=True)
args = parser.parse_args()
source = "sample_checkpoints/fmnist_test_3k.safetensors"
with safe_open(source, framework="pt") as f:
    images, labels, meta = f.get_tensor("images"), f.get_tensor("labels"), f.metadata()
x = images.float()
x = x.mean((1, 2, 3), keepdim=True) + args.contrast * (x - x.mean((1, 2, 3), keepdim=True))
x = TF.rotate(x, args.rotate) if args.rotate else x
meta = {
    "class_names": meta["class_names"],
    "source": f"{source}, contrast x{args.contrast}, rotated {args.rotate} degrees",
    "split": "test",
}
save_file({"images": x.round().clamp(0, 255).to(torch.uint8), "labels": labels}, str(args.output), metadata=meta)
print(f"wrote {args.output}: {len(labels)} images; {json.loads(meta['class_names'])[:2]}...")
