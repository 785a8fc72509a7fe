"""Every torchvision classification family, at full size, from a user's plain state dict: do rank,
compare, repair and info run?

    python benchmarks/families.py [NAME ...]

For each model: build it with 10 classes (seed 0, and seed 1 for compare's second input), save
`torch.save(model.state_dict())`, and run the four commands with `--arch NAME` alone (the class
count is inferred from the weights, the input size assumed or taken from the model) on 40 synthetic
3x32x32 images. Prints each command's exit code, or its error line. An untrained model may gain
nothing in repair: exit 3 ("the original is kept") is a clean end.
"""

from __future__ import annotations

import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from beta_diag import models
from beta_diag.cli import app
from tests.conftest import write_bundle

NAMES = [
    "resnet18",
    "resnext50_32x4d",
    "wide_resnet50_2",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "efficientnet_b0",
    "efficientnet_v2_s",
    "regnet_x_400mf",
    "regnet_y_400mf",
    "densenet121",
    "shufflenet_v2_x0_5",
    "squeezenet1_1",
    "mnasnet0_5",
    "convnext_tiny",
    "vit_b_16",
    "swin_t",
    "swin_v2_t",
    "maxvit_t",
    "alexnet",
]


def main() -> None:
    warnings.filterwarnings("ignore")
    names = sys.argv[1:] or NAMES
    print("command: python benchmarks/families.py" + ("" if names == NAMES else " " + " ".join(names)), flush=True)
    runner = CliRunner()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        train = write_bundle(root / "train.safetensors", 40, classes=10, channels=3, size=32, seed=1)
        test = write_bundle(root / "test.safetensors", 40, classes=10, channels=3, size=32, seed=2)
        for name in names:
            start = time.perf_counter()
            paths = []
            for seed in (0, 1):
                torch.manual_seed(seed)
                paths.append(root / f"{name}_{seed}.pt")
                torch.save(models.build(name, {"num_classes": 10}).state_dict(), paths[-1])
            a, b = map(str, paths)
            out = {}
            for cmd in (
                ["rank", a, "--arch", name, "--data", str(test), "--bootstrap", "20"],
                ["compare", a, b, "--arch", name, "--data", str(test), "--bootstrap", "20"],
                [
                    "repair",
                    a,
                    "--arch",
                    name,
                    "--data",
                    str(test),
                    "--train-data",
                    str(train),
                    "--epochs",
                    "1",
                    "-o",
                    str(root / f"{name}_r.safetensors"),
                    "--force",
                ],
                ["info", a, "--arch", name],
            ):
                r = runner.invoke(app, cmd)
                out[cmd[0]] = r.exit_code if r.exit_code in (0, 3) else (r.exit_code, r.stderr.strip()[-240:])
            print(f"{name:20s} {time.perf_counter() - start:5.0f} s  {out}", flush=True)


if __name__ == "__main__":
    main()
