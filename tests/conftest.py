import os

import pytest
import torch

# Without a GPU the Triton kernels run on the CPU through Triton's interpreter; it must be
# chosen before triton is first imported (importing torch does not import triton).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fused_ls import available_backends  # noqa: E402

DEVICE = os.environ.get("FUSED_LS_TEST_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")
FUSED_BACKENDS = [b for b in available_backends(DEVICE) if b != "torch"]
ALL_BACKENDS = FUSED_BACKENDS + ["torch"]


@pytest.fixture(params=ALL_BACKENDS)
def backend(request):
    """Every backend that can run on the test device, the eager one included."""
    return request.param


@pytest.fixture(params=FUSED_BACKENDS)
def fused_backend(request):
    """Every fused kernel backend that can run on the test device."""
    return request.param


@pytest.fixture
def device():
    return torch.device(DEVICE)


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # Fresh inputs on every run, reproducible from the printed seed when a test fails.
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    print(f"torch.manual_seed({seed})")  # shown with the output of a failing test
    yield
