// Grouped expert MLP on CPU. The rows of every expert are contiguous in the expert-sorted
// order, so each expert's two GEMMs are single ATen matmul calls (MKL/oneDNN inside) on
// slices of one gathered buffer; around them are fused, token-parallel passes: gather of x
// rows, the activation, and scale-by-router-weight + scatter-add, where each token sums its
// own k slots (no atomics).
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "common.h"

namespace m2dino {
namespace {

constexpr int64_t kRowGrain = 64;

// Splits [0, total) into one equal contiguous range per thread and runs fn(begin, end) on
// each inside ONE parallel region. The expert GEMMs are issued from inside it, so each is
// single-threaded: the FLOPs are balanced across threads whatever the expert sizes, and
// there is one barrier per phase instead of one per GEMM. (Measured on 2 busy cores: eight
// 2-thread MKL GEMMs of one expert each took 1.7x one big GEMM of the same FLOPs; the same
// GEMMs split this way cost what the big one does.)
template <typename Fn>
void parallel_ranges(int64_t total, const Fn& fn) {
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), total));
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    // ATen ops run here on OpenMP worker threads, which do not inherit the caller's dispatch
    // state: dispatch below autograd (these are a custom op's internals; out= ops would
    // otherwise refuse inputs that require grad) and without autocast. Copying the caller's
    // whole ThreadLocalState instead would also copy Python saved-tensor hooks (activation
    // checkpointing), whose refcounting needs the GIL: a deadlock.
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    for (int64_t c = begin; c < end; ++c) fn(total * c / chunks, total * (c + 1) / chunks);
  });
}

// Runs fn(e, row_begin, row_end) on every piece of every expert's rows, the rows split
// evenly across threads (see parallel_ranges).
template <typename Fn>
void for_each_expert_rows(const std::vector<int64_t>& bounds, const Fn& fn) {
  const int64_t num_experts = static_cast<int64_t>(bounds.size()) - 1;
  parallel_ranges(bounds.back(), [&](int64_t lo, int64_t hi) {
    for (int64_t e = 0; e < num_experts; ++e) {
      const int64_t begin = std::max(lo, bounds[e]), end = std::min(hi, bounds[e + 1]);
      if (begin < end) fn(e, begin, end);
    }
  });
}

// row_of_slot[s] = i where sorted_slots[i] = s; fails unless sorted_slots is a permutation.
at::Tensor invert_slots(const at::Tensor& sorted_slots) {
  const int64_t n = sorted_slots.numel();
  auto inverse = at::full({n}, -1, sorted_slots.options());
  const int64_t* src = sorted_slots.data_ptr<int64_t>();
  int64_t* inv = inverse.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    const int64_t s = src[i];
    TORCH_CHECK(s >= 0 && s < n, "sorted_slots[", i, "] = ", s, " is out of range [0, T*k) = [0, ",
                n, ")");
    TORCH_CHECK(inv[s] < 0, "sorted_slots is not a permutation: slot ", s, " appears twice");
    inv[s] = i;
  }
  return inverse;
}

// x_rows[i] = x[sorted_slots[i] / k]
at::Tensor gather_rows(const at::Tensor& x, const at::Tensor& sorted_slots, int64_t top_k) {
  const int64_t N = sorted_slots.numel(), D = x.size(1);
  auto rows = at::empty({N, D}, x.options());
  const int64_t* slots = sorted_slots.data_ptr<int64_t>();
  const size_t row_bytes = D * x.element_size();
  const char* src = static_cast<const char*>(x.data_ptr());
  char* dst = static_cast<char*>(rows.data_ptr());
  at::parallel_for(0, N, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      std::memcpy(dst + i * row_bytes, src + (slots[i] / top_k) * row_bytes, row_bytes);
    }
  });
  return rows;
}

template <typename scalar_t>
void swiglu_forward(const at::Tensor& h_pre, at::Tensor& act) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = act.size(0), H = act.size(1);
  const scalar_t* hp = h_pre.data_ptr<scalar_t>();
  scalar_t* out = act.data_ptr<scalar_t>();
  at::parallel_for(0, N, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const scalar_t* a = hp + i * 2 * H;
      const scalar_t* b = a + H;
      for (int64_t h = 0; h < H; ++h) {
        const acc_t av = a[h];
        out[i * H + h] = static_cast<scalar_t>(av / (acc_t(1) + std::exp(-av)) * acc_t(b[h]));
      }
    }
  });
}

template <typename scalar_t>
void swiglu_backward(const at::Tensor& grad_act, const at::Tensor& h_pre, at::Tensor& grad_h) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = grad_act.size(0), H = grad_act.size(1);
  const scalar_t* g = grad_act.data_ptr<scalar_t>();
  const scalar_t* hp = h_pre.data_ptr<scalar_t>();
  scalar_t* out = grad_h.data_ptr<scalar_t>();
  at::parallel_for(0, N, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      for (int64_t h = 0; h < H; ++h) {
        const acc_t a = hp[i * 2 * H + h], b = hp[i * 2 * H + H + h], gv = g[i * H + h];
        const acc_t sig = acc_t(1) / (acc_t(1) + std::exp(-a));
        out[i * 2 * H + h] = static_cast<scalar_t>(gv * b * sig * (acc_t(1) + a * (acc_t(1) - sig)));
        out[i * 2 * H + H + h] = static_cast<scalar_t>(gv * a * sig);
      }
    }
  });
}

// act = activation(h_pre); GELU through ATen's vectorised exact-erf kernel.
at::Tensor activate(const at::Tensor& h_pre, Activation act) {
  if (act == Activation::kGelu) return at::gelu(h_pre);
  auto out = at::empty({h_pre.size(0), h_pre.size(1) / 2}, h_pre.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, h_pre.scalar_type(), "swiglu_forward",
                                  [&] { swiglu_forward<scalar_t>(h_pre, out); });
  return out;
}

// d act / d h_pre applied to grad_act (gelu: in place in grad_act's buffer).
at::Tensor activate_backward(at::Tensor& grad_act, const at::Tensor& h_pre, Activation act) {
  if (act == Activation::kGelu) return at::gelu_backward_out(grad_act, grad_act, h_pre);
  auto grad_h = at::empty_like(h_pre);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, h_pre.scalar_type(), "swiglu_backward",
                                  [&] { swiglu_backward<scalar_t>(grad_act, h_pre, grad_h); });
  return grad_h;
}

// y[t] = sum_j weights[t, j] * rows[row_of_slot[t*k + j]], accumulated in acc_t
// (weights undefined: plain sum).
template <typename scalar_t>
void weighted_combine(const at::Tensor& rows, const at::Tensor& row_of_slot,
                      const at::Tensor& weights, int64_t k, at::Tensor& y) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t T = y.size(0), D = y.size(1);
  const scalar_t* rp = rows.data_ptr<scalar_t>();
  const int64_t* inv = row_of_slot.data_ptr<int64_t>();
  const acc_t* wp = weights.defined() ? weights.data_ptr<acc_t>() : nullptr;
  scalar_t* yp = y.data_ptr<scalar_t>();
  at::parallel_for(0, T, kRowGrain / 4, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(D);
    for (int64_t t = begin; t < end; ++t) {
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t j = 0; j < k; ++j) {
        const acc_t w = wp ? wp[t * k + j] : acc_t(1);
        const scalar_t* r = rp + inv[t * k + j] * D;
        for (int64_t d = 0; d < D; ++d) acc[d] += w * static_cast<acc_t>(r[d]);
      }
      for (int64_t d = 0; d < D; ++d) yp[t * D + d] = static_cast<scalar_t>(acc[d]);
    }
  });
}

// Per sorted row i (slot s, token t): grad_weights[s] = <grad_y[t], expert_out[i]> and
// g_rows[i] = weights[s] * grad_y[t] (the gradient of the row's unweighted output).
template <typename scalar_t>
void scale_gather_grad(const at::Tensor& grad_y, const at::Tensor& expert_out,
                       const at::Tensor& weights, const at::Tensor& sorted_slots,
                       at::Tensor& g_rows, at::Tensor& grad_weights) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = sorted_slots.numel(), D = grad_y.size(1), k = weights.size(1);
  const scalar_t* gy = grad_y.data_ptr<scalar_t>();
  const scalar_t* eo = expert_out.data_ptr<scalar_t>();
  const acc_t* wp = weights.data_ptr<acc_t>();
  const int64_t* slots = sorted_slots.data_ptr<int64_t>();
  scalar_t* gr = g_rows.data_ptr<scalar_t>();
  acc_t* gw = grad_weights.data_ptr<acc_t>();
  at::parallel_for(0, N, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t s = slots[i];
      const scalar_t* g = gy + (s / k) * D;
      const scalar_t* o = eo + i * D;
      const acc_t w = wp[s];
      acc_t dot = 0;
      for (int64_t d = 0; d < D; ++d) {
        const acc_t gv = g[d];
        dot += gv * static_cast<acc_t>(o[d]);
        gr[i * D + d] = static_cast<scalar_t>(w * gv);
      }
      gw[s] = dot;
    }
  });
}

}  // namespace

std::vector<at::Tensor> experts_forward_cpu(const at::Tensor& x, const at::Tensor& weights,
                                            const at::Tensor& experts, const at::Tensor& sorted_slots,
                                            const at::Tensor& offsets, const at::Tensor& fc1_w,
                                            const at::Tensor& fc1_b, const at::Tensor& fc2_w,
                                            const at::Tensor& fc2_b, const std::string& activation) {
  const Activation act = parse_activation(activation);
  check_expert_args(x, weights, experts, sorted_slots, offsets, fc1_w, fc1_b, fc2_w, fc2_b, act);
  TORCH_CHECK(x.device().is_cpu(), "experts_forward_cpu needs CPU tensors, got ", x.device());
  const int64_t T = x.size(0), D = x.size(1), k = weights.size(1);
  const int64_t H1 = fc1_w.size(1), N = T * k;
  const auto bounds = host_expert_bounds(offsets, N);
  const auto row_of_slot = invert_slots(sorted_slots);

  const auto x_rows = gather_rows(x, sorted_slots, k);
  auto h_pre = at::empty({N, H1}, x.options());
  for_each_expert_rows(bounds, [&](int64_t e, int64_t begin, int64_t end) {
    auto out = h_pre.slice(0, begin, end);
    at::addmm_out(out, fc1_b[e], x_rows.slice(0, begin, end), fc1_w[e].t());
  });
  const auto hidden = activate(h_pre, act);
  auto expert_out = at::empty({N, D}, x.options());
  for_each_expert_rows(bounds, [&](int64_t e, int64_t begin, int64_t end) {
    auto out = expert_out.slice(0, begin, end);
    at::addmm_out(out, fc2_b[e], hidden.slice(0, begin, end), fc2_w[e].t());
  });
  auto y = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "experts_combine", [&] {
    weighted_combine<scalar_t>(expert_out, row_of_slot, weights, k, y);
  });
  return {y, h_pre, expert_out};
}

std::vector<at::Tensor> experts_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weights,
    const at::Tensor& experts, const at::Tensor& sorted_slots, const at::Tensor& offsets,
    const at::Tensor& fc1_w, const at::Tensor& fc1_b, const at::Tensor& fc2_w,
    const at::Tensor& fc2_b, const std::string& activation, const at::Tensor& h_pre,
    const at::Tensor& expert_out) {
  const Activation act = parse_activation(activation);
  check_expert_args(x, weights, experts, sorted_slots, offsets, fc1_w, fc1_b, fc2_w, fc2_b, act);
  TORCH_CHECK(x.device().is_cpu(), "experts_backward_cpu needs CPU tensors, got ", x.device());
  const int64_t T = x.size(0), D = x.size(1), k = weights.size(1);
  const int64_t E = fc1_w.size(0), H1 = fc1_w.size(1), N = T * k;
  check_expert_backward_args(x, grad_y, h_pre, expert_out, N, H1);
  const auto bounds = host_expert_bounds(offsets, N);
  const auto row_of_slot = invert_slots(sorted_slots);

  // g_rows: gradient of each row's unweighted expert output; later reused for grad_x rows.
  auto g_rows = at::empty({N, D}, x.options());
  auto grad_weights = at::empty({T, k}, weights.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "experts_scale_gather", [&] {
    scale_gather_grad<scalar_t>(grad_y, expert_out, weights, sorted_slots, g_rows, grad_weights);
  });

  auto grad_fc1_w = at::empty_like(fc1_w);
  auto grad_fc1_b = at::empty_like(fc1_b);
  auto grad_fc2_w = at::empty_like(fc2_w);
  auto grad_fc2_b = at::empty_like(fc2_b);
  const auto hidden = activate(h_pre, act);  // recomputed: only h_pre is saved
  // Weight and bias gradients reduce over each expert's rows: split across threads by
  // output rows instead (dW[e][r0:r1] from column slices of the row-major operands).
  const auto weight_grads = [&](const at::Tensor& g, const at::Tensor& input, at::Tensor& grad_w,
                                at::Tensor& grad_b) {
    parallel_ranges(grad_w.size(1), [&](int64_t r0, int64_t r1) {
      for (int64_t e = 0; e < E; ++e) {
        auto gw = grad_w[e].slice(0, r0, r1);
        auto gb = grad_b[e].slice(0, r0, r1);
        const int64_t n = bounds[e + 1] - bounds[e];
        if (n == 0) {  // an expert without tokens gets exact zero gradients
          gw.zero_();
          gb.zero_();
          continue;
        }
        const auto g_e = g.slice(0, bounds[e], bounds[e + 1]).slice(1, r0, r1);
        at::mm_out(gw, g_e.t(), input.slice(0, bounds[e], bounds[e + 1]));
        at::sum_out(gb, g_e, 0);
      }
    });
  };
  weight_grads(g_rows, hidden, grad_fc2_w, grad_fc2_b);
  auto grad_hidden = at::empty_like(hidden);
  for_each_expert_rows(bounds, [&](int64_t e, int64_t begin, int64_t end) {
    auto out = grad_hidden.slice(0, begin, end);
    at::mm_out(out, g_rows.slice(0, begin, end), fc2_w[e]);
  });
  const auto grad_h_pre = activate_backward(grad_hidden, h_pre, act);
  const auto x_rows = gather_rows(x, sorted_slots, k);
  weight_grads(grad_h_pre, x_rows, grad_fc1_w, grad_fc1_b);
  auto& grad_x_rows = g_rows;  // g_rows is no longer needed
  for_each_expert_rows(bounds, [&](int64_t e, int64_t begin, int64_t end) {
    auto out = grad_x_rows.slice(0, begin, end);
    at::mm_out(out, grad_h_pre.slice(0, begin, end), fc1_w[e]);
  });
  auto grad_x = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "experts_grad_combine", [&] {
    weighted_combine<scalar_t>(grad_x_rows, row_of_slot, at::Tensor(), k, grad_x);
  });
  return {grad_x, grad_weights, grad_fc1_w, grad_fc1_b, grad_fc2_w, grad_fc2_b};
}

}  // namespace m2dino
