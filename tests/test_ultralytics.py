"""Ultralytics YOLO classification through fused_ls.integrations.ultralytics, and the YOLO demo.

Skipped where Ultralytics is not installed (the main test venv: its CPU torch has no matching
torchvision). CI installs it in a second venv and sets FUSED_LS_REQUIRE_ULTRALYTICS=1 there, so
that a missing install fails instead of skipping.

The trainings run in subprocesses whose socket functions record and refuse every use from their
first line on, before ultralytics is imported (it probes DNS on import unless told it is offline),
so "no network" covers the whole run.
"""

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

os.environ["YOLO_OFFLINE"] = "true"  # before ultralytics is imported: no DNS probe from this process either
if os.environ.get("FUSED_LS_REQUIRE_ULTRALYTICS") == "1":
    import ultralytics  # noqa: F401  (a missing install must fail here, not skip)
else:
    pytest.importorskip("ultralytics")

from ultralytics.utils.loss import v8ClassificationLoss  # noqa: E402

from fused_ls.integrations.ultralytics import (  # noqa: E402
    SmoothedClassificationLoss,
    smoothed_xent_trainer,
    stock_loss_items_format,
)

FLOAT32_EPS = torch.finfo(torch.float32).eps
C = 10


def _logits_with_a_margin(batch: int = 64, margin: float = 2.0):
    """Random logits whose target logit exceeds every other by at least `margin`: the smoothed
    loss then exceeds plain cross-entropy by at least eps * margin * (C - 1) / C (uniform) or
    eps * margin (others), far beyond rounding."""
    logits = 2 * torch.randn(batch, C)
    target = torch.randint(0, C, (batch,))
    logits[torch.arange(batch), target] = logits.max(dim=1).values + margin
    return logits, target


def _smoothed_loss_float64(logits, target, eps, convention):
    """The definition: mean over rows of -sum_j q_j log softmax(x)_j, in float64."""
    logp = logits.double().log_softmax(-1)
    if convention == "others":
        q = torch.full_like(logp, eps / (C - 1))
        q[torch.arange(len(target)), target] = 1 - eps
    else:
        q = torch.full_like(logp, eps / C)
        q[torch.arange(len(target)), target] += 1 - eps
    return -(q * logp).sum(-1).mean()


def _float32_loss_bound(logits):
    """A bound on the float32 loss's rounding error: per row, logsumexp and sum_j q_j x_j each
    accumulate at most C + 2 roundings of a relative size eps_32 on terms no larger than
    max|x| + |lse|; the batch mean adds its own (the same order). Doubled for slack."""
    logits = logits.detach().double()
    return 2 * (2 * C + 4) * FLOAT32_EPS * float(logits.abs().max() + logits.logsumexp(-1).abs().max())


# ---- the criterion on a fixed batch ----------------------------------------------------------------------


@pytest.mark.parametrize("convention", ["others", "uniform"])
def test_criterion_loss_is_the_smoothed_cross_entropy_not_the_plain_one(convention):
    logits, target = _logits_with_a_margin()
    criterion = SmoothedClassificationLoss(0.1, convention)

    loss, _ = criterion(logits, {"cls": target})

    expected = _smoothed_loss_float64(logits, target, 0.1, convention)
    assert abs(float(loss) - float(expected)) <= _float32_loss_bound(logits)
    plain = float(F.cross_entropy(logits.double(), target))
    assert float(loss) - plain >= 0.1 * 2.0 * (C - 1) / C - _float32_loss_bound(logits)


def test_criterion_with_no_smoothing_gives_ultralytics_own_loss_and_item_format():
    logits, target = _logits_with_a_margin(margin=0.0)
    batch = {"cls": target}

    ours, our_items = SmoothedClassificationLoss(0.0)(logits, batch)
    stock, stock_items = v8ClassificationLoss()(logits, batch)

    # Both are float32 mean cross-entropies of the same logits: each within the rounding bound
    # of the float64 value, so within twice that of each other.
    assert abs(float(ours) - float(stock)) <= 2 * _float32_loss_bound(logits)
    assert type(our_items) is type(stock_items)
    if isinstance(stock_items, dict):
        assert tuple(our_items) == tuple(stock_items) == stock_loss_items_format()
        assert all(not v.requires_grad for v in our_items.values())
    else:
        assert stock_loss_items_format() is None and not our_items.requires_grad


def test_criterion_reads_the_logits_of_the_evaluation_heads_probability_logit_pair():
    logits, target = _logits_with_a_margin()
    criterion = SmoothedClassificationLoss(0.1)
    from_pair, _ = criterion((logits.softmax(-1), logits), {"cls": target})
    alone, _ = criterion(logits, {"cls": target})
    assert torch.equal(from_pair, alone)


def test_criterion_gradient_is_the_smoothed_gradient():
    logits, target = _logits_with_a_margin(batch=8)
    logits.requires_grad_(True)
    loss, _ = SmoothedClassificationLoss(0.1, "others")(logits, {"cls": target})
    loss.backward()
    # d/dx of the mean smoothed loss: (softmax(x) - q) / B
    q = torch.full((8, C), 0.1 / (C - 1), dtype=torch.float64)
    q[torch.arange(8), target] = 0.9
    expected = (logits.detach().double().softmax(-1) - q) / 8
    # Each entry is (p - q) / B with p = exp(x - lse) <= 1: p inherits lse's rounding (within the
    # loss bound) plus a few roundings of its own; q and the division by 8 add one each.
    assert (logits.grad.double() - expected).abs().max() <= (_float32_loss_bound(logits) + 4 * FLOAT32_EPS) / 8


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        ({"label_smoothing": 1.5}, ValueError, r"label_smoothing must lie in \[0, 1\], got 1.5"),
        ({"label_smoothing": -0.1}, ValueError, r"must lie in \[0, 1\]"),
        ({"label_smoothing": float("nan")}, ValueError, r"must lie in \[0, 1\]"),
        ({"label_smoothing": "0.1"}, TypeError, r"must be a number"),
        ({"convention": "fairseq"}, ValueError, r"convention must be one of \('uniform', 'others'\)"),
        ({"reduction": "sum"}, TypeError, r"sets 'reduction' itself"),
    ],
    ids=["above-one", "negative", "nan", "string", "convention", "reduction"],
)
def test_bad_settings_are_refused_when_the_trainer_is_made(kwargs, error, message):
    with pytest.raises(error, match=message):
        smoothed_xent_trainer(**kwargs)
    with pytest.raises(error, match=message):
        SmoothedClassificationLoss(**kwargs)


def test_criterion_refuses_logits_that_are_not_a_batch_of_class_scores():
    with pytest.raises(ValueError, match=r"expected \(batch, classes\) logits.*\(2, 3, 4\)"):
        SmoothedClassificationLoss(0.1)(torch.zeros(2, 3, 4), {"cls": torch.zeros(2, dtype=torch.long)})


# ---- real trainings, offline -----------------------------------------------------------------------------

# Runs first in each subprocess: every way Python code reaches the network goes through these.
SOCKET_GUARD = textwrap.dedent("""
    import json, socket, sys
    ATTEMPTS = []

    def _refuse(name):
        def refuse(*args, **kwargs):
            ATTEMPTS.append(f"{name}{args[:2]!r}"[:200])
            raise OSError(f"network use refused by the test ({name})")
        return refuse

    for _name in ("getaddrinfo", "gethostbyname", "gethostbyname_ex", "create_connection"):
        setattr(socket, _name, _refuse("socket." + _name))
    for _name in ("connect", "connect_ex", "sendto"):
        setattr(socket.socket, _name, _refuse("socket.socket." + _name))
""")

TRAINING = SOCKET_GUARD + textwrap.dedent("""
    import os, zipfile
    from pathlib import Path
    os.environ["YOLO_OFFLINE"] = "true"  # the documented offline switch, before ultralytics is imported
    work = Path(sys.argv[1])
    import torch
    from ultralytics import __version__
    from fused_ls.demo.idx import load_fashion_mnist
    from fused_ls.demo.yolo import YoloPreset, export_image_folders
    from fused_ls.integrations import ultralytics as integration

    calls = []
    original = integration.SmoothedClassificationLoss.__call__

    def recording(self, preds, batch):
        loss, items = original(self, preds, batch)
        calls.append({"grad": torch.is_grad_enabled(), "pair": isinstance(preds, (list, tuple)),
                      "loss": float(loss)})
        return loss, items

    integration.SmoothedClassificationLoss.__call__ = recording
    preset = YoloPreset(train_size=240, holdout_size=100, test_size=10)
    root = export_image_folders(load_fashion_mnist(), preset, work / "images")
    trainer = integration.smoothed_xent_trainer(0.1, convention="others")(overrides=dict(
        model="yolo11n-cls.yaml", data=str(root), epochs=1, imgsz=32, batch=32, workers=0, device="cpu",
        plots=False, amp=False, project=str(work / "runs"), name="run", exist_ok=True, verbose=False, seed=0))
    saved = []
    trainer.add_callback("on_model_save", lambda t: saved.append(
        any(b"fused_ls" in zipfile.ZipFile(t.last).read(n) for n in zipfile.ZipFile(t.last).namelist()
            if n.endswith(".pkl"))))
    trainer.train()
    csv = (work / "runs" / "run" / "results.csv").read_text().splitlines()
    row = dict(zip([c.strip() for c in csv[0].split(",")], csv[-1].split(",")))
    print("RESULT " + json.dumps({
        "ultralytics": __version__, "top1": float(trainer.metrics["metrics/accuracy_top1"]),
        "val_loss_logged": float(row["val/loss"]), "calls": calls, "checkpoint_mentions_fused_ls": saved,
        "model_class": type(trainer.model).__module__ + "." + type(trainer.model).__name__,
        "attempts": ATTEMPTS}))
""")


def _run_guarded(script: str, *args: str, cwd: Path, timeout: float = 240) -> tuple[dict, str]:
    env = {**os.environ, "XDG_CACHE_HOME": str(cwd / "cache"), "YOLO_CONFIG_DIR": str(cwd / "yolo-config")}
    env.pop("YOLO_OFFLINE", None)  # each script sets its own: the demo must do it by itself
    proc = subprocess.run([sys.executable, "-c", script, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, output[-4000:]
    return json.loads(lines[-1][len("RESULT "):]), output


@pytest.fixture(scope="module")
def training(tmp_path_factory, fashion_mnist_dir):
    work = tmp_path_factory.mktemp("yolo-train")
    return _run_guarded(TRAINING, str(work), cwd=work)[0]


@pytest.fixture(scope="session")
def fashion_mnist_dir():
    from fused_ls.demo.idx import DEBIAN_DIR, DatasetNotFoundError, find_fashion_mnist

    try:
        find_fashion_mnist(DEBIAN_DIR)
    except DatasetNotFoundError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"CI must install the Debian package dataset-fashion-mnist:\n{exc}")
        pytest.skip(f"Fashion-MNIST is not installed (CI installs it): {exc}")
    return DEBIAN_DIR


def test_short_training_finishes_and_reports_a_top1_accuracy(training):
    assert 0.0 <= training["top1"] <= 1.0
    assert training["model_class"] == "ultralytics.nn.tasks.ClassificationModel"  # a model that loads anywhere


def test_training_and_validation_both_go_through_the_smoothed_criterion(training):
    train_calls = [c for c in training["calls"] if c["grad"]]
    val_calls = [c for c in training["calls"] if not c["grad"]]
    assert len(train_calls) == math.ceil(240 / 32)  # every training batch
    assert val_calls and all(c["pair"] for c in val_calls)  # its batch size is Ultralytics' choice
    # Ultralytics logs the validation loss as the mean of its per-batch losses, rounded to 5 decimals.
    mean_val_loss = sum(c["loss"] for c in val_calls) / len(val_calls)
    assert abs(training["val_loss_logged"] - mean_val_loss) <= 0.5e-5 + 1e-6  # rounding + float32 sum


def test_checkpoints_written_during_training_do_not_need_fused_ls(training):
    assert training["checkpoint_mentions_fused_ls"] and not any(training["checkpoint_mentions_fused_ls"])


def test_training_opens_no_socket(training):
    assert training["attempts"] == []


DEMO = SOCKET_GUARD + textwrap.dedent("""
    from fused_ls.__main__ import main
    status = main(sys.argv[1:])
    print("RESULT " + json.dumps({"status": status, "attempts": ATTEMPTS}))
""")


def test_yolo_demo_runs_offline_and_writes_its_report(tmp_path, fashion_mnist_dir):
    out = tmp_path / "out"
    argv = ["demo", "--model", "yolo11n-cls", "--train-size", "200", "--holdout-size", "100", "--test-size", "100",
            "--epochs", "1", "--batch-size", "50", "--out", str(out), "--no-progress"]

    result, output = _run_guarded(DEMO, *argv, cwd=tmp_path)

    assert result == {"status": 0, "attempts": []}, output[-3000:]
    report = json.loads((out / "results.json").read_text())
    assert [r["setting"]["name"] for r in report["results"]] == ["no smoothing, noise 0%", "LS 0.1 (others), noise 0%"]
    for r in report["results"]:
        (run,) = r["runs"]
        assert run["before"]["accuracy"] == run["after_ts"]["accuracy"]  # a temperature keeps the argmax
        for stage in ("before", "after_ts"):
            m = run[stage]
            assert 0 <= m["accuracy"] <= 1 and 0 <= m["ece"] <= 1 and m["nll"] > 0
            assert sum(run[f"bins_{stage}"]["count"]) == 100
        assert r["summary"]["before"]["accuracy"]["std"] is None  # one seed: no spread claimed
    assert report["table_markdown"].count("\n") == 3 and " ± " not in report["table_markdown"]
    assert report["environment"]["ultralytics"] and report["config"]["baseline"].startswith("Ultralytics")
    assert (out / "reliability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Fashion-MNIST" in output and "| LS 0.1 (others), noise 0% |" in output


@pytest.mark.parametrize("bad,message", [(["--noise", "0.4"], "clean labels only"), (["--hidden", "32"], "--hidden"),
                                         (["--imgsz", "40"], "multiple of 32"), (["--smoothing", "0"], "positive")])
def test_yolo_demo_rejects_options_it_cannot_honour(bad, message, capsys):
    from fused_ls.demo import cli

    with pytest.raises(SystemExit) as info:
        cli.main(["--model", "yolo11n-cls", *bad])
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_exported_image_folders_hold_the_split_in_label_order(tmp_path):
    from PIL import Image

    from fused_ls.demo.yolo import YoloPreset, export_image_folders

    labels = torch.arange(60) % C
    images = torch.randint(0, 256, (60, 28, 28), dtype=torch.uint8)
    data = {"train_images": images, "train_labels": labels, "test_images": images[:20], "test_labels": labels[:20]}
    root = export_image_folders(data, YoloPreset(train_size=30, holdout_size=20, test_size=20), tmp_path / "x")

    counts = {split: sum(1 for _ in (root / split).rglob("*.png")) for split in ("train", "val", "test")}
    assert counts == {"train": 30, "val": 20, "test": 20}
    folders = sorted(p.name for p in (root / "test").iterdir())
    assert folders[0].startswith("0_T-shirt-top") and folders[9].startswith("9_Ankle-boot")
    for i, folder in enumerate(folders):  # sorted folder order is the label order, pixels intact
        for png in (root / "test" / folder).glob("*.png"):
            index = int(png.stem)
            assert int(labels[index]) == i
            assert torch.equal(torch.from_numpy(np.array(Image.open(png))), images[index])
    assert not list(tmp_path.glob("*.partial-*"))
