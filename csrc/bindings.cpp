// Python bindings of m2dino_kernels._C. The kernels live in routing_cpu.cpp, experts_cpu.cpp
// and kernels.cu; this file only declares and binds them.
#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "m2dino fused MoE kernels (CPU, and CUDA when built with it)";
#ifdef M2DINO_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
