"""``make demo``: train the embedded default, predict the validation phantoms, print the scores.

What it runs, in this process (the same code paths as the commands shown)::

    python -m segmerge train                       # default: GMD on cached 64³ phantoms
    python -m segmerge predict --input <validation datalist> --output runs/demo/predictions
    python -m segmerge evaluate --pred runs/demo/predictions --gt <validation datalist>

and ends with the Dice table and the ``mlflow ui`` command that opens the run. Extra arguments
are passed to ``train`` (e.g. ``scripts/demo.py --epochs 2``). When ``segmerge.inference`` is not
installed the validation Dice of the training run is the table.
"""

from __future__ import annotations

import os

# Passive OpenMP waiting: with spinning waits, a busy 2-core machine slows convolutions down
# by an order of magnitude. Must be set before torch starts its thread pool.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _validation_datalist(dataset: Path, out: Path) -> Path:
    """A datalist of the dataset's validation cases only (absolute paths)."""
    from segmerge.data import load_dataset

    spec = load_dataset(dataset)
    items = []
    for item in spec.validation:
        items.append({k: str(v) for k, v in item.items() if v is not None})
    out.mkdir(parents=True, exist_ok=True)
    path = out / "validation.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"validation": items}, indent=1))
    os.replace(tmp, path)
    return path


def predict_and_score(
    dataset: Path, model: Path, patch: int, et_label: int, out: Path
) -> tuple[dict[str, float], int]:
    """Predict the validation cases with the trained weights and score them.

    Returns:
        ``(mean metrics, number of cases)``.
    """
    from segmerge.inference.cli import predict_main
    from segmerge.inference.evaluate import evaluate_predictions

    datalist = _validation_datalist(dataset, out)
    pred = out / "predictions"
    cmd = [
        "--input", str(datalist), "--output", str(pred), "--overwrite", "--model", str(model),
        "--set", f"roi_size=[{patch},{patch},{patch}]",
    ]  # fmt: skip
    print("\n$ python -m segmerge predict " + " ".join(cmd), flush=True)
    if predict_main(cmd) not in (0, None):
        raise SystemExit("demo: prediction failed")
    print(f"\n$ python -m segmerge evaluate --pred {pred} --gt {datalist}", flush=True)
    result = evaluate_predictions(pred, datalist, et_label)
    return dict(result.aggregate("mean")), len(result.rows)


def main(argv: list[str] | None = None) -> int:
    """Train, predict, evaluate, print. Returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    t0 = time.time()
    os.chdir(REPO)  # the bundle root: configs/, models/, runs/, cache/
    from segmerge.engine.cli import main as train_main
    from segmerge.engine.config import load_config, parse_argv
    from segmerge.engine.trainer import dataset_location

    print("$ python -m segmerge train " + " ".join(args), flush=True)
    status = train_main(args)
    if status != 0:
        return status
    t_train = time.time() - t0
    parser = load_config(parse_argv(args))
    dataset = dataset_location(parser)
    patch = int(parser.get_parsed_content("patch_size"))
    et_label = int(parser.get_parsed_content("dataset#et_label"))
    model = Path(parser.get_parsed_content("bundle_root")).absolute() / "models" / "model.pt"
    table, n_cases = predict_and_score(dataset, model, patch, et_label, REPO / "runs" / "demo")
    wall = time.time() - t0
    print("\n=== segmerge demo ===")
    print(f"validation phantoms, predicted with models/model.pt ({n_cases} cases):")
    print(f"  {'region':<8}{'Dice':>8}{'HD95':>9}")
    for region in ("wt", "tc", "et"):
        dice = _pick(table, "dice", region)
        hd = _pick(table, "hd95", region)
        print(f"  {region:<8}{dice:>8.4f}{hd:>9.2f}")
    print(f"training {t_train / 60:.1f} min, demo total {wall / 60:.1f} min (after installation)")
    from segmerge.engine.tracking import default_tracking_uri, ui_command

    uri = parser.get_parsed_content("tracking_uri") or default_tracking_uri(
        Path(parser.get_parsed_content("output_dir"))
    )
    print(f"open the run: {ui_command(uri)}")
    return 0


def _pick(table: dict[str, float], metric: str, region: str) -> float:
    for key in (f"{metric}_{region}", f"{metric}/{region}", f"{region}_{metric}"):
        if key in table:
            return float(table[key])
    return float("nan")


if __name__ == "__main__":
    sys.exit(main())
