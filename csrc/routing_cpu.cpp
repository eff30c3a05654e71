// Task-conditioned top-k routing on CPU: one fused pass per token (task-selected gate GEMV in
// fp32, softmax, top-k, renormalise), parallel over tokens, then a counting sort of the
// token slots by expert. Backward: the renorm/top-k/softmax chain per token, fused with the
// grad_x GEMV; grad_W/grad_b grouped by task (tokens bucketed by a counting sort on task).
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "common.h"

namespace m2dino {
namespace {

// Minimum tokens per parallel chunk: a token costs ~E*D multiply-adds.
constexpr int64_t kTokenGrain = 16;

void check_task_range_cpu(const at::Tensor& task_ids, int64_t num_tasks) {
  const int64_t* ids = task_ids.data_ptr<int64_t>();
  for (int64_t t = 0; t < task_ids.numel(); ++t) {
    TORCH_CHECK(ids[t] >= 0 && ids[t] < num_tasks, "task_ids[", t, "] = ", ids[t],
                " is out of range [0, num_tasks) = [0, ", num_tasks, ")");
  }
}

// Stable counting sort of the slots s = t*k + j by expert: counts, offsets (exclusive scan)
// and sorted_slots (ascending expert, then ascending slot). O(T*k), serial: it is a tiny
// fraction of the routing pass.
void sort_slots_by_expert_cpu(const at::Tensor& experts, int64_t num_experts, at::Tensor& counts,
                              at::Tensor& sorted_slots, at::Tensor& offsets) {
  const int64_t num_slots = experts.numel();
  const int64_t* ex = experts.data_ptr<int64_t>();
  int64_t* cnt = counts.data_ptr<int64_t>();
  int64_t* off = offsets.data_ptr<int64_t>();
  int64_t* out = sorted_slots.data_ptr<int64_t>();
  std::fill(cnt, cnt + num_experts, 0);
  for (int64_t s = 0; s < num_slots; ++s) cnt[ex[s]]++;
  off[0] = 0;
  for (int64_t e = 0; e < num_experts; ++e) off[e + 1] = off[e] + cnt[e];
  std::vector<int64_t> cursor(off, off + num_experts);
  for (int64_t s = 0; s < num_slots; ++s) out[cursor[ex[s]]++] = s;
}

template <typename scalar_t>
void route_forward_kernel(const at::Tensor& x, const at::Tensor& task_ids,
                          const at::Tensor& gate_weight, const std::optional<at::Tensor>& gate_bias,
                          int64_t top_k, at::Tensor& logits, at::Tensor& probs,
                          at::Tensor& weights, at::Tensor& experts) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t T = x.size(0), D = x.size(1), E = gate_weight.size(1);
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const int64_t* ids = task_ids.data_ptr<int64_t>();
  const scalar_t* wp = gate_weight.data_ptr<scalar_t>();
  const scalar_t* bp = gate_bias.has_value() ? gate_bias->data_ptr<scalar_t>() : nullptr;
  acc_t* lp = logits.data_ptr<acc_t>();
  acc_t* pp = probs.data_ptr<acc_t>();
  acc_t* wout = weights.data_ptr<acc_t>();
  int64_t* eout = experts.data_ptr<int64_t>();

  at::parallel_for(0, T, kTokenGrain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> xrow(D);
    std::vector<char> taken(E);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t task = ids[t];
      for (int64_t d = 0; d < D; ++d) xrow[d] = static_cast<acc_t>(xp[t * D + d]);
      acc_t* lrow = lp + t * E;
      acc_t* prow = pp + t * E;
      // gate GEMV with the token's own task's router, fp32 accumulation
      const scalar_t* wtask = wp + task * E * D;
      for (int64_t e = 0; e < E; ++e) {
        const scalar_t* wrow = wtask + e * D;
        acc_t acc = 0;
        for (int64_t d = 0; d < D; ++d) acc += static_cast<acc_t>(wrow[d]) * xrow[d];
        if (bp != nullptr) acc += static_cast<acc_t>(bp[task * E + e]);
        lrow[e] = acc;
      }
      // softmax (NaN/Inf propagate: no clamping)
      acc_t mx = lrow[0];
      for (int64_t e = 1; e < E; ++e) mx = std::max(mx, lrow[e]);
      acc_t total = 0;
      for (int64_t e = 0; e < E; ++e) {
        prow[e] = std::exp(lrow[e] - mx);
        total += prow[e];
      }
      for (int64_t e = 0; e < E; ++e) prow[e] /= total;
      // top-k by repeated selection: strict '>' scanning upwards keeps ties on the lower
      // index; a NaN never wins a comparison, so the pick is always a valid, unused expert.
      std::fill(taken.begin(), taken.end(), 0);
      acc_t selected = 0;
      for (int64_t j = 0; j < top_k; ++j) {
        int64_t best = -1;
        for (int64_t e = 0; e < E; ++e) {
          if (taken[e]) continue;
          if (best < 0 || prow[e] > prow[best]) best = e;
        }
        taken[best] = 1;
        eout[t * top_k + j] = best;
        wout[t * top_k + j] = prow[best];
        selected += prow[best];
      }
      for (int64_t j = 0; j < top_k; ++j) wout[t * top_k + j] /= selected;
    }
  });
}

template <typename scalar_t>
void route_backward_kernel(const at::Tensor& grad_logits, const at::Tensor& grad_probs,
                           const at::Tensor& grad_weights, const at::Tensor& x,
                           const at::Tensor& task_ids, const at::Tensor& gate_weight,
                           const at::Tensor& probs, const at::Tensor& weights,
                           const at::Tensor& experts, at::Tensor& g_logits, at::Tensor& grad_x) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t T = x.size(0), D = x.size(1), E = gate_weight.size(1), k = weights.size(1);
  const acc_t* gl = grad_logits.data_ptr<acc_t>();
  const acc_t* gp = grad_probs.data_ptr<acc_t>();
  const acc_t* gw = grad_weights.data_ptr<acc_t>();
  const acc_t* pp = probs.data_ptr<acc_t>();
  const acc_t* wp = weights.data_ptr<acc_t>();
  const int64_t* ex = experts.data_ptr<int64_t>();
  const int64_t* ids = task_ids.data_ptr<int64_t>();
  const scalar_t* gate = gate_weight.data_ptr<scalar_t>();
  acc_t* g_out = g_logits.data_ptr<acc_t>();
  scalar_t* gx = grad_x.data_ptr<scalar_t>();

  at::parallel_for(0, T, kTokenGrain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> g_probs(E), gx_acc(D);
    for (int64_t t = begin; t < end; ++t) {
      const acc_t* prow = pp + t * E;
      // weights_j = p_sel_j / S  =>  dL/dp_sel_j = (gw_j - <gw, w>) / S
      acc_t selected = 0, dot = 0;
      for (int64_t j = 0; j < k; ++j) {
        selected += prow[ex[t * k + j]];
        dot += gw[t * k + j] * wp[t * k + j];
      }
      for (int64_t e = 0; e < E; ++e) g_probs[e] = gp[t * E + e];
      for (int64_t j = 0; j < k; ++j) g_probs[ex[t * k + j]] += (gw[t * k + j] - dot) / selected;
      // softmax backward
      acc_t gp_dot_p = 0;
      for (int64_t e = 0; e < E; ++e) gp_dot_p += g_probs[e] * prow[e];
      acc_t* grow = g_out + t * E;
      for (int64_t e = 0; e < E; ++e) grow[e] = gl[t * E + e] + prow[e] * (g_probs[e] - gp_dot_p);
      // grad_x[t] = W[task]^T g[t]
      std::fill(gx_acc.begin(), gx_acc.end(), acc_t(0));
      const scalar_t* wtask = gate + ids[t] * E * D;
      for (int64_t e = 0; e < E; ++e) {
        const acc_t g = grow[e];
        const scalar_t* wrow = wtask + e * D;
        for (int64_t d = 0; d < D; ++d) gx_acc[d] += g * static_cast<acc_t>(wrow[d]);
      }
      for (int64_t d = 0; d < D; ++d) gx[t * D + d] = static_cast<scalar_t>(gx_acc[d]);
    }
  });
}

// grad_W[n] = sum_{task_t = n} g[t] x[t]^T, grad_b[n] = sum g[t]: tokens bucketed by task
// (counting sort), then parallel over tasks, each summing its own tokens (no atomics).
template <typename scalar_t>
void gate_weight_grad_kernel(const at::Tensor& g_logits, const at::Tensor& x,
                             const at::Tensor& task_ids, int64_t num_tasks, at::Tensor& grad_w_acc,
                             at::Tensor& grad_b_acc) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t T = x.size(0), D = x.size(1), E = g_logits.size(1);
  const int64_t* ids = task_ids.data_ptr<int64_t>();
  std::vector<int64_t> start(num_tasks + 1, 0), order(T);
  for (int64_t t = 0; t < T; ++t) start[ids[t] + 1]++;
  for (int64_t n = 0; n < num_tasks; ++n) start[n + 1] += start[n];
  {
    std::vector<int64_t> cursor(start.begin(), start.end() - 1);
    for (int64_t t = 0; t < T; ++t) order[cursor[ids[t]]++] = t;
  }
  const acc_t* g = g_logits.data_ptr<acc_t>();
  const scalar_t* xp = x.data_ptr<scalar_t>();
  acc_t* gw = grad_w_acc.data_ptr<acc_t>();
  acc_t* gb = grad_b_acc.data_ptr<acc_t>();
  at::parallel_for(0, num_tasks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      acc_t* gw_task = gw + n * E * D;
      acc_t* gb_task = gb + n * E;
      for (int64_t i = start[n]; i < start[n + 1]; ++i) {
        const int64_t t = order[i];
        const scalar_t* xrow = xp + t * D;
        for (int64_t e = 0; e < E; ++e) {
          const acc_t ge = g[t * E + e];
          gb_task[e] += ge;
          acc_t* out = gw_task + e * D;
          for (int64_t d = 0; d < D; ++d) out[d] += ge * static_cast<acc_t>(xrow[d]);
        }
      }
    }
  });
}

}  // namespace

std::vector<at::Tensor> route_forward_cpu(const at::Tensor& x, const at::Tensor& task_ids,
                                          const at::Tensor& gate_weight,
                                          const std::optional<at::Tensor>& gate_bias,
                                          int64_t top_k) {
  check_route_args(x, task_ids, gate_weight, gate_bias, top_k);
  TORCH_CHECK(x.device().is_cpu(), "route_forward_cpu needs CPU tensors, got ", x.device());
  const int64_t T = x.size(0), NT = gate_weight.size(0), E = gate_weight.size(1);
  check_task_range_cpu(task_ids, NT);
  const auto fopts = x.options().dtype(routing_dtype(x.scalar_type()));
  const auto iopts = x.options().dtype(at::kLong);
  auto logits = at::empty({T, E}, fopts);
  auto probs = at::empty({T, E}, fopts);
  auto weights = at::empty({T, top_k}, fopts);
  auto experts = at::empty({T, top_k}, iopts);
  auto counts = at::empty({E}, iopts);
  auto sorted_slots = at::empty({T * top_k}, iopts);
  auto offsets = at::empty({E + 1}, iopts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "route_forward_cpu", [&] {
    route_forward_kernel<scalar_t>(x, task_ids, gate_weight, gate_bias, top_k, logits, probs,
                                   weights, experts);
  });
  sort_slots_by_expert_cpu(experts, E, counts, sorted_slots, offsets);
  return {logits, probs, weights, experts, counts, sorted_slots, offsets};
}

std::vector<std::optional<at::Tensor>> route_backward_cpu(
    const at::Tensor& grad_logits, const at::Tensor& grad_probs, const at::Tensor& grad_weights,
    const at::Tensor& x, const at::Tensor& task_ids, const at::Tensor& gate_weight,
    bool has_bias, const at::Tensor& probs, const at::Tensor& weights, const at::Tensor& experts) {
  check_route_backward_args(grad_logits, grad_probs, grad_weights, x, task_ids, gate_weight, probs,
                            weights, experts);
  TORCH_CHECK(x.device().is_cpu(), "route_backward_cpu needs CPU tensors, got ", x.device());
  const int64_t T = x.size(0), NT = gate_weight.size(0), E = gate_weight.size(1);
  check_task_range_cpu(task_ids, NT);
  const int64_t* ex = experts.data_ptr<int64_t>();
  for (int64_t s = 0; s < experts.numel(); ++s) {
    TORCH_CHECK(ex[s] >= 0 && ex[s] < E, "experts.view(-1)[", s, "] = ", ex[s],
                " is out of range [0, E) = [0, ", E, ")");
  }
  const auto acc = routing_dtype(x.scalar_type());
  auto g_logits = at::empty({T, E}, x.options().dtype(acc));
  auto grad_x = at::empty_like(x);
  auto grad_w = at::zeros(gate_weight.sizes(), x.options().dtype(acc));
  auto grad_b = at::zeros({NT, E}, x.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "route_backward_cpu", [&] {
    route_backward_kernel<scalar_t>(grad_logits, grad_probs, grad_weights, x, task_ids,
                                    gate_weight, probs, weights, experts, g_logits, grad_x);
    gate_weight_grad_kernel<scalar_t>(g_logits, x, task_ids, NT, grad_w, grad_b);
  });
  std::optional<at::Tensor> grad_bias;
  if (has_bias) grad_bias = grad_b.to(gate_weight.scalar_type());
  return {grad_x, grad_w.to(gate_weight.scalar_type()), grad_bias};
}

}  // namespace m2dino
