import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from beta_diag import checkpoint
from beta_diag.cli import app
from beta_diag.configs import DEFAULT_LR, OptimizerName, TrainConfig
from tests.conftest import sha, train_args, write_bundle

runner = CliRunner()


def run(*args: str) -> object:
    return runner.invoke(app, [str(a) for a in args])


def test_info_json_and_table(tiny: dict[str, Path]) -> None:
    result = run("info", tiny["ckpt"], "--json")
    assert result.exit_code == 0, result.stderr
    info = json.loads(result.stdout)
    assert [g["name"] for g in info["groups"]] == ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc"]
    assert sum(g["numel"] for g in info["groups"]) == info["parameters"]
    assert info["metadata"]["arch_kwargs"] == {"width": 4, "in_channels": 1}
    assert info["history_summary"]["epochs"] == 4
    table = run("info", tiny["ckpt"])
    assert table.exit_code == 0 and "layer4" in table.stdout and "history: 4 epochs" in table.stdout


def test_schedule_of_checkpoint_and_planned(tiny: dict[str, Path], tmp_path: Path) -> None:
    result = run("schedule", tiny["ckpt"], "--json")
    assert result.exit_code == 0, result.stderr
    runs = json.loads(result.stdout)["schedules"]
    assert len(runs) == 1 and runs[0]["epochs"][0]["epoch"] == 1
    plot = tmp_path / "s.png"
    planned = run("schedule", "--lr", "0.1", "--epochs", "20", "--steps-per-epoch", "5", "--json", "--plot", plot)
    assert planned.exit_code == 0, planned.stderr
    names = [r["name"] for r in json.loads(planned.stdout)["schedules"]]
    assert names == ["constant", "beta", "hybrid"]
    assert plot.read_bytes()[:4] == b"\x89PNG"


def test_train_writes_checkpoint_with_history(tiny: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "m.safetensors"
    result = run(
        *train_args(
            tiny, out, "--epochs", "2", "--batch-size", "64", "--momentum", "hybrid", "--optimizer", "adam", "--device", "cpu", "--json"
        )
    )
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["sha256"] == checkpoint.file_sha256(out)
    meta = checkpoint.load(out).metadata
    assert meta.training["momentum"] == "hybrid" and meta.training["optimizer"] == "adam" and meta.training["lr"] == 0.001
    assert [h["epoch"] for h in meta.history] == [1, 2]
    assert set(meta.history[0]) >= {"lr", "momentum", "mu_c", "zeta", "regime", "train_loss", "test_acc"}
    assert "seconds" not in meta.history[0]  # the file records no wall-clock: same command, same bytes


def test_train_is_deterministic(tiny: dict[str, Path], tmp_path: Path) -> None:
    """Same command twice: byte-identical --json and file (the path aside); --timings adds wall-clock."""
    outs, stdouts = [tmp_path / "a" / "m.safetensors", tmp_path / "b" / "m.safetensors"], []
    for out in outs:
        out.parent.mkdir()
        result = run(*train_args(tiny, out, "--device", "cpu", "--json"))
        assert result.exit_code == 0, result.stderr
        stdouts.append(result.stdout.replace(str(out), "OUT"))
    assert stdouts[0] == stdouts[1] and "seconds" not in stdouts[0]
    assert outs[0].read_bytes() == outs[1].read_bytes()
    timed = run(*train_args(tiny, tmp_path / "c.safetensors", "--device", "cpu", "--json", "--timings"))
    assert timed.exit_code == 0 and json.loads(timed.stdout)["seconds"] > 0


def bad_cases(tiny: dict[str, Path], tmp: Path) -> list[tuple[list, str]]:
    """(arguments, expected error text) for inputs a user can get wrong."""
    truncated = tmp / "truncated.safetensors"
    truncated.write_bytes(tiny["ckpt"].read_bytes()[:1000])
    not_ckpt = tmp / "notes.safetensors"
    not_ckpt.write_text("these are my notes, not a checkpoint")
    no_arch = tmp / "noarch.safetensors"
    save_file(checkpoint.load(tiny["ckpt"]).state_dict, str(no_arch))
    eleven = write_bundle(tmp / "eleven.safetensors", 24, classes=12)
    exists = tmp / "exists.safetensors"
    exists.write_bytes(b"keep me")
    no_test = ["train", "--data", tiny["train"], "--arch-arg", "width=2", "--epochs", "1"]
    train = no_test + ["--test-data", tiny["test"]]
    return [
        (["info", tmp / "missing.safetensors"], "missing.safetensors: no such file: check the path"),
        (["info", not_ckpt], "not a safetensors file, or truncated"),
        (["info", truncated], "header claims"),
        (["info", tiny["ckpt"], "--arch", "resnet19"], "unknown architecture 'resnet19'"),
        (["rank", no_arch], "metadata has no 'arch': pass --arch, e.g. --arch resnet18_cifar"),
        (["rank", tiny["ckpt"], "--data", eleven], "has label 11 but the model has 4 classes"),
        (["rank", tiny["ckpt"], "--data", "cifar10:/no/such/dir"], "folder /no/such/dir does not exist"),
        (["info", tiny["ckpt"], "--arch", "resnet20_cifar"], "weights do not match architecture"),
        (no_test + ["--data", tmp / "nowhere.safetensors", "--test-data", tiny["test"], "-o", tmp / "o1.safetensors"], "data bundle"),
        (no_test + ["-o", tmp / "o5.safetensors"], "is a bundle, which holds one split: pass --test-data"),
        (train + ["--test-data", eleven, "-o", tmp / "o2.safetensors"], "has label 11 but the model has 4 classes"),
        (train + ["-o", exists], "already exists: choose another output path or pass --force"),
        (train + ["--limit", "0", "-o", tmp / "o3.safetensors"], "--limit 0: pass a positive number of examples"),
        (train + ["--device", "cuda", "-o", tmp / "o4.safetensors"], "no CUDA device is available")
        if not torch.cuda.is_available()
        else (["info", tmp / "missing2.safetensors"], "no such file"),
    ]


def test_bad_input_one_line_error_exit_1_nothing_written(tiny: dict[str, Path], tmp_path: Path) -> None:
    cases = bad_cases(tiny, tmp_path)
    for args, message in cases:
        before = {p: sha(p) for p in tmp_path.iterdir()} | {tiny["ckpt"]: sha(tiny["ckpt"])}
        result = run(*args)
        assert result.exit_code == 1, (args, result.stdout, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], (args, result.stderr)
        assert "Traceback" not in result.stderr + result.stdout
        assert {p: sha(p) for p in tmp_path.iterdir()} | {tiny["ckpt"]: sha(tiny["ckpt"])} == before, args


def test_info_on_plain_state_dict_without_arch(tiny: dict[str, Path], tmp_path: Path) -> None:
    plain = tmp_path / "plain.safetensors"
    save_file(checkpoint.load(tiny["ckpt"]).state_dict, str(plain))
    info = json.loads(run("info", plain, "--json").stdout)
    assert info["metadata"]["arch"] is None and info["tensors"] > 0 and "groups" not in info
    with_arch = json.loads(
        run(
            "info",
            plain,
            "--arch",
            "resnet18_cifar",
            "--arch-arg",
            "width=4",
            "--arch-arg",
            "in_channels=1",
            "--arch-arg",
            "num_classes=4",
            "--json",
        ).stdout
    )
    assert len(with_arch["groups"]) == 7


def test_plain_state_dict_on_compare_and_repair_with_arch(tiny: dict[str, Path], tmp_path: Path) -> None:
    plain = tmp_path / "plain.safetensors"
    save_file(checkpoint.load(tiny["damaged"]).state_dict, str(plain))  # damaged: the repair has something to fix
    arch = ["--arch", "resnet18_cifar", "--arch-arg", "width=4", "--arch-arg", "in_channels=1", "--arch-arg", "num_classes=4"]
    data = ["--data", str(tiny["test"])]
    refused = run("compare", plain, plain, *data)
    assert refused.exit_code == 1 and "metadata has no 'arch': pass --arch" in refused.stderr
    compared = run("compare", plain, plain, *data, *arch, "--bootstrap", "5", "--json")
    assert compared.exit_code == 0, compared.stderr
    assert json.loads(compared.stdout)["verdict"].startswith("same ")
    out = tmp_path / "r.safetensors"
    repaired = run(
        "repair",
        plain,
        *arch,
        *data,
        "--train-data",
        str(tiny["train"]),
        "--layers",
        "fc",
        "--epochs",
        "2",
        "--lr",
        "0.02",
        "-o",
        out,
        "--json",
    )
    assert repaired.exit_code == 0, repaired.stderr
    assert json.loads(repaired.stdout)["plan"]["groups"] == ["fc"] and out.is_file()
    assert checkpoint.load(out).metadata.arch == "resnet18_cifar"  # the repaired file names what it was built as


ASSUMED = [
    "assumed 1x32x32 inputs (the metadata names no input shape): pass --input-size if the model expects another",
    (
        "assumed pixels scaled to [0, 1] then normalised with mean 0.5 and "
        "std 0.5 per channel (the metadata names none): pass --mean and --std"
    ),
]


def said(source: Path, notes: list[str]) -> list[str]:
    """The stderr lines of ``notes``: the assumptions as a warning block first, then the other notes."""
    assumed = [n for n in notes if n.startswith("assumed")]
    head = [f"Warning: {source}: not read from the checkpoint, assumed (results depend on it):"] if assumed else []
    return head + [f"  - {n}" for n in assumed] + [f"Note: {source}: {n}" for n in notes if n not in assumed]


def test_training_script_layouts_load_and_say_what_was_converted(tiny: dict[str, Path], tmp_path: Path) -> None:
    weights = checkpoint.load(tiny["ckpt"]).state_dict
    wrapped = tmp_path / "ddp_compiled.pt"
    torch.save({"epoch": 3, "net": {f"module._orig_mod.{k}": v for k, v in weights.items()}}, wrapped)
    arch = ["--arch", "resnet18_cifar", "--arch-arg", "width=4", "--arch-arg", "in_channels=1", "--arch-arg", "num_classes=4"]
    info = run("info", wrapped, *arch, "--json")
    assert info.exit_code == 0, info.stderr
    notes = [
        "read the weights under the key 'net'",
        "stripped the 'module.' prefix from every key (DataParallel/DDP)",
        "stripped the '_orig_mod.' prefix from every key (torch.compile)",
        *ASSUMED,
    ]
    assert json.loads(info.stdout)["notes"] == notes and len(json.loads(info.stdout)["groups"]) == 7
    assert info.stderr.splitlines() == said(wrapped, notes)  # each said once, the assumptions first
    custom = tmp_path / "custom.pt"
    torch.save({"ema_weights": weights, "step": 7}, custom)
    refused = run("info", custom, *arch)
    assert refused.exit_code == 1 and refused.stderr.strip().endswith(
        "(its dicts: ema_weights): pass --state-key with the one holding the weights"
    )
    wrong_key = run("info", custom, *arch, "--state-key", "weights")
    assert wrong_key.exit_code == 1 and wrong_key.stderr.strip().endswith(
        "(its keys: ema_weights, step): pass --state-key with one of them"
    )
    named = run("info", custom, *arch, "--state-key", "ema_weights", "--json")
    assert named.exit_code == 0 and json.loads(named.stdout)["notes"][0] == "read the weights under the key 'ema_weights' (--state-key)"
    plain = tmp_path / "plain.safetensors"
    save_file(weights, str(plain))
    assert "--state-key is for .pt/.pth files" in run("info", plain, "--state-key", "x").stderr
    compared = run("compare", wrapped, plain, "--data", str(tiny["test"]), *arch, "--bootstrap", "5", "--json")
    assert compared.exit_code == 0, compared.stderr
    assert json.loads(compared.stdout)["pairs"][0]["spearman"] == 1.0  # the same weights, however they were saved
    assert compared.stderr.count("Note: ") == len(notes) - len(ASSUMED) + 2  # the conversions, and for each checkpoint:
    assert compared.stderr.count("\n  - assumed ") == 2 * len(ASSUMED)  # both files' assumptions, as warnings
    assert compared.stderr.count(": 8x8 images are resized to the model's 32x32 (bilinear)\n") == 2
    assert json.loads(compared.stdout)["inputs"][1]["notes"] == [*ASSUMED, "8x8 images are resized to the model's 32x32 (bilinear)"]


def test_what_the_weights_say_is_inferred_and_said(tiny: dict[str, Path], tmp_path: Path) -> None:
    plain = tmp_path / "plain.safetensors"
    save_file(checkpoint.load(tiny["ckpt"]).state_dict, str(plain))
    info = run("info", plain, "--arch", "resnet18_cifar", "--arch-arg", "width=4", "--json")
    assert info.exit_code == 0, info.stderr
    notes = [
        "inferred num_classes=4 from the weights (fc.weight); --arch-arg num_classes=N overrides it",
        "inferred in_channels=1 from the weights (conv1.weight); --arch-arg in_channels=N overrides it",
        *ASSUMED,
    ]
    d = json.loads(info.stdout)
    assert d["notes"] == notes and d["metadata"]["arch_kwargs"] == {"width": 4, "num_classes": 4, "in_channels": 1}
    assert info.stderr.splitlines() == said(plain, notes)
    torchvision = pytest.importorskip("torchvision")
    r18 = tmp_path / "r18.safetensors"
    save_file(torchvision.models.resnet18(num_classes=7).state_dict(), str(r18))
    info = run("info", r18, "--arch", "resnet18", "--json")
    assert info.exit_code == 0, info.stderr
    rgb = [n.replace("1x32x32", "3x32x32") for n in ASSUMED]
    assert json.loads(info.stdout)["notes"] == [
        "inferred num_classes=7 from the weights (fc.weight); --arch-arg num_classes=N overrides it",
        *rgb,
    ]
    given = run(
        "info",
        r18,
        "--arch",
        "resnet18",
        "--arch-arg",
        "num_classes=7",
        "--input-size",
        "64",
        "--mean",
        "0.4",
        "--std",
        "0.2,0.3,0.25",
        "--json",
    )
    assert given.exit_code == 0, given.stderr
    assert json.loads(given.stdout)["notes"] == [] and given.stderr == ""  # named: nothing inferred or assumed, nothing said
    meta = json.loads(given.stdout)["metadata"]
    assert (meta["input_shape"], meta["mean"], meta["std"]) == ([3, 64, 64], [0.4, 0.4, 0.4], [0.2, 0.3, 0.25])
    for bad, fix in (
        (["--std", "0,1,1"], "all positive"),
        (["--mean", "0.1,0.2"], "pass one finite number or 3"),
        (["--input-size", "0"], "pass sides from 1 to 4096"),
        (["--input-size", "a"], "pass numbers separated by commas"),
    ):
        refused = run("info", r18, "--arch", "resnet18", *bad)
        assert refused.exit_code == 1 and len(refused.stderr.splitlines()) == 1 and fix in refused.stderr, refused.stderr


def test_usage_error_exits_2(tiny: dict[str, Path]) -> None:
    assert run("info").exit_code == 2
    assert run("train", "--optimizer", "lbfgs", "-o", "x.safetensors").exit_code == 2


def test_verbose_shows_traceback(tmp_path: Path) -> None:
    result = run("info", tmp_path / "missing.safetensors", "--verbose")
    assert result.exit_code == 1 and "Traceback" in result.stderr


def test_archs_lists_names() -> None:
    names = json.loads(run("archs", "--json").stdout)
    assert names[:2] == ["resnet18_cifar", "resnet20_cifar"] and "resnet18" in names


def test_python_dash_m() -> None:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "beta_diag", "--help"], capture_output=True, text=True, check=True)
    assert "Usage: python -m beta_diag [OPTIONS] COMMAND [ARGS]..." in out.stdout


def test_cli_defaults_are_the_librarys(tiny: dict[str, Path], tmp_path: Path) -> None:
    """One policy: what each command runs with when no option is given is what the library runs with, read from what
    the command recorded (not from its declarations), and the documented values hold."""
    from beta_diag import schedules
    from beta_diag.configs import RankConfig, RepairConfig

    out = tmp_path / "m.safetensors"
    assert run(*train_args(tiny, out, "--device", "cpu")).exit_code == 0
    recorded = checkpoint.load(out).metadata.training
    expected = TrainConfig(epochs=1, device="cpu").to_dict()
    assert {k: recorded[k] for k in expected} == expected
    documented = (TrainConfig().epochs, TrainConfig().lr, TrainConfig(optimizer=OptimizerName.adam).lr, TrainConfig().batch_size)
    assert documented == (5, 0.05, DEFAULT_LR[OptimizerName.adam], 128) and DEFAULT_LR[OptimizerName.adam] == 0.001

    planned = run("repair", tiny["damaged"], "--layers", "fc", "--dry-run", "--json")
    assert planned.exit_code == 0, planned.stderr
    config = json.loads(planned.stdout)["config"]
    assert {k: config[k] for k in RepairConfig().to_dict()} == RepairConfig().to_dict()
    assert (config["epochs"], config["lr"], config["accept_p"], config["auto_layers"]) == (3, 0.003, 0.05, "search")

    ranked = run("rank", tiny["ckpt"], "--json")
    assert ranked.exit_code == 0, ranked.stderr
    assert json.loads(ranked.stdout)["config"] == RankConfig().to_dict()
    assert (RankConfig().bootstrap, RankConfig().control) == (200, 1000)

    shown = run("schedule", "--json")
    assert shown.exit_code == 0 and json.loads(shown.stdout)["schedules"] == json.loads(json.dumps(schedules.planned_runs()))
