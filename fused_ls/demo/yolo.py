"""The demo on an Ultralytics YOLO classifier (``python -m fused_ls demo --model yolo11n-cls``).

Ultralytics' classification loss ignores label smoothing (see fused_ls.integrations.ultralytics);
this trains yolo11n-cls from its YAML (random weights, nothing downloaded) on a Fashion-MNIST
subset exported as Ultralytics' image-folder layout, once as Ultralytics ships it (plain
cross-entropy) and once per smoothing value through ``smoothed_xent_trainer``, and measures the
final weights on the Fashion-MNIST test images with the MLP demo's metrics and report:
accuracy, NLL, ECE, reliability diagram, and the same after temperature scaling fitted on the
held-out split (Ultralytics' ``val`` folder, which it also validates on after every epoch).

Runs that share a seed share everything but the loss: the split is fixed, and Ultralytics'
``seed`` with ``deterministic=True`` fixes the initial weights, batch order and augmentations.
Seeds vary those, not the split. No network: ``YOLO_OFFLINE`` is set before ultralytics is
imported (it otherwise probes DNS on import), the model comes from a YAML, ``plots=False``
(plots fetch a font) and ``amp=False`` (the AMP check on a GPU fetches weights).
"""

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
from dataclasses import dataclass
from pathlib import Path

import torch

from fused_ls.demo.experiment import NUM_BINS, Setting, calibration_metrics, fit_temperature, reliability_bins
from fused_ls.demo.idx import DatasetNotFoundError, load_fashion_mnist
from fused_ls.demo.report import outcome, pooled_bins, reliability_figure, setting_dict, summarize, table

MODELS = ("yolo11n-cls",)
SCHEMA = "fused_ls.demo.yolo/1"
SPLIT_SEED = 0  # the one train / held-out split every run uses
EXPORT_FORMAT = 1  # part of the cache folder's name: bump when the exported files change
OFFLINE_ENVIRONMENT = {
    "YOLO_OFFLINE": "true",  # no DNS probe on import, no update check, no telemetry
    "YOLO_AUTOINSTALL": "false",  # never pip-install a missing requirement
}


@dataclass(frozen=True)
class YoloPreset:
    train_size: int = 5000  # training images, from the 60000
    holdout_size: int = 2000  # further training images: Ultralytics' val split, and the temperature fit
    test_size: int = 10000  # the first N Fashion-MNIST test images
    epochs: int = 8
    batch_size: int = 64
    lr: float = 2e-3  # AdamW, Ultralytics' weight decay
    imgsz: int = 32  # 28x28 images resized; YOLO needs a multiple of its stride 32

    def summary(self, model: str) -> str:
        return (f"{model} from its YAML at {self.imgsz}x{self.imgsz}, {self.epochs} epochs over "
                f"{self.train_size} images")


def use_offline_ultralytics() -> None:
    """Set Ultralytics' offline switches; they are read once, when ultralytics is first imported."""
    if "ultralytics" in sys.modules and os.environ.get("YOLO_OFFLINE", "").lower() != "true":
        raise RuntimeError("ultralytics was imported before the demo could set YOLO_OFFLINE=true; "
                           "run the demo in a fresh process")
    os.environ.update(OFFLINE_ENVIRONMENT)


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fused_ls"


def class_folder_names(num_classes: int) -> list[str]:
    """Folder names that sort in label order (Ultralytics numbers classes by sorted folder name)."""
    from fused_ls.demo.idx import FASHION_MNIST_CLASSES

    width = len(str(num_classes - 1))
    names = FASHION_MNIST_CLASSES if num_classes == len(FASHION_MNIST_CLASSES) else [""] * num_classes
    return [f"{i:0{width}d}_{name.replace('/', '-').replace(' ', '-')}".rstrip("_") for i, name in enumerate(names)]


def export_image_folders(data: dict[str, torch.Tensor], preset: YoloPreset, root: Path | None = None) -> Path:
    """Write the split as ``ROOT/{train,val,test}/<class>/<index>.png`` and return ROOT.

    A folder already complete is reused: it is made under a temporary name and renamed when
    whole, so an interrupted export is never taken for a finished one.
    """
    from PIL import Image

    images, labels = data["train_images"], data["train_labels"]
    needed = preset.train_size + preset.holdout_size
    if needed > images.shape[0]:
        raise ValueError(f"train size {preset.train_size} + held-out size {preset.holdout_size} = {needed} exceeds "
                         f"the {images.shape[0]} training images")
    if preset.test_size > data["test_images"].shape[0]:
        raise ValueError(f"test size {preset.test_size} exceeds the {data['test_images'].shape[0]} test images")
    num_classes = int(max(labels.max(), data["test_labels"].max())) + 1
    if root is None:
        root = cache_dir() / (f"fashion-mnist-png-v{EXPORT_FORMAT}-split{SPLIT_SEED}-"
                              f"{preset.train_size}-{preset.holdout_size}-{preset.test_size}")
    root = Path(root)
    if root.is_dir():
        return root
    pool = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(SPLIT_SEED))[:needed]
    splits = {
        "train": (images[pool[: preset.train_size]], labels[pool[: preset.train_size]]),
        "val": (images[pool[preset.train_size:]], labels[pool[preset.train_size:]]),
        "test": (data["test_images"][: preset.test_size], data["test_labels"][: preset.test_size]),
    }
    folders = class_folder_names(num_classes)
    partial = root.with_name(f"{root.name}.partial-{os.getpid()}")
    for split, (split_images, split_labels) in splits.items():
        for folder in folders:
            (partial / split / folder).mkdir(parents=True, exist_ok=True)
        for i, (image, label) in enumerate(zip(split_images.numpy(), split_labels.tolist())):
            Image.fromarray(image).save(partial / split / folders[label] / f"{i:05d}.png", compress_level=1)
    try:
        partial.rename(root)
    except OSError:  # another process finished the same export first
        if not root.is_dir():
            raise
        import shutil

        shutil.rmtree(partial, ignore_errors=True)
    return root


def _train_args(preset: YoloPreset, data_root: Path, seed: int, device: str, project: Path, name: str) -> dict:
    return {
        "model": "yolo11n-cls.yaml", "data": str(data_root), "epochs": preset.epochs, "imgsz": preset.imgsz,
        "batch": preset.batch_size, "optimizer": "AdamW", "lr0": preset.lr, "warmup_epochs": 1, "seed": seed,
        "deterministic": True, "workers": 0, "device": device, "plots": False, "amp": False, "val": True,
        "project": str(project), "name": name, "exist_ok": True, "verbose": False,
    }


@torch.no_grad()
def _logits(trainer, model, folder: Path, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's logits on every image of `folder`, through Ultralytics' own evaluation transforms."""
    loader = trainer.get_dataloader(str(folder), batch_size=batch_size, rank=-1, mode="val")
    logits, labels = [], []
    for batch in loader:
        batch = trainer.preprocess_batch(batch)
        preds = model(batch["img"].float())
        logits.append((preds[1] if isinstance(preds, (list, tuple)) else preds).float().cpu())
        labels.append(batch["cls"].long().cpu())
    return torch.cat(logits), torch.cat(labels)


def train_and_evaluate(data_root: Path, preset: YoloPreset, setting: Setting, seed: int, *, model_name: str,
                       device: str, out: Path, backend: str = "auto") -> dict:
    """One Ultralytics training run and its metrics, in the MLP demo's run format."""
    from ultralytics.models.yolo.classify import ClassificationTrainer

    from fused_ls.integrations.ultralytics import smoothed_xent_trainer

    name = f"eps{setting.label_smoothing:g}-{setting.convention}-seed{seed}"
    # Absolute: Ultralytics puts a relative project under its own runs_dir setting.
    overrides = _train_args(preset, data_root, seed, device, (out / "yolo_runs").resolve(), name)
    overrides["model"] = f"{model_name}.yaml"
    if setting.label_smoothing == 0:
        trainer_class = ClassificationTrainer  # Ultralytics as shipped: plain cross-entropy
    else:
        trainer_class = smoothed_xent_trainer(setting.label_smoothing, setting.convention, backend=backend)
    trainer = trainer_class(overrides=overrides)
    started = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - started

    # The final EMA weights (what last.pt holds), in float32: no model selection on the held-out split.
    model = trainer.ema.ema.float().eval()
    test_logits, test_y = _logits(trainer, model, data_root / "test", preset.batch_size)
    holdout_logits, holdout_y = _logits(trainer, model, data_root / "val", preset.batch_size)
    train_logits, train_y = _logits(trainer, model, data_root / "train", preset.batch_size)
    temperature = fit_temperature(holdout_logits, holdout_y)
    scaled = test_logits / temperature
    return {
        "seed": seed,
        "train_accuracy": float((train_logits.argmax(-1) == train_y).float().mean()),
        "temperature": temperature,
        "train_seconds": train_seconds,
        "ultralytics_top1_val": float(trainer.metrics.get("metrics/accuracy_top1", float("nan"))),
        "before": calibration_metrics(test_logits, test_y),
        "after_ts": calibration_metrics(scaled, test_y),
        "bins_before": reliability_bins(test_logits, test_y),
        "bins_after_ts": reliability_bins(scaled, test_y),
    }


def _settings(smoothing: list[float], convention: str) -> list[Setting]:
    conventions = ("uniform", "others") if convention == "both" else (convention,)
    settings = [Setting(0.0, "none", 0.0)]
    for eps in dict.fromkeys(smoothing):
        if eps != 0:
            settings.extend(Setting(eps, c, 0.0) for c in conventions)
    return settings


def main(args: argparse.Namespace, parser: argparse.ArgumentParser, argv: list[str]) -> int:
    """The YOLO demo, from the demo's parsed command line."""
    if args.noise not in (None, [0.0]):
        parser.error(f"--model {args.model} trains on clean labels only: leave out --noise")
    if args.hidden is not None:
        parser.error(f"--hidden is for the MLP; --model {args.model} is fixed by its YAML")
    overrides = {k: getattr(args, k) for k in ("train_size", "holdout_size", "test_size", "epochs", "batch_size", "lr",
                                               "imgsz") if getattr(args, k) is not None}
    preset = dataclasses.replace(YoloPreset(), **overrides)
    for field in ("train_size", "holdout_size", "test_size", "epochs", "batch_size"):
        if getattr(preset, field) < 1:
            parser.error(f"--{field.replace('_', '-')} must be at least 1")
    if preset.imgsz < 32 or preset.imgsz % 32:
        parser.error(f"--imgsz must be a multiple of 32 (the model's stride), got {preset.imgsz}")
    seeds = args.seeds if args.seeds is not None else 1
    if seeds < 1:
        parser.error("--seeds must be at least 1")
    if any(not 0 <= eps < 1 for eps in args.smoothing):
        parser.error(f"--smoothing values must lie in [0, 1), got {args.smoothing}")
    convention = args.convention or "others"
    settings = _settings(args.smoothing, convention)
    if len(settings) < 2:
        parser.error("--smoothing needs a positive value to compare with no smoothing")

    use_offline_ultralytics()
    os.environ.setdefault("YOLO_VERBOSE", "false" if args.no_progress else "true")
    try:
        import ultralytics
    except ImportError:
        print(f"--model {args.model} needs Ultralytics: pip install \"fused_ls[demo,ultralytics]\" "
              f"(torchvision must match torch {torch.__version__})", file=sys.stderr)
        return 2
    started = time.perf_counter()
    try:
        data = load_fashion_mnist(args.data)
    except DatasetNotFoundError as exc:
        print(exc, file=sys.stderr)
        return 2
    out = Path(args.out)
    data_root = export_image_folders(data, preset)

    runs: dict[Setting, list[dict]] = {s: [] for s in settings}
    for seed in range(seeds):
        for setting in settings:
            print(f"demo: {args.model}, {setting.name.split(',')[0]}, seed {seed} ...", flush=True)
            run = train_and_evaluate(data_root, preset, setting, seed, model_name=args.model, device=args.device,
                                     out=out, backend=args.backend)
            print(f"demo:   test accuracy {run['before']['accuracy']:.1%}, ECE {run['before']['ece']:.3f}, "
                  f"{run['train_seconds']:.0f} s", flush=True)
            runs[setting].append(run)

    results = [
        {"setting": setting_dict(s), "summary": summarize(runs[s]),
         "reliability": {stage: pooled_bins(runs[s], stage) for stage in ("before", "after_ts")}, "runs": runs[s]}
        for s in settings
    ]
    description = preset.summary(args.model)
    from fused_ls import __version__, backends

    report = {
        "schema": SCHEMA,
        "command": shlex.join(["python", "-m", "fused_ls", "demo", *argv]),
        "description": description,
        "config": {
            "model": args.model, **dataclasses.asdict(preset), "seeds": list(range(seeds)),
            "smoothing": args.smoothing, "convention": convention, "data": os.path.abspath(args.data),
            "images": str(data_root), "device": args.device,
            "training": "Ultralytics ClassificationTrainer, its default augmentations; AdamW, warmup 1 epoch",
            "evaluated": "the final EMA weights (last.pt), not the best-on-val checkpoint",
            "baseline": "Ultralytics' own trainer and loss (plain cross-entropy)",
            "temperature_fit": "L-BFGS on the NLL of the held-out (val) split's logits",
            "ece": f"torchmetrics MulticlassCalibrationError(n_bins={NUM_BINS}, norm='l1')",
        },
        "environment": {
            "fused_ls": __version__,
            "backend": backends.resolve(args.backend, torch.device("cpu" if args.device == "cpu" else "cuda")),
            "ultralytics": ultralytics.__version__, "torch": torch.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        },
        "runtime_seconds": None,
        "table_markdown": table(results),
        "outcome": outcome(results),
        "results": results,
    }
    out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out / "results.json", out / "reliability.png"
    reliability_figure(results, str(png_path), f"Fashion-MNIST test set, {seeds} seed{'s' * (seeds > 1)}; "
                                               f"{description}")
    report["runtime_seconds"] = time.perf_counter() - started
    json_path.write_text(json.dumps(report, indent=1))

    print(f"\nFashion-MNIST, {description}; test set ({preset.test_size} images), "
          + (f"mean ± std over {seeds} seeds" if seeds > 1 else "one seed: no spread is measured")
          + f"; TS = temperature scaling fitted on the {preset.holdout_size} held-out images\n")
    print(report["table_markdown"])
    print()
    for sentence in report["outcome"]:
        print("- " + sentence)
    threads = torch.get_num_threads()
    print(f"\n{seeds * len(settings)} runs, {report['runtime_seconds']:.0f} s in all (Ultralytics "
          f"{ultralytics.__version__}, {threads} torch thread{'s' * (threads > 1)}); wrote {json_path} and {png_path}")
    return 0
