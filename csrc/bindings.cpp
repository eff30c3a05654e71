// Python bindings of m2dino_kernels._C. The kernels live in routing_cpu.cpp, experts_cpu.cpp
// and kernels.cu; this file declares them and binds one entry point per protocol function
// that dispatches on the device of x.
#include <torch/extension.h>

#include "common.h"

namespace m2dino {

std::vector<at::Tensor> route_forward_cpu(const at::Tensor& x, const at::Tensor& task_ids,
                                          const at::Tensor& gate_weight,
                                          const std::optional<at::Tensor>& gate_bias,
                                          int64_t top_k);
std::vector<std::optional<at::Tensor>> route_backward_cpu(
    const at::Tensor& grad_logits, const at::Tensor& grad_probs, const at::Tensor& grad_weights,
    const at::Tensor& x, const at::Tensor& task_ids, const at::Tensor& gate_weight,
    bool has_bias, const at::Tensor& probs, const at::Tensor& weights, const at::Tensor& experts);
std::vector<at::Tensor> experts_forward_cpu(const at::Tensor& x, const at::Tensor& weights,
                                            const at::Tensor& experts, const at::Tensor& sorted_slots,
                                            const at::Tensor& offsets, const at::Tensor& fc1_w,
                                            const at::Tensor& fc1_b, const at::Tensor& fc2_w,
                                            const at::Tensor& fc2_b, const std::string& activation);
std::vector<at::Tensor> experts_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weights,
    const at::Tensor& experts, const at::Tensor& sorted_slots, const at::Tensor& offsets,
    const at::Tensor& fc1_w, const at::Tensor& fc1_b, const at::Tensor& fc2_w,
    const at::Tensor& fc2_b, const std::string& activation, const at::Tensor& h_pre,
    const at::Tensor& expert_out);

#ifdef M2DINO_WITH_CUDA
std::vector<at::Tensor> route_forward_cuda(const at::Tensor& x, const at::Tensor& task_ids,
                                           const at::Tensor& gate_weight,
                                           const std::optional<at::Tensor>& gate_bias,
                                           int64_t top_k);
std::vector<std::optional<at::Tensor>> route_backward_cuda(
    const at::Tensor& grad_logits, const at::Tensor& grad_probs, const at::Tensor& grad_weights,
    const at::Tensor& x, const at::Tensor& task_ids, const at::Tensor& gate_weight,
    bool has_bias, const at::Tensor& probs, const at::Tensor& weights, const at::Tensor& experts);
std::vector<at::Tensor> experts_forward_cuda(const at::Tensor& x, const at::Tensor& weights,
                                             const at::Tensor& experts, const at::Tensor& sorted_slots,
                                             const at::Tensor& offsets, const at::Tensor& fc1_w,
                                             const at::Tensor& fc1_b, const at::Tensor& fc2_w,
                                             const at::Tensor& fc2_b, const std::string& activation);
std::vector<at::Tensor> experts_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weights,
    const at::Tensor& experts, const at::Tensor& sorted_slots, const at::Tensor& offsets,
    const at::Tensor& fc1_w, const at::Tensor& fc1_b, const at::Tensor& fc2_w,
    const at::Tensor& fc2_b, const std::string& activation, const at::Tensor& h_pre,
    const at::Tensor& expert_out);
#endif

namespace {

// Which implementation runs: the device of x (the checks inside each implementation make
// sure every other tensor is on that device too).
bool on_cuda(const at::Tensor& x) {
  TORCH_CHECK(x.defined(), "x is undefined");
  if (x.device().is_cpu()) return false;
#ifdef M2DINO_WITH_CUDA
  if (x.device().is_cuda()) return true;
#endif
  TORCH_CHECK(false, "m2dino_kernels._C has no kernels for ", x.device(), " tensors",
#ifdef M2DINO_WITH_CUDA
              ""
#else
              " (this build has no CUDA kernels)"
#endif
  );
}

#ifdef M2DINO_WITH_CUDA
#define M2DINO_DISPATCH(x, name, ...) \
  (on_cuda(x) ? name##_cuda(__VA_ARGS__) : name##_cpu(__VA_ARGS__))
#else
#define M2DINO_DISPATCH(x, name, ...) (on_cuda(x), name##_cpu(__VA_ARGS__))
#endif

std::vector<at::Tensor> route_forward(const at::Tensor& x, const at::Tensor& task_ids,
                                      const at::Tensor& gate_weight,
                                      const std::optional<at::Tensor>& gate_bias, int64_t top_k) {
  return M2DINO_DISPATCH(x, route_forward, x, task_ids, gate_weight, gate_bias, top_k);
}

std::vector<std::optional<at::Tensor>> route_backward(
    const at::Tensor& grad_logits, const at::Tensor& grad_probs, const at::Tensor& grad_weights,
    const at::Tensor& x, const at::Tensor& task_ids, const at::Tensor& gate_weight,
    bool has_bias, const at::Tensor& probs, const at::Tensor& weights, const at::Tensor& experts) {
  return M2DINO_DISPATCH(x, route_backward, grad_logits, grad_probs, grad_weights, x, task_ids,
                         gate_weight, has_bias, probs, weights, experts);
}

std::vector<at::Tensor> experts_forward(const at::Tensor& x, const at::Tensor& weights,
                                        const at::Tensor& experts, const at::Tensor& sorted_slots,
                                        const at::Tensor& offsets, const at::Tensor& fc1_w,
                                        const at::Tensor& fc1_b, const at::Tensor& fc2_w,
                                        const at::Tensor& fc2_b, const std::string& activation) {
  return M2DINO_DISPATCH(x, experts_forward, x, weights, experts, sorted_slots, offsets, fc1_w,
                         fc1_b, fc2_w, fc2_b, activation);
}

std::vector<at::Tensor> experts_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weights,
    const at::Tensor& experts, const at::Tensor& sorted_slots, const at::Tensor& offsets,
    const at::Tensor& fc1_w, const at::Tensor& fc1_b, const at::Tensor& fc2_w,
    const at::Tensor& fc2_b, const std::string& activation, const at::Tensor& h_pre,
    const at::Tensor& expert_out) {
  return M2DINO_DISPATCH(x, experts_backward, grad_y, x, weights, experts, sorted_slots, offsets,
                         fc1_w, fc1_b, fc2_w, fc2_b, activation, h_pre, expert_out);
}

}  // namespace
}  // namespace m2dino

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "m2dino fused MoE kernels (CPU, and CUDA when built with it)";
#ifdef M2DINO_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  using namespace pybind11::literals;
  // The kernels touch no Python object: release the GIL while they run.
  const auto no_gil = pybind11::call_guard<pybind11::gil_scoped_release>();
  m.def("route_forward", &m2dino::route_forward, no_gil,
        "Task-conditioned top-k routing: (logits, probs, weights, experts, counts, "
        "sorted_slots, offsets)",
        "x"_a, "task_ids"_a, "gate_weight"_a, "gate_bias"_a, "top_k"_a);
  m.def("route_backward", &m2dino::route_backward, no_gil,
        "Routing backward: (grad_x, grad_gate_weight, grad_gate_bias or None)",
        "grad_logits"_a, "grad_probs"_a, "grad_weights"_a, "x"_a, "task_ids"_a,
        "gate_weight"_a, "has_bias"_a, "probs"_a, "weights"_a, "experts"_a);
  m.def("experts_forward", &m2dino::experts_forward, no_gil,
        "Grouped expert MLP forward: (y, h_pre, expert_out)", "x"_a, "weights"_a, "experts"_a,
        "sorted_slots"_a, "offsets"_a, "fc1_w"_a, "fc1_b"_a, "fc2_w"_a, "fc2_b"_a,
        "activation"_a);
  m.def("experts_backward", &m2dino::experts_backward, no_gil,
        "Grouped expert MLP backward: (grad_x, grad_weights, grad_fc1_w, grad_fc1_b, "
        "grad_fc2_w, grad_fc2_b)",
        "grad_y"_a, "x"_a, "weights"_a, "experts"_a, "sorted_slots"_a, "offsets"_a, "fc1_w"_a,
        "fc1_b"_a, "fc2_w"_a, "fc2_b"_a, "activation"_a, "h_pre"_a, "expert_out"_a);
}
