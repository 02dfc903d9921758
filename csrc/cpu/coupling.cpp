// Affine coupling on the CPU: one pass per direction over x (B, C, S) viewed as rows (b, c), fused tanh-scale, mask
// (none / dense / checkerboard from indices), exp and the per-sample log-det (forward) or the per-channel scale
// gradient (backward). Rows run in parallel (at::parallel_for); the inner loop over the last dim is branch-free and
// vectorised (float math from flowgmm_math.h, `omp simd` reductions). Nothing but the inputs is saved for backward.
// Kept positions need no math: vector rows skip runs of kept features (Segment), and checkerboard rows on AVX-512
// compute on the transformed half only (checker_*_rows).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "flowgmm_math.h"
#include "ops.h"

namespace flowgmm {
namespace cpu {
namespace {

// Loop modes: rows (b, c) with the inner loop over the S positions (no mask, or a mask row: the dense mask's, or the
// checkerboard's (S,) pattern, generated once per call and shared by all channels), or for vectors (S == 1) rows b
// with the inner loop over channels (per-element scale and mask).
enum Mode { kNoMask = 0, kDense = 1, kVecNoMask = 2, kVecDense = 3 };

struct Geometry {
  int64_t B, C, S;  // S = positions per channel
};

Geometry geometry(const Tensor& x) {
  Geometry g;
  g.B = x.size(0);
  g.C = x.size(1);
  g.S = 1;
  for (int64_t d = 2; d < x.dim(); ++d) g.S *= x.size(d);
  return g;
}

int64_t grain_rows(int64_t S) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, S)); }

// The mask rows: the dense (C, S) mask, or the checkerboard's (S,) pattern over (H, W) (for S == 1, vector mode,
// its single value repeated over the C channels); undefined without a mask.
template <typename scalar_t>
Tensor mask_rows(const OptTensor& mask, int64_t parity, const Tensor& x) {
  if (mask) return mask->to(x.scalar_type()).contiguous();
  if (parity < 0) return Tensor();
  const int64_t H = x.size(2), W = x.size(3);
  const bool vec = H * W == 1;
  Tensor pattern = at::empty({vec ? x.size(1) : H * W}, x.options());
  scalar_t* p = pattern.data_ptr<scalar_t>();
  if (vec) {
    for (int64_t c = 0; c < x.size(1); ++c) p[c] = static_cast<scalar_t>(math::checker_keep(0, 0, parity));
    return pattern;
  }
  for (int64_t h = 0; h < H; ++h)
    for (int64_t w = 0; w < W; ++w) p[h * W + w] = static_cast<scalar_t>(math::checker_keep(h, w, parity));
  return pattern;
}

// Vector mode (S == 1) walks each row b as segments of features: `compute` segments run the coupling math, the others
// are features the mask keeps exactly (b == 1), where y = x, the log-det term is 0 and the gradients are gx = gy,
// gs = gt = 0 -- so a half mask does the exp/tanh work on half the features only. Same result as the formula for
// finite s and t (the formula would turn a NaN or inf s at a kept feature into NaN via 0 * s; this path ignores it).
struct Segment {
  int64_t begin, end;
  bool compute;
};

template <typename scalar_t>
struct Args {
  using acc = at::opmath_type<scalar_t>;
  const scalar_t *x, *s, *t, *mask, *gy;  // gy: backward only
  const acc *scale, *gl;                  // gl: backward only (nullptr = zero)
  scalar_t *y, *gx, *gs, *gt;             // y: forward; gx, gs, gt: backward
  acc* row_red;                           // per row (b, c): log-det (forward) or scale gradient (backward)
  int64_t mask_cstride;                   // S for a (C, S) mask, 0 for the shared checkerboard pattern
  const Segment* seg;                     // vector mode: the segments of a row (see Segment)
  int64_t n_seg;
  const int32_t* odd;                     // checkerboard, AVX-512 path: per pair of positions (see checker_pairs)
  Geometry g;
  // batch strides (elements between samples; each sample's (C, S) plane is dense, see plane_dense in ops.h) of the
  // inputs x, s, t, gy and the outputs gs, gt (y and gx are contiguous: C S)
  int64_t xb, sb, tb, gyb, gsb, gtb;
  int64_t gls;  // stride of gl (0 when expanded: the gradient of ldj_out.sum())

  // element offset of row (b, c) in a tensor of batch stride bs
  int64_t off(int64_t bs, int64_t b, int64_t c) const { return b * bs + c * g.S; }
};

// rows [begin, end) of the forward pass
template <typename scalar_t, bool kScale, bool kReverse, int kMode>
inline __attribute__((always_inline)) void forward_range(const Args<scalar_t>& a, int64_t begin, int64_t end) {
  using acc = at::opmath_type<scalar_t>;
  const Geometry& g = a.g;
  if constexpr (kMode >= kVecNoMask) {
    const acc* sc = a.scale;
    const scalar_t* m = a.mask;
    for (int64_t b = begin; b < end; ++b) {
      const scalar_t *xr = a.x + b * a.xb, *sr = a.s + b * a.sb, *tr = a.t + b * a.tb;
      scalar_t* yr = a.y + b * g.C;
      double ldj = 0;
      for (int64_t k = 0; k < a.n_seg; ++k) {
        const Segment sg = a.seg[k];
        if (!sg.compute) {
          std::copy(xr + sg.begin, xr + sg.end, yr + sg.begin);
          continue;
        }
        ldj += blocked_sum<acc>(sg.begin, sg.end, [&](int64_t c) __attribute__((always_inline)) {
          acc s_m;
          const acc keep = kMode == kVecDense ? static_cast<acc>(m[c]) : acc(0);
          yr[c] = static_cast<scalar_t>(math::coupling_forward<acc, kScale, kReverse>(
              static_cast<acc>(xr[c]), static_cast<acc>(sr[c]), static_cast<acc>(tr[c]), kScale ? sc[c] : acc(0),
              keep, s_m));
          return s_m;
        });
      }
      a.row_red[b] = static_cast<acc>(ldj);
    }
    return;
  }
  for (int64_t r = begin; r < end; ++r) {
    const int64_t c = r % g.C;
    const acc sc = kScale ? a.scale[c] : acc(0);
    const scalar_t* mrow = kMode == kDense ? a.mask + c * a.mask_cstride : nullptr;
    const int64_t b = r / g.C;
    const scalar_t *xr = a.x + a.off(a.xb, b, c), *sr = a.s + a.off(a.sb, b, c), *tr = a.t + a.off(a.tb, b, c);
    scalar_t* yr = a.y + r * g.S;
    a.row_red[r] = static_cast<acc>(blocked_sum<acc>(0, g.S, [&](int64_t w) __attribute__((always_inline)) {
      acc s_m;
      const acc keep = kMode == kDense ? static_cast<acc>(mrow[w]) : acc(0);
      yr[w] = static_cast<scalar_t>(math::coupling_forward<acc, kScale, kReverse>(
          static_cast<acc>(xr[w]), static_cast<acc>(sr[w]), static_cast<acc>(tr[w]), sc, keep, s_m));
      return s_m;
    }));
  }
}

// rows [begin, end) of the backward pass
template <typename scalar_t, bool kScale, bool kReverse, int kMode>
inline __attribute__((always_inline)) void backward_range(const Args<scalar_t>& a, int64_t begin, int64_t end) {
  using acc = at::opmath_type<scalar_t>;
  const Geometry& g = a.g;
  if constexpr (kMode >= kVecNoMask) {
    const acc* sc = a.scale;
    const scalar_t* m = a.mask;
    for (int64_t b = begin; b < end; ++b) {
      const scalar_t *gyr = a.gy + b * a.gyb, *xr = a.x + b * a.xb, *sr = a.s + b * a.sb, *tr = a.t + b * a.tb;
      scalar_t *gxr = a.gx + b * g.C, *gsr = a.gs + b * a.gsb, *gtr = a.gt + b * a.gtb;
      acc* red = a.row_red;  // this chunk's (C,) partial of the scale gradient (see run())
      const acc glb = a.gl ? a.gl[b * a.gls] : acc(0);
      for (int64_t k = 0; k < a.n_seg; ++k) {
        const Segment sg = a.seg[k];
        if (!sg.compute) {  // kept features: y = x
          std::copy(gyr + sg.begin, gyr + sg.end, gxr + sg.begin);
          std::fill(gsr + sg.begin, gsr + sg.end, scalar_t(0));
          std::fill(gtr + sg.begin, gtr + sg.end, scalar_t(0));
          continue;
        }
#pragma omp simd
        for (int64_t c = sg.begin; c < sg.end; ++c) {
          acc vx, vs, vt;
          const acc keep = kMode == kVecDense ? static_cast<acc>(m[c]) : acc(0);
          const acc gsc = math::coupling_backward<acc, kScale, kReverse>(
              static_cast<acc>(gyr[c]), glb, static_cast<acc>(xr[c]), static_cast<acc>(sr[c]),
              static_cast<acc>(tr[c]), kScale ? sc[c] : acc(0), keep, vx, vs, vt);
          gxr[c] = static_cast<scalar_t>(vx);
          gsr[c] = static_cast<scalar_t>(vs);
          gtr[c] = static_cast<scalar_t>(vt);
          if (kScale) red[c] += gsc;
        }
      }
    }
    return;
  }
  for (int64_t r = begin; r < end; ++r) {
    const int64_t b = r / g.C, c = r % g.C;
    const acc sc = kScale ? a.scale[c] : acc(0);
    const acc glb = a.gl ? a.gl[b * a.gls] : acc(0);
    const scalar_t* mrow = kMode == kDense ? a.mask + c * a.mask_cstride : nullptr;
    const scalar_t *gyr = a.gy + a.off(a.gyb, b, c), *xr = a.x + a.off(a.xb, b, c), *sr = a.s + a.off(a.sb, b, c),
                   *tr = a.t + a.off(a.tb, b, c);
    scalar_t *gxr = a.gx + r * g.S, *gsr = a.gs + a.off(a.gsb, b, c), *gtr = a.gt + a.off(a.gtb, b, c);
    const double gscale = blocked_sum<acc>(0, g.S, [&](int64_t w) __attribute__((always_inline)) {
      acc vx, vs, vt;
      const acc keep = kMode == kDense ? static_cast<acc>(mrow[w]) : acc(0);
      const acc part = math::coupling_backward<acc, kScale, kReverse>(
          static_cast<acc>(gyr[w]), glb, static_cast<acc>(xr[w]), static_cast<acc>(sr[w]), static_cast<acc>(tr[w]), sc,
          keep, vx, vs, vt);
      gxr[w] = static_cast<scalar_t>(vx);
      gsr[w] = static_cast<scalar_t>(vs);
      gtr[w] = static_cast<scalar_t>(vt);
      return part;
    });
    if (kScale) a.row_red[r] = static_cast<acc>(gscale);
  }
}

// flags (scale given, reverse, mask mode) -> template parameters; a switch rather than generic lambdas so that the
// float instantiations below are inlined into (and vectorised for) each ISA clone
#define FLOWGMM_FLAG_CASES(FN, T)                       \
  switch ((has_scale ? 8 : 0) + (reverse ? 4 : 0) + mode) { \
    case 0: FN<T, false, false, kNoMask>(a, begin, end); break; \
    case 1: FN<T, false, false, kDense>(a, begin, end); break; \
    case 2: FN<T, false, false, kVecNoMask>(a, begin, end); break; \
    case 3: FN<T, false, false, kVecDense>(a, begin, end); break; \
    case 4: FN<T, false, true, kNoMask>(a, begin, end); break; \
    case 5: FN<T, false, true, kDense>(a, begin, end); break; \
    case 6: FN<T, false, true, kVecNoMask>(a, begin, end); break; \
    case 7: FN<T, false, true, kVecDense>(a, begin, end); break; \
    case 8: FN<T, true, false, kNoMask>(a, begin, end); break; \
    case 9: FN<T, true, false, kDense>(a, begin, end); break; \
    case 10: FN<T, true, false, kVecNoMask>(a, begin, end); break; \
    case 11: FN<T, true, false, kVecDense>(a, begin, end); break; \
    case 12: FN<T, true, true, kNoMask>(a, begin, end); break; \
    case 13: FN<T, true, true, kDense>(a, begin, end); break; \
    case 14: FN<T, true, true, kVecNoMask>(a, begin, end); break; \
    default: FN<T, true, true, kVecDense>(a, begin, end); break; \
  }

template <typename scalar_t>
void forward_dispatch(const Args<scalar_t>& a, bool has_scale, bool reverse, int mode, int64_t begin, int64_t end) {
  FLOWGMM_FLAG_CASES(forward_range, scalar_t)
}
template <typename scalar_t>
void backward_dispatch(const Args<scalar_t>& a, bool has_scale, bool reverse, int mode, int64_t begin, int64_t end) {
  FLOWGMM_FLAG_CASES(backward_range, scalar_t)
}

// float32, the hot path: one clone per ISA (FLOWGMM_CPU_CLONES, ops.h)

FLOWGMM_CPU_CLONES void forward_dispatch_f32(const Args<float>& a, bool has_scale, bool reverse, int mode, int64_t begin,
                                         int64_t end) {
  FLOWGMM_FLAG_CASES(forward_range, float)
}
FLOWGMM_CPU_CLONES void backward_dispatch_f32(const Args<float>& a, bool has_scale, bool reverse, int mode,
                                          int64_t begin, int64_t end) {
  FLOWGMM_FLAG_CASES(backward_range, float)
}

// Vector-mode backward with a scale: the rows b are cut into at most one chunk per thread and each chunk sums its
// scale gradient into its own (C,) row of a.row_red (zeroed by the caller), so no (B, C) array is written and summed.
int64_t vec_chunks(const Geometry& g) {
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), at::divup(g.B * g.C, 16384)));
}

// ---------------------------------------------------------------------------------------------------------------
// Checkerboard rows on AVX-512 (float32, even W). With W even, the positions of a row (b, c) pair up as (2p, 2p + 1)
// inside one image row, and exactly one of each pair is transformed (b = 0); the other passes through (y = x, log-det
// term 0, gx = gy, gs = gt = 0). So a block of pairs is split into its transformed elements (two 16-wide loads and a
// permute per 16 pairs and array), the coupling math runs on those only -- half the exp/tanh work of the plain loop --
// and the results are interleaved back with the passed-through elements. A pair-tail (S / 2 not a multiple of 16) runs
// the plain loop. Same result as the formula for finite s and t at the kept positions (see Segment). Compiled for
// AVX-512 only and used when the CPU has it; the plain loop serves every other case.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
#define FLOWGMM_CHECKER_AVX512 1
#pragma GCC push_options
#pragma GCC target("avx512f")

typedef float v16f __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));
constexpr int64_t kPairBlock = 256;  // pairs per block: 4 KiB scratch per array, in L1

inline __attribute__((always_inline)) v16f load16(const float* p) {
  v16f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline __attribute__((always_inline)) void store16(float* p, v16f v) { std::memcpy(p, &v, sizeof(v)); }
// the transformed element of each of the 16 pairs in [a, b] (odd: -1 where it is the odd one of its pair)
inline __attribute__((always_inline)) v16f pick(v16f a, v16f b, v16i odd) {
  const v16f ev = __builtin_shufflevector(a, b, 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const v16f od = __builtin_shufflevector(a, b, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  return odd ? od : ev;
}
// 32 positions from the 16 transformed results r and the passed-through values: those of `through` (pairs of a, b
// layout), or `fill` when through is null
inline __attribute__((always_inline)) void place(float* out, v16f r, v16i odd, const float* through, float fill) {
  v16f ev, od;
  if (through) {
    const v16f a = load16(through), b = load16(through + 16);
    ev = __builtin_shufflevector(a, b, 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    od = __builtin_shufflevector(a, b, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  } else {
    ev = od = v16f{} + fill;
  }
  const v16f e = odd ? ev : r, o = odd ? r : od;
  store16(out, __builtin_shufflevector(e, o, 0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23));
  store16(out + 16, __builtin_shufflevector(e, o, 8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31));
}

// Pairs [p0, p0 + np) of a row (np a multiple of 16): their transformed elements of src into dst[0, np) ...
inline __attribute__((always_inline)) void split_pairs(const float* src, float* dst, const int32_t* odd_pairs,
                                                       int64_t p0, int64_t np) {
  for (int64_t j = 0; j < np; j += 16) {
    const int64_t i = 2 * (p0 + j);
    v16i odd;
    std::memcpy(&odd, odd_pairs + p0 + j, sizeof(odd));
    store16(dst + j, pick(load16(src + i), load16(src + i + 16), odd));
  }
}

// ... and back: results r[0, np) to their positions in out, the other positions from `through` (or `fill`)
inline __attribute__((always_inline)) void merge_pairs(float* out, const float* r, const int32_t* odd_pairs, int64_t p0,
                                                       int64_t np, const float* through, float fill) {
  for (int64_t j = 0; j < np; j += 16) {
    const int64_t i = 2 * (p0 + j);
    v16i odd;
    std::memcpy(&odd, odd_pairs + p0 + j, sizeof(odd));
    place(out + i, load16(r + j), odd, through ? through + i : nullptr, fill);
  }
}

template <bool kScale, bool kReverse>
void checker_forward_rows(const Args<float>& a, int64_t begin, int64_t end) {
  const Geometry& g = a.g;
  const int64_t nvec = (g.S / 2) / 16 * 16;  // pairs taken 16 at a time
  alignas(64) float xt[kPairBlock], st[kPairBlock], tt[kPairBlock], yt[kPairBlock];
  for (int64_t r = begin; r < end; ++r) {
    const int64_t b = r / g.C, c = r % g.C;
    const float sc = kScale ? a.scale[c] : 0.0f;
    const float *xr = a.x + a.off(a.xb, b, c), *sr = a.s + a.off(a.sb, b, c), *tr = a.t + a.off(a.tb, b, c);
    float* yr = a.y + r * g.S;
    double ldj = 0;  // the pair blocks' float partials added in double (see blocked_sum in ops.h)
    for (int64_t p0 = 0; p0 < nvec; p0 += kPairBlock) {
      const int64_t np = std::min(kPairBlock, nvec - p0);
      split_pairs(xr, xt, a.odd, p0, np);
      split_pairs(sr, st, a.odd, p0, np);
      split_pairs(tr, tt, a.odd, p0, np);
      float part = 0;
#pragma omp simd reduction(+ : part)
      for (int64_t j = 0; j < np; ++j) {
        float s_m;
        yt[j] = math::coupling_forward<float, kScale, kReverse>(xt[j], st[j], tt[j], sc, 0.0f, s_m);
        part += s_m;
      }
      ldj += part;
      merge_pairs(yr, yt, a.odd, p0, np, xr, 0.0f);
    }
    for (int64_t w = 2 * nvec; w < g.S; ++w) {  // tail: the plain formula with the mask pattern
      float s_m;
      yr[w] = math::coupling_forward<float, kScale, kReverse>(xr[w], sr[w], tr[w], sc, a.mask[w], s_m);
      ldj += s_m;
    }
    a.row_red[r] = static_cast<float>(ldj);
  }
}

template <bool kScale, bool kReverse>
void checker_backward_rows(const Args<float>& a, int64_t begin, int64_t end) {
  const Geometry& g = a.g;
  const int64_t nvec = (g.S / 2) / 16 * 16;
  alignas(64) float gyt[kPairBlock], xt[kPairBlock], st[kPairBlock], tt[kPairBlock];
  alignas(64) float gxt[kPairBlock], gst[kPairBlock], gtt[kPairBlock];
  for (int64_t r = begin; r < end; ++r) {
    const int64_t b = r / g.C, c = r % g.C;
    const float sc = kScale ? a.scale[c] : 0.0f;
    const float glb = a.gl ? a.gl[b * a.gls] : 0.0f;
    const float *gyr = a.gy + a.off(a.gyb, b, c), *xr = a.x + a.off(a.xb, b, c), *sr = a.s + a.off(a.sb, b, c),
                *tr = a.t + a.off(a.tb, b, c);
    float *gxr = a.gx + r * g.S, *gsr = a.gs + a.off(a.gsb, b, c), *gtr = a.gt + a.off(a.gtb, b, c);
    double gscale = 0;
    for (int64_t p0 = 0; p0 < nvec; p0 += kPairBlock) {
      const int64_t np = std::min(kPairBlock, nvec - p0);
      split_pairs(gyr, gyt, a.odd, p0, np);
      split_pairs(xr, xt, a.odd, p0, np);
      split_pairs(sr, st, a.odd, p0, np);
      split_pairs(tr, tt, a.odd, p0, np);
      float part = 0;
#pragma omp simd reduction(+ : part)
      for (int64_t j = 0; j < np; ++j) {
        float vx, vs, vt;
        part += math::coupling_backward<float, kScale, kReverse>(gyt[j], glb, xt[j], st[j], tt[j], sc, 0.0f, vx,
                                                                 vs, vt);
        gxt[j] = vx;
        gst[j] = vs;
        gtt[j] = vt;
      }
      gscale += part;
      merge_pairs(gxr, gxt, a.odd, p0, np, gyr, 0.0f);  // passed through: gx = gy
      merge_pairs(gsr, gst, a.odd, p0, np, nullptr, 0.0f);  // gs = gt = 0
      merge_pairs(gtr, gtt, a.odd, p0, np, nullptr, 0.0f);
    }
    for (int64_t w = 2 * nvec; w < g.S; ++w) {
      float vx, vs, vt;
      gscale += math::coupling_backward<float, kScale, kReverse>(gyr[w], glb, xr[w], sr[w], tr[w], sc, a.mask[w], vx,
                                                                 vs, vt);
      gxr[w] = vx;
      gsr[w] = vs;
      gtr[w] = vt;
    }
    if (kScale) a.row_red[r] = static_cast<float>(gscale);
  }
}

void checker_dispatch(bool forward, const Args<float>& a, bool has_scale, bool reverse, int64_t begin, int64_t end) {
  switch ((forward ? 4 : 0) + (has_scale ? 2 : 0) + (reverse ? 1 : 0)) {
    case 0: checker_backward_rows<false, false>(a, begin, end); break;
    case 1: checker_backward_rows<false, true>(a, begin, end); break;
    case 2: checker_backward_rows<true, false>(a, begin, end); break;
    case 3: checker_backward_rows<true, true>(a, begin, end); break;
    case 4: checker_forward_rows<false, false>(a, begin, end); break;
    case 5: checker_forward_rows<false, true>(a, begin, end); break;
    case 6: checker_forward_rows<true, false>(a, begin, end); break;
    default: checker_forward_rows<true, true>(a, begin, end); break;
  }
}

#pragma GCC pop_options
#endif  // FLOWGMM_CHECKER_AVX512

// The pair pattern of the AVX-512 checkerboard path (-1 where a pair's transformed element is its odd one), or an
// undefined tensor when the path does not apply: float32, 4-D x with even W and at least 16 pairs per row, a CPU
// with AVX-512F, and a build that has the path.
Tensor checker_pairs(const Tensor& x, int64_t parity) {
#if defined(FLOWGMM_CHECKER_AVX512)
  if (parity < 0 || x.scalar_type() != at::kFloat || x.dim() != 4 || x.size(3) % 2 || x.size(2) * x.size(3) < 32 ||
      !__builtin_cpu_supports("avx512f"))
    return Tensor();
  const int64_t W = x.size(3), pairs = x.size(2) * W / 2;
  Tensor odd = at::empty({pairs}, x.options().dtype(at::kInt));
  int32_t* p = odd.data_ptr<int32_t>();
  for (int64_t k = 0; k < pairs; ++k) {
    const int64_t h = (2 * k) / W, w = (2 * k) % W;
    p[k] = math::checker_keep(h, w, parity) ? -1 : 0;  // even element kept -> the odd one is transformed
  }
  return odd;
#else
  (void)x;
  (void)parity;
  return Tensor();
#endif
}

template <typename scalar_t>
void call_range(bool forward, const Args<scalar_t>& a, bool has_scale, bool reverse, int mode, int64_t begin,
                int64_t end) {
  if constexpr (std::is_same_v<scalar_t, float>) {
#if defined(FLOWGMM_CHECKER_AVX512)
    if (a.odd) return checker_dispatch(forward, a, has_scale, reverse, begin, end);
#endif
    if (forward) forward_dispatch_f32(a, has_scale, reverse, mode, begin, end);
    else backward_dispatch_f32(a, has_scale, reverse, mode, begin, end);
  } else {
    if (forward) forward_dispatch(a, has_scale, reverse, mode, begin, end);
    else backward_dispatch(a, has_scale, reverse, mode, begin, end);
  }
}

template <typename scalar_t>
void run(bool forward, const Args<scalar_t>& a, bool has_scale, bool reverse, int mode) {
  const bool vec = mode >= kVecNoMask;
  if (vec && !forward && has_scale) {
    const int64_t chunks = vec_chunks(a.g), rows = at::divup(a.g.B, chunks);
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t k = c0; k < c1; ++k) {
        Args<scalar_t> ak = a;
        ak.row_red = a.row_red + k * a.g.C;
        call_range(false, ak, true, reverse, mode, k * rows, std::min(a.g.B, (k + 1) * rows));
      }
    });
    return;
  }
  at::parallel_for(0, vec ? a.g.B : a.g.B * a.g.C, vec ? grain_rows(a.g.C) : grain_rows(a.g.S),
                   [&](int64_t begin, int64_t end) { call_range(forward, a, has_scale, reverse, mode, begin, end); });
}

// Per-sample log-det from the per-row sums (B, R): sign * sum_r rows[b, r] (+ sldj[b]), in one serial pass (B R is
// small: rows are (b, c) pairs or samples), added in double.
template <typename acc, typename out_t>
void finish_ldj(const acc* rows, int64_t B, int64_t R, bool negate, const out_t* sldj, out_t* out) {
  for (int64_t b = 0; b < B; ++b) {
    double sum = 0;
    for (int64_t r = 0; r < R; ++r) sum += rows[b * R + r];
    const out_t v = static_cast<out_t>(negate ? -sum : sum);
    out[b] = sldj ? v + sldj[b] : v;
  }
}

// Scale gradient from the per-row (or per-chunk) partials (N, C): sum over N in double, one serial pass.
template <typename acc>
void finish_gscale(const acc* partial, int64_t N, int64_t C, acc* out) {
  std::vector<double> sum(C, 0.0);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c) sum[c] += partial[n * C + c];
  for (int64_t c = 0; c < C; ++c) out[c] = static_cast<acc>(sum[c]);
}

// The segments of a vector row: maximal runs of features with mask == 1 exactly (kept) and of the others. More than
// kMaxSegments runs (a scattered mask) -> one compute segment over all features, the plain branch-free loop.
constexpr size_t kMaxSegments = 16;

template <typename scalar_t>
std::vector<Segment> vector_segments(const Tensor& mask_c, int64_t C) {
  std::vector<Segment> seg;
  if (mask_c.defined()) {
    const scalar_t* m = mask_c.data_ptr<scalar_t>();
    for (int64_t c = 0; c < C; ++c) {
      const bool compute = static_cast<double>(m[c]) != 1.0;
      if (seg.empty() || seg.back().compute != compute) {
        if (seg.size() == kMaxSegments) return {Segment{0, C, true}};
        seg.push_back(Segment{c, c + 1, compute});
      } else {
        seg.back().end = c + 1;
      }
    }
  }
  if (seg.empty()) seg.push_back(Segment{0, C, true});
  return seg;
}

int loop_mode(bool masked, const Geometry& g) {
  if (g.S == 1) return masked ? kVecDense : kVecNoMask;
  return masked ? kDense : kNoMask;
}

// What the loops read besides the data, for both directions: x, s, t, the mask rows (dense, or the checkerboard
// pattern), the vector segments, the AVX-512 checkerboard pair pattern and the scale. Holds the scratch tensors the
// Args point into, so it must outlive the run.
template <typename scalar_t>
struct Inputs {
  Tensor mask_c, odd;
  std::vector<Segment> seg;

  Inputs(Args<scalar_t>& a, const Tensor& x, const Tensor& s, const Tensor& t, const Tensor& scale_c,
         const OptTensor& mask, int64_t parity, const Geometry& g) {
    using acc = at::opmath_type<scalar_t>;
    a.x = x.data_ptr<scalar_t>();
    a.s = s.data_ptr<scalar_t>();
    a.t = t.data_ptr<scalar_t>();
    a.xb = batch_stride(x);
    a.sb = batch_stride(s);
    a.tb = batch_stride(t);
    mask_c = mask_rows<scalar_t>(mask, parity, x);
    a.mask = mask_c.defined() ? mask_c.data_ptr<scalar_t>() : nullptr;
    a.mask_cstride = mask ? g.S : 0;
    seg = vector_segments<scalar_t>(g.S == 1 ? mask_c : Tensor(), g.C);
    a.seg = seg.data();
    a.n_seg = static_cast<int64_t>(seg.size());
    odd = checker_pairs(x, mask ? -1 : parity);
    a.odd = odd.defined() ? odd.data_ptr<int32_t>() : nullptr;
    a.scale = scale_c.defined() ? scale_c.data_ptr<acc>() : nullptr;
    a.g = g;
  }
};

}  // namespace

std::tuple<Tensor, Tensor> coupling_fwd(const Tensor& x_, const Tensor& s_, const Tensor& t_, const OptTensor& scale,
                                        const OptTensor& mask, int64_t parity, bool reverse, const OptTensor& sldj) {
  const Tensor x = dense_planes(x_), s = dense_planes(s_), t = dense_planes(t_);
  const Geometry g = geometry(x);
  const auto acc_t = acc_dtype(x.scalar_type());
  const auto out_t = ldj_dtype(x.scalar_type(), sldj ? sldj->scalar_type() : at::kFloat);
  Tensor y = at::empty(x.sizes(), x.options());
  Tensor row_ldj = at::empty({g.B, g.S == 1 ? 1 : g.C}, x.options().dtype(acc_t));
  const Tensor scale_c = scale ? scale->to(acc_t).contiguous() : Tensor();
  const int mode = loop_mode(mask.has_value() || parity >= 0, g);
  if (x.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "coupling_fwd_cpu", [&] {
      using acc = at::opmath_type<scalar_t>;
      Args<scalar_t> a{};
      const Inputs<scalar_t> in(a, x, s, t, scale_c, mask, parity, g);
      a.y = y.data_ptr<scalar_t>();
      a.row_red = row_ldj.data_ptr<acc>();
      run(true, a, scale.has_value(), reverse, mode);
    });
  } else {
    row_ldj.zero_();
  }
  // sldj_out = +-sum of the row log-dets (+ sldj)
  Tensor sldj_out = at::empty({g.B}, x.options().dtype(out_t));
  const Tensor sldj_in = sldj ? sldj->to(out_t).contiguous() : Tensor();
  AT_DISPATCH_FLOATING_TYPES(out_t, "coupling_ldj_cpu", [&] {
    using out_type = scalar_t;
    if (acc_t == at::kDouble) {
      finish_ldj<double, out_type>(row_ldj.data_ptr<double>(), g.B, row_ldj.size(1), reverse,
                                   sldj ? sldj_in.data_ptr<out_type>() : nullptr, sldj_out.data_ptr<out_type>());
    } else {
      finish_ldj<float, out_type>(row_ldj.data_ptr<float>(), g.B, row_ldj.size(1), reverse,
                                  sldj ? sldj_in.data_ptr<out_type>() : nullptr, sldj_out.data_ptr<out_type>());
    }
  });
  return {y, sldj_out};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> coupling_bwd(const Tensor& grad_y, const OptTensor& grad_sldj,
                                                        const Tensor& x_, const Tensor& s_, const Tensor& t_,
                                                        const OptTensor& scale, const OptTensor& mask, int64_t parity,
                                                        bool reverse, bool joint_st) {
  const Tensor x = dense_planes(x_), s = dense_planes(s_), t = dense_planes(t_);
  const Tensor gy = dense_planes(grad_y.to(x.scalar_type()));
  const Geometry g = geometry(x);
  const auto acc_t = acc_dtype(x.scalar_type());
  const Tensor gl = grad_sldj ? grad_sldj->to(acc_t) : Tensor();  // read at its stride
  Tensor gx = at::empty(x.sizes(), x.options());
  auto [gst, gs, gt] = coupling_st_grads(x, joint_st);
  const int mode = loop_mode(mask.has_value() || parity >= 0, g);
  // scale-gradient partials: one (C,) row per row block b (image mode: per sample b, written) or per chunk of samples
  // (vector mode: accumulated, so zeroed)
  const bool vec = mode >= kVecNoMask;
  const int64_t n_partial = !scale ? 0 : (vec ? vec_chunks(g) : g.B);
  Tensor row_gscale = vec || x.numel() == 0 ? at::zeros({n_partial, g.C}, x.options().dtype(acc_t))
                                            : at::empty({n_partial, g.C}, x.options().dtype(acc_t));
  const Tensor scale_c = scale ? scale->to(acc_t).contiguous() : Tensor();
  if (x.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "coupling_bwd_cpu", [&] {
      using acc = at::opmath_type<scalar_t>;
      Args<scalar_t> a{};
      a.gy = gy.data_ptr<scalar_t>();
      a.gyb = batch_stride(gy);
      a.gl = grad_sldj ? gl.data_ptr<acc>() : nullptr;
      a.gls = grad_sldj ? gl.stride(0) : 0;
      const Inputs<scalar_t> in(a, x, s, t, scale_c, mask, parity, g);
      a.gx = gx.data_ptr<scalar_t>();
      a.gs = gs.data_ptr<scalar_t>();
      a.gt = gt.data_ptr<scalar_t>();
      a.gsb = batch_stride(gs);
      a.gtb = batch_stride(gt);
      a.row_red = scale ? row_gscale.data_ptr<acc>() : nullptr;
      run(false, a, scale.has_value(), reverse, mode);
    });
  }
  Tensor gscale = scale ? at::empty({g.C}, x.options().dtype(acc_t)) : at::empty({0}, x.options());
  if (scale) {
    if (acc_t == at::kDouble) {
      finish_gscale<double>(row_gscale.data_ptr<double>(), n_partial, g.C, gscale.data_ptr<double>());
    } else {
      finish_gscale<float>(row_gscale.data_ptr<float>(), n_partial, g.C, gscale.data_ptr<float>());
    }
    gscale = gscale.to(scale->scalar_type());
  }
  if (joint_st) return {gx, gst, at::empty({0}, x.options()), gscale};
  return {gx, gs, gt, gscale};
}

}  // namespace cpu
}  // namespace flowgmm
