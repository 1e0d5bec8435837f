"""Every Triton kernel configuration the launchers and the tuner can choose compiles for sm_80,
sm_90 and sm_100 through Triton's real pipeline and ptxas, with no GPU, and none spills more
than a few bytes a thread (tests/triton_targets.py, SPILL_LIMIT, says why a few).

The interpreter that runs the other Triton tests forgives what a GPU compiler does not
(register pressure, unsupported operations), so this compiles for real. One subprocess per
architecture, without TRITON_INTERPRET (tests/triton_targets.py says how).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernels compile and run for real")
SCRIPT = Path(__file__).with_name("triton_targets.py")
# Every launch kind, feature set and specialisation within CI's minutes: float16 compiles as
# bfloat16 does but for its conversions, and 32000 and 256000 share 128256's specialisation (a
# multiple of 16) but for the split launch's segment count. `python tests/triton_targets.py`
# with no options compiles them all (docs/triton-resources.md).
SCOPE = ["--dtypes", "bfloat16", "float32", "--vocabularies", "1000", "4096", "16384", "50257", "128256"]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """arch -> (exit code, output, resource rows), the three architectures compiled side by side."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton_cache"))
    runs = {}
    for arch in (80, 90, 100):
        out = tmp_path_factory.mktemp(f"sm{arch}") / "resources.json"
        process = subprocess.Popen([sys.executable, str(SCRIPT), "--arch", str(arch), "--json", str(out), *SCOPE],
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        runs[arch] = (process, out)
    results = {}
    for arch, (process, out) in runs.items():
        output, _ = process.communicate(timeout=1200)
        rows = json.loads(out.read_text()) if out.exists() else []
        results[arch] = (process.returncode, output, rows)
    return results


@pytest.mark.parametrize("arch", [80, 90, 100])
def test_every_launch_configuration_compiles_without_spilling_registers(compiled, arch):
    returncode, output, rows = compiled[arch]
    assert returncode == 0, output[-6000:]
    kernels = {row["kernel"].split(" ")[0] for row in rows}
    assert {"smoothed_xent_fwd_kernel", "smoothed_xent_split_kernel", "given_lse_kernel", "scale_rows_kernel",
            "compensated_add_kernel"} <= kernels
    from triton_targets import SPILL_LIMIT

    assert all(row["spill_stores"] <= SPILL_LIMIT and row["spill_loads"] <= SPILL_LIMIT for row in rows)
    # Every kind of launch was compiled, the cooperative one included.
    launches = " ".join(row["kernel"] for row in rows)
    assert "PERSISTENT=1" in launches and "PHASE=0" in launches and "SINGLE_PASS=1" in launches


@pytest.mark.parametrize("arch", [80, 90])
def test_every_row_is_read_and_written_with_16_byte_accesses_whatever_its_length(compiled, arch):
    """V = 1000 or 50257 (not a multiple of 16): the fused kernel reads and writes an aligned body
    of 16-byte vectors, and element by element only the target's logit and the edges (one load,
    one store), as for V = 4096."""
    _, _, rows = compiled[arch]
    fused = [row for row in rows if row["kernel"].startswith("smoothed_xent_fwd_kernel")]
    assert any("ALIGN=1" in row["kernel"] for row in fused) and any("ALIGN=0" in row["kernel"] for row in fused)
    for row in fused:
        assert row["wide_accesses"] >= 1, row["kernel"]
        if " bf16 " in row["kernel"]:
            assert row["b16_accesses"] <= 3, (row["kernel"], row["b16_accesses"])
