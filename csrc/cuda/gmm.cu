// Gaussian-mixture likelihood on CUDA (isotropic (K,) or diagonal (K, D) log_std); (B, K, D) is never formed.
// Forward: one warp per sample; for each component the warp reduces sum_d (z_d - mu_kd)^2 / s_kd^2 over D, then lane
// 0 forms the logits row (log N + log pi) and the nll (logsumexp over K or the label gather with label_weight) with
// flowgmm_math.h's row functions. Backward: one kernel; a block owns 256 columns d and walks chunks of samples
// (grid-stride over the chunks, so any batch fits the grid): per chunk it forms the per-sample gradients G = dL/dlog N
// (softmax weights, label terms) in shared memory from the saved logits, writes dL/dz for its (b, d) once, and
// accumulates dL/dmu and dL/dlog_std over the chunk in registers, then adds them to its own slot (blockIdx.y, k, d) of
// a partials buffer (no other block touches it: deterministic, no float atomics); ATen sums the partials in a fixed
// order. The (K,) softmax step for weight_logits is done with ATen ops.
#include "common.cuh"
#include "flowgmm_math.h"
#include "ops.h"

namespace flowgmm {
namespace cuda {
namespace {

using cuda_detail::kThreads;
using cuda_detail::warp_sum;

template <typename zt>
__global__ void __launch_bounds__(kThreads) gmm_fwd_kernel(const zt* __restrict__ z,
                                                          const at::opmath_type<zt>* __restrict__ means,
                                                          const at::opmath_type<zt>* __restrict__ inv_var,
                                                          const at::opmath_type<zt>* __restrict__ log_det,
                                                          const at::opmath_type<zt>* __restrict__ log_pi,
                                                          const int64_t* __restrict__ labels, double label_weight,
                                                          int64_t B, int64_t K, int64_t D, bool diag,
                                                          at::opmath_type<zt>* logits, at::opmath_type<zt>* nll) {
  using acc = at::opmath_type<zt>;
  const int lane = threadIdx.x & 31;
  const int64_t b = static_cast<int64_t>(blockIdx.x) * (kThreads / 32) + (threadIdx.x >> 5);
  if (b >= B) return;  // whole warp
  const zt* zr = z + b * D;
  const acc half_d_log2pi = static_cast<acc>(0.5 * static_cast<double>(D) * math::kLog2Pi);
  for (int64_t k = 0; k < K; ++k) {
    const acc* mr = means + k * D;
    acc part = 0;
    if (diag) {
      const acc* ivr = inv_var + k * D;
      for (int64_t d = lane; d < D; d += 32) {
        const acc diff = static_cast<acc>(zr[d]) - mr[d];
        part += diff * diff * ivr[d];
      }
    } else {
      for (int64_t d = lane; d < D; d += 32) {
        const acc diff = static_cast<acc>(zr[d]) - mr[d];
        part += diff * diff;
      }
    }
    const acc maha = warp_sum(part) * (diag ? acc(1) : inv_var[k]);
    if (lane == 0) logits[b * K + k] = -acc(0.5) * maha - log_det[k] - half_d_log2pi + log_pi[k];
  }
  if (lane == 0)
    nll[b] = math::row_nll(logits + b * K, log_pi, K, labels ? labels[b] : int64_t(-1), static_cast<acc>(label_weight));
}

template <typename zt>
__global__ void __launch_bounds__(kThreads) gmm_bwd_kernel(
    const zt* __restrict__ z, const at::opmath_type<zt>* __restrict__ means,
    const at::opmath_type<zt>* __restrict__ inv_var, const at::opmath_type<zt>* __restrict__ logits,
    const at::opmath_type<zt>* __restrict__ g_logits, const at::opmath_type<zt>* __restrict__ g_nll,
    const int64_t* __restrict__ labels, double label_weight, int64_t B, int64_t K, int64_t D, int64_t rows,
    bool diag, zt* gz, at::opmath_type<zt>* gm_part, at::opmath_type<zt>* gl_part, at::opmath_type<zt>* gpi_part) {
  // gm_part, gl_part: (gridDim.y, K, D); gpi_part: (gridDim.y, K); zero on entry, each slot owned by one block
  using acc = at::opmath_type<zt>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc* G = reinterpret_cast<acc*>(smem_raw);  // (rows, K): dL/dlog N
  acc* P = G + rows * K;                      // (rows, K): dL/dlog pi
  const int64_t d = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const bool active = d < D;
  acc* gm_slot = gm_part + static_cast<int64_t>(blockIdx.y) * K * D;
  acc* gl_slot = gl_part + static_cast<int64_t>(blockIdx.y) * K * D;
  const int64_t chunks = (B + rows - 1) / rows;
  for (int64_t chunk = blockIdx.y; chunk < chunks; chunk += gridDim.y) {
    const int64_t b0 = chunk * rows;
    const int64_t nb = b0 + rows < B ? rows : B - b0;
    for (int64_t r = threadIdx.x; r < nb; r += kThreads) {
      const int64_t b = b0 + r;
      math::row_grad(logits + b * K, g_logits ? g_logits + b * K : nullptr, g_nll ? g_nll[b] : acc(0), K,
                     labels ? labels[b] : int64_t(-1), static_cast<acc>(label_weight), G + r * K, P + r * K);
    }
    __syncthreads();
    if (blockIdx.x == 0 && gpi_part) {
      for (int64_t k = threadIdx.x; k < K; k += kThreads) {
        acc sum = 0;
        for (int64_t r = 0; r < nb; ++r) sum += P[r * K + k];
        gpi_part[static_cast<int64_t>(blockIdx.y) * K + k] += sum;
      }
    }
    if (active) {
      for (int64_t r = 0; r < nb; ++r) {
        const int64_t b = b0 + r;
        const acc zb = static_cast<acc>(z[b * D + d]);
        acc g = 0;
        for (int64_t k = 0; k < K; ++k)
          g -= G[r * K + k] * (diag ? inv_var[k * D + d] : inv_var[k]) * (zb - means[k * D + d]);
        gz[b * D + d] = static_cast<zt>(g);
      }
      for (int64_t k = 0; k < K; ++k) {
        const acc m = means[k * D + d], iv = diag ? inv_var[k * D + d] : inv_var[k];
        acc gm = 0, gl = 0;
        for (int64_t r = 0; r < nb; ++r) {
          const acc diff = static_cast<acc>(z[(b0 + r) * D + d]) - m, Gk = G[r * K + k];
          gm += Gk * diff;
          gl += Gk * (diff * diff * iv - acc(1));
        }
        gm_slot[k * D + d] += gm * iv;
        gl_slot[k * D + d] += gl;  // isotropic: summed over d too by the launcher
      }
    }
    __syncthreads();  // G and P are rewritten by the next chunk
  }
}

struct Prepared {
  Tensor z, means, log_std, inv_var, log_det, log_pi;  // z: its own dtype (float64 when computing in float64)
  at::ScalarType cdt;
};

Prepared prepare(const Tensor& z, const Tensor& means, const Tensor& log_std, const OptTensor& weight_logits) {
  Prepared p;
  p.cdt = ldj_dtype(z.scalar_type(), means.scalar_type(), log_std.scalar_type());
  p.z = (p.cdt == at::kDouble ? z.to(at::kDouble) : z).contiguous();
  p.means = means.to(p.cdt).contiguous();
  p.log_std = log_std.to(p.cdt).contiguous();
  p.inv_var = at::exp(p.log_std * -2);
  const int64_t K = means.size(0), D = means.size(1);
  p.log_det = log_std.dim() == 2 ? p.log_std.sum(1) : p.log_std * static_cast<double>(D);
  p.log_pi = weight_logits ? at::log_softmax(weight_logits->to(p.cdt), 0)
                           : at::full({K}, -std::log(static_cast<double>(K)), p.means.options());
  return p;
}

}  // namespace

std::tuple<Tensor, Tensor> gmm_fwd(const Tensor& z, const Tensor& means, const Tensor& log_std,
                                   const OptTensor& weight_logits, const OptTensor& labels, double label_weight) {
  const c10::cuda::OptionalCUDAGuard guard(z.device());
  const Prepared p = prepare(z, means, log_std, weight_logits);
  const int64_t B = z.size(0), K = means.size(0), D = means.size(1);
  Tensor logits = at::empty({B, K}, p.means.options());
  Tensor nll = at::empty({B}, p.means.options());
  if (B == 0) return {nll, logits};
  const Tensor lab = labels ? labels->contiguous() : Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.z.scalar_type(), "gmm_fwd_cuda", [&] {
    using acc = at::opmath_type<scalar_t>;
    const auto blocks = static_cast<unsigned>(cuda_detail::ceil_div(B, kThreads / 32));
    gmm_fwd_kernel<scalar_t><<<blocks, kThreads, 0, cuda_detail::stream()>>>(
        p.z.data_ptr<scalar_t>(), p.means.data_ptr<acc>(), p.inv_var.data_ptr<acc>(), p.log_det.data_ptr<acc>(),
        p.log_pi.data_ptr<acc>(), lab.defined() ? lab.data_ptr<int64_t>() : nullptr, label_weight, B, K, D,
        log_std.dim() == 2, logits.data_ptr<acc>(), nll.data_ptr<acc>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {nll, logits};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> gmm_bwd(const OptTensor& grad_nll, const OptTensor& grad_logits,
                                                   const Tensor& z, const Tensor& means, const Tensor& log_std,
                                                   const OptTensor& weight_logits, const OptTensor& labels,
                                                   double label_weight, const Tensor& logits_) {
  const c10::cuda::OptionalCUDAGuard guard(z.device());
  const Prepared p = prepare(z, means, log_std, weight_logits);
  const int64_t B = z.size(0), K = means.size(0), D = means.size(1);
  const Tensor logits = logits_.to(p.cdt).contiguous();
  const Tensor gn = grad_nll ? grad_nll->to(p.cdt).contiguous() : Tensor();
  const Tensor gL = grad_logits ? grad_logits->to(p.cdt).contiguous() : Tensor();
  const Tensor lab = labels ? labels->contiguous() : Tensor();
  Tensor gz = at::empty({B, D}, p.z.options());
  Tensor gm = at::zeros({K, D}, p.means.options());
  Tensor gls = at::zeros(p.log_std.sizes(), p.means.options());
  Tensor gpi = at::zeros({K}, p.means.options());
  const int64_t elt = p.cdt == at::kDouble ? 8 : 4;
  const int64_t max_rows = (48 * 1024) / (2 * K * elt);
  TORCH_CHECK(max_rows >= 1, "gmm_bwd (CUDA): K = ", K, " components is too many for the shared-memory tile");
  if (B > 0) {
    // blocks: enough to fill the GPU (grid.y <= target); rows per chunk bounded by shared memory; a block walks
    // chunks y, y + grid.y, ... so any B fits. The partials are (grid.y, K, D): bounded by the target, not by B.
    const int64_t col_blocks = cuda_detail::ceil_div(D, kThreads);
    const int64_t target = std::clamp<int64_t>(cuda_detail::target_blocks() / col_blocks, 1, 65535);
    const int64_t rows = std::min<int64_t>(cuda_detail::ceil_div(B, target), max_rows);
    const int64_t grid_y = std::min<int64_t>(cuda_detail::ceil_div(B, rows), target);
    const dim3 grid(static_cast<unsigned>(col_blocks), static_cast<unsigned>(grid_y));
    const size_t smem = static_cast<size_t>(2 * rows * K * elt);
    Tensor gm_part = at::zeros({grid_y, K, D}, p.means.options());
    Tensor gl_part = at::zeros({grid_y, K, D}, p.means.options());
    Tensor gpi_part = at::zeros({grid_y, K}, p.means.options());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.z.scalar_type(), "gmm_bwd_cuda", [&] {
      using acc = at::opmath_type<scalar_t>;
      gmm_bwd_kernel<scalar_t><<<grid, kThreads, smem, cuda_detail::stream()>>>(
          p.z.data_ptr<scalar_t>(), p.means.data_ptr<acc>(), p.inv_var.data_ptr<acc>(), logits.data_ptr<acc>(),
          gL.defined() ? gL.data_ptr<acc>() : nullptr, gn.defined() ? gn.data_ptr<acc>() : nullptr,
          lab.defined() ? lab.data_ptr<int64_t>() : nullptr, label_weight, B, K, D, rows, log_std.dim() == 2,
          gz.data_ptr<scalar_t>(), gm_part.data_ptr<acc>(), gl_part.data_ptr<acc>(),
          weight_logits ? gpi_part.data_ptr<acc>() : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    gm = gm_part.sum(0);
    gls = log_std.dim() == 2 ? gl_part.sum(0) : gl_part.sum(at::IntArrayRef{0, 2});
    gpi = gpi_part.sum(0);
  }
  Tensor gw = at::empty({0}, p.means.options());
  if (weight_logits) {
    gw = (gpi - at::softmax(weight_logits->to(p.cdt), 0) * gpi.sum()).to(weight_logits->scalar_type());
  }
  return {gz.to(z.scalar_type()), gm.to(means.scalar_type()), gls.to(log_std.scalar_type()), gw};
}

}  // namespace cuda
}  // namespace flowgmm
