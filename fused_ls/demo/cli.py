"""python -m fused_ls demo: does label smoothing do what it is said to do? Measured on Fashion-MNIST."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shlex
import sys
import time

import torch

from fused_ls.demo.experiment import NUM_BINS, PRESETS, Setting, make_split, preset_dict, train_and_evaluate
from fused_ls.demo.idx import DEBIAN_DIR, DatasetNotFoundError, load_fashion_mnist
from fused_ls.demo.report import outcome, pooled_bins, reliability_figure, setting_dict, summarize, table
from fused_ls.demo.yolo import MODELS as YOLO_MODELS  # imports Ultralytics only when a YOLO demo runs

SCHEMA = "fused_ls.demo/1"


def _floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    return values


def _widths(text: str) -> tuple[int, ...]:
    if text.strip().lower() in ("", "none", "linear"):
        return ()
    try:
        widths = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer widths or 'none', got {text!r}") from None
    if any(w < 1 for w in widths):
        raise argparse.ArgumentTypeError(f"layer widths must be positive, got {text!r}")
    return widths


def build_parser() -> argparse.ArgumentParser:
    presets = "\n".join(f"  {name:14s} {p.summary()}: {p.purpose}" for name, p in PRESETS.items())
    parser = argparse.ArgumentParser(
        prog="python -m fused_ls demo",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Train a small Fashion-MNIST classifier with fused_ls.smoothed_xent at several label-smoothing\n"
            "values and label-noise rates, over several seeds, and measure on the clean test set: accuracy,\n"
            "NLL, 15-bin ECE (torchmetrics), mean confidence, before and after temperature scaling fitted on\n"
            "a held-out split of the training images. Writes results.json and reliability.png.\n\n"
            "--model yolo11n-cls trains Ultralytics' YOLO11n classifier instead\n"
            "(pip install \"fused_ls[demo,ultralytics]\"),\n"
            "as Ultralytics ships it (no smoothing: its loss ignores label_smoothing) and with smoothed_xent, on\n"
            "clean labels, by default one seed, eps 0.1 (others), offline; see docs/ultralytics.md.\n\n"
            f"presets (MLP):\n{presets}"
        ),
    )
    parser.add_argument("--data", default=DEBIAN_DIR,
                        help="folder with the four Fashion-MNIST IDX files, gzipped or not (default: %(default)s, "
                             "from the Debian package dataset-fashion-mnist)")
    parser.add_argument("--out", default="demo_out", help="folder for results.json and reliability.png "
                        "(default: %(default)s)")
    parser.add_argument("--model", choices=("mlp", *YOLO_MODELS), default="mlp",
                        help="the classifier: the demo's MLP, or an Ultralytics YOLO classifier built from its YAML "
                             "(default: %(default)s)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="overconfident",
                        help="MLP: what is trained, on how much data, for how long (default: %(default)s)")
    parser.add_argument("--smoothing", type=_floats, default=[0.0, 0.1],
                        help="label-smoothing values, comma-separated (default: 0,0.1)")
    parser.add_argument("--convention", choices=("uniform", "others", "both"), default=None,
                        help="how smoothing spreads eps: 'uniform' (PyTorch, eps/C to every class) or 'others' "
                             "(eps/(C-1) to every wrong class) (default: uniform for the MLP, others for YOLO)")
    parser.add_argument("--noise", type=_floats, default=None,
                        help="symmetric label-noise rates: that fraction of the training labels moved to a "
                             "uniformly random other class, comma-separated (default: 0,0.4; MLP only)")
    parser.add_argument("--clean-holdout", action="store_true",
                        help="fit the temperature on the held-out split's clean labels, even under label noise "
                             "(default: its labels carry the same noise as the training labels)")
    parser.add_argument("--seeds", type=int, default=None,
                        help="seeds 0..N-1 per setting (default: 3 for the MLP, N >= 2; 1 for YOLO)")
    group = parser.add_argument_group("overrides of the preset")
    group.add_argument("--train-size", type=int)
    group.add_argument("--holdout-size", type=int, help="training images kept out to fit the temperature")
    group.add_argument("--hidden", type=_widths, help="hidden widths, e.g. 256,256, or 'none' for a linear model")
    group.add_argument("--epochs", type=int)
    group.add_argument("--batch-size", type=int)
    group.add_argument("--lr", type=float, help="Adam learning rate (AdamW for YOLO)")
    group.add_argument("--test-size", type=int, help="YOLO: the first N test images (default 10000)")
    group.add_argument("--imgsz", type=int, help="YOLO: input size, a multiple of 32 (default 32)")
    parser.add_argument("--threads", type=int, default=1,
                        help="MLP: torch CPU threads (default: %(default)s; Ultralytics picks its own). A second "
                             "thread can help on idle cores, "
                             "but on cores shared with other jobs two threads ran this demo 5-10x slower than one "
                             "(OpenMP threads spin waiting for each other); with more threads, set "
                             "OMP_WAIT_POLICY=PASSIVE")
    parser.add_argument("--device", default="cpu", help="torch device to train on (default: %(default)s)")
    parser.add_argument("--backend", default="auto", help="smoothed_xent backend (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _check(args: argparse.Namespace, parser: argparse.ArgumentParser, preset) -> None:
    if args.seeds < 2:
        parser.error("--seeds must be at least 2: the table reports a standard deviation over seeds")
    if any(not 0 <= eps < 1 for eps in args.smoothing):
        parser.error(f"--smoothing values must lie in [0, 1), got {args.smoothing}")
    if any(not 0 <= rate < 1 for rate in args.noise):
        parser.error(f"--noise rates must lie in [0, 1), got {args.noise}")
    for field in ("train_size", "holdout_size", "epochs", "batch_size"):
        if getattr(preset, field) < 1:
            parser.error(f"--{field.replace('_', '-')} must be at least 1")
    if args.threads < 1:
        parser.error("--threads must be at least 1")


def settings_for(smoothing: list[float], noise: list[float], convention: str) -> list[Setting]:
    conventions = ("uniform", "others") if convention == "both" else (convention,)
    settings = []
    for rate in dict.fromkeys(noise):
        for eps in dict.fromkeys(smoothing):
            if eps == 0:
                settings.append(Setting(0.0, "none", rate))
            else:
                settings.extend(Setting(eps, c, rate) for c in conventions)
    return settings


def run_all(data, preset, settings, seeds, *, device, backend, clean_holdout, progress) -> dict[Setting, list[dict]]:
    """Every (seed, setting) run; a seed's data split is made once and shared by its settings."""
    from tqdm.auto import tqdm

    runs: dict[Setting, list[dict]] = {s: [] for s in settings}
    with tqdm(total=len(seeds) * len(settings) * preset.epochs, unit="epoch", disable=not progress, desc="demo",
              dynamic_ncols=True) as bar:
        for seed in seeds:
            split = make_split(data, preset, seed, device)
            for setting in settings:
                bar.set_postfix_str(f"seed {seed}, {setting.name}")
                runs[setting].append(
                    train_and_evaluate(split, preset, setting, seed, backend=backend, clean_holdout=clean_holdout,
                                       on_epoch=lambda: bar.update(1))
                )
    return runs


def environment(backend: str, device: torch.device, threads: int) -> dict:
    import torchmetrics

    from fused_ls import __version__, backends

    return {
        "fused_ls": __version__, "backend": backends.resolve(backend, device), "torch": torch.__version__,
        "torchmetrics": torchmetrics.__version__, "python": platform.python_version(),
        "machine": platform.machine(), "cpus": os.cpu_count(), "threads": threads,
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.model != "mlp":
        from fused_ls.demo.yolo import main as yolo_main

        return yolo_main(args, parser, sys.argv[1:] if argv is None else argv)
    for option in ("test_size", "imgsz"):
        if getattr(args, option) is not None:
            parser.error(f"--{option.replace('_', '-')} is for --model {YOLO_MODELS[0]}")
    args.seeds = 3 if args.seeds is None else args.seeds
    args.convention = args.convention or "uniform"
    args.noise = [0.0, 0.4] if args.noise is None else args.noise
    overrides = {k: getattr(args, k) for k in ("train_size", "holdout_size", "hidden", "epochs", "batch_size", "lr")
                 if getattr(args, k) is not None}
    preset = dataclasses.replace(PRESETS[args.preset], **overrides)
    _check(args, parser, preset)
    started = time.perf_counter()
    try:
        data = load_fashion_mnist(args.data)
    except DatasetNotFoundError as exc:
        print(exc, file=sys.stderr)
        return 2
    image_features = data["train_images"][0].numel()
    num_classes = int(data["train_labels"].max()) + 1

    device = torch.device(args.device)
    settings = settings_for(args.smoothing, args.noise, args.convention)
    seeds = list(range(args.seeds))
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        runs = run_all(data, preset, settings, seeds, device=device, backend=args.backend,
                       clean_holdout=args.clean_holdout, progress=not args.no_progress)
    finally:
        torch.set_num_threads(previous_threads)

    results = [
        {
            "setting": setting_dict(s),
            "summary": summarize(runs[s]),
            "reliability": {stage: pooled_bins(runs[s], stage) for stage in ("before", "after_ts")},
            "runs": runs[s],
        }
        for s in settings
    ]
    changed = " (changed)" if overrides else ""
    description = f"preset '{args.preset}'{changed}: {preset.summary(image_features, num_classes)}"
    report = {
        "schema": SCHEMA,
        "command": shlex.join(["python", "-m", "fused_ls", "demo", *(sys.argv[1:] if argv is None else argv)]),
        "description": description,
        "config": {
            "preset": args.preset, **preset_dict(preset), "seeds": seeds, "smoothing": args.smoothing,
            "noise": args.noise, "convention": args.convention, "data": os.path.abspath(args.data),
            "device": str(device), "optimizer": "Adam, no weight decay",
            "temperature_fit": "L-BFGS on the NLL of the held-out split's logits",
            "ece": f"torchmetrics MulticlassCalibrationError(n_bins={NUM_BINS}, norm='l1')",
            "noise_applies_to": "training labels" + ("" if args.clean_holdout else " and held-out labels")
                                + "; the test set stays clean",
        },
        "environment": environment(args.backend, device, args.threads),
        "runtime_seconds": None,  # filled in once the figure is drawn
        "table_markdown": table(results),
        "outcome": outcome(results, args.clean_holdout),
        "results": results,
    }
    os.makedirs(args.out, exist_ok=True)
    json_path = os.path.join(args.out, "results.json")
    png_path = os.path.join(args.out, "reliability.png")
    reliability_figure(results, png_path, f"Fashion-MNIST test set, {len(seeds)} seeds pooled; {description}")
    report["runtime_seconds"] = time.perf_counter() - started
    with open(json_path, "w") as f:
        json.dump(report, f, indent=1)

    print(f"\nFashion-MNIST, {description}; clean test set ({data['test_labels'].numel()} images), "
          f"mean ± std over {len(seeds)} seeds; TS = temperature scaling fitted on {preset.holdout_size} held-out "
          "training images\n")
    print(report["table_markdown"])
    print()
    for sentence in report["outcome"]:
        print("- " + sentence)
    print(f"\n{len(seeds) * len(settings)} runs, {report['runtime_seconds']:.0f} s in all on {args.threads} threads "
          f"(backend {report['environment']['backend']}); wrote {json_path} and {png_path}")
    return 0
