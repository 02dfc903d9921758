// Declarations shared by the op registration (ops.cpp), the CPU loops (cpu/*.cpp) and the CUDA launchers (cuda/*.cu).
// Every function here takes checked, normalised arguments (see check_* in ops.cpp); shapes follow
// flowgmm_fast/ops/reference.py.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <optional>
#include <tuple>

namespace flowgmm {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// Log-det / likelihood dtype: float64 when any input is float64, else float32.
inline at::ScalarType ldj_dtype(at::ScalarType a, at::ScalarType b = at::kFloat, at::ScalarType c = at::kFloat) {
  return (a == at::kDouble || b == at::kDouble || c == at::kDouble) ? at::kDouble : at::kFloat;
}
// Compute dtype of a tensor's elements: double for double, float otherwise.
inline at::ScalarType acc_dtype(at::ScalarType a) { return a == at::kDouble ? at::kDouble : at::kFloat; }

// Coupling operands: a tensor (B, C, *S) whose per-sample (C, *S) planes are dense (row-major) but whose samples may
// sit at any stride -- the `.chunk(2, dim=1)` views of a (B, 2C, *S) tensor (the s/t net's output, the channel
// coupling's halves) -- is read in place: the loops take its batch stride. Anything else (channels_last, transposed,
// expanded planes) is copied to a contiguous tensor first, the only copy left.
inline bool plane_dense(const Tensor& t) {
  int64_t expected = 1;
  for (int64_t d = t.dim() - 1; d >= 1; --d) {
    if (t.size(d) != 1 && t.stride(d) != expected) return false;
    expected *= t.size(d);
  }
  return true;
}
inline Tensor dense_planes(const Tensor& t) { return plane_dense(t) ? t : t.contiguous(); }
// the distance between samples of a plane-dense tensor, in elements (a single sample: its plane size)
inline int64_t batch_stride(const Tensor& t) {
  if (t.size(0) > 1) return t.stride(0);
  int64_t plane = 1;
  for (int64_t d = 1; d < t.dim(); ++d) plane *= t.size(d);
  return plane;
}
// The coupling backward's s and t gradients: separate (B, C, *S) tensors, or with `joint` the two halves of one
// (B, 2C, *S) buffer, the gradient of the s/t net's output as a whole (no concatenation after the op).
inline std::tuple<Tensor, Tensor, Tensor> coupling_st_grads(const Tensor& x, bool joint) {
  if (!joint) return {Tensor(), at::empty(x.sizes(), x.options()), at::empty(x.sizes(), x.options())};
  auto sizes = x.sizes().vec();
  const int64_t C = sizes[1];
  sizes[1] *= 2;
  Tensor st = at::empty(sizes, x.options());
  return {st, st.narrow(1, 0, C), st.narrow(1, C, C)};
}

// squeeze2x2 geometry, shared by the CPU loop and the CUDA kernel: the squeezed side is (B, 4C, H2, W2), the other
// (B, C, 2 H2, 2 W2); `x` is the input of the direction `reverse`.
struct SqueezeGeometry {
  int64_t B, C, H2, W2;
};
inline SqueezeGeometry squeeze_geometry(const Tensor& x, bool reverse) {
  return {x.size(0), reverse ? x.size(1) / 4 : x.size(1), reverse ? x.size(2) : x.size(2) / 2,
          reverse ? x.size(3) : x.size(3) / 2};
}
inline Tensor squeeze_output(const Tensor& x, const SqueezeGeometry& g, bool reverse) {
  return reverse ? at::empty({g.B, g.C, 2 * g.H2, 2 * g.W2}, x.options())
                 : at::empty({g.B, 4 * g.C, g.H2, g.W2}, x.options());
}

#define FLOWGMM_DECLARE_OPS(ns)                                                                                    \
  namespace ns {                                                                                                   \
  std::tuple<Tensor, Tensor> coupling_fwd(const Tensor& x, const Tensor& s, const Tensor& t, const OptTensor& scale, \
                                          const OptTensor& mask, int64_t parity, bool reverse,                     \
                                          const OptTensor& sldj);                                                  \
  std::tuple<Tensor, Tensor, Tensor, Tensor> coupling_bwd(const Tensor& grad_y, const OptTensor& grad_sldj,        \
                                                          const Tensor& x, const Tensor& s, const Tensor& t,       \
                                                          const OptTensor& scale, const OptTensor& mask,           \
                                                          int64_t parity, bool reverse, bool joint_st);            \
  Tensor squeeze2x2(const Tensor& x, bool reverse, bool alt_order);                                                \
  std::tuple<Tensor, Tensor> logit_fwd(const Tensor& x, double alpha, bool reverse, const OptTensor& sldj,         \
                                       const OptTensor& noise);                                                    \
  std::tuple<Tensor, Tensor> logit_bwd(const Tensor& grad_y, const OptTensor& grad_sldj, const Tensor& x,         \
                                       double alpha, bool reverse, const OptTensor& noise, bool noise_grad);       \
  std::tuple<Tensor, Tensor> gmm_fwd(const Tensor& z, const Tensor& means, const Tensor& log_std,                  \
                                     const OptTensor& weight_logits, const OptTensor& labels, double label_weight); \
  std::tuple<Tensor, Tensor, Tensor, Tensor> gmm_bwd(const OptTensor& grad_nll, const OptTensor& grad_logits,      \
                                                     const Tensor& z, const Tensor& means, const Tensor& log_std,  \
                                                     const OptTensor& weight_logits, const OptTensor& labels,      \
                                                     double label_weight, const Tensor& logits);                   \
  }

FLOWGMM_DECLARE_OPS(cpu)

// CPU hot loops for float32 are compiled once per ISA (AVX-512, AVX2, baseline) and picked at load time (ifunc);
// the per-element math (flowgmm_math.h) is always_inline so each clone vectorises it for its ISA.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__CUDACC__)
#define FLOWGMM_CPU_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FLOWGMM_CPU_CLONES
#endif
#if !defined(__CUDACC__)
// Row reductions of the CPU loops (log-dets, scale gradients): sum_{i in [begin, end)} term(i) as vectorised partials
// in the compute dtype over kSumBlock elements, added in double. One float accumulator per SIMD lane over a whole
// 2048 x 2048 sample drifted by 1e-4 (coupling) to 5e-4 (logit) relative; blocked, the error stays at a few float ulps
// of the block sums. `term` may write outputs as a side effect (y, gradients): the loop over i is one pass.
constexpr int64_t kSumBlock = 1024;

template <typename acc, typename Term>
inline __attribute__((always_inline)) double blocked_sum(int64_t begin, int64_t end, const Term& term) {
  double total = 0;
  for (int64_t i0 = begin; i0 < end; i0 += kSumBlock) {
    const int64_t i1 = std::min(end, i0 + kSumBlock);
    acc part = 0;
#pragma omp simd reduction(+ : part)
    for (int64_t i = i0; i < i1; ++i) part += term(i);
    total += part;
  }
  return total;
}
#endif

#if defined(FLOWGMM_WITH_CUDA)
FLOWGMM_DECLARE_OPS(cuda)
#endif
}  // namespace flowgmm
