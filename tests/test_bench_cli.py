"""`python -m fused_ls bench` end to end on a tiny case: outputs, schema, the correctness gate,
which cases run by default and with --full, and the table printed as it is measured.

No timing is asserted: these prove the report is produced and that a provider whose
numbers differ from eager is caught and not timed.
"""

import json

import pytest
import torch

from fused_ls import available_backends, smoothed_xent
from fused_ls.bench import cases, cli, xent
from fused_ls.bench.xent import Provider

RESULT_KEYS = {"case", "rows", "classes", "dtype", "provider", "mode", "bytes", "median_ms", "times_ms", "gbps",
               "copy_gbps", "pct_of_copy", "peak_extra_bytes", "peak_extra_vs_logits", "memory_method",
               "speedup_vs_eager", "memory_vs_eager", "check", "error"}


def _register(monkeypatch, name, make_loss, overwrites_input=False):
    provider = Provider(name, "test provider", overwrites_input, lambda device: None, make_loss)
    monkeypatch.setitem(xent.PROVIDERS, name, provider)


def _run(tmp_path, shapes, providers, *extra):
    argv = ["--device", "cpu", "--shapes", shapes, "--providers", ",".join(providers),
            "--repeats", "2", "--warmup", "1", "--seed", "1", "--out", str(tmp_path), *extra]
    status = cli.main(argv)
    return status, json.loads((tmp_path / "bench.json").read_text())


def test_report_is_written_with_checked_results(tmp_path):
    fused = [b for b in ("native",) if b in available_backends("cpu")]
    providers = ["eager"] + fused + [f"{b}-inplace" for b in fused]
    status, doc = _run(tmp_path, "8x1000:fp32", providers)

    assert status == 0
    assert doc["schema"] == "fused_ls.bench/1" and doc["complete"]
    for key in ("date", "device", "device_name", "torch", "triton", "fused_ls"):
        assert key in doc["env"]
    assert doc["settings"]["providers"] == providers
    assert [c["case"] for c in doc["copy"]] == ["8x1000:fp32"]
    assert len(doc["results"]) == len(providers) * 2  # providers x modes
    for r in doc["results"]:
        assert RESULT_KEYS <= r.keys()
        assert r["error"] is None, r
        assert r["check"]["ok"], r
        assert r["check"]["grad_rel_err"] <= r["check"]["tolerance"]
        assert len(r["times_ms"]) == 2 and r["median_ms"] > 0
        assert r["bytes"] == 8 * 1000 * 4 * (2 if r["mode"] == "fwd+bwd" else 1)
        assert r["speedup_vs_eager"] > 0
        assert r["peak_extra_bytes"] is not None and r["peak_extra_bytes"] >= 0, r.get("memory_error")
    assert (tmp_path / "bench.png").stat().st_size > 0
    assert "| 8x1000:fp32 | fwd+bwd | eager |" in (tmp_path / "bench.md").read_text()


def _clobbering_loss(eps):
    """Eager's loss, after which the provider scribbles over its input, as in-place kernels do."""

    def loss(x, t):
        value = torch.nn.functional.cross_entropy(x, t, label_smoothing=eps)
        x.detach().fill_(float("nan"))
        return value

    return loss


def test_providers_that_agree_with_eager_pass_and_one_that_overwrites_its_input_disturbs_none(tmp_path, monkeypatch):
    _register(monkeypatch, "clobbering", _clobbering_loss, overwrites_input=True)
    _register(monkeypatch, "clobbering-too", _clobbering_loss, overwrites_input=True)  # shares the scratch copy
    _register(monkeypatch, "fused-reference", lambda eps: lambda x, t: smoothed_xent(x, t, eps, backend="torch"))
    status, doc = _run(tmp_path, "8x1000,4x3000", ["eager", "clobbering", "clobbering-too", "fused-reference"], "--dtypes", "fp32,bf16",
                       "--no-memory", "--no-plot")

    assert status == 0
    assert [c["case"] for c in doc["copy"]] == ["8x1000:fp32", "4x3000:fp32", "8x1000:bf16", "4x3000:bf16"]
    for name in ("clobbering", "clobbering-too", "fused-reference"):
        checked = [r for r in doc["results"] if r["provider"] == name]
        assert len(checked) == 8 and all(r["check"]["ok"] and r["median_ms"] > 0 for r in checked)


def test_provider_that_disagrees_with_eager_fails_its_check_and_is_not_timed(tmp_path, monkeypatch):
    _register(monkeypatch, "wrong-smoothing",
              lambda eps: lambda x, t: torch.nn.functional.cross_entropy(x, t, label_smoothing=eps + 0.05))
    status, doc = _run(tmp_path, "8x1000:fp32", ["eager", "wrong-smoothing"], "--no-memory", "--no-plot")

    assert status == 1
    wrong = [r for r in doc["results"] if r["provider"] == "wrong-smoothing"]
    assert wrong and all(not r["check"]["ok"] and r["median_ms"] is None and r["error"] for r in wrong)
    assert all(r["check"]["ok"] for r in doc["results"] if r["provider"] == "eager")


@pytest.mark.parametrize("argv", [["--shapes", "4096"], ["--providers", "nonesuch"], ["--modes", "backward"]])
def test_bad_options_are_refused(tmp_path, argv):
    assert cli.main([*argv, "--out", str(tmp_path)]) == 2


@pytest.mark.skipif("native" not in available_backends("cpu"), reason="needs the native backend")
def test_eval_mode_measures_the_no_grad_forward_which_holds_no_gradient(tmp_path):
    status, doc = _run(tmp_path, "256x20000:fp32", ["eager", "native"], "--modes", "eval", "--no-plot")
    assert status == 0
    rows = {r["provider"]: r for r in doc["results"]}
    assert set(rows) == {"eager", "native"} and all(r["mode"] == "eval" for r in rows.values())
    for r in rows.values():
        assert r["error"] is None and r["check"]["ok"], r
        assert r["bytes"] == 256 * 20000 * 4  # the logits read once
    # eager's log_softmax is a logits-sized temporary; the loss-only kernel allocates none
    assert rows["eager"]["peak_extra_vs_logits"] > 0.75, rows["eager"]
    assert rows["native"]["peak_extra_vs_logits"] < 0.25, rows["native"]


def _fake_measurements(monkeypatch) -> list[str]:
    """Replace the measuring in the CLI by nothing; returns the list the cases run are added to."""
    ran = []

    def run_case(case, providers, modes, device, **kwargs):
        ran.append(case.name)
        return None, []

    monkeypatch.setattr(cli, "run_case", run_case)
    monkeypatch.setattr(cli, "copy_ceiling", lambda device, nbytes: {"gbps": 1.0, "what": "fake", "bytes_per_copy": 1})
    return ran


@pytest.mark.parametrize("extra, expected", [
    ([], cases.CPU_DEFAULT),
    (["--full"], cases.CPU_FULL),
    (["--full", "--dtypes", "bf16"], [c.split(":")[0] + ":bf16" for c in cases.CPU_FULL]),
    (["--full", "--shapes", "8x1000:fp32"], ["8x1000:fp32"]),  # --shapes replaces either set
])
def test_the_default_set_is_a_short_representative_run_and_full_selects_the_whole_table(tmp_path, monkeypatch, extra,
                                                                                         expected):
    ran = _fake_measurements(monkeypatch)
    status = cli.main(["--device", "cpu", "--providers", "eager", "--no-plot", "--out", str(tmp_path), *extra])
    doc = json.loads((tmp_path / "bench.json").read_text())

    assert status == 0
    assert ran == list(expected) == doc["settings"]["cases"]
    assert doc["settings"]["full"] == ("--full" in extra)


def test_the_full_table_holds_more_and_larger_cases_than_the_default_set():
    default, full = cases.default_cases("cpu"), cases.default_cases("cpu", full=True)
    assert len(default) < len(full) and sum(c.numel for c in default) < sum(c.numel for c in full) / 2
    assert {c.dtype for c in default} == {"fp32", "bf16"}  # both dtypes the full table has
    for device in ("cpu", "cuda"):
        assert len(cases.default_cases(device)) < len(cases.default_cases(device, full=True))


def test_rows_are_printed_as_each_case_is_measured(tmp_path, monkeypatch, capsys):
    measure_case = cli.run_case
    printed_before = {}

    def run_case(case, *args, **kwargs):
        printed_before[case.name] = capsys.readouterr().out
        return measure_case(case, *args, **kwargs)

    monkeypatch.setattr(cli, "run_case", run_case)
    status, doc = _run(tmp_path, "8x1000:fp32,4x3000:fp32", ["eager"], "--no-memory", "--no-plot")
    printed_after = capsys.readouterr().out

    assert status == 0 and doc["complete"]
    header, first_case, second_case = printed_before["8x1000:fp32"], printed_before["4x3000:fp32"], printed_after
    assert "median ms" in header and "8x1000:fp32" not in header  # the table's head, before any case
    assert "8x1000:fp32  fwd+bwd  eager" in first_case and "4x3000:fp32" not in first_case
    assert "4x3000:fp32  fwd+bwd  eager" in second_case and "8x1000:fp32  fwd " not in second_case
    # the rows printed one case at a time line up with the head printed first
    head = next(line for line in header.splitlines() if "median ms" in line)
    for line in (first_case + second_case).splitlines():
        if " eager " in line:
            assert line.index("eager") == head.index("provider"), (head, line)
            assert line.rstrip().endswith("reference")


def test_vocab_parallel_bench_times_every_backend_on_a_tiny_case():
    from fused_ls.bench import vocab_parallel

    result = vocab_parallel.measure(rows=8, vocab=64, world=2, backends=("native", "torch"), warmup=0, repeats=1)
    assert set(result["parallel_s"]) == set(result["single_s"]) and result["single_s"]
    assert all(seconds > 0 for seconds in result["parallel_s"].values())
    assert "parallel / single" in vocab_parallel.table(result)
