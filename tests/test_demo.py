"""The demo (`python -m fused_ls demo`): its IDX reader, its pieces, and the whole command on a small subset.

Tests on the real Fashion-MNIST files need the Debian package dataset-fashion-mnist. Where it is
missing they fail with the install command when the CI environment variable is set (CI installs it)
and are skipped otherwise, so that a developer machine without the data still runs everything else.
"""

import gzip
import json
import os
import statistics
import struct

import pytest
import torch
from torchmetrics.classification import MulticlassCalibrationError

from fused_ls.demo import cli
from fused_ls.demo.experiment import NUM_BINS, PRESETS, Preset, fit_temperature, make_split, reliability_bins
from fused_ls.demo.idx import (
    DEBIAN_DIR,
    FASHION_MNIST_FILES,
    DatasetNotFoundError,
    IDXFormatError,
    find_fashion_mnist,
    load_fashion_mnist,
    parse_idx,
    read_idx,
)
from fused_ls.demo.report import outcome

IDX_TYPE_CODES = {torch.uint8: (0x08, "B"), torch.int32: (0x0C, "i"), torch.float32: (0x0D, "f")}


def idx_bytes(tensor: torch.Tensor) -> bytes:
    """An IDX file written from its definition: magic, big-endian sizes, big-endian data."""
    code, fmt = IDX_TYPE_CODES[tensor.dtype]
    header = bytes([0, 0, code, tensor.dim()]) + struct.pack(f">{tensor.dim()}I", *tensor.shape)
    values = tensor.flatten().tolist()
    return header + struct.pack(f">{len(values)}{fmt}", *values)


@pytest.fixture(scope="session")
def fashion_mnist_dir():
    try:
        find_fashion_mnist(DEBIAN_DIR)
    except DatasetNotFoundError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"CI must install the Debian package dataset-fashion-mnist:\n{exc}")
        pytest.skip(f"Fashion-MNIST is not installed (CI installs it): {exc}")
    return DEBIAN_DIR


# ---- the IDX reader --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,shape", [(torch.uint8, (5, 4, 3)), (torch.int32, (7, 2)), (torch.float32, (6,))])
def test_idx_reader_decodes_header_and_big_endian_data(tmp_path, dtype, shape):
    if dtype == torch.uint8:
        tensor = torch.randint(0, 256, shape, dtype=dtype)
    elif dtype == torch.int32:
        tensor = torch.randint(-(2**31), 2**31 - 1, shape, dtype=dtype)
    else:
        tensor = torch.randn(shape, dtype=dtype)
    path = tmp_path / "file-idx"
    path.write_bytes(idx_bytes(tensor))

    decoded = read_idx(path)

    assert decoded.dtype == dtype and decoded.shape == shape
    assert torch.equal(decoded, tensor)


def test_idx_reader_recognises_gzip_by_its_bytes_not_its_name(tmp_path):
    tensor = torch.randint(0, 256, (3, 28, 28), dtype=torch.uint8)
    path = tmp_path / "no-gz-suffix"
    path.write_bytes(gzip.compress(idx_bytes(tensor)))
    assert torch.equal(read_idx(path), tensor)


def test_idx_reader_rejects_a_wrong_magic_number(tmp_path):
    path = tmp_path / "not-idx"
    path.write_bytes(b"\x89PNG" + bytes(100))
    with pytest.raises(IDXFormatError, match=r"not an IDX file.*magic number.*0x89 0x50"):
        read_idx(path)


@pytest.mark.parametrize(
    "data,message",
    [
        (b"\x00\x00", r"too short"),
        (bytes([0, 0, 0x07, 1]) + struct.pack(">I", 1) + b"\x00", r"unknown IDX type code 0x07"),
        (bytes([0, 0, 0x08, 3]) + struct.pack(">I", 2), r"truncated header"),
        (bytes([0, 0, 0x08, 2]) + struct.pack(">2I", 2, 3) + bytes(5),
         r"shape \(2, 3\) of uint8 \(18 bytes in all\), but the file has 17"),
        (bytes([0, 0, 0x08, 1]) + struct.pack(">I", 2) + bytes(3), r"\(10 bytes in all\), but the file has 11"),
    ],
    ids=["short", "type-code", "header", "truncated-data", "trailing-data"],
)
def test_idx_reader_rejects_malformed_files_with_a_clear_error(data, message):
    with pytest.raises(IDXFormatError, match=message):
        parse_idx(data, name="bad")


def test_missing_dataset_error_says_how_to_get_it(tmp_path):
    (tmp_path / FASHION_MNIST_FILES["train_images"]).write_bytes(b"")
    with pytest.raises(DatasetNotFoundError) as info:
        find_fashion_mnist(str(tmp_path))
    message = str(info.value)
    assert "apt-get install dataset-fashion-mnist" in message and "--data" in message
    assert "t10k-labels-idx1-ubyte" in message and "train-images-idx3-ubyte[" not in message


def test_real_fashion_mnist_files_have_the_published_shapes_and_balance(fashion_mnist_dir):
    data = load_fashion_mnist(fashion_mnist_dir)
    for split, n in (("train", 60000), ("test", 10000)):
        images, labels = data[f"{split}_images"], data[f"{split}_labels"]
        assert images.shape == (n, 28, 28) and images.dtype == torch.uint8
        assert labels.shape == (n,) and labels.dtype == torch.int64
        assert 0 <= int(labels.min()) and int(labels.max()) <= 9
        # Fashion-MNIST is balanced: a misaligned header would scramble these counts.
        assert torch.bincount(labels, minlength=10).tolist() == [n // 10] * 10
        assert int(images.max()) == 255 and 0.2 < images.float().mean().item() / 255 < 0.4


# ---- pieces of the experiment ----------------------------------------------------------------------------


def _fake_data(n_train=300, n_test=50, classes=10):
    return {
        "train_images": torch.randint(0, 256, (n_train, 4, 4), dtype=torch.uint8),
        "train_labels": torch.randint(0, classes, (n_train,)),
        "test_images": torch.randint(0, 256, (n_test, 4, 4), dtype=torch.uint8),
        "test_labels": torch.arange(n_test) % classes,
    }


def test_symmetric_label_noise_flips_the_stated_fraction_to_other_classes_and_nests():
    preset = Preset("test", train_size=200, holdout_size=50, hidden=(), epochs=1, batch_size=32, lr=1e-3)
    split = make_split(_fake_data(), preset, seed=3, device=torch.device("cpu"))
    clean = torch.cat([split.train_y_clean, split.holdout_y_clean])

    flipped = {}
    for rate in (0.0, 0.2, 0.4):
        train, holdout = split.noisy_labels(rate)
        noisy = torch.cat([train, holdout])
        changed = noisy != clean
        assert int(changed.sum()) == round(rate * 250)
        assert ((noisy >= 0) & (noisy < 10)).all()
        flipped[rate] = set(changed.nonzero().flatten().tolist())
    assert flipped[0.2] <= flipped[0.4]
    assert not flipped[0.0]


def test_temperature_fit_recovers_the_temperature_that_generated_the_labels():
    true_temperature = 2.5
    logits = 3 * torch.randn(10000, 10, dtype=torch.float64)
    labels = torch.multinomial((logits / true_temperature).softmax(-1), 1).squeeze(1)
    fitted = fit_temperature(logits.float(), labels)
    assert abs(fitted - true_temperature) < 0.1 * true_temperature


def test_reliability_bins_reproduce_torchmetrics_ece():
    logits = 4 * torch.randn(3000, 10)
    labels = torch.randint(0, 10, (3000,))
    labels[:1500] = logits[:1500].argmax(-1)  # half right, so bins hold both kinds
    bins = reliability_bins(logits, labels)
    ours = sum(abs(c - k) for c, k in zip(bins["confidence_sum"], bins["correct_sum"])) / 3000
    reference = MulticlassCalibrationError(num_classes=10, n_bins=NUM_BINS, norm="l1")(logits.softmax(-1), labels)
    assert sum(bins["count"]) == 3000
    assert ours == pytest.approx(float(reference), abs=1e-5)


def _fake_result(eps, noise, eces, accuracy=0.8, confidence=0.8):
    runs = [
        {"seed": i, "temperature": 1.0,
         "before": {"accuracy": accuracy, "nll": 0.5, "ece": e, "confidence": confidence},
         "after_ts": {"accuracy": accuracy, "nll": 0.5, "ece": 0.01, "confidence": accuracy}}
        for i, e in enumerate(eces)
    ]
    summary = {stage: {m: {"mean": statistics.fmean(r[stage][m] for r in runs), "std": 0.0}
                       for m in ("accuracy", "nll", "ece", "confidence")} for stage in ("before", "after_ts")}
    summary["temperature"] = {"mean": 1.0, "std": 0.0}
    return {"setting": {"label_smoothing": eps, "convention": "uniform" if eps else "none", "noise": noise},
            "summary": summary, "runs": runs}


def test_outcome_says_when_smoothing_made_calibration_worse():
    results = [_fake_result(0.0, 0.0, [0.01, 0.02, 0.015]), _fake_result(0.1, 0.0, [0.05, 0.01, 0.06], 0.8, 0.7)]
    sentences = outcome(results)
    # the mean got worse but one seed disagrees: reported per comparison, not counted as "in every seed"
    assert "raised it (worse calibration) in every seed in 0" in sentences[0]
    assert "ECE 0.015 -> 0.040 (worse in 2/3 seeds)" in sentences[1]
    consistent = outcome([_fake_result(0.0, 0.0, [0.01, 0.02]), _fake_result(0.1, 0.0, [0.05, 0.03])])
    assert "raised it (worse calibration) in every seed in 1" in consistent[0]
    assert "ECE 0.015 -> 0.040 (worse in 2/2 seeds)" in consistent[1]
    assert "under-confident by 10.0 points" in sentences[1]


def test_outcome_without_an_unsmoothed_baseline_says_there_is_no_comparison():
    assert outcome([_fake_result(0.1, 0.0, [0.05, 0.05])])[0].startswith("No comparison")


# ---- the command end to end ------------------------------------------------------------------------------

SMALL = ["--train-size", "600", "--holdout-size", "400", "--hidden", "32", "--epochs", "2", "--batch-size", "64",
         "--seeds", "2", "--noise", "0,0.4", "--smoothing", "0,0.1", "--convention", "both", "--threads", "1",
         "--no-progress"]


@pytest.fixture(scope="module")
def small_run(fashion_mnist_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    status = cli.main(["--data", fashion_mnist_dir, "--out", str(out), *SMALL])
    return status, out, json.loads((out / "results.json").read_text())


def test_demo_writes_its_json_and_figure(small_run):
    status, out, report = small_run
    assert status == 0
    assert report["schema"] == "fused_ls.demo/1"
    assert report["command"].startswith("python -m fused_ls demo --data")
    assert (out / "reliability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["runtime_seconds"] > 0
    assert {"torch", "backend", "threads", "date_utc"} <= set(report["environment"])


def test_demo_runs_every_setting_for_every_seed_with_sane_numbers(small_run):
    _, _, report = small_run
    names = [r["setting"]["name"] for r in report["results"]]
    # label smoothing 0 runs once per noise level: its two conventions are the same loss
    assert names == [f"{ls}, noise {n}" for n in ("0%", "40%")
                     for ls in ("no smoothing", "LS 0.1 (uniform)", "LS 0.1 (others)")]
    for result in report["results"]:
        assert [run["seed"] for run in result["runs"]] == [0, 1]
        for run in result["runs"]:
            before, after = run["before"], run["after_ts"]
            assert before["accuracy"] > 0.3  # chance is 0.1
            assert before["accuracy"] == after["accuracy"]  # a temperature never changes the argmax
            for stage in (before, after):
                assert 0 <= stage["ece"] <= 1 and stage["nll"] > 0 and 0.1 <= stage["confidence"] <= 1
            assert run["temperature"] > 0
        for stage in ("before", "after_ts"):
            bins = result["reliability"][stage]
            assert len(bins["count"]) == NUM_BINS and sum(bins["count"]) == 2 * 10000
            stats = result["summary"][stage]["ece"]
            assert stats["mean"] == pytest.approx(statistics.fmean(r[stage]["ece"] for r in result["runs"]))
    assert report["table_markdown"].count("\n") == len(names) + 1
    assert len(report["outcome"]) == 1 + 4 and "ECE" in report["outcome"][1]


def test_demo_on_another_folder_of_idx_files(tmp_path):
    # Plain (not gzipped) files under --data; images that carry their class, so the model can learn.
    labels = {"train": torch.arange(500) % 10, "test": torch.arange(200) % 10}
    for split, y in labels.items():
        images = torch.randint(0, 60, (y.numel(), 8, 8), dtype=torch.uint8)
        images[torch.arange(y.numel()), y // 8 + 2, y % 8] = 255
        (tmp_path / FASHION_MNIST_FILES[f"{split}_images"]).write_bytes(idx_bytes(images))
        (tmp_path / FASHION_MNIST_FILES[f"{split}_labels"]).write_bytes(idx_bytes(y.to(torch.uint8)))
    argv = ["--data", str(tmp_path), "--out", str(tmp_path / "out"), "--train-size", "300", "--holdout-size", "200",
            "--hidden", "none", "--epochs", "10", "--batch-size", "50", "--lr", "0.05", "--seeds", "2", "--noise", "0",
            "--threads", "1", "--no-progress"]

    assert cli.main(argv) == 0
    report = json.loads((tmp_path / "out" / "results.json").read_text())
    assert all(run["before"]["accuracy"] > 0.9 for r in report["results"] for run in r["runs"])


def test_demo_without_the_data_explains_how_to_get_it_and_fails(tmp_path, capsys):
    assert cli.main(["--data", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "apt-get install dataset-fashion-mnist" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_default_presets_fit_the_60000_training_images():
    for preset in PRESETS.values():
        assert preset.train_size + preset.holdout_size <= 60000


@pytest.mark.parametrize("bad", [["--seeds", "1"], ["--smoothing", "1.0"], ["--noise", "-0.1"], ["--hidden", "0"]])
def test_demo_rejects_bad_options(bad, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(bad)
    assert info.value.code == 2
    assert "error" in capsys.readouterr().err
