"""Write docs/api.md from the public names' signatures and docstrings: ``python docs/make_api.py``.

``--check`` exits 1 when docs/api.md differs from what the signatures give (tests/test_readme.py runs it).
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import inspect
import sys
from pathlib import Path

import beta_diag

OUT = Path(__file__).resolve().parent / "api.md"
SECTIONS = {
    "The commands": ["rank", "compare", "plan", "apply", "repair", "train", "evaluate", "open_session"],
    "Their inputs": ["DataChoice", "ModelChoice", "RankConfig", "RepairConfig", "TrainConfig", "repair_training", "REPAIR_TRAINING"],
    "Their results": ["Ranking", "Comparison", "Plan", "RepairReport", "Verdict", "TrainResult", "Evaluation"],
    "Files": ["load_checkpoint", "save_checkpoint", "Checkpoint", "Metadata", "load_ranking", "save_ranking"],
    "The paper's quantities": ["critical_momentum", "damping_ratio", "regime"],
    "Errors (each names its fix)": [
        "BetaDiagError",
        "CheckpointError",
        "ModelError",
        "DataError",
        "OutputError",
        "ConfigError",
        "NoErrorsToDiagnose",
    ],
}


def _default(value: object) -> str:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return f"{type(value).__name__}(...)"  # a default config: its fields are listed under its own name
    if isinstance(value, enum.Enum):
        return f"{type(value).__name__}.{value.name}"
    return repr(value)


def signature(obj: object) -> str:
    """``(a, *, b: int = 1) -> X``: the annotations as written in the source, defaults shown briefly."""
    sig = inspect.signature(obj)  # type: ignore[arg-type]
    shown, star = [], False
    for p in sig.parameters.values():
        if p.kind is p.KEYWORD_ONLY and not star:
            shown.append("*")
            star = True
        text = {p.VAR_POSITIONAL: "*", p.VAR_KEYWORD: "**"}.get(p.kind, "") + p.name
        star = star or p.kind is p.VAR_POSITIONAL
        if p.annotation is not p.empty:
            text += f": {p.annotation if isinstance(p.annotation, str) else inspect.formatannotation(p.annotation)}"
        if p.default is not p.empty:
            text += f" = {_default(p.default)}" if p.annotation is not p.empty else f"={_default(p.default)}"
        shown.append(text)
    returns = "" if sig.return_annotation in (sig.empty, None, "None") or isinstance(obj, type) else f" -> {sig.return_annotation}"
    return f"({', '.join(shown)}){returns}"


def first_paragraph(obj: object) -> str:
    doc = inspect.getdoc(obj) or ""
    return " ".join(doc.split("\n\n")[0].split())


def entry(name: str) -> str:
    obj = getattr(beta_diag, name)
    if isinstance(obj, type) and issubclass(obj, Exception):
        return f"- `{name}`: {first_paragraph(obj)}"
    if callable(obj) and not (isinstance(obj, type) and not dataclasses.is_dataclass(obj)):
        kind = "class " if isinstance(obj, type) else ""
        return f"### `{kind}{name}{signature(obj)}`\n\n{first_paragraph(obj)}\n"
    return f"### `{name}`\n\n`{obj!r}`\n"


def render() -> str:
    listed = [n for names in SECTIONS.values() for n in names]
    missing = sorted(set(beta_diag.__all__) - set(listed) - {"__version__"})
    if missing or len(listed) != len(set(listed)):
        raise SystemExit(f"docs/make_api.py: list every export once in SECTIONS (missing: {missing})")
    parts = [
        "# The Python API\n",
        "Written by `python docs/make_api.py` from the signatures and docstrings of `beta_diag.__all__`; a test checks it",
        "is current. Every function takes its first argument by position and the rest by keyword.\n",
    ]
    for title, names in SECTIONS.items():
        parts.append(f"## {title}\n")
        parts += [entry(n) for n in names]
        parts.append("")
    return "\n".join(parts).rstrip() + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/api.md is stale")
    args = parser.parse_args()
    text = render()
    if args.check:
        if OUT.read_text() != text:
            print("docs/api.md is stale: run python docs/make_api.py", file=sys.stderr)
            raise SystemExit(1)
        return
    OUT.write_text(text)


if __name__ == "__main__":
    main()
