"""Whether this Triton can compile for a CUDA target (its NVIDIA backend is installed): the
condition of the tests that compile kernels for sm_80/sm_90 without a GPU."""


def has_triton_cuda_backend() -> bool:
    try:
        from triton.backends import backends
    except ImportError:
        return False
    return "nvidia" in backends
