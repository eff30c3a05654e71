"""m2dino_kernels: fused task-conditioned MoE routing, grouped expert MLPs and RoPE attention.

Every op has a plain PyTorch reference (the oracle) and faster backends behind one API.
"""
