"""The eval command: accuracy, loss, per-class accuracy and top confusions of checkpoints on data sets, one pass each."""

from __future__ import annotations

from beta_diag import options as opt
from beta_diag.cli_app import app, handle_errors, say_notes
from beta_diag.configs import DataChoice, ModelChoice
from beta_diag.options import read_class_map


@app.command("eval")
@handle_errors
@opt.takes_model
def evaluate(
    ckpts: opt.Ckpts,
    data: opt.EvalData = None,
    split: opt.Split = None,
    limit: opt.Limit = None,
    class_map: opt.ClassMap = None,
    seed: opt.Seed = 0,
    model: ModelChoice = ModelChoice(),
    device: opt.Device = "auto",
    as_json: opt.Json = False,
    quiet: opt.Quiet = False,
    verbose: opt.Verbose = False,
) -> None:
    """Accuracy, mean loss, per-class accuracy (with the class names) and the top confusions of each checkpoint on
    each data set, in one evaluation pass each: run it before and after a repair.

    Example: beta-diag eval model.safetensors repaired.safetensors --data test.safetensors --data shifted.safetensors
    """
    from beta_diag import report
    from beta_diag.evaluation import evaluate as run
    from beta_diag.session import open_session

    results, folders = [], read_class_map(class_map)
    with report.progress(quiet or as_json) as progress:
        for ckpt in ckpts:
            session = open_session(ckpt, device=device, model=model)
            say_notes(session.ckpt.path, session.ckpt.notes)
            specs: list[str | None] = list(data) if data else [None]  # None: the checkpoint's own held-out data
            for spec in specs:
                ds = session.load_data(DataChoice(spec, split, limit, seed, folders), min_classes=1)
                results.append(run(session, ds, progress=progress))
    report.print_json({"evaluations": [r.to_dict() for r in results]}) if as_json else report.eval_table(results)
