"""Bad input across every command: exit 1 (2 for usage), one `Error:` line naming the fix,
no traceback, nothing written, every input file unchanged."""

from __future__ import annotations

import dataclasses
import json
import pickle
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from typer.testing import CliRunner

from beta_diag import checkpoint, data
from beta_diag.cli import app
from tests.conftest import sha, write_bundle

runner = CliRunner()
Case = Callable[[dict[str, Path], Path], tuple[list, str]]


def copy_ckpt(t: dict[str, Path], tmp: Path, name: str, edit: Callable[[dict], dict] | None = None, meta: dict | None = None) -> Path:
    ck = checkpoint.load(t["ckpt"])
    out = tmp / name
    state = edit(dict(ck.state_dict)) if edit else ck.state_dict
    save_file(state, str(out), metadata=meta if meta is not None else ck.metadata.to_strings())
    return out


def raw(tmp: Path, name: str, content: bytes) -> Path:
    (tmp / name).write_bytes(content)
    return tmp / name


class Evil:
    def __reduce__(self) -> tuple:
        return (Path.touch, (Path("/tmp/beta-diag-battery-pwned"),))


def evil_pt(t: dict[str, Path], tmp: Path) -> Path:
    with open(tmp / "evil.pt", "wb") as f:
        pickle.dump({"w": Evil()}, f)
    return tmp / "evil.pt"


def corrupt_imagefolder(t: dict[str, Path], tmp: Path) -> Path:
    for cls in ("a", "b"):
        (tmp / "imgs" / cls).mkdir(parents=True)
        Image.new("L", (8, 8)).save(tmp / "imgs" / cls / "ok.png")
    (tmp / "imgs" / "b" / "bad.png").write_bytes(b"\x89PNG not really")
    return tmp / "imgs"


def stale_ranking(t: dict[str, Path], tmp: Path) -> Path:
    ck = copy_ckpt(t, tmp, "soon_changed.safetensors")
    out = tmp / "stale.json"
    assert runner.invoke(app, ["rank", str(ck), "--out", str(out), "--bootstrap", "5"]).exit_code == 0
    copy_ckpt(t, tmp, "soon_changed.safetensors", edit=lambda s: {k: v * 2 if v.is_floating_point() else v for k, v in s.items()})
    return out


def resnet20(t: dict[str, Path], tmp: Path) -> Path:
    from dataclasses import replace

    from beta_diag import models

    meta = replace(checkpoint.load(t["ckpt"]).metadata, arch="resnet20_cifar")
    model = models.build("resnet20_cifar", {"width": 4, "in_channels": 1, "num_classes": 4})
    checkpoint.save(tmp / "r20.safetensors", model.state_dict(), meta)
    return tmp / "r20.safetensors"


def empty_bundle(t: dict[str, Path], tmp: Path) -> Path:
    save_file(
        {"images": torch.zeros(0, 1, 8, 8, dtype=torch.uint8), "labels": torch.zeros(0, dtype=torch.long)}, str(tmp / "empty.safetensors")
    )
    return tmp / "empty.safetensors"


def one_class(t: dict[str, Path], tmp: Path) -> Path:
    ds = data.load(str(t["test"]))
    data.save_bundle(tmp / "one.safetensors", ds.subset(torch.nonzero(ds.labels == 2).flatten()))
    return tmp / "one.safetensors"


CASES: dict[str, tuple[Case, int]] = {
    "missing file": (lambda t, d: (["info", d / "nope.safetensors"], "no such file: check the path"), 1),
    "empty file": (lambda t, d: (["rank", raw(d, "empty.safetensors", b"")], "file is empty or truncated (0 bytes)"), 1),
    "truncated safetensors": (
        lambda t, d: (["rank", raw(d, "cut.safetensors", t["ckpt"].read_bytes()[:5000])], "re-save or re-download it"),
        1,
    ),
    "text file named .safetensors": (
        lambda t, d: (["compare", raw(d, "notes.safetensors", b"hello world, not weights"), t["ckpt"]], "not a safetensors file"),
        1,
    ),
    "huge header": (
        lambda t, d: (["info", raw(d, "huge.safetensors", struct.pack("<Q", 1 << 40) + b"{}")], "header claims 1099511627776 bytes"),
        1,
    ),
    "malformed header": (
        lambda t, d: (["info", raw(d, "bad.safetensors", struct.pack("<Q", 9) + b"{not json")], "not a readable safetensors file"),
        1,
    ),
    "metadata of the wrong type": (
        lambda t, d: (
            ["info", copy_ckpt(t, d, "m.safetensors", meta={"num_classes": '"ten"'})],
            "metadata 'num_classes' must be a positive integer",
        ),
        1,
    ),
    "unknown architecture in metadata": (
        lambda t, d: (["rank", copy_ckpt(t, d, "m.safetensors", meta={"arch": "resnet19"})], "unknown architecture 'resnet19'"),
        1,
    ),
    "code named in metadata": (
        lambda t, d: (["rank", copy_ckpt(t, d, "m.safetensors", meta={"arch": "os:system"})], "never runs code a file names"),
        1,
    ),
    "pickle holding code": (lambda t, d: (["info", evil_pt(t, d)], "refused: the file holds Python objects beyond plain tensors"), 1),
    ".pt without tensors": (
        lambda t, d: (["info", (torch.save({"a": 1}, d / "x.pt"), d / "x.pt")[1]], "does not hold a state dict of tensors"),
        1,
    ),
    "folder without model.safetensors": (lambda t, d: (["info", d], "folder has no model.safetensors"), 1),
    "key mismatch": (lambda t, d: (["rank", t["ckpt"], "--arch", "resnet20_cifar"], "weights do not match architecture"), 1),
    "shape mismatch": (lambda t, d: (["rank", t["ckpt"], "--arch-arg", "width=8"], "weight shape(s) differ"), 1),
    "malformed --arch-arg": (lambda t, d: (["rank", t["ckpt"], "--arch-arg", "width"], "is not KEY=VALUE"), 1),
    "NaN weights": (
        lambda t, d: (
            ["rank", copy_ckpt(t, d, "nan.safetensors", edit=lambda s: {**s, "fc.bias": torch.full_like(s["fc.bias"], float("nan"))})],
            "NaN/Inf values (fc: 4)",
        ),
        1,
    ),
    "labels beyond the classes": (
        lambda t, d: (
            ["rank", t["ckpt"], "--data", write_bundle(d / "b.safetensors", 24, classes=12)],
            "has label 11 but the model has 4 classes",
        ),
        1,
    ),
    "empty data": (lambda t, d: (["rank", t["ckpt"], "--data", empty_bundle(t, d)], "holds no examples"), 1),
    "one-class data": (lambda t, d: (["rank", t["ckpt"], "--data", one_class(t, d)], "holds only 1 class(es)"), 1),
    "corrupt image in an ImageFolder": (
        lambda t, d: (["rank", t["ckpt"], "--data", f"imagefolder:{corrupt_imagefolder(t, d)}"], "cannot decode image"),
        1,
    ),
    "unknown data spec": (lambda t, d: (["rank", t["ckpt"], "--data", "mnist++"], "unknown data spec 'mnist++'"), 1),
    "missing CIFAR folder": (lambda t, d: (["rank", t["ckpt"], "--data", f"cifar10:{d}"], "missing test_batch, batches.meta"), 1),
    "unknown split": (lambda t, d: (["rank", t["ckpt"], "--split", "validation"], "unknown split 'validation': use train or test"), 1),
    "--limit 0": (lambda t, d: (["rank", t["ckpt"], "--limit", "0"], "--limit 0: pass a positive number of examples"), 1),
    "--top-k beyond the groups": (lambda t, d: (["rank", t["ckpt"], "--top-k", "99"], "--top-k 99: there are 7 groups"), 1),
    "--groups matching nothing": (lambda t, d: (["rank", t["ckpt"], "--groups", "head*"], "--groups head* matches no group"), 1),
    "output folder missing": (lambda t, d: (["rank", t["ckpt"], "--out", d / "no" / "r.json"], "folder does not exist"), 1),
    "output equal to input": (
        lambda t, d: (["repair", t["ckpt"], "--layers", "fc", "-o", t["ckpt"]], "output would overwrite an input"),
        1,
    ),
    "output exists": (
        lambda t, d: (["repair", t["ckpt"], "--layers", "fc", "-o", raw(d, "keep.safetensors", b"mine")], "already exists"),
        1,
    ),
    "--layers naming nothing valid": (
        lambda t, d: (["repair", t["ckpt"], "--layers", "head,neck", "-o", d / "r.safetensors"], "unknown name(s) head, neck"),
        1,
    ),
    "stale ranking": (lambda t, d: (["compare", t["ckpt"], stale_ranking(t, d)], "is stale"), 1),
    "ranking of another checkpoint": (
        lambda t, d: (["repair", t["ckpt"], "--ranking", stale_ranking(t, d), "-o", d / "r.safetensors"], "ranks another checkpoint"),
        1,
    ),
    "not a ranking file": (
        lambda t, d: (["compare", t["ckpt"], raw(d, "r.json", b'{"hello": 1}')], "not a ranking saved by beta-diag rank --out"),
        1,
    ),
    "compare across architectures": (lambda t, d: (["compare", t["ckpt"], resnet20(t, d)], "has other layer groups than"), 1),
    "schedule without history": (
        lambda t, d: (["schedule", copy_ckpt(t, d, "nohist.safetensors", meta={"arch": "resnet18_cifar"})], "no training history"),
        1,
    ),
    "--device cuda without CUDA": (lambda t, d: (["rank", t["ckpt"], "--device", "cuda"], "no CUDA device is available"), 1),
    "missing argument": (lambda t, d: (["rank"], ""), 2),
    "unknown metric": (lambda t, d: (["rank", t["ckpt"], "--metric", "vibes"], ""), 2),
    "negative epochs": (lambda t, d: (["repair", t["ckpt"], "--epochs", "0"], ""), 2),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name: str, tiny: dict[str, Path], tmp_path: Path) -> None:
    if name == "--device cuda without CUDA" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    make, code = CASES[name]
    args, message = make(tiny, tmp_path)
    inputs = [tiny["ckpt"], tiny["train"], tiny["test"], *[p for p in tmp_path.rglob("*") if p.is_file()]]
    before = {p: sha(p) for p in inputs}
    listing = sorted(tmp_path.rglob("*"))
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == code, (result.stdout, result.stderr)
    assert "Traceback" not in result.stdout + result.stderr
    if code == 1:
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], result.stderr
        assert ":" in lines[0][7:], "the message names the fix after a colon"
    assert {p: sha(p) for p in inputs} == before
    assert sorted(tmp_path.rglob("*")) == listing  # nothing written, no temporary left
    assert not Path("/tmp/beta-diag-battery-pwned").exists()


def test_half_precision_weights_load_and_rank(tiny: dict[str, Path], tmp_path: Path) -> None:
    for dtype in (torch.float16, torch.bfloat16):
        half = copy_ckpt(
            tiny, tmp_path, f"{dtype}.safetensors", edit=lambda s: {k: v.to(dtype) if v.is_floating_point() else v for k, v in s.items()}
        )
        assert runner.invoke(app, ["rank", str(half), "--bootstrap", "5"]).exit_code == 0


def test_colour_data_for_a_grey_model_is_converted(tiny: dict[str, Path], tmp_path: Path) -> None:
    """RGB images for a grey model: converted as PIL's convert("L") converts them (ITU-R 601 luma), and said."""
    from beta_diag.configs import DataChoice
    from beta_diag.session import open_session

    rgb = write_bundle(tmp_path / "rgb.safetensors", 64, channels=3, seed=5, label_noise=0.2)
    result = runner.invoke(app, ["rank", str(tiny["ckpt"]), "--data", str(rgb), "--bootstrap", "5", "--json"])
    assert result.exit_code == 0, result.stderr
    ranked = json.loads(result.stdout)
    assert ranked["examples"] == 64 and any("3-channel images are converted to grey (ITU-R 601 luma)" in n for n in ranked["notes"])
    session = open_session(tiny["ckpt"], device="cpu")
    colour = session.load_data(DataChoice(str(rgb)))
    by_pil_images = [np.array(Image.fromarray(im.permute(1, 2, 0).numpy()).convert("L")) for im in colour.images]
    grey = torch.stack([torch.from_numpy(im)[None] for im in by_pil_images])
    by_pil = session.evaluate(dataclasses.replace(colour, images=grey)).logits
    ours = session.evaluate(colour).logits
    first_channel = session.evaluate(dataclasses.replace(colour, images=colour.images[:, :1])).logits
    assert (ours - by_pil).abs().max() < 0.05 < (first_channel - by_pil).abs().max()  # 8-bit rounding apart; not one channel
