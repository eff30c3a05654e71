"""Triton kernels of m2dino_kernels (CUDA, or CPU tensors under TRITON_INTERPRET=1).

- routing.py       task-conditioned top-k routing (forward, backward) and the device
                   stable counting sort
- grouped_gemm.py  the expert GEMMs over expert-sorted rows, their tile configs and the
                   shared @triton.jit helpers (activation math, tile lookup, dot)
- moe.py           backend "triton": the kernel backend protocol over the two above
- attention.py     flash attention with DINOv3's RoPE fused into the q/k tile loads

Nothing is imported here, so importing this package does not import triton. Every module
imports the library with absolute imports (`import triton`): this package is
`m2dino_kernels.triton` and never shadows it.
"""
