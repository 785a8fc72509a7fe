"""Train examples/my_model.py's SmallNet with plain PyTorch and save a plain state dict (README, "Your own model").

    python examples/train_plain.py --seed 0 -o my_model.pt

Trains one epoch of SGD on the bundled 5,000 Fashion-MNIST training images, inputs scaled to [0, 1]
and normalised with mean 0.2856 and std 0.3529 (pass the same to beta-diag with --mean/--std).
"""

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from my_model import SmallNet

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("-o", "--output", type=Path, required=True)
args = parser.parse_args()
torch.manual_seed(args.seed)
bundle = load_file("sample_checkpoints/fmnist_train_5k.safetensors")
x = (bundle["images"].float() / 255 - 0.2856) / 0.3529  # (N, 1, 28, 28)
y = bundle["labels"]
model = SmallNet()
opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
for idx in torch.randperm(len(y)).split(64):
    opt.zero_grad()
    F.cross_entropy(model(x[idx]), y[idx]).backward()
    opt.step()
torch.save(model.state_dict(), args.output)
print(f"wrote {args.output}")
