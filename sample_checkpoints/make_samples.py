"""Reproduce the bundled sample checkpoints and data bundles (needs Debian's dataset-fashion-mnist).

    python sample_checkpoints/make_samples.py [--force]

Trains ResNet-18-CIFAR (width 16, 701k parameters) on 30,000 Fashion-MNIST training images
(seeded subset) with beta-scheduled momentum, once with SGD and once with Adam, same seed and
data, and tests each epoch on the full 10,000-image test set; and a third sample without BatchNorm, a small
ConvNeXt-style network (``convnext_cifar``, width 24, 237k parameters, GroupNorm/LayerNorm only) with Adam,
which carries the fingerprint `train` records (activation statistics for drift). Writes beside this file:
- fmnist_resnet18w16_sgd_beta.safetensors, fmnist_resnet18w16_adam_beta.safetensors,
  fmnist_convnext24_adam_beta.safetensors
- fmnist_test_3k.safetensors: 3,000 test images (seeded), the default data of `rank`
- fmnist_train_5k.safetensors: 5,000 training images the samples never saw, for `repair`
The checkpoints record the two bundles as their default data, so they run with no --data.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

from beta_diag import checkpoint, data
from beta_diag.configs import DataChoice
from beta_diag.training import OptimizerName, TrainConfig, train

HERE = Path(__file__).resolve().parent
TRAIN_LIMIT, SEED = 30_000, 0
RESNET = ("resnet18_cifar", {"width": 16})
RUNS = {  # file: (architecture, its arguments, training, keep the fingerprint)
    "fmnist_resnet18w16_sgd_beta.safetensors": (
        *RESNET,
        TrainConfig(epochs=6, lr=0.05, optimizer=OptimizerName.sgd, weight_decay=5e-4),
        False,
    ),
    "fmnist_resnet18w16_adam_beta.safetensors": (
        *RESNET,
        TrainConfig(epochs=6, lr=0.002, optimizer=OptimizerName.adam, weight_decay=0.0),
        False,
    ),
    "fmnist_convnext24_adam_beta.safetensors": (
        "convnext_cifar",
        {"width": 24},
        TrainConfig(epochs=6, lr=0.002, optimizer=OptimizerName.adam, weight_decay=0.0),
        True,
    ),
}
BUNDLES = {"train": "fmnist_train_5k.safetensors", "test": "fmnist_test_3k.safetensors"}


def make_bundles(force: bool) -> None:
    full_train = data.load("fashion-mnist", "train")
    unseen = data.subset_index(len(full_train), 5_000, SEED, skip=TRAIN_LIMIT)  # after the 30k trained on
    test = data.load("fashion-mnist", "test")
    for split, ds in (("train", full_train.subset(unseen)), ("test", test.subset(data.subset_index(len(test), 3_000, SEED)))):
        out = HERE / BUNDLES[split]
        if force or not out.exists():
            data.save_bundle(out, replace(ds, split=split))
            print(f"wrote {out.name}: {len(ds)} images", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="overwrite existing files")
    parser.add_argument("--only", choices=sorted(RUNS), help="train one checkpoint only")
    args = parser.parse_args()
    make_bundles(args.force)
    for name, (arch, kwargs, config, keep_fingerprint) in RUNS.items():
        if args.only and name != args.only:
            continue
        start = time.perf_counter()
        result = train(arch, data=DataChoice("fashion-mnist", limit=TRAIN_LIMIT, seed=config.seed), arch_kwargs=kwargs, config=config)
        defaults = {split: {"spec": file, "split": split} for split, file in BUNDLES.items()}
        meta = replace(result.metadata, data=defaults)
        fingerprint = result.fingerprint if keep_fingerprint else None  # the ResNets predate fingerprints: kept as they were
        checkpoint.save(HERE / name, result.model.state_dict(), meta, force=args.force, fingerprint=fingerprint)
        last = meta.history[-1]
        print(f"wrote {name}: test accuracy {last['test_acc']:.4f} in {time.perf_counter() - start:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
