// 2x2 squeeze (a permutation; any dtype) and the logit preprocessing with its per-sample log-det on CUDA.
// Squeeze: one thread per adjacent column pair (2w, 2w + 1) of an unsqueezed row (grid.y walks the samples), so a warp
// reads / writes the unsqueezed rows contiguously and the two squeezed rows (j = 0, 1) contiguously; int32 indexing
// within a sample (int64 past 2^31 elements) with precomputed multiply-shift dividers, int64 per-sample base.
// Logit forward: the column-tiled per-sample layout of coupling.cu with the log-det reduced per warp into a
// (B, column blocks * warps) partials buffer that ATen sums in a fixed order (deterministic: no float atomics);
// backward: elementwise. The tensor's device (guard) and its current stream.
#include <cstdint>
#include <type_traits>

#include "common.cuh"  // first: IntegerDivider.cuh relies on the c10 macros it pulls in
#include <ATen/cuda/detail/IntegerDivider.cuh>
#include "flowgmm_math.h"
#include "ops.h"

namespace flowgmm {
namespace cuda {
namespace {

using cuda_detail::kThreads;
using cuda_detail::kWarps;
using cuda_detail::warp_sum;

// Thread p of sample b owns unsqueezed elements 2p and 2p + 1 (row q = p / W2 = 2 (c H2 + h) + i, column pair w =
// p % W2) and element w of squeezed rows (o(c, i, j), h) for j = 0, 1. index_t is int32 when a sample has fewer than
// 2^31 elements (IntDivider<uint32_t>: a multiply-high and shift per division), else int64 (plain division).
template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kThreads) squeeze_kernel(const scalar_t* __restrict__ src, scalar_t* __restrict__ dst,
                                                          int64_t B, index_t pairs, index_t C, index_t H2, index_t W2,
                                                          at::cuda::detail::IntDivider<std::make_unsigned_t<index_t>> by_w2,
                                                          at::cuda::detail::IntDivider<std::make_unsigned_t<index_t>> by_h2,
                                                          bool alt, bool reverse) {
  using uindex_t = std::make_unsigned_t<index_t>;
  const index_t p = static_cast<index_t>(blockIdx.x) * kThreads + static_cast<index_t>(threadIdx.x);
  if (p >= pairs) return;
  const auto qw = by_w2.divmod(static_cast<uindex_t>(p));
  const index_t q = static_cast<index_t>(qw.div), w = static_cast<index_t>(qw.mod);
  const index_t i = q & 1;
  const auto ch = by_h2.divmod(static_cast<uindex_t>(q >> 1));
  const index_t c = static_cast<index_t>(ch.div), h = static_cast<index_t>(ch.mod);
  const index_t plane = H2 * W2, hw = h * W2 + w;
  const index_t q0 = math::squeeze_channel<index_t>(c, i, 0, C, alt) * plane + hw;
  const index_t q1 = math::squeeze_channel<index_t>(c, i, 1, C, alt) * plane + hw;
  const index_t u = 2 * p;
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    const int64_t base = b * (2 * static_cast<int64_t>(pairs));
    const scalar_t* s = src + base;
    scalar_t* d = dst + base;
    if (reverse) {
      d[u] = s[q0];
      d[u + 1] = s[q1];
    } else {
      d[q0] = s[u];
      d[q1] = s[u + 1];
    }
  }
}

template <typename scalar_t, typename index_t>
void launch_squeeze(const Tensor& x, Tensor& out, const SqueezeGeometry& g, bool alt, bool reverse) {
  using div_t = at::cuda::detail::IntDivider<std::make_unsigned_t<index_t>>;
  const int64_t pairs = 2 * g.C * g.H2 * g.W2;
  const dim3 grid(static_cast<unsigned>(cuda_detail::ceil_div(pairs, kThreads)),
                  static_cast<unsigned>(std::min<int64_t>(g.B, 65535)));
  squeeze_kernel<scalar_t, index_t><<<grid, kThreads, 0, cuda_detail::stream()>>>(
      x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), g.B, static_cast<index_t>(pairs),
      static_cast<index_t>(g.C), static_cast<index_t>(g.H2), static_cast<index_t>(g.W2),
      div_t(static_cast<std::make_unsigned_t<index_t>>(g.W2)), div_t(static_cast<std::make_unsigned_t<index_t>>(g.H2)),
      alt, reverse);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) logit_fwd_kernel(const scalar_t* __restrict__ x,
                                                            const scalar_t* __restrict__ noise, scalar_t* y,
                                                            at::opmath_type<scalar_t>* ldj_part, int64_t B, int64_t N,
                                                            int64_t rows, double alpha, double scale,
                                                            double log_scale, bool reverse) {
  using acc = at::opmath_type<scalar_t>;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const bool active = j < N;
  const acc a = static_cast<acc>(alpha), sc = static_cast<acc>(scale), ls = static_cast<acc>(log_scale);
  const int64_t b0 = static_cast<int64_t>(blockIdx.y) * rows;
  const int64_t b1 = b0 + rows < B ? b0 + rows : B;
  for (int64_t b = b0; b < b1; ++b) {
    acc el = 0;
    if (active) {
      const int64_t i = b * N + j;
      acc v = static_cast<acc>(x[i]);
      if (reverse) {
        y[i] = static_cast<scalar_t>(math::logit_reverse(v, a, sc, ls, el));
      } else {
        if (noise) v = math::dequantize(v, static_cast<acc>(noise[i]));
        y[i] = static_cast<scalar_t>(math::logit_forward(v, a, sc, ls, el));
      }
    }
    const acc tot = warp_sum(el);
    if ((threadIdx.x & 31) == 0)
      ldj_part[(b * gridDim.x + blockIdx.x) * kWarps + (threadIdx.x >> 5)] = reverse ? -tot : tot;
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) logit_bwd_kernel(const scalar_t* __restrict__ gy,
                                                            const at::opmath_type<scalar_t>* __restrict__ gl,
                                                            const scalar_t* __restrict__ x,
                                                            const scalar_t* __restrict__ noise, scalar_t* gx,
                                                            scalar_t* gnoise, int64_t total, int64_t N, double alpha,
                                                            double scale, bool reverse) {
  using acc = at::opmath_type<scalar_t>;
  const acc a = static_cast<acc>(alpha), sc = static_cast<acc>(scale);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const acc glb = gl ? gl[i / N] : acc(0), nz = noise ? static_cast<acc>(noise[i]) : acc(0);
    const acc g = math::logit_grad(static_cast<acc>(gy[i]), glb, static_cast<acc>(x[i]), noise != nullptr, nz, a, sc,
                                   reverse);
    // with noise g = dL/du: dL/dx = g 255/256 and dL/dnoise = g / 256, each rounded once (see math::logit_grad)
    gx[i] = static_cast<scalar_t>(noise ? g * (acc(255) / acc(256)) : g);
    if (gnoise) gnoise[i] = static_cast<scalar_t>(g / acc(256));
  }
}

unsigned elementwise_blocks(int64_t total) {
  return static_cast<unsigned>(
      std::clamp<int64_t>(cuda_detail::ceil_div(total, kThreads), 1, cuda_detail::target_blocks() * 4));
}

}  // namespace

Tensor squeeze2x2(const Tensor& x_, bool reverse, bool alt_order) {
  const c10::cuda::OptionalCUDAGuard guard(x_.device());
  const Tensor x = x_.contiguous();
  const SqueezeGeometry g = squeeze_geometry(x, reverse);
  Tensor out = squeeze_output(x, g, reverse);
  if (x.numel() == 0) return out;
  // int32 within a sample while its elements (and the dividers' operands) stay below 2^31
  const bool narrow = 4 * g.C * g.H2 * g.W2 < (int64_t(1) << 31);
  AT_DISPATCH_ALL_TYPES_AND3(at::kHalf, at::kBFloat16, at::kBool, x.scalar_type(), "squeeze2x2_cuda", [&] {
    if (narrow) launch_squeeze<scalar_t, int32_t>(x, out, g, alt_order, reverse);
    else launch_squeeze<scalar_t, int64_t>(x, out, g, alt_order, reverse);
  });
  return out;
}

std::tuple<Tensor, Tensor> logit_fwd(const Tensor& x_, double alpha, bool reverse, const OptTensor& sldj,
                                     const OptTensor& noise) {
  const c10::cuda::OptionalCUDAGuard guard(x_.device());
  const Tensor x = x_.contiguous();
  const Tensor n = noise ? noise->contiguous() : Tensor();
  const int64_t B = x.size(0), N = B == 0 ? 0 : x.numel() / B;
  const auto acc_t = acc_dtype(x.scalar_type());
  const auto out_t = ldj_dtype(x.scalar_type(), sldj ? sldj->scalar_type() : at::kFloat);
  Tensor y = at::empty_like(x);
  Tensor ldj = at::zeros({B}, x.options().dtype(acc_t));
  if (x.numel() > 0) {
    const auto layout = cuda_detail::column_grid(B, N);
    const dim3 grid = layout.first;
    const int64_t rows = layout.second;
    Tensor part = at::empty({B, static_cast<int64_t>(grid.x) * kWarps}, x.options().dtype(acc_t));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "logit_fwd_cuda", [&] {
      using acc = at::opmath_type<scalar_t>;
      logit_fwd_kernel<scalar_t><<<grid, kThreads, 0, cuda_detail::stream()>>>(
          x.data_ptr<scalar_t>(), n.defined() ? n.data_ptr<scalar_t>() : nullptr, y.data_ptr<scalar_t>(),
          part.data_ptr<acc>(), B, N, rows, alpha, 1 - 2 * alpha, std::log1p(-2 * alpha), reverse);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    ldj = part.sum(1);
  }
  Tensor out = ldj.to(out_t);
  if (sldj) out = out.add_(sldj->to(out_t));
  return {y, out};
}

std::tuple<Tensor, Tensor> logit_bwd(const Tensor& grad_y, const OptTensor& grad_sldj, const Tensor& x_, double alpha,
                                     bool reverse, const OptTensor& noise, bool noise_grad) {
  const c10::cuda::OptionalCUDAGuard guard(x_.device());
  const Tensor x = x_.contiguous();
  const Tensor gy = grad_y.to(x.scalar_type()).contiguous();
  const Tensor n = noise ? noise->contiguous() : Tensor();
  const int64_t B = x.size(0), total = x.numel(), N = B == 0 ? 1 : std::max<int64_t>(1, total / B);
  const Tensor gl = grad_sldj ? grad_sldj->to(acc_dtype(x.scalar_type())).contiguous() : Tensor();
  Tensor gx = at::empty_like(x);
  Tensor gn = noise && noise_grad ? at::empty_like(x) : at::empty({0}, x.options());
  if (total == 0) return {gx, gn};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "logit_bwd_cuda", [&] {
    using acc = at::opmath_type<scalar_t>;
    logit_bwd_kernel<scalar_t><<<elementwise_blocks(total), kThreads, 0, cuda_detail::stream()>>>(
        gy.data_ptr<scalar_t>(), gl.defined() ? gl.data_ptr<acc>() : nullptr, x.data_ptr<scalar_t>(),
        n.defined() ? n.data_ptr<scalar_t>() : nullptr, gx.data_ptr<scalar_t>(),
        gn.numel() ? gn.data_ptr<scalar_t>() : nullptr, total, N, alpha, 1 - 2 * alpha, reverse);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {gx, gn};
}

}  // namespace cuda
}  // namespace flowgmm
