// 2x2 squeeze (a permutation, any dtype) and the logit preprocessing with its per-sample log-det on the CPU.
// Rows run in parallel with at::parallel_for; the per-element math is flowgmm_math.h's.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

#include "flowgmm_math.h"
#include "ops.h"

namespace flowgmm {
namespace cpu {

Tensor squeeze2x2(const Tensor& x_, bool reverse, bool alt_order) {
  const Tensor x = x_.contiguous();
  const SqueezeGeometry g = squeeze_geometry(x, reverse);
  const int64_t B = g.B, C = g.C, H2 = g.H2, W2 = g.W2;
  Tensor out = squeeze_output(x, g, reverse);
  if (x.numel() == 0) return out;
  AT_DISPATCH_ALL_TYPES_AND3(at::kHalf, at::kBFloat16, at::kBool, x.scalar_type(), "squeeze2x2_cpu", [&] {
    const scalar_t* src = x.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    // Row pairs r = (b, c, h): unsqueezed rows 2h and 2h + 1 of channel c, the 4 W2 contiguous elements from r * 4 W2,
    // each row split into its even (j = 0) and odd (j = 1) columns, which are contiguous rows of W2 in the squeezed
    // tensor. (b, c, h) is divided out once per chunk and then counted up: no division per row or element.
    const int64_t N = 4 * C * H2 * W2, plane = H2 * W2;
    at::parallel_for(0, B * C * H2, std::max<int64_t>(1, 4096 / (4 * W2)), [&](int64_t begin, int64_t end) {
      int64_t h = begin % H2, c = (begin / H2) % C, b = begin / (C * H2);
      for (int64_t r = begin; r < end; ++r) {
        for (int64_t i = 0; i < 2; ++i) {
          const int64_t u = (2 * r + i) * (2 * W2);
          const int64_t q0 = b * N + math::squeeze_channel<int64_t>(c, i, 0, C, alt_order) * plane + h * W2;
          const int64_t q1 = b * N + math::squeeze_channel<int64_t>(c, i, 1, C, alt_order) * plane + h * W2;
          if (reverse) {
            for (int64_t w = 0; w < W2; ++w) {
              dst[u + 2 * w] = src[q0 + w];
              dst[u + 2 * w + 1] = src[q1 + w];
            }
          } else {
            for (int64_t w = 0; w < W2; ++w) {
              dst[q0 + w] = src[u + 2 * w];
              dst[q1 + w] = src[u + 2 * w + 1];
            }
          }
        }
        if (++h == H2) {
          h = 0;
          if (++c == C) c = 0, ++b;
        }
      }
    });
  });
  return out;
}

namespace {

// Samples [begin, end) of the logit transform, N elements each: y and the per-sample log-det sum (reverse: negated),
// the sum blocked (blocked_sum in ops.h).
template <typename scalar_t, bool kReverse, bool kNoise>
inline __attribute__((always_inline)) void logit_range(const scalar_t* xp, const scalar_t* np, scalar_t* yp,
                                                      at::opmath_type<scalar_t>* lp, int64_t N,
                                                      at::opmath_type<scalar_t> a, at::opmath_type<scalar_t> sc,
                                                      at::opmath_type<scalar_t> ls, int64_t begin, int64_t end) {
  using acc = at::opmath_type<scalar_t>;
  for (int64_t b = begin; b < end; ++b) {
    const int64_t o = b * N;
    const double total = blocked_sum<acc>(0, N, [&](int64_t i) __attribute__((always_inline)) {
      acc el;
      acc v = static_cast<acc>(xp[o + i]);
      if constexpr (kReverse) {
        yp[o + i] = static_cast<scalar_t>(math::logit_reverse(v, a, sc, ls, el));
      } else {
        if constexpr (kNoise) v = math::dequantize(v, static_cast<acc>(np[o + i]));
        yp[o + i] = static_cast<scalar_t>(math::logit_forward(v, a, sc, ls, el));
      }
      return el;
    });
    lp[b] = static_cast<acc>(kReverse ? -total : total);
  }
}

// always_inline: inlined into each ISA clone of the float overload below, so the loops are vectorised for its ISA
template <typename scalar_t>
inline __attribute__((always_inline)) void logit_dispatch(bool reverse, const scalar_t* xp, const scalar_t* np,
                                                         scalar_t* yp, at::opmath_type<scalar_t>* lp, int64_t N,
                                                         at::opmath_type<scalar_t> a, at::opmath_type<scalar_t> sc,
                                                         at::opmath_type<scalar_t> ls, int64_t begin, int64_t end) {
  if (reverse) logit_range<scalar_t, true, false>(xp, np, yp, lp, N, a, sc, ls, begin, end);
  else if (np) logit_range<scalar_t, false, true>(xp, np, yp, lp, N, a, sc, ls, begin, end);
  else logit_range<scalar_t, false, false>(xp, np, yp, lp, N, a, sc, ls, begin, end);
}

// float32: a non-template overload (preferred by the call in logit_fwd), one clone per ISA (FLOWGMM_CPU_CLONES, ops.h)
FLOWGMM_CPU_CLONES void logit_dispatch(bool reverse, const float* xp, const float* np, float* yp, float* lp,
                                       int64_t N, float a, float sc, float ls, int64_t begin, int64_t end) {
  logit_dispatch<float>(reverse, xp, np, yp, lp, N, a, sc, ls, begin, end);
}

// dL/dx (and with noise dL/dnoise, when gnp is given) of samples [begin, end); see math::logit_grad
template <typename scalar_t, bool kReverse, bool kNoise>
inline __attribute__((always_inline)) void logit_grad_range(const scalar_t* gyp, const at::opmath_type<scalar_t>* glp,
                                                           const scalar_t* xp, const scalar_t* np, scalar_t* gxp,
                                                           scalar_t* gnp, int64_t N, at::opmath_type<scalar_t> a,
                                                           at::opmath_type<scalar_t> sc, int64_t begin, int64_t end) {
  using acc = at::opmath_type<scalar_t>;
  for (int64_t b = begin; b < end; ++b) {
    const int64_t o = b * N;
    const acc glb = glp ? glp[b] : acc(0);
#pragma omp simd
    for (int64_t i = 0; i < N; ++i) {
      const acc nz = kNoise ? static_cast<acc>(np[o + i]) : acc(0);
      const acc g = math::logit_grad(static_cast<acc>(gyp[o + i]), glb, static_cast<acc>(xp[o + i]), kNoise, nz, a,
                                     sc, kReverse);
      if constexpr (kNoise) {
        gxp[o + i] = static_cast<scalar_t>(g * (acc(255) / acc(256)));
        if (gnp) gnp[o + i] = static_cast<scalar_t>(g / acc(256));
      } else {
        gxp[o + i] = static_cast<scalar_t>(g);
      }
    }
  }
}

template <typename scalar_t>
inline __attribute__((always_inline)) void logit_grad_dispatch(bool reverse, const scalar_t* gyp,
                                                              const at::opmath_type<scalar_t>* glp, const scalar_t* xp,
                                                              const scalar_t* np, scalar_t* gxp, scalar_t* gnp,
                                                              int64_t N, at::opmath_type<scalar_t> a,
                                                              at::opmath_type<scalar_t> sc, int64_t begin,
                                                              int64_t end) {
  if (reverse) logit_grad_range<scalar_t, true, false>(gyp, glp, xp, np, gxp, gnp, N, a, sc, begin, end);
  else if (np) logit_grad_range<scalar_t, false, true>(gyp, glp, xp, np, gxp, gnp, N, a, sc, begin, end);
  else logit_grad_range<scalar_t, false, false>(gyp, glp, xp, np, gxp, gnp, N, a, sc, begin, end);
}

FLOWGMM_CPU_CLONES void logit_grad_dispatch(bool reverse, const float* gyp, const float* glp, const float* xp,
                                            const float* np, float* gxp, float* gnp, int64_t N, float a, float sc,
                                            int64_t begin, int64_t end) {
  logit_grad_dispatch<float>(reverse, gyp, glp, xp, np, gxp, gnp, N, a, sc, begin, end);
}

int64_t grain_samples(int64_t N) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, N)); }

}  // namespace

std::tuple<Tensor, Tensor> logit_fwd(const Tensor& x_, double alpha, bool reverse, const OptTensor& sldj,
                                     const OptTensor& noise) {
  const Tensor x = x_.contiguous();
  const Tensor n = noise ? noise->contiguous() : Tensor();
  const int64_t B = x.size(0), N = B == 0 ? 0 : x.numel() / B;
  const auto acc_t = acc_dtype(x.scalar_type());
  const auto out_t = ldj_dtype(x.scalar_type(), sldj ? sldj->scalar_type() : at::kFloat);
  Tensor y = at::empty_like(x);
  // per-sample log-det in the compute dtype; when that is also the output dtype and there is no sldj, it is the output
  Tensor ldj = at::zeros({B}, x.options().dtype(acc_t));
  if (x.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "logit_fwd_cpu", [&] {
      using acc = at::opmath_type<scalar_t>;
      const scalar_t* xp = x.data_ptr<scalar_t>();
      const scalar_t* np = noise ? n.data_ptr<scalar_t>() : nullptr;
      scalar_t* yp = y.data_ptr<scalar_t>();
      acc* lp = ldj.data_ptr<acc>();
      const acc a = static_cast<acc>(alpha), sc = static_cast<acc>(1 - 2 * alpha),
                ls = static_cast<acc>(std::log1p(-2 * alpha));
      at::parallel_for(0, B, grain_samples(N), [&](int64_t begin, int64_t end) {
        logit_dispatch(reverse, xp, np, yp, lp, N, a, sc, ls, begin, end);
      });
    });
  }
  if (ldj.scalar_type() != out_t) ldj = ldj.to(out_t);
  if (sldj) ldj.add_(*sldj);  // sldj is float32 or float64, out_t the wider: add_ promotes in place
  return {y, ldj};
}

std::tuple<Tensor, Tensor> logit_bwd(const Tensor& grad_y, const OptTensor& grad_sldj, const Tensor& x_, double alpha,
                                     bool reverse, const OptTensor& noise, bool noise_grad) {
  const Tensor x = x_.contiguous();
  const Tensor gy = grad_y.to(x.scalar_type()).contiguous();
  const Tensor n = noise ? noise->contiguous() : Tensor();
  const int64_t B = x.size(0), N = B == 0 ? 0 : x.numel() / B;
  const auto acc_t = acc_dtype(x.scalar_type());
  const Tensor gl = grad_sldj ? grad_sldj->to(acc_t).contiguous() : Tensor();
  Tensor gx = at::empty_like(x);
  Tensor gn = noise && noise_grad ? at::empty_like(x) : at::empty({0}, x.options());
  if (x.numel() == 0) return {gx, gn};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "logit_bwd_cpu", [&] {
    using acc = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* gyp = gy.data_ptr<scalar_t>();
    const scalar_t* np = noise ? n.data_ptr<scalar_t>() : nullptr;
    const acc* glp = grad_sldj ? gl.data_ptr<acc>() : nullptr;
    scalar_t* gxp = gx.data_ptr<scalar_t>();
    scalar_t* gnp = gn.numel() ? gn.data_ptr<scalar_t>() : nullptr;
    const acc a = static_cast<acc>(alpha), sc = static_cast<acc>(1 - 2 * alpha);
    at::parallel_for(0, B, grain_samples(N), [&](int64_t begin, int64_t end) {
      logit_grad_dispatch(reverse, gyp, glp, xp, np, gxp, gnp, N, a, sc, begin, end);
    });
  });
  return {gx, gn};
}

}  // namespace cpu
}  // namespace flowgmm
