"""The device's dense matmul rate, measured first in every run: the yardstick that the
expert GEMMs' achieved TFLOP/s are compared with (same device, same run)."""
import pytest
import torch
from harness import DEVICE

SIZES = {"cuda": [(8192, 8192, 8192)], "cpu": [(1024, 1024, 1024)]}
DTYPES = {"cuda": [torch.bfloat16], "cpu": [torch.float32]}


@pytest.mark.parametrize("dtype", DTYPES[DEVICE], ids=str)
@pytest.mark.parametrize("m,n,k", SIZES[DEVICE])
def test_matmul_peak(measure, m, n, k, dtype):
    a = torch.randn(m, k, device=DEVICE, dtype=dtype)
    b = torch.randn(k, n, device=DEVICE, dtype=dtype)
    measure("matmul_peak", f"{str(dtype)[6:]}_{m}", lambda: a @ b, flops=2.0 * m * n * k, rounds=10)
