// CUDA kernels of m2dino_kernels._C, all in this one translation unit (compile time).
//
// Routing: one warp per token computes the task-selected gate GEMV (fp32 accumulation,
// warp-shuffle reduction), then lane 0 does softmax, top-k (ties to the lower index),
// renormalisation and atomically counts the expert choices. The permutation stays on the
// device: an E+1 scan kernel for the offsets, then one block per expert scans all slots in
// slot order and places those routed to it (stable by construction, no sort, no host sync).
// A task id out of range (which m2dino_kernels.moe rejects before calling in) never reads
// out of bounds here: its token gets NaN logits/probs/weights and experts 0..k-1.
//
// Experts: gather kernel -> expert GEMM -> bias + activation kernel -> expert GEMM ->
// bias + weighted combine kernel (each token sums its own k rows, no atomics); the backward
// mirrors it, with the bias gradients as per-expert column sums (one kernel, fp32). The
// expert GEMMs (ExpertRows) run as ONE at::_grouped_mm over the experts' contiguous row
// blocks with the offsets on the device (no host copy) wherever PyTorch runs it with device
// offsets: bf16 on sm90/sm100 with 16-byte aligned rows (D, H multiples of 8). Elsewhere
// (fp32/fp16, sm80, odd sizes, or M2DINO_CUDA_GROUPED_MM=0) they fall back to a loop of
// cuBLAS calls on each expert's slice, which needs the row counts on the host: the offsets
// (E+1 int64) are copied once per forward and once per backward call, the only
// device-to-host sync in this file.
// (Only c10 CUDA headers are included: ATen/cuda/CUDAContext.h would pull in cuBLAS and
// cuSPARSE headers, which a pip-installed torch keeps outside the toolkit.)
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime_api.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "common.h"

namespace m2dino {
namespace {

constexpr int kWarp = 32;
constexpr int kBlock = 256;
constexpr int kWarpsPerBlock = kBlock / kWarp;

__device__ __forceinline__ float dev_exp(float v) { return expf(v); }
__device__ __forceinline__ double dev_exp(double v) { return exp(v); }
__device__ __forceinline__ float dev_erf(float v) { return erff(v); }
__device__ __forceinline__ double dev_erf(double v) { return erf(v); }
__device__ __forceinline__ float dev_nan(float) { return __int_as_float(0x7fc00000); }
__device__ __forceinline__ double dev_nan(double) { return __longlong_as_double(0x7ff8000000000000LL); }

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ------------------------------------------------------------------------------------------
// Routing
// ------------------------------------------------------------------------------------------
template <typename scalar_t, typename acc_t>
__global__ void route_forward_kernel(const scalar_t* __restrict__ x, const int64_t* __restrict__ task_ids,
                                     const scalar_t* __restrict__ gate_w,
                                     const scalar_t* __restrict__ gate_b, int64_t T, int64_t D,
                                     int64_t E, int64_t NT, int64_t k, acc_t* __restrict__ logits,
                                     acc_t* __restrict__ probs, acc_t* __restrict__ weights,
                                     int64_t* __restrict__ experts,
                                     unsigned long long* __restrict__ counts) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (t >= T) return;  // uniform per warp
  const int64_t task = task_ids[t];
  const bool valid = task >= 0 && task < NT;
  const scalar_t* xrow = x + t * D;
  acc_t* lrow = logits + t * E;
  acc_t* prow = probs + t * E;
  for (int64_t e = 0; e < E; ++e) {
    acc_t acc = 0;
    if (valid) {
      const scalar_t* wrow = gate_w + (task * E + e) * D;
      for (int64_t d = lane; d < D; d += kWarp) acc += static_cast<acc_t>(wrow[d]) * static_cast<acc_t>(xrow[d]);
    }
    acc = warp_sum(acc);
    if (lane == 0) {
      if (!valid) acc = dev_nan(acc);
      else if (gate_b != nullptr) acc += static_cast<acc_t>(gate_b[task * E + e]);
      lrow[e] = acc;
    }
  }
  if (lane != 0) return;
  acc_t mx = lrow[0];
  for (int64_t e = 1; e < E; ++e) mx = lrow[e] > mx ? lrow[e] : mx;
  acc_t total = 0;
  for (int64_t e = 0; e < E; ++e) {
    prow[e] = dev_exp(lrow[e] - mx);
    total += prow[e];
  }
  for (int64_t e = 0; e < E; ++e) prow[e] /= total;
  // top-k by repeated selection: strict '>' scanning upwards keeps ties on the lower index;
  // NaN never wins a comparison, so every pick is a valid expert not chosen before.
  acc_t selected = 0;
  int64_t* erow = experts + t * k;
  acc_t* wrow = weights + t * k;
  for (int64_t j = 0; j < k; ++j) {
    int64_t best = -1;
    for (int64_t e = 0; e < E; ++e) {
      bool taken = false;
      for (int64_t i = 0; i < j; ++i) taken |= erow[i] == e;
      if (taken) continue;
      if (best < 0 || prow[e] > prow[best]) best = e;
    }
    erow[j] = best;
    wrow[j] = prow[best];
    selected += prow[best];
    atomicAdd(counts + best, 1ULL);
  }
  for (int64_t j = 0; j < k; ++j) wrow[j] /= selected;
}

__global__ void offsets_kernel(const int64_t* __restrict__ counts, int64_t E, int64_t* __restrict__ offsets) {
  int64_t running = 0;
  offsets[0] = 0;
  for (int64_t e = 0; e < E; ++e) {
    running += counts[e];
    offsets[e + 1] = running;
  }
}

// Exclusive scan of one int per thread over the block; *total gets the block's sum.
__device__ int block_exclusive_scan(int value, int* total) {
  __shared__ int warp_totals[kWarpsPerBlock];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  int inclusive = value;
  for (int offset = 1; offset < kWarp; offset <<= 1) {
    const int other = __shfl_up_sync(0xffffffffu, inclusive, offset);
    if (lane >= offset) inclusive += other;
  }
  if (lane == kWarp - 1) warp_totals[warp] = inclusive;
  __syncthreads();
  if (warp == 0) {
    int w = lane < kWarpsPerBlock ? warp_totals[lane] : 0;
    for (int offset = 1; offset < kWarp; offset <<= 1) {
      const int other = __shfl_up_sync(0xffffffffu, w, offset);
      if (lane >= offset) w += other;
    }
    if (lane < kWarpsPerBlock) warp_totals[lane] = w;  // inclusive warp prefix
  }
  __syncthreads();
  const int warp_base = warp == 0 ? 0 : warp_totals[warp - 1];
  *total = warp_totals[kWarpsPerBlock - 1];
  __syncthreads();  // warp_totals is reused by the next call
  return warp_base + inclusive - value;
}

// Block e walks the slots in order and writes those routed to expert e at
// offsets[e] + (rank among them): a stable counting-sort placement.
__global__ void place_slots_kernel(const int64_t* __restrict__ experts, int64_t num_slots,
                                   const int64_t* __restrict__ offsets, int64_t* __restrict__ sorted_slots) {
  const int64_t e = blockIdx.x;
  int64_t base = offsets[e];
  for (int64_t start = 0; start < num_slots; start += kBlock) {
    const int64_t s = start + threadIdx.x;
    const int flag = (s < num_slots && experts[s] == e) ? 1 : 0;
    int chunk_total = 0;
    const int rank = block_exclusive_scan(flag, &chunk_total);
    if (flag) sorted_slots[base + rank] = s;
    base += chunk_total;
  }
}

template <typename scalar_t, typename acc_t>
__global__ void route_backward_kernel(const acc_t* __restrict__ grad_logits, const acc_t* __restrict__ grad_probs,
                                      const acc_t* __restrict__ grad_weights, const acc_t* __restrict__ probs,
                                      const acc_t* __restrict__ weights, const int64_t* __restrict__ experts,
                                      const int64_t* __restrict__ task_ids, const scalar_t* __restrict__ gate_w,
                                      int64_t T, int64_t D, int64_t E, int64_t NT, int64_t k,
                                      acc_t* __restrict__ g_all, scalar_t* __restrict__ grad_x) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (t >= T) return;
  const int64_t task = task_ids[t];
  const bool valid = task >= 0 && task < NT;
  // g_all[t, task*E + e]: this token's logit gradient in its own task's columns
  acc_t* grow = g_all + (t * NT + (valid ? task : 0)) * E;
  if (lane == 0 && valid) {
    const acc_t* prow = probs + t * E;
    const int64_t* erow = experts + t * k;
    acc_t selected = 0, dot = 0;
    for (int64_t j = 0; j < k; ++j) {
      selected += prow[erow[j]];
      dot += grad_weights[t * k + j] * weights[t * k + j];
    }
    // g_probs = grad_probs + scatter((gw_j - <gw, w>) / S); softmax backward
    acc_t gp_dot_p = 0;
    for (int64_t e = 0; e < E; ++e) {
      acc_t gp = grad_probs[t * E + e];
      for (int64_t j = 0; j < k; ++j) {
        if (erow[j] == e) gp += (grad_weights[t * k + j] - dot) / selected;
      }
      grow[e] = gp;  // staged, finished below
      gp_dot_p += gp * prow[e];
    }
    for (int64_t e = 0; e < E; ++e) grow[e] = grad_logits[t * E + e] + prow[e] * (grow[e] - gp_dot_p);
  }
  __syncwarp();  // orders lane 0's writes of grow before the other lanes read them
  for (int64_t d = lane; d < D; d += kWarp) {
    acc_t acc = 0;
    if (valid) {
      for (int64_t e = 0; e < E; ++e) acc += grow[e] * static_cast<acc_t>(gate_w[(task * E + e) * D + d]);
    }
    grad_x[t * D + d] = static_cast<scalar_t>(acc);
  }
}

// ------------------------------------------------------------------------------------------
// Experts
// ------------------------------------------------------------------------------------------
template <typename scalar_t>
__global__ void gather_rows_kernel(const scalar_t* __restrict__ x, const int64_t* __restrict__ sorted_slots,
                                   int64_t N, int64_t D, int64_t k, scalar_t* __restrict__ rows) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= N * D) return;
  const int64_t i = idx / D, d = idx % D;
  rows[idx] = x[(sorted_slots[i] / k) * D + d];
}

__global__ void invert_slots_kernel(const int64_t* __restrict__ sorted_slots, int64_t N,
                                    int64_t* __restrict__ row_of_slot) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < N) row_of_slot[sorted_slots[i]] = i;
}

// h_pre[i, c] + bias[expert of row i, c], rounded to scalar_t and written back into h_pre
// (bias == nullptr: h_pre as it is). The expert of row i is experts[sorted_slots[i]].
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t add_row_bias(scalar_t* __restrict__ h_pre, const scalar_t* __restrict__ bias,
                                              const int64_t* __restrict__ experts,
                                              const int64_t* __restrict__ sorted_slots, int64_t i,
                                              int64_t width, int64_t c) {
  if (bias == nullptr) return h_pre[i * width + c];
  const int64_t e = experts[sorted_slots[i]];
  const scalar_t h = static_cast<scalar_t>(acc_t(h_pre[i * width + c]) + acc_t(bias[e * width + c]));
  h_pre[i * width + c] = h;
  return h;
}

// act[i, h] = gelu(h_pre[i, h]) or silu(h_pre[i, h]) * h_pre[i, H + h], after adding the
// fc1 bias of row i's expert into h_pre (bias == nullptr: h_pre already has it)
template <typename scalar_t, typename acc_t>
__global__ void activation_kernel(scalar_t* __restrict__ h_pre, const scalar_t* __restrict__ bias,
                                  const int64_t* __restrict__ experts, const int64_t* __restrict__ sorted_slots,
                                  int64_t N, int64_t H, bool swiglu, scalar_t* __restrict__ act) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= N * H) return;
  const int64_t i = idx / H, c = idx % H;
  if (!swiglu) {
    const acc_t h = add_row_bias<scalar_t, acc_t>(h_pre, bias, experts, sorted_slots, i, H, c);
    act[idx] = static_cast<scalar_t>(acc_t(0.5) * h * (acc_t(1) + dev_erf(h * acc_t(M_SQRT1_2))));
  } else {
    const acc_t a = add_row_bias<scalar_t, acc_t>(h_pre, bias, experts, sorted_slots, i, 2 * H, c);
    const acc_t b = add_row_bias<scalar_t, acc_t>(h_pre, bias, experts, sorted_slots, i, 2 * H, H + c);
    act[idx] = static_cast<scalar_t>(a / (acc_t(1) + dev_exp(-a)) * b);
  }
}

// grad_h_pre from grad_act (closed forms, exact erf GELU)
template <typename scalar_t, typename acc_t>
__global__ void activation_backward_kernel(const scalar_t* __restrict__ grad_act, const scalar_t* __restrict__ h_pre,
                                           int64_t N, int64_t H, bool swiglu, scalar_t* __restrict__ grad_h) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= N * H) return;
  const acc_t g = grad_act[idx];
  if (!swiglu) {
    const acc_t h = h_pre[idx];
    const acc_t cdf = acc_t(0.5) * (acc_t(1) + dev_erf(h * acc_t(M_SQRT1_2)));
    const acc_t pdf = dev_exp(acc_t(-0.5) * h * h) * acc_t(0.3989422804014327);  // 1/sqrt(2 pi)
    grad_h[idx] = static_cast<scalar_t>(g * (cdf + h * pdf));
  } else {
    const int64_t i = idx / H, c = idx % H;
    const acc_t a = h_pre[i * 2 * H + c], b = h_pre[i * 2 * H + H + c];
    const acc_t sig = acc_t(1) / (acc_t(1) + dev_exp(-a));
    grad_h[i * 2 * H + c] = static_cast<scalar_t>(g * b * sig * (acc_t(1) + a * (acc_t(1) - sig)));
    grad_h[i * 2 * H + H + c] = static_cast<scalar_t>(g * a * sig);
  }
}

// out[t, d] = sum_j w[t, j] * rows[row_of_slot[t*k + j], d] (w == nullptr: plain sum).
// bias != nullptr: each row first gets the fc2 bias of its expert (experts[t*k + j]) added
// and written back (every row belongs to exactly one slot, so to exactly one thread per d).
template <typename scalar_t, typename acc_t>
__global__ void combine_kernel(scalar_t* __restrict__ rows, const int64_t* __restrict__ row_of_slot,
                               const acc_t* __restrict__ w, const scalar_t* __restrict__ bias,
                               const int64_t* __restrict__ experts, int64_t T, int64_t D, int64_t k,
                               scalar_t* __restrict__ out) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= T * D) return;
  const int64_t t = idx / D, d = idx % D;
  acc_t acc = 0;
  for (int64_t j = 0; j < k; ++j) {
    scalar_t* row = rows + row_of_slot[t * k + j] * D;
    acc_t r = row[d];
    if (bias != nullptr) {
      const scalar_t biased = static_cast<scalar_t>(r + acc_t(bias[experts[t * k + j] * D + d]));
      row[d] = biased;
      r = biased;
    }
    acc += w == nullptr ? r : w[t * k + j] * r;
  }
  out[idx] = static_cast<scalar_t>(acc);
}

// out[e, c] = sum of rows[r, c] over expert e's rows r in [offsets[e], offsets[e+1]),
// accumulated in acc_t: the bias gradients, straight from the device offsets. Block: 32
// columns (lanes) x 8 row phases (warps); grid: (column chunks, experts).
template <typename scalar_t, typename acc_t>
__global__ void expert_column_sums_kernel(const scalar_t* __restrict__ rows, const int64_t* __restrict__ offsets,
                                          int64_t C, scalar_t* __restrict__ out) {
  __shared__ acc_t partial[kWarpsPerBlock][kWarp];
  const int64_t e = blockIdx.y;
  const int lane = threadIdx.x % kWarp, phase = threadIdx.x / kWarp;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kWarp + lane;
  acc_t acc = 0;
  if (c < C) {
    for (int64_t r = offsets[e] + phase; r < offsets[e + 1]; r += kWarpsPerBlock) acc += rows[r * C + c];
  }
  partial[phase][lane] = acc;
  __syncthreads();
  if (phase != 0 || c >= C) return;
  for (int p = 1; p < kWarpsPerBlock; ++p) acc += partial[p][lane];
  out[e * C + c] = static_cast<scalar_t>(acc);
}

// Exact zeros for the weight gradient of every expert without rows (whatever a grouped GEMM
// writes for an empty group); busy experts are not touched.
template <typename scalar_t>
__global__ void zero_idle_experts_kernel(scalar_t* __restrict__ grads, const int64_t* __restrict__ offsets,
                                         int64_t per_expert) {
  const int64_t e = blockIdx.y;
  if (offsets[e + 1] != offsets[e]) return;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < per_expert;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    grads[e * per_expert + i] = scalar_t(0);
  }
}

// One warp per sorted row i (slot s, token t): grad_weights[s] = <grad_y[t], expert_out[i]>,
// g_rows[i] = weights[s] * grad_y[t].
template <typename scalar_t, typename acc_t>
__global__ void scale_gather_grad_kernel(const scalar_t* __restrict__ grad_y, const scalar_t* __restrict__ expert_out,
                                         const acc_t* __restrict__ weights, const int64_t* __restrict__ sorted_slots,
                                         int64_t N, int64_t D, int64_t k, scalar_t* __restrict__ g_rows,
                                         acc_t* __restrict__ grad_weights) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (i >= N) return;
  const int64_t s = sorted_slots[i];
  const scalar_t* g = grad_y + (s / k) * D;
  const acc_t w = weights[s];
  acc_t dot = 0;
  for (int64_t d = lane; d < D; d += kWarp) {
    const acc_t gv = g[d];
    dot += gv * static_cast<acc_t>(expert_out[i * D + d]);
    g_rows[i * D + d] = static_cast<scalar_t>(w * gv);
  }
  dot = warp_sum(dot);
  if (lane == 0) grad_weights[s] = dot;
}

#define M2DINO_CHECK_CUDA_INPUT(t) \
  TORCH_CHECK((t).device().is_cuda(), #t " must be a CUDA tensor, got ", (t).device())

at::Tensor gather_rows(const at::Tensor& x, const at::Tensor& sorted_slots, int64_t k) {
  const int64_t N = sorted_slots.numel(), D = x.size(1);
  auto rows = at::empty({N, D}, x.options());
  if (N * D == 0) return rows;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "gather_rows_cuda", [&] {
    gather_rows_kernel<scalar_t><<<ceil_div(N * D, kBlock), kBlock, 0, stream>>>(
        x.data_ptr<scalar_t>(), sorted_slots.data_ptr<int64_t>(), N, D, k, rows.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return rows;
}

at::Tensor invert_slots(const at::Tensor& sorted_slots) {
  const int64_t N = sorted_slots.numel();
  auto inv = at::empty({N}, sorted_slots.options());
  if (N == 0) return inv;
  invert_slots_kernel<<<ceil_div(N, kBlock), kBlock, 0, c10::cuda::getCurrentCUDAStream()>>>(
      sorted_slots.data_ptr<int64_t>(), N, inv.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return inv;
}

// act(h_pre); with a bias [E, H1] (and the routing to find each row's expert) the bias is
// first added into h_pre in place.
at::Tensor activate(at::Tensor& h_pre, Activation act, const at::Tensor& bias = at::Tensor(),
                    const at::Tensor& experts = at::Tensor(), const at::Tensor& sorted_slots = at::Tensor()) {
  const bool swiglu = act == Activation::kSwiglu;
  const int64_t N = h_pre.size(0), H = swiglu ? h_pre.size(1) / 2 : h_pre.size(1);
  auto out = at::empty({N, H}, h_pre.options());
  if (N * H == 0) return out;
  const bool with_bias = bias.defined();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, h_pre.scalar_type(), "activation_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    activation_kernel<scalar_t, acc_t><<<ceil_div(N * H, kBlock), kBlock, 0, c10::cuda::getCurrentCUDAStream()>>>(
        h_pre.data_ptr<scalar_t>(), with_bias ? bias.data_ptr<scalar_t>() : nullptr,
        with_bias ? experts.data_ptr<int64_t>() : nullptr,
        with_bias ? sorted_slots.data_ptr<int64_t>() : nullptr, N, H, swiglu, out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor activate_backward(const at::Tensor& grad_act, const at::Tensor& h_pre, Activation act) {
  const bool swiglu = act == Activation::kSwiglu;
  const int64_t N = grad_act.size(0), H = grad_act.size(1);
  auto grad_h = at::empty_like(h_pre);
  if (N * H == 0) return grad_h;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, h_pre.scalar_type(), "activation_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    activation_backward_kernel<scalar_t, acc_t><<<ceil_div(N * H, kBlock), kBlock, 0, c10::cuda::getCurrentCUDAStream()>>>(
        grad_act.data_ptr<scalar_t>(), h_pre.data_ptr<scalar_t>(), N, H, swiglu, grad_h.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_h;
}

// out = the (weighted) sum over each token's k rows; with a bias [E, D] (and experts [T, k])
// every row first gets its expert's bias added in place.
void combine(at::Tensor& rows, const at::Tensor& row_of_slot, const at::Tensor& weights,
             int64_t k, at::Tensor& out, const at::Tensor& bias = at::Tensor(),
             const at::Tensor& experts = at::Tensor()) {
  const int64_t T = out.size(0), D = out.size(1);
  if (T * D == 0) return;
  const bool with_bias = bias.defined();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "combine_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    combine_kernel<scalar_t, acc_t><<<ceil_div(T * D, kBlock), kBlock, 0, c10::cuda::getCurrentCUDAStream()>>>(
        rows.data_ptr<scalar_t>(), row_of_slot.data_ptr<int64_t>(),
        weights.defined() ? weights.data_ptr<acc_t>() : nullptr,
        with_bias ? bias.data_ptr<scalar_t>() : nullptr, with_bias ? experts.data_ptr<int64_t>() : nullptr,
        T, D, k, out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// Per-expert column sums of expert-sorted rows [N, C] -> [E, C] (zeros for idle experts).
at::Tensor expert_column_sums(const at::Tensor& rows, const at::Tensor& offsets) {
  const int64_t E = offsets.numel() - 1, C = rows.size(1);
  auto out = at::empty({E, C}, rows.options());
  if (E * C == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, rows.scalar_type(), "expert_column_sums_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const dim3 grid(static_cast<unsigned>(ceil_div(C, kWarp)), static_cast<unsigned>(E));
    expert_column_sums_kernel<scalar_t, acc_t><<<grid, kBlock, 0, c10::cuda::getCurrentCUDAStream()>>>(
        rows.data_ptr<scalar_t>(), offsets.data_ptr<int64_t>(), C, out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// How the expert GEMMs of one call run: one grouped GEMM with the offsets on the device, or
// (the fallback) a loop over the experts' slices with the offsets copied to the host.
struct ExpertRows {
  int64_t N = 0;
  at::Tensor offsets;            // [E+1] int64, on the device
  bool grouped = false;
  at::Tensor group_ends;         // grouped: offsets[1:] as int32 (what _grouped_mm takes)
  std::vector<int64_t> bounds;   // loop: host copy of offsets (the one sync)
};

// Whether at::_grouped_mm runs its device-offset kernel (CUTLASS) for these operands: bf16,
// compute capability 9.x or 10.x (PyTorch's own fast-path condition; elsewhere its fallback
// copies the offsets to the host, like our loop), rows 16-byte aligned, and not disabled by
// M2DINO_CUDA_GROUPED_MM=0.
bool grouped_mm_runs_on_device(const at::Tensor& x, const at::Tensor& fc1_w, const at::Tensor& fc2_w,
                               int64_t N) {
  if (x.scalar_type() != at::kBFloat16 || N <= 0 || N > INT32_MAX) return false;
  const char* env = std::getenv("M2DINO_CUDA_GROUPED_MM");
  if (env != nullptr && std::string(env) == "0") return false;
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, x.get_device()));
  if (major != 9 && major != 10) return false;
  const int64_t D = x.size(1), H1 = fc1_w.size(1), H = fc2_w.size(2);
  const auto aligned = [](const at::Tensor& t) {
    return reinterpret_cast<std::uintptr_t>(t.data_ptr()) % 16 == 0;
  };
  return D % 8 == 0 && H1 % 8 == 0 && H % 8 == 0 && aligned(fc1_w) && aligned(fc2_w);
}

ExpertRows expert_rows(const at::Tensor& x, const at::Tensor& offsets, const at::Tensor& fc1_w,
                       const at::Tensor& fc2_w, int64_t N) {
  ExpertRows rows;
  rows.N = N;
  rows.offsets = offsets;
  rows.grouped = grouped_mm_runs_on_device(x, fc1_w, fc2_w, N);
  if (rows.grouped) {
    rows.group_ends = offsets.narrow(0, 1, offsets.numel() - 1).to(at::kInt);
  } else {
    rows.bounds = host_expert_bounds(offsets, N);
  }
  return rows;
}

// out[rows of e] = a[rows of e] @ w[e]^T (transpose_w: nn.Linear's forward, w [E, M, K]) or
// @ w[e] (its input gradient, w [E, K, M]); [N, M].
at::Tensor expert_mm(const at::Tensor& a, const at::Tensor& w, bool transpose_w, const ExpertRows& rows) {
  const auto wt = transpose_w ? w.transpose(1, 2) : w;
  if (rows.grouped) return at::_grouped_mm(a, wt, rows.group_ends).contiguous();
  auto out = at::empty({rows.N, wt.size(2)}, a.options());
  for (size_t e = 0; e + 1 < rows.bounds.size(); ++e) {
    const int64_t begin = rows.bounds[e], n = rows.bounds[e + 1] - begin;
    if (n == 0) continue;
    auto slice = out.narrow(0, begin, n);
    at::mm_out(slice, a.narrow(0, begin, n), wt[e]);
  }
  return out;
}

// dW[e] = g[rows of e]^T @ in[rows of e] -> [E, G, I]; exact zeros for experts without rows.
at::Tensor expert_weight_grad(const at::Tensor& g, const at::Tensor& in, const ExpertRows& rows) {
  const int64_t E = rows.offsets.numel() - 1;
  if (rows.grouped) {
    auto grad = at::_grouped_mm(g.t(), in, rows.group_ends).contiguous();
    const int64_t per_expert = grad.numel() / std::max<int64_t>(E, 1);
    if (per_expert > 0) {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad.scalar_type(), "zero_idle_experts_cuda", [&] {
        const dim3 grid(static_cast<unsigned>(std::min<int64_t>(ceil_div(per_expert, kBlock), 1024)),
                        static_cast<unsigned>(E));
        zero_idle_experts_kernel<scalar_t><<<grid, kBlock, 0, c10::cuda::getCurrentCUDAStream()>>>(
            grad.data_ptr<scalar_t>(), rows.offsets.data_ptr<int64_t>(), per_expert);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    }
    return grad;
  }
  auto grad = at::zeros({E, g.size(1), in.size(1)}, g.options());
  for (int64_t e = 0; e < E; ++e) {
    const int64_t begin = rows.bounds[e], n = rows.bounds[e + 1] - begin;
    if (n == 0) continue;
    auto slice = grad[e];
    at::mm_out(slice, g.narrow(0, begin, n).t(), in.narrow(0, begin, n));
  }
  return grad;
}

}  // namespace

std::vector<at::Tensor> route_forward_cuda(const at::Tensor& x, const at::Tensor& task_ids,
                                           const at::Tensor& gate_weight,
                                           const std::optional<at::Tensor>& gate_bias,
                                           int64_t top_k) {
  check_route_args(x, task_ids, gate_weight, gate_bias, top_k);
  M2DINO_CHECK_CUDA_INPUT(x);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t T = x.size(0), D = x.size(1), NT = gate_weight.size(0), E = gate_weight.size(1);
  const auto fopts = x.options().dtype(routing_dtype(x.scalar_type()));
  const auto iopts = x.options().dtype(at::kLong);
  auto logits = at::empty({T, E}, fopts);
  auto probs = at::empty({T, E}, fopts);
  auto weights = at::empty({T, top_k}, fopts);
  auto experts = at::empty({T, top_k}, iopts);
  auto counts = at::zeros({E}, iopts);
  auto sorted_slots = at::empty({T * top_k}, iopts);
  auto offsets = at::empty({E + 1}, iopts);
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (T > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "route_forward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      route_forward_kernel<scalar_t, acc_t><<<ceil_div(T, kWarpsPerBlock), kBlock, 0, stream>>>(
          x.data_ptr<scalar_t>(), task_ids.data_ptr<int64_t>(), gate_weight.data_ptr<scalar_t>(),
          gate_bias.has_value() ? gate_bias->data_ptr<scalar_t>() : nullptr, T, D, E, NT, top_k,
          logits.data_ptr<acc_t>(), probs.data_ptr<acc_t>(), weights.data_ptr<acc_t>(),
          experts.data_ptr<int64_t>(), reinterpret_cast<unsigned long long*>(counts.data_ptr<int64_t>()));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  offsets_kernel<<<1, 1, 0, stream>>>(counts.data_ptr<int64_t>(), E, offsets.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (T > 0) {
    place_slots_kernel<<<E, kBlock, 0, stream>>>(experts.data_ptr<int64_t>(), T * top_k,
                                                 offsets.data_ptr<int64_t>(), sorted_slots.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {logits, probs, weights, experts, counts, sorted_slots, offsets};
}

std::vector<std::optional<at::Tensor>> route_backward_cuda(
    const at::Tensor& grad_logits, const at::Tensor& grad_probs, const at::Tensor& grad_weights,
    const at::Tensor& x, const at::Tensor& task_ids, const at::Tensor& gate_weight,
    bool has_bias, const at::Tensor& probs, const at::Tensor& weights, const at::Tensor& experts) {
  check_route_backward_args(grad_logits, grad_probs, grad_weights, x, task_ids, gate_weight, probs,
                            weights, experts);
  M2DINO_CHECK_CUDA_INPUT(x);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t T = x.size(0), D = x.size(1), NT = gate_weight.size(0), E = gate_weight.size(1);
  const int64_t k = weights.size(1);
  const auto acc = routing_dtype(x.scalar_type());
  // [T, NT*E]: each token's logit gradient in its own task's E columns; the gate weight
  // gradient is then one cuBLAS GEMM (the gate is tiny next to the experts).
  auto g_all = at::zeros({T, NT * E}, x.options().dtype(acc));
  auto grad_x = at::empty_like(x);
  if (T > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "route_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      route_backward_kernel<scalar_t, acc_t><<<ceil_div(T, kWarpsPerBlock), kBlock, 0, c10::cuda::getCurrentCUDAStream()>>>(
          grad_logits.data_ptr<acc_t>(), grad_probs.data_ptr<acc_t>(), grad_weights.data_ptr<acc_t>(),
          probs.data_ptr<acc_t>(), weights.data_ptr<acc_t>(), experts.data_ptr<int64_t>(),
          task_ids.data_ptr<int64_t>(), gate_weight.data_ptr<scalar_t>(), T, D, E, NT, k,
          g_all.data_ptr<acc_t>(), grad_x.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  auto grad_w = at::mm(g_all.t(), x.to(acc)).view({NT, E, D}).to(gate_weight.scalar_type());
  std::optional<at::Tensor> grad_b;
  if (has_bias) grad_b = g_all.sum(0).view({NT, E}).to(gate_weight.scalar_type());
  return {grad_x, grad_w, grad_b};
}

std::vector<at::Tensor> experts_forward_cuda(const at::Tensor& x, const at::Tensor& weights,
                                             const at::Tensor& experts, const at::Tensor& sorted_slots,
                                             const at::Tensor& offsets, const at::Tensor& fc1_w,
                                             const at::Tensor& fc1_b, const at::Tensor& fc2_w,
                                             const at::Tensor& fc2_b, const std::string& activation) {
  const Activation act = parse_activation(activation);
  check_expert_args(x, weights, experts, sorted_slots, offsets, fc1_w, fc1_b, fc2_w, fc2_b, act);
  M2DINO_CHECK_CUDA_INPUT(x);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t T = x.size(0), k = weights.size(1), N = T * k;
  const auto rows = expert_rows(x, offsets, fc1_w, fc2_w, N);

  const auto x_rows = gather_rows(x, sorted_slots, k);
  auto h_pre = expert_mm(x_rows, fc1_w, /*transpose_w=*/true, rows);
  const auto hidden = activate(h_pre, act, fc1_b, experts, sorted_slots);  // + fc1 bias
  auto expert_out = expert_mm(hidden, fc2_w, /*transpose_w=*/true, rows);
  auto y = at::empty_like(x);
  combine(expert_out, invert_slots(sorted_slots), weights, k, y, fc2_b, experts);  // + fc2 bias
  return {y, h_pre, expert_out};
}

std::vector<at::Tensor> experts_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weights,
    const at::Tensor& experts, const at::Tensor& sorted_slots, const at::Tensor& offsets,
    const at::Tensor& fc1_w, const at::Tensor& fc1_b, const at::Tensor& fc2_w,
    const at::Tensor& fc2_b, const std::string& activation, const at::Tensor& h_pre,
    const at::Tensor& expert_out) {
  const Activation act = parse_activation(activation);
  check_expert_args(x, weights, experts, sorted_slots, offsets, fc1_w, fc1_b, fc2_w, fc2_b, act);
  M2DINO_CHECK_CUDA_INPUT(x);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t T = x.size(0), D = x.size(1), k = weights.size(1);
  const int64_t H1 = fc1_w.size(1), N = T * k;
  check_expert_backward_args(x, grad_y, h_pre, expert_out, N, H1);
  const auto rows = expert_rows(x, offsets, fc1_w, fc2_w, N);

  // g_rows: the gradient of each row's unweighted expert output
  auto g_rows = at::empty({N, D}, x.options());
  auto grad_weights = at::empty({T, k}, weights.options());
  if (N > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "scale_gather_grad_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      scale_gather_grad_kernel<scalar_t, acc_t><<<ceil_div(N, kWarpsPerBlock), kBlock, 0, c10::cuda::getCurrentCUDAStream()>>>(
          grad_y.data_ptr<scalar_t>(), expert_out.data_ptr<scalar_t>(), weights.data_ptr<acc_t>(),
          sorted_slots.data_ptr<int64_t>(), N, D, k, g_rows.data_ptr<scalar_t>(), grad_weights.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  auto h_pre_copy = h_pre;  // activate() takes it mutable; without a bias it only reads it
  const auto hidden = activate(h_pre_copy, act);  // recomputed: only h_pre is saved
  // fc2: grad_w[e] = g^T hidden, grad_b[e] = column sums of g, grad_hidden = g w2[e]
  auto grad_fc2_w = expert_weight_grad(g_rows, hidden, rows);
  auto grad_fc2_b = expert_column_sums(g_rows, offsets);
  const auto grad_hidden = expert_mm(g_rows, fc2_w, /*transpose_w=*/false, rows);
  const auto grad_h_pre = activate_backward(grad_hidden, h_pre, act);
  // fc1: the same with x's rows
  const auto x_rows = gather_rows(x, sorted_slots, k);
  auto grad_fc1_w = expert_weight_grad(grad_h_pre, x_rows, rows);
  auto grad_fc1_b = expert_column_sums(grad_h_pre, offsets);
  auto grad_x_rows = expert_mm(grad_h_pre, fc1_w, /*transpose_w=*/false, rows);
  auto grad_x = at::empty_like(x);
  combine(grad_x_rows, invert_slots(sorted_slots), at::Tensor(), k, grad_x);
  return {grad_x, grad_weights, grad_fc1_w, grad_fc1_b, grad_fc2_w, grad_fc2_b};
}

}  // namespace m2dino
