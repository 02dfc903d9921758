// Affine coupling on CUDA: one fused kernel per direction (flowgmm_math.h's per-element math).
// Layout: x viewed as (B, N = C * S); each thread owns one column (so its channel, scale and mask value are loaded
// once) and loops over a chunk of samples; coalesced across threads. Deterministic (no float atomics): forward, each
// warp's sum of its sample's log-det terms goes to its own slot of a (B, column blocks * warps) partials buffer, summed
// by ATen in a fixed order; backward, dL/dx, dL/ds, dL/dt are written once and each column's scale gradient, reduced in
// registers over the sample chunk, goes to a (chunks, N) partials buffer, summed over chunks and the channel's
// positions by ATen. Grid sized from the SM count; the tensor's device (guard) and its current stream. Inputs whose
// per-sample (C, S) planes are dense (the s/t net's `.chunk(2, 1)` views) are read in place at their batch strides;
// with a joint s/t tensor the s and t gradients are the two halves of one (B, 2C, S) tensor (coupling_st_grads).
// Vectors (x (B, D)) have their own row-tiled pair of kernels (see "vectors" below).
#include "common.cuh"
#include "flowgmm_math.h"
#include "ops.h"

namespace flowgmm {
namespace cuda {
namespace {

using cuda_detail::kThreads;
using cuda_detail::kWarps;
using cuda_detail::warp_sum;

enum Mode { kNoMask = 0, kDense = 1, kChecker = 2 };

template <typename scalar_t>
struct CouplingArgs {
  using acc = at::opmath_type<scalar_t>;
  const scalar_t *x, *s, *t, *mask, *gy;
  const acc *scale, *gl;
  scalar_t *y, *gx, *gs, *gt;
  acc* red;  // forward: (B, gridDim.x * kWarps) log-det partials; backward: (gridDim.y, N) scale-gradient partials
  int64_t B, N, S, W, rows;
  int64_t xb, sb, tb, gyb, gsb, gtb;  // batch strides (elements) of x, s, t, gy, gs, gt; y and gx: N
  int64_t gls;                        // stride of gl (0 when expanded)
  int parity, mode;
  bool has_scale, reverse;
};

template <typename scalar_t>
__device__ __forceinline__ at::opmath_type<scalar_t> column_keep(const CouplingArgs<scalar_t>& a, int64_t j) {
  using acc = at::opmath_type<scalar_t>;
  if (a.mode == kDense) return static_cast<acc>(a.mask[j]);
  if (a.mode == kChecker) {
    const int64_t sp = j % a.S, h = sp / a.W;
    return static_cast<acc>(math::checker_keep(h, sp - h * a.W, a.parity));
  }
  return acc(0);
}

// One element (sample b, column j of the (B, N) view) of the forward: stores y, returns s_m (its log-det term).
template <typename scalar_t>
__device__ __forceinline__ at::opmath_type<scalar_t> forward_element(const CouplingArgs<scalar_t>& a, int64_t b,
                                                                     int64_t j, at::opmath_type<scalar_t> sc,
                                                                     at::opmath_type<scalar_t> keep) {
  using acc = at::opmath_type<scalar_t>;
  const acc xv = static_cast<acc>(a.x[b * a.xb + j]), sv = static_cast<acc>(a.s[b * a.sb + j]),
            tv = static_cast<acc>(a.t[b * a.tb + j]);
  acc s_m, yv;
  if (a.has_scale) {
    yv = a.reverse ? math::coupling_forward<acc, true, true>(xv, sv, tv, sc, keep, s_m)
                   : math::coupling_forward<acc, true, false>(xv, sv, tv, sc, keep, s_m);
  } else {
    yv = a.reverse ? math::coupling_forward<acc, false, true>(xv, sv, tv, sc, keep, s_m)
                   : math::coupling_forward<acc, false, false>(xv, sv, tv, sc, keep, s_m);
  }
  a.y[b * a.N + j] = static_cast<scalar_t>(yv);
  return s_m;
}

// One element of the backward: stores dL/dx, dL/ds, dL/dt, returns its scale-gradient term (0 without a scale).
template <typename scalar_t>
__device__ __forceinline__ at::opmath_type<scalar_t> backward_element(const CouplingArgs<scalar_t>& a, int64_t b,
                                                                      int64_t j, at::opmath_type<scalar_t> sc,
                                                                      at::opmath_type<scalar_t> keep) {
  using acc = at::opmath_type<scalar_t>;
  const acc gy = static_cast<acc>(a.gy[b * a.gyb + j]), gl = a.gl ? a.gl[b * a.gls] : acc(0);
  const acc xv = static_cast<acc>(a.x[b * a.xb + j]), sv = static_cast<acc>(a.s[b * a.sb + j]),
            tv = static_cast<acc>(a.t[b * a.tb + j]);
  acc gx, gs, gt, gscale = 0;
  if (a.has_scale) {
    gscale = a.reverse ? math::coupling_backward<acc, true, true>(gy, gl, xv, sv, tv, sc, keep, gx, gs, gt)
                       : math::coupling_backward<acc, true, false>(gy, gl, xv, sv, tv, sc, keep, gx, gs, gt);
  } else if (a.reverse) {
    math::coupling_backward<acc, false, true>(gy, gl, xv, sv, tv, sc, keep, gx, gs, gt);
  } else {
    math::coupling_backward<acc, false, false>(gy, gl, xv, sv, tv, sc, keep, gx, gs, gt);
  }
  a.gx[b * a.N + j] = static_cast<scalar_t>(gx);
  a.gs[b * a.gsb + j] = static_cast<scalar_t>(gs);
  a.gt[b * a.gtb + j] = static_cast<scalar_t>(gt);
  return gscale;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) coupling_fwd_kernel(const CouplingArgs<scalar_t> a) {
  using acc = at::opmath_type<scalar_t>;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const bool active = j < a.N;
  const int64_t c = active ? j / a.S : 0;
  const acc sc = (active && a.has_scale) ? a.scale[c] : acc(0);
  const acc keep = active ? column_keep(a, j) : acc(0);
  const int64_t b0 = static_cast<int64_t>(blockIdx.y) * a.rows;
  const int64_t b1 = b0 + a.rows < a.B ? b0 + a.rows : a.B;
  for (int64_t b = b0; b < b1; ++b) {
    const acc s_m = active ? forward_element(a, b, j, sc, keep) : acc(0);
    const acc tot = warp_sum(s_m);
    if ((threadIdx.x & 31) == 0) a.red[(b * gridDim.x + blockIdx.x) * kWarps + (threadIdx.x >> 5)] = tot;
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) coupling_bwd_kernel(const CouplingArgs<scalar_t> a) {
  using acc = at::opmath_type<scalar_t>;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const bool active = j < a.N;
  const int64_t c = active ? j / a.S : 0;
  const acc sc = (active && a.has_scale) ? a.scale[c] : acc(0);
  const acc keep = active ? column_keep(a, j) : acc(0);
  const int64_t b0 = static_cast<int64_t>(blockIdx.y) * a.rows;
  const int64_t b1 = b0 + a.rows < a.B ? b0 + a.rows : a.B;
  acc gscale = 0;
  if (active) {
    for (int64_t b = b0; b < b1; ++b) gscale += backward_element(a, b, j, sc, keep);
  }
  if (a.has_scale && active) a.red[static_cast<int64_t>(blockIdx.y) * a.N + j] = gscale;
}

// ----------------------------------------------------------------------------------------------- vectors (S = 1)
// x (B, D): a block of kThreads = rows x lanes threads, lanes = min(next power of two of D, 32), so a row's features
// sit on `lanes` adjacent lanes of one warp (coalesced) and a small D still keeps every lane busy with rows. Blocks
// walk row chunks of `rows` rows (a multiple of kThreads / lanes).
// Forward: a row's log-det is reduced over its lanes with shuffles (fixed order) and stored once to red[b]: no partials.
// Backward: features outer, rows inner, so each thread keeps one register sum of its feature's scale gradient, then
// reduced over the block's row slots in shared memory in a fixed order and stored to red[blockIdx.x, d]: one (D,) partial
// per block, summed by ATen (deterministic; no atomics).
__host__ __device__ inline int vec_lanes(int64_t D) {
  int lanes = 1;
  while (lanes < 32 && lanes < D) lanes *= 2;
  return lanes;
}

template <typename scalar_t>
__device__ __forceinline__ at::opmath_type<scalar_t> row_keep(const CouplingArgs<scalar_t>& a, int64_t d) {
  using acc = at::opmath_type<scalar_t>;
  return a.mode == kDense ? static_cast<acc>(a.mask[d]) : acc(0);
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) coupling_vec_fwd_kernel(const CouplingArgs<scalar_t> a) {
  using acc = at::opmath_type<scalar_t>;
  const int lanes = vec_lanes(a.N), lane = threadIdx.x % lanes, slot = threadIdx.x / lanes, slots = kThreads / lanes;
  const int64_t b0 = static_cast<int64_t>(blockIdx.x) * a.rows;
  const int64_t b1 = b0 + a.rows < a.B ? b0 + a.rows : a.B;
  for (int64_t g = b0; g < b1; g += slots) {  // uniform across the block: every lane reaches the shuffles
    const int64_t b = g + slot;
    acc tot = 0;
    if (b < b1) {
      for (int64_t d = lane; d < a.N; d += lanes)
        tot += forward_element(a, b, d, a.has_scale ? a.scale[d] : acc(0), row_keep(a, d));
    }
    for (int o = lanes / 2; o > 0; o >>= 1) tot += __shfl_down_sync(0xffffffffu, tot, o, lanes);
    if (b < b1 && lane == 0) a.red[b] = tot;
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) coupling_vec_bwd_kernel(const CouplingArgs<scalar_t> a) {
  using acc = at::opmath_type<scalar_t>;
  __shared__ acc part[kThreads];
  const int lanes = vec_lanes(a.N), lane = threadIdx.x % lanes, slot = threadIdx.x / lanes, slots = kThreads / lanes;
  const int64_t b0 = static_cast<int64_t>(blockIdx.x) * a.rows;
  const int64_t b1 = b0 + a.rows < a.B ? b0 + a.rows : a.B;
  for (int64_t d0 = 0; d0 < a.N; d0 += lanes) {  // uniform across the block: every thread reaches the barriers
    const int64_t d = d0 + lane;
    acc gscale = 0;
    if (d < a.N) {
      const acc sc = a.has_scale ? a.scale[d] : acc(0), keep = row_keep(a, d);
      for (int64_t b = b0 + slot; b < b1; b += slots) gscale += backward_element(a, b, d, sc, keep);
    }
    if (a.has_scale) {
      part[threadIdx.x] = gscale;
      __syncthreads();
      if (slot == 0 && d < a.N) {
        acc sum = 0;
        for (int r = 0; r < slots; ++r) sum += part[r * lanes + lane];
        a.red[static_cast<int64_t>(blockIdx.x) * a.N + d] = sum;
      }
      __syncthreads();
    }
  }
}

// Blocks and rows per block of the vector kernels: about target_blocks() blocks, each a multiple of its row slots.
inline std::pair<unsigned, int64_t> vec_grid(int64_t B, int64_t D) {
  const int64_t slots = kThreads / vec_lanes(D);
  const int64_t groups = cuda_detail::ceil_div(std::max<int64_t>(B, 1), slots);
  const int64_t blocks = std::clamp<int64_t>(cuda_detail::target_blocks(), 1, groups);
  const int64_t rows = cuda_detail::ceil_div(groups, blocks) * slots;
  return {static_cast<unsigned>(cuda_detail::ceil_div(std::max<int64_t>(B, 1), rows)), rows};
}

template <typename scalar_t>
CouplingArgs<scalar_t> make_args(const Tensor& x, const Tensor& s, const Tensor& t, const Tensor& scale_c,
                                 const Tensor& mask_c, int64_t parity, bool reverse) {
  using acc = at::opmath_type<scalar_t>;
  CouplingArgs<scalar_t> a{};
  a.x = x.data_ptr<scalar_t>();
  a.s = s.data_ptr<scalar_t>();
  a.t = t.data_ptr<scalar_t>();
  a.xb = batch_stride(x);
  a.sb = batch_stride(s);
  a.tb = batch_stride(t);
  a.mask = mask_c.defined() ? mask_c.data_ptr<scalar_t>() : nullptr;
  a.scale = scale_c.defined() ? scale_c.data_ptr<acc>() : nullptr;
  a.B = x.size(0);
  a.N = a.B == 0 ? 0 : x.numel() / a.B;
  a.S = 1;
  for (int64_t d = 2; d < x.dim(); ++d) a.S *= x.size(d);
  a.W = parity >= 0 ? x.size(3) : 1;
  a.parity = static_cast<int>(parity);
  a.mode = parity >= 0 ? kChecker : (mask_c.defined() ? kDense : kNoMask);
  a.has_scale = scale_c.defined();
  a.reverse = reverse;
  return a;
}

// make_args plus the backward's tensors: the gradient of y, of ldj (read at its stride; may be undefined), the
// outputs and the scale-gradient partials (undefined without a scale).
template <typename scalar_t>
CouplingArgs<scalar_t> make_bwd_args(const Tensor& x, const Tensor& s, const Tensor& t, const Tensor& scale_c,
                                     const Tensor& mask_c, int64_t parity, bool reverse, const Tensor& gy,
                                     const Tensor& gl, const Tensor& gx, const Tensor& gs, const Tensor& gt,
                                     const Tensor& part, int64_t rows) {
  using acc = at::opmath_type<scalar_t>;
  CouplingArgs<scalar_t> a = make_args<scalar_t>(x, s, t, scale_c, mask_c, parity, reverse);
  a.gy = gy.data_ptr<scalar_t>();
  a.gyb = batch_stride(gy);
  a.gl = gl.defined() ? gl.data_ptr<acc>() : nullptr;
  a.gls = gl.defined() ? gl.stride(0) : 0;
  a.gx = gx.data_ptr<scalar_t>();
  a.gs = gs.data_ptr<scalar_t>();
  a.gt = gt.data_ptr<scalar_t>();
  a.gsb = batch_stride(gs);
  a.gtb = batch_stride(gt);
  a.red = part.defined() ? part.data_ptr<acc>() : nullptr;
  a.rows = rows;
  return a;
}

}  // namespace

std::tuple<Tensor, Tensor> coupling_fwd(const Tensor& x_, const Tensor& s_, const Tensor& t_, const OptTensor& scale,
                                        const OptTensor& mask, int64_t parity, bool reverse, const OptTensor& sldj) {
  const c10::cuda::OptionalCUDAGuard guard(x_.device());
  const Tensor x = dense_planes(x_), s = dense_planes(s_), t = dense_planes(t_);
  const auto acc_t = acc_dtype(x.scalar_type());
  const auto out_t = ldj_dtype(x.scalar_type(), sldj ? sldj->scalar_type() : at::kFloat);
  const Tensor scale_c = scale ? scale->to(acc_t).contiguous() : Tensor();
  const Tensor mask_c = mask ? mask->to(x.scalar_type()).contiguous() : Tensor();
  Tensor y = at::empty(x.sizes(), x.options());
  Tensor ldj = at::zeros({x.size(0)}, x.options().dtype(acc_t));
  if (x.numel() > 0 && x.dim() == 2) {
    const auto layout = vec_grid(x.size(0), x.size(1));
    const unsigned blocks = layout.first;
    const int64_t rows = layout.second;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "coupling_vec_fwd_cuda", [&] {
      using acc = at::opmath_type<scalar_t>;
      auto a = make_args<scalar_t>(x, s, t, scale_c, mask_c, parity, reverse);
      a.y = y.data_ptr<scalar_t>();
      a.red = ldj.data_ptr<acc>();
      a.rows = rows;
      coupling_vec_fwd_kernel<scalar_t><<<blocks, kThreads, 0, cuda_detail::stream()>>>(a);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  } else if (x.numel() > 0) {
    const auto layout = cuda_detail::column_grid(x.size(0), x.numel() / x.size(0));
    const dim3 grid = layout.first;
    const int64_t rows = layout.second;
    Tensor part = at::empty({x.size(0), static_cast<int64_t>(grid.x) * kWarps}, x.options().dtype(acc_t));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "coupling_fwd_cuda", [&] {
      using acc = at::opmath_type<scalar_t>;
      auto a = make_args<scalar_t>(x, s, t, scale_c, mask_c, parity, reverse);
      a.y = y.data_ptr<scalar_t>();
      a.red = part.data_ptr<acc>();
      a.rows = rows;
      coupling_fwd_kernel<scalar_t><<<grid, kThreads, 0, cuda_detail::stream()>>>(a);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    ldj = part.sum(1);
  }
  Tensor out = ldj.to(out_t);
  if (reverse) out.neg_();
  if (sldj) out.add_(sldj->to(out_t));
  return {y, out};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> coupling_bwd(const Tensor& grad_y, const OptTensor& grad_sldj,
                                                        const Tensor& x_, const Tensor& s_, const Tensor& t_,
                                                        const OptTensor& scale, const OptTensor& mask, int64_t parity,
                                                        bool reverse, bool joint_st) {
  const c10::cuda::OptionalCUDAGuard guard(x_.device());
  const Tensor x = dense_planes(x_), s = dense_planes(s_), t = dense_planes(t_);
  const Tensor gy = dense_planes(grad_y.to(x.scalar_type()));
  const auto acc_t = acc_dtype(x.scalar_type());
  const Tensor gl = grad_sldj ? grad_sldj->to(acc_t) : Tensor();  // read at its stride
  const Tensor scale_c = scale ? scale->to(acc_t).contiguous() : Tensor();
  const Tensor mask_c = mask ? mask->to(x.scalar_type()).contiguous() : Tensor();
  Tensor gx = at::empty(x.sizes(), x.options());
  auto [gst, gs, gt] = coupling_st_grads(x, joint_st);
  Tensor gscale = at::zeros({scale ? x.size(1) : 0}, x.options().dtype(acc_t));
  if (x.numel() > 0 && x.dim() == 2) {
    const int64_t B = x.size(0), D = x.size(1);
    const auto layout = vec_grid(B, D);
    const unsigned blocks = layout.first;
    const int64_t rows = layout.second;
    Tensor part = scale ? at::empty({static_cast<int64_t>(blocks), D}, x.options().dtype(acc_t)) : Tensor();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "coupling_vec_bwd_cuda", [&] {
      auto a = make_bwd_args<scalar_t>(x, s, t, scale_c, mask_c, parity, reverse, gy, gl, gx, gs, gt, part, rows);
      coupling_vec_bwd_kernel<scalar_t><<<blocks, kThreads, 0, cuda_detail::stream()>>>(a);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    if (scale) gscale = part.sum(0);
  } else if (x.numel() > 0) {
    const int64_t B = x.size(0), N = x.numel() / B;
    const auto layout = cuda_detail::column_grid(B, N);
    const dim3 grid = layout.first;
    const int64_t rows = layout.second;
    Tensor part = scale ? at::empty({static_cast<int64_t>(grid.y), N}, x.options().dtype(acc_t)) : Tensor();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "coupling_bwd_cuda", [&] {
      auto a = make_bwd_args<scalar_t>(x, s, t, scale_c, mask_c, parity, reverse, gy, gl, gx, gs, gt, part, rows);
      coupling_bwd_kernel<scalar_t><<<grid, kThreads, 0, cuda_detail::stream()>>>(a);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    if (scale) gscale = part.sum(0).view({x.size(1), N / x.size(1)}).sum(1);
  }
  const Tensor gscale_out = scale ? gscale.to(scale->scalar_type()) : at::empty({0}, x.options());
  if (joint_st) return {gx, gst, at::empty({0}, x.options()), gscale_out};
  return {gx, gs, gt, gscale_out};
}

}  // namespace cuda
}  // namespace flowgmm
