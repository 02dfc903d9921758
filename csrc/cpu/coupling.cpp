// Affine coupling on the CPU: one pass per direction over x (B, C, S) viewed as rows (b, c), fused tanh-scale, mask
// (none / dense / checkerboard from indices), exp and the per-sample log-det (forward) or the per-channel scale
// gradient (backward). Rows run in parallel (at::parallel_for); the inner loop over the last dim is branch-free and
// vectorised (float math from flowgmm_math.h, `omp simd` reductions). Nothing but the inputs is saved for backward.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include "flowgmm_math.h"
#include "ops.h"

namespace flowgmm {
namespace cpu {
namespace {

enum MaskMode { kNoMask = 0, kDense = 1, kChecker = 2 };

struct Geometry {
  int64_t B, C, S, H, W;  // S = H * W positions per channel; H = 1 unless checkerboard
};

Geometry geometry(const Tensor& x, int64_t parity) {
  Geometry g;
  g.B = x.size(0);
  g.C = x.size(1);
  g.S = 1;
  for (int64_t d = 2; d < x.dim(); ++d) g.S *= x.size(d);
  g.H = parity >= 0 ? x.size(2) : 1;
  g.W = parity >= 0 ? x.size(3) : g.S;
  return g;
}

int64_t grain_rows(int64_t S) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, S)); }

template <typename scalar_t, typename acc, int kMode>
inline acc keep_at(const scalar_t* mask_row, int64_t h, int64_t w, int64_t W, int parity) {
  if (kMode == kDense) return static_cast<acc>(mask_row[h * W + w]);
  if (kMode == kChecker) return static_cast<acc>(math::checker_keep(h, w, parity));
  return acc(0);
}

template <typename scalar_t, bool kScale, bool kReverse, int kMode>
void forward_rows(const scalar_t* x, const scalar_t* s, const scalar_t* t, const at::opmath_type<scalar_t>* scale,
                  const scalar_t* mask, int parity, const Geometry& g, scalar_t* y,
                  at::opmath_type<scalar_t>* row_ldj) {
  using acc = at::opmath_type<scalar_t>;
  at::parallel_for(0, g.B * g.C, grain_rows(g.S), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t c = r % g.C;
      const acc sc = kScale ? scale[c] : acc(0);
      const scalar_t* mrow = kMode == kDense ? mask + c * g.S : nullptr;
      acc ldj = 0;
      for (int64_t h = 0; h < g.H; ++h) {
        const int64_t o = r * g.S + h * g.W;
        const scalar_t *xr = x + o, *sr = s + o, *tr = t + o;
        scalar_t* yr = y + o;
#pragma omp simd reduction(+ : ldj)
        for (int64_t w = 0; w < g.W; ++w) {
          acc s_m;
          const acc keep = keep_at<scalar_t, acc, kMode>(mrow, h, w, g.W, parity);
          yr[w] = static_cast<scalar_t>(math::coupling_forward<acc, kScale, kReverse>(
              static_cast<acc>(xr[w]), static_cast<acc>(sr[w]), static_cast<acc>(tr[w]), sc, keep, s_m));
          ldj += s_m;
        }
      }
      row_ldj[r] = ldj;
    }
  });
}

template <typename scalar_t, bool kScale, bool kReverse, int kMode>
void backward_rows(const scalar_t* gy, const at::opmath_type<scalar_t>* gl, const scalar_t* x, const scalar_t* s,
                   const scalar_t* t, const at::opmath_type<scalar_t>* scale, const scalar_t* mask, int parity,
                   const Geometry& g, scalar_t* gx, scalar_t* gs, scalar_t* gt, at::opmath_type<scalar_t>* row_gscale) {
  using acc = at::opmath_type<scalar_t>;
  at::parallel_for(0, g.B * g.C, grain_rows(g.S), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / g.C, c = r % g.C;
      const acc sc = kScale ? scale[c] : acc(0);
      const acc glb = gl ? gl[b] : acc(0);
      const scalar_t* mrow = kMode == kDense ? mask + c * g.S : nullptr;
      acc gscale = 0;
      for (int64_t h = 0; h < g.H; ++h) {
        const int64_t o = r * g.S + h * g.W;
        const scalar_t *gyr = gy + o, *xr = x + o, *sr = s + o, *tr = t + o;
        scalar_t *gxr = gx + o, *gsr = gs + o, *gtr = gt + o;
#pragma omp simd reduction(+ : gscale)
        for (int64_t w = 0; w < g.W; ++w) {
          acc vx, vs, vt;
          const acc keep = keep_at<scalar_t, acc, kMode>(mrow, h, w, g.W, parity);
          gscale += math::coupling_backward<acc, kScale, kReverse>(static_cast<acc>(gyr[w]), glb,
                                                                   static_cast<acc>(xr[w]), static_cast<acc>(sr[w]),
                                                                   static_cast<acc>(tr[w]), sc, keep, vx, vs, vt);
          gxr[w] = static_cast<scalar_t>(vx);
          gsr[w] = static_cast<scalar_t>(vs);
          gtr[w] = static_cast<scalar_t>(vt);
        }
      }
      if (kScale) row_gscale[r] = gscale;
    }
  });
}

// Turns the run-time flags (scale given, reverse, mask mode) into template parameters.
template <typename F>
void dispatch_flags(bool has_scale, bool reverse, int mode, F&& f) {
  auto with_mode = [&](auto kS, auto kR) {
    if (mode == kDense) f(kS, kR, std::integral_constant<int, kDense>{});
    else if (mode == kChecker) f(kS, kR, std::integral_constant<int, kChecker>{});
    else f(kS, kR, std::integral_constant<int, kNoMask>{});
  };
  auto with_reverse = [&](auto kS) {
    if (reverse) with_mode(kS, std::true_type{});
    else with_mode(kS, std::false_type{});
  };
  if (has_scale) with_reverse(std::true_type{});
  else with_reverse(std::false_type{});
}

int mask_mode(const OptTensor& mask, int64_t parity) { return parity >= 0 ? kChecker : (mask ? kDense : kNoMask); }

}  // namespace

std::tuple<Tensor, Tensor> coupling_fwd(const Tensor& x_, const Tensor& s_, const Tensor& t_, const OptTensor& scale,
                                        const OptTensor& mask, int64_t parity, bool reverse, const OptTensor& sldj) {
  const Tensor x = x_.contiguous(), s = s_.contiguous(), t = t_.contiguous();
  const Geometry g = geometry(x, parity);
  const auto acc_t = acc_dtype(x.scalar_type());
  const auto out_t = ldj_dtype(x.scalar_type(), sldj ? sldj->scalar_type() : at::kFloat);
  Tensor y = at::empty_like(x);
  Tensor row_ldj = at::empty({g.B, g.C}, x.options().dtype(acc_t));
  const Tensor scale_c = scale ? scale->to(acc_t).contiguous() : Tensor();
  const Tensor mask_c = mask ? mask->to(x.scalar_type()).contiguous() : Tensor();
  const int mode = mask_mode(mask, parity);
  if (x.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "coupling_fwd_cpu", [&] {
      using acc = at::opmath_type<scalar_t>;
      dispatch_flags(scale.has_value(), reverse, mode, [&](auto kS, auto kR, auto kM) {
        forward_rows<scalar_t, decltype(kS)::value, decltype(kR)::value, decltype(kM)::value>(
            x.data_ptr<scalar_t>(), s.data_ptr<scalar_t>(), t.data_ptr<scalar_t>(),
            scale ? scale_c.data_ptr<acc>() : nullptr, mask ? mask_c.data_ptr<scalar_t>() : nullptr,
            static_cast<int>(parity), g, y.data_ptr<scalar_t>(), row_ldj.data_ptr<acc>());
      });
    });
  } else {
    row_ldj.zero_();
  }
  Tensor ldj = row_ldj.sum(1).to(out_t);
  if (reverse) ldj.neg_();
  Tensor sldj_out = sldj ? ldj.add_(sldj->to(out_t)) : ldj;
  return {y, sldj_out};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> coupling_bwd(const Tensor& grad_y, const OptTensor& grad_sldj,
                                                        const Tensor& x_, const Tensor& s_, const Tensor& t_,
                                                        const OptTensor& scale, const OptTensor& mask, int64_t parity,
                                                        bool reverse) {
  const Tensor x = x_.contiguous(), s = s_.contiguous(), t = t_.contiguous();
  const Tensor gy = grad_y.to(x.scalar_type()).contiguous();
  const Geometry g = geometry(x, parity);
  const auto acc_t = acc_dtype(x.scalar_type());
  const Tensor gl = grad_sldj ? grad_sldj->to(acc_t).contiguous() : Tensor();
  Tensor gx = at::empty_like(x), gs = at::empty_like(x), gt = at::empty_like(x);
  Tensor row_gscale = at::zeros({scale ? g.B : 0, g.C}, x.options().dtype(acc_t));
  const Tensor scale_c = scale ? scale->to(acc_t).contiguous() : Tensor();
  const Tensor mask_c = mask ? mask->to(x.scalar_type()).contiguous() : Tensor();
  const int mode = mask_mode(mask, parity);
  if (x.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "coupling_bwd_cpu", [&] {
      using acc = at::opmath_type<scalar_t>;
      dispatch_flags(scale.has_value(), reverse, mode, [&](auto kS, auto kR, auto kM) {
        backward_rows<scalar_t, decltype(kS)::value, decltype(kR)::value, decltype(kM)::value>(
            gy.data_ptr<scalar_t>(), grad_sldj ? gl.data_ptr<acc>() : nullptr, x.data_ptr<scalar_t>(),
            s.data_ptr<scalar_t>(), t.data_ptr<scalar_t>(), scale ? scale_c.data_ptr<acc>() : nullptr,
            mask ? mask_c.data_ptr<scalar_t>() : nullptr, static_cast<int>(parity), g, gx.data_ptr<scalar_t>(),
            gs.data_ptr<scalar_t>(), gt.data_ptr<scalar_t>(), scale ? row_gscale.data_ptr<acc>() : nullptr);
      });
    });
  }
  Tensor gscale = scale ? row_gscale.sum(0).to(scale->scalar_type()) : at::empty({0}, x.options());
  return {gx, gs, gt, gscale};
}

}  // namespace cpu
}  // namespace flowgmm
