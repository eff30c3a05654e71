// Shared argument checks and helpers of the m2dino_kernels._C sources (CPU and CUDA).
// Every entry point TORCH_CHECKs what it assumes, so a misuse from Python raises a
// RuntimeError naming the argument instead of reading out of bounds.
#pragma once
// ATen only (not torch/extension.h): kernels.cu includes this too, and the pybind/Python
// headers would slow nvcc down and warn.
#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <vector>

namespace m2dino {

inline void check_tensor(const at::Tensor& t, const char* name, int64_t dim,
                         const at::Device& device) {
  TORCH_CHECK(t.defined(), name, " is undefined");
  TORCH_CHECK(t.dim() == dim, name, " must be ", dim, "-D, got shape ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous (shape ", t.sizes(), ", strides ",
              t.strides(), ")");
  TORCH_CHECK(t.device() == device, name, " is on ", t.device(), " but x is on ", device);
}

inline void check_shape(const at::Tensor& t, const char* name, at::IntArrayRef expected) {
  TORCH_CHECK(t.sizes() == expected, name, " must have shape ", expected, ", got ", t.sizes());
}

inline void check_dtype(const at::Tensor& t, const char* name, at::ScalarType dtype) {
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
}

inline void check_float_input(const at::Tensor& x) {
  auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf,
              "x must be float32, float64, bfloat16 or float16, got ", dt);
}

// Routing outputs (logits, probs, weights) and their gradients: fp32, or fp64 for fp64
// inputs (so the whole chain can be gradchecked).
inline at::ScalarType routing_dtype(at::ScalarType input) {
  return input == at::kDouble ? at::kDouble : at::kFloat;
}

enum class Activation { kGelu, kSwiglu };

inline Activation parse_activation(const std::string& name) {
  if (name == "gelu") return Activation::kGelu;
  if (name == "swiglu") return Activation::kSwiglu;
  TORCH_CHECK(false, "activation must be 'gelu' or 'swiglu', got '", name, "'");
}

// The checks shared by experts_forward/backward on any device. Returns H1 (fc1 rows).
inline void check_expert_args(const at::Tensor& x, const at::Tensor& weights,
                              const at::Tensor& experts, const at::Tensor& sorted_slots,
                              const at::Tensor& offsets, const at::Tensor& fc1_w,
                              const at::Tensor& fc1_b, const at::Tensor& fc2_w,
                              const at::Tensor& fc2_b, Activation act) {
  check_float_input(x);
  const auto dev = x.device();
  check_tensor(x, "x", 2, dev);
  check_tensor(weights, "weights", 2, dev);
  check_tensor(experts, "experts", 2, dev);
  check_tensor(sorted_slots, "sorted_slots", 1, dev);
  check_tensor(offsets, "offsets", 1, dev);
  check_tensor(fc1_w, "fc1_w", 3, dev);
  check_tensor(fc1_b, "fc1_b", 2, dev);
  check_tensor(fc2_w, "fc2_w", 3, dev);
  check_tensor(fc2_b, "fc2_b", 2, dev);
  const int64_t T = x.size(0), D = x.size(1), k = weights.size(1);
  const int64_t E = fc1_w.size(0), H1 = fc1_w.size(1);
  TORCH_CHECK(k >= 1 && k <= E, "weights must have shape [T, k] with 1 <= k <= E = ", E,
              ", got ", weights.sizes());
  TORCH_CHECK(act == Activation::kGelu || H1 % 2 == 0,
              "swiglu needs an even fc1 output size H1, got fc1_w ", fc1_w.sizes());
  const int64_t H = act == Activation::kSwiglu ? H1 / 2 : H1;
  check_shape(weights, "weights", {T, k});
  check_shape(experts, "experts", {T, k});
  check_shape(sorted_slots, "sorted_slots", {T * k});
  check_shape(offsets, "offsets", {E + 1});
  check_shape(fc1_w, "fc1_w", {E, H1, D});
  check_shape(fc1_b, "fc1_b", {E, H1});
  check_shape(fc2_w, "fc2_w", {E, D, H});
  check_shape(fc2_b, "fc2_b", {E, D});
  check_dtype(weights, "weights", routing_dtype(x.scalar_type()));
  check_dtype(experts, "experts", at::kLong);
  check_dtype(sorted_slots, "sorted_slots", at::kLong);
  check_dtype(offsets, "offsets", at::kLong);
  for (auto* p : {&fc1_w, &fc1_b, &fc2_w, &fc2_b}) {
    TORCH_CHECK(p->scalar_type() == x.scalar_type(), "expert weights must have x's dtype ",
                x.scalar_type(), ", got ", p->scalar_type());
  }
}

// The incoming gradient and saved tensors of experts_backward on any device: grad_y [T, D],
// h_pre [N, H1] and expert_out [N, D] (N = T*k), all in x's dtype on x's device.
inline void check_expert_backward_args(const at::Tensor& x, const at::Tensor& grad_y,
                                       const at::Tensor& h_pre, const at::Tensor& expert_out,
                                       int64_t N, int64_t H1) {
  const int64_t T = x.size(0), D = x.size(1);
  const auto check_2d = [&](const at::Tensor& t, const char* name, at::IntArrayRef shape) {
    check_tensor(t, name, 2, x.device());
    check_shape(t, name, shape);
    check_dtype(t, name, x.scalar_type());
  };
  check_2d(grad_y, "grad_y", {T, D});
  check_2d(h_pre, "h_pre", {N, H1});
  check_2d(expert_out, "expert_out", {N, D});
}

// Host copy of the expert offsets [E+1] after checking that they partition [0, num_rows)
// (on CUDA this is the one device-to-host sync of the per-expert GEMM loop, the fallback
// where at::_grouped_mm cannot take the offsets on the device).
inline std::vector<int64_t> host_expert_bounds(const at::Tensor& offsets, int64_t num_rows) {
  const auto cpu = offsets.to(at::kCPU);
  const int64_t* off = cpu.data_ptr<int64_t>();
  std::vector<int64_t> bounds(off, off + cpu.numel());
  TORCH_CHECK(bounds.front() == 0 && bounds.back() == num_rows,
              "offsets must start at 0 and end at T*k = ", num_rows, ", got ", bounds.front(),
              " and ", bounds.back());
  for (size_t e = 0; e + 1 < bounds.size(); ++e) {
    TORCH_CHECK(bounds[e] <= bounds[e + 1], "offsets must be non-decreasing, got offsets[", e,
                "] = ", bounds[e], " > offsets[", e + 1, "] = ", bounds[e + 1]);
  }
  return bounds;
}

// The checks shared by route_forward on any device (task-id range is checked per device).
inline void check_route_args(const at::Tensor& x, const at::Tensor& task_ids,
                             const at::Tensor& gate_weight,
                             const std::optional<at::Tensor>& gate_bias, int64_t top_k) {
  check_float_input(x);
  const auto dev = x.device();
  check_tensor(x, "x", 2, dev);
  check_tensor(task_ids, "task_ids", 1, dev);
  check_tensor(gate_weight, "gate_weight", 3, dev);
  check_dtype(task_ids, "task_ids", at::kLong);
  check_dtype(gate_weight, "gate_weight", x.scalar_type());
  const int64_t T = x.size(0), D = x.size(1);
  const int64_t NT = gate_weight.size(0), E = gate_weight.size(1);
  check_shape(task_ids, "task_ids", {T});
  TORCH_CHECK(gate_weight.size(2) == D, "gate_weight must have shape [num_tasks, E, D] with D = ",
              D, ", got ", gate_weight.sizes());
  TORCH_CHECK(NT >= 1 && E >= 1, "gate_weight needs at least one task and one expert, got ",
              gate_weight.sizes());
  TORCH_CHECK(top_k >= 1 && top_k <= E, "top_k must be in [1, E] = [1, ", E, "], got ", top_k);
  if (gate_bias.has_value()) {
    check_tensor(*gate_bias, "gate_bias", 2, dev);
    check_shape(*gate_bias, "gate_bias", {NT, E});
    check_dtype(*gate_bias, "gate_bias", x.scalar_type());
  }
}

inline void check_route_backward_args(const at::Tensor& grad_logits, const at::Tensor& grad_probs,
                                      const at::Tensor& grad_weights, const at::Tensor& x,
                                      const at::Tensor& task_ids, const at::Tensor& gate_weight,
                                      const at::Tensor& probs, const at::Tensor& weights,
                                      const at::Tensor& experts) {
  check_route_args(x, task_ids, gate_weight, std::nullopt, 1);
  const auto dev = x.device();
  const int64_t T = x.size(0), E = gate_weight.size(1);
  const auto rdt = routing_dtype(x.scalar_type());
  check_tensor(probs, "probs", 2, dev);
  check_tensor(weights, "weights", 2, dev);
  check_tensor(experts, "experts", 2, dev);
  const int64_t k = weights.size(1);
  TORCH_CHECK(k >= 1 && k <= E, "weights must have shape [T, k] with 1 <= k <= E = ", E,
              ", got ", weights.sizes());
  const std::pair<const at::Tensor*, const char*> te[] = {
      {&grad_logits, "grad_logits"}, {&grad_probs, "grad_probs"}, {&probs, "probs"}};
  for (const auto& [t, name] : te) {
    check_tensor(*t, name, 2, dev);
    check_shape(*t, name, {T, E});
    check_dtype(*t, name, rdt);
  }
  check_tensor(grad_weights, "grad_weights", 2, dev);
  check_shape(grad_weights, "grad_weights", {T, k});
  check_dtype(grad_weights, "grad_weights", rdt);
  check_shape(weights, "weights", {T, k});
  check_dtype(weights, "weights", rdt);
  check_shape(experts, "experts", {T, k});
  check_dtype(experts, "experts", at::kLong);
}

}  // namespace m2dino
