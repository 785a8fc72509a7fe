"""Training throughput of the sample model (ResNet-18-CIFAR width 16, 1x28x28), with inference as the baseline.

    python benchmarks/train_throughput.py [--quick]

One epoch of beta_diag.training.fit (SGD, beta momentum, batch 128) on the bundled 5,000 training
images (--quick: 1,000), then an eval-mode inference pass over the same images, in one run.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from beta_diag import data, models
from beta_diag.configs import TrainConfig
from beta_diag.runtime import evaluate, resolve_device
from beta_diag.training import fit, seeded

SAMPLES = Path(__file__).resolve().parents[1] / "sample_checkpoints"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    print("command: python benchmarks/train_throughput.py" + (" --quick" if args.quick else ""))
    ds = data.load(str(SAMPLES / "fmnist_train_5k.safetensors"), "train", limit=1000 if args.quick else None)
    pre = data.Preprocess((1, 28, 28), *data.channel_stats(ds.images))
    with seeded(0):
        model = models.build("resnet18_cifar", {"width": 16, "in_channels": 1, "num_classes": 10})
    start = time.perf_counter()
    fit(model, ds, None, pre, TrainConfig(epochs=1, device="cpu"))
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    evaluate(model, ds, pre, resolve_device("cpu"))
    eval_s = time.perf_counter() - start
    print(
        f"train: {len(ds) / train_s:.0f} images/s ({train_s:.1f} s); inference: {len(ds) / eval_s:.0f} images/s; "
        f"training costs {train_s / eval_s:.2f}x inference"
    )


if __name__ == "__main__":
    main()
