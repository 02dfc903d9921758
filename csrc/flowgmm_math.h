// Per-element math of every flowgmm_native op, shared by the CPU loops (csrc/cpu/*.cpp) and the CUDA kernels
// (csrc/cuda/*.cu): the CPU tests exercise exactly the formulas the GPU kernels run. Semantics are those of
// flowgmm_fast/ops/reference.py (its module docstring); `acc` is float for float/bfloat16/half inputs, double for
// double.
//
// Transcendentals: on the device the CUDA libm (expf, tanhf, logf, ...); on the host, for float, branch-free
// polynomial exp and log (Cephes-style, ~1 ulp), with tanh and log1p built on them, which GCC vectorises inside the
// CPU loops (glibc's scalar expf/tanhf/logf would not vectorise and would lose to eager PyTorch's SLEEF kernels);
// double always uses libm.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define FG_HD __host__ __device__ __forceinline__
#else
// always_inline: the CPU loops are compiled in several ISA clones (target_clones in cpu/coupling.cpp); the math must
// be inlined into each clone to be vectorised for its ISA.
#define FG_HD inline __attribute__((always_inline))
#endif

namespace flowgmm {
namespace math {

#if !defined(__CUDA_ARCH__)
// exp(x) for float = 2^n exp(r): x = n ln2 + r, |r| <= ln2 / 2, exp(r) by a degree-6 polynomial (Cephes). Returns
// exp(r) and sets n (an integer-valued float); the callers apply 2^n through the exponent bits. Finite x only.
FG_HD float expf_reduced(float x, float& n) {
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding and subtracting it rounds to the nearest integer
  n = (x * 1.44269504088896341f + magic) - magic;
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  return p * r * r + r + 1.0f;
}

// 2^k for an integer-valued float k in [-126, 127], through the exponent bits.
FG_HD float exp2_int(float k) {
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

// exp for float, vectorisable, for |x| <= 87 only (no special cases; used where the argument is bounded).
FG_HD float host_expf_bounded(float x) {
  float n;
  const float e = expf_reduced(x, n);
  return e * exp2_int(n);
}

// exp for float over the whole range with one polynomial: the argument is clamped to [-86.64, ln(FLT_MAX)] and the
// power of two applied as 2^(n-1) * 2, so n = 128 (results in (2^127.5, FLT_MAX]) stays finite. Exact 0 below -86.64
// (results under 2.4e-38, the bottom of the normal range), +inf above ln(FLT_MAX); NaN propagates. Relative error
// ~1.2e-7. Selects only, no branches, so it vectorises (with -fno-trapping-math, set in setup.py, GCC if-converts the
// selects for AVX2 and SSE as well as AVX-512).
FG_HD float host_expf(float x) {
  const float lo = -86.64f, hi = 88.7228391f;  // hi = ln(FLT_MAX)
  float xc = x < lo ? lo : x;
  xc = xc > hi ? hi : xc;
  float n;
  const float e = expf_reduced(xc, n);
  float out = (e * exp2_int(n - 1.0f)) * 2.0f;
  out = x < lo ? 0.0f : out;
  out = x > hi ? INFINITY : out;
  return out;
}

// log for float, vectorisable (Cephes' logf scheme): x = m 2^e with m in [sqrt(1/2), sqrt(2)), log(m) from a degree-9
// polynomial in m - 1, e ln2 added in two parts. Denormals are rescaled by 2^23 first; 0 -> -inf, x < 0 -> NaN,
// +inf -> +inf, NaN propagates. ~1 ulp.
FG_HD float host_logf(float x) {
  const bool tiny = x < 1.17549435e-38f;  // below FLT_MIN: denormal (0 and negatives are overridden below)
  const float xs = tiny ? x * 8388608.0f : x;
  int32_t bits;
  std::memcpy(&bits, &xs, sizeof(bits));
  float e = static_cast<float>(((bits >> 23) & 0xff) - 126) - (tiny ? 23.0f : 0.0f);
  const int32_t mbits = (bits & 0x007fffff) | 0x3f000000;  // mantissa in [0.5, 1)
  float m;
  std::memcpy(&m, &mbits, sizeof(m));
  const bool low = m < 0.707106781186547524f;
  e = low ? e - 1.0f : e;
  m = low ? m + m - 1.0f : m - 1.0f;
  const float z = m * m;
  float y = 7.0376836292e-2f;
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  y = y - 2.12194440e-4f * e;
  y = y - 0.5f * z;
  float r = m + y + 0.693359375f * e;
  r = x == 0.0f ? -INFINITY : r;
  r = x < 0.0f ? NAN : r;
  r = x == INFINITY ? INFINITY : r;
  return x != x ? x : r;
}

// log1p for float, vectorisable: log(u) x / (u - 1) with u = 1 + x (the factor corrects u's rounding), x itself
// where u rounds to 1.
FG_HD float host_log1pf(float x) {
  const float u = 1.0f + x;
  const float d = u - 1.0f;
  float r = host_logf(u) * (x / (d == 0.0f ? 1.0f : d));
  r = d == 0.0f ? x : r;
  return u == INFINITY ? u : r;
}

// tanh for float, vectorisable: 1 - 2 / (exp(2x) + 1) with x clamped to +-10; absolute error ~1e-7 (relative error
// grows for |x| < 1e-3, where tanh(x) ~ x is tiny anyway). The correctly rounded float tanh is exactly +-1 from
// |x| = 13 ln2 / 2 ~ 9.01 on (1 - tanh < 2^-25, half an ulp below 1), and so is this formula: at |x| >= 9.1 the term
// 2 / (e^2x + 1) < 2.5e-8 rounds away. So d tanh / ds = 1 - tanh^2 is exactly 0 where the reference's is (a clamp at 9
// stopped at 1 - 2^-24 and left a gradient of 1.2e-7 at every saturated s).
FG_HD float host_tanhf(float x) {
  float xc = x > 10.0f ? 10.0f : x;
  xc = xc < -10.0f ? -10.0f : xc;
  return 1.0f - 2.0f / (host_expf_bounded(2.0f * xc) + 1.0f);
}
#endif

// The float transcendentals: CUDA's libm on the device, the vectorisable versions above on the host.
#if defined(__CUDA_ARCH__)
#define FG_FLOAT_FN(name, device_fn, host_fn) \
  FG_HD float name(float x) { return device_fn(x); }
#else
#define FG_FLOAT_FN(name, device_fn, host_fn) \
  FG_HD float name(float x) { return host_fn(x); }
#endif
FG_FLOAT_FN(exp_, expf, host_expf)
FG_FLOAT_FN(tanh_, tanhf, host_tanhf)
FG_FLOAT_FN(log_, logf, host_logf)
FG_FLOAT_FN(log1p_, log1pf, host_log1pf)
#undef FG_FLOAT_FN
FG_HD double exp_(double x) { return exp(x); }
FG_HD double tanh_(double x) { return tanh(x); }
FG_HD double log_(double x) { return log(x); }
FG_HD double log1p_(double x) { return log1p(x); }

// ---------------------------------------------------------------------------------------------------------------
// Affine coupling (Dinh et al. 2017, eq. 7-9). keep = mask value b (1 = conditioning position, 0 = transformed).
//   s_eff = scale * tanh(s) (or s), s_m = (1 - b) s_eff, t_m = (1 - b) t
//   forward: y = (x + t_m) exp(s_m);   reverse: y = x exp(-s_m) - t_m;   log-det term: s_m (caller signs it)

// checkerboard mask value b[h, w] = (h + w + parity) % 2
FG_HD int checker_keep(int64_t h, int64_t w, int64_t parity) { return static_cast<int>((h + w + parity) & 1); }

// tanh(x) and its slope 1 - tanh(x)^2 for the backward, from q = 1 - |tanh x| = 2 / (e^{2|x|} + 1) formed without
// cancellation: slope = q (2 - q). Written as 1 - th * th, the slope inherits th's absolute rounding error (1e-7
// in float), which is its whole size once |x| > 8: off by 2% at |x| = 6 and never 0 past saturation. This one is
// accurate to a few ulps relative, and exactly 0 where e^{2|x|} overflows (|x| > 44 in float).
template <typename acc>
FG_HD void tanh_and_slope(acc x, acc& th, acc& slope) {
  const acc ax = x < acc(0) ? -x : x;
  const acc q = acc(2) / (exp_(acc(2) * ax) + acc(1));
  th = x < acc(0) ? q - acc(1) : acc(1) - q;
  slope = q * (acc(2) - q);
}

template <typename acc, bool kScale, bool kReverse>
FG_HD acc coupling_forward(acc x, acc s, acc t, acc scale, acc keep, acc& s_m) {
  const acc s_eff = kScale ? scale * tanh_(s) : s;
  const acc w = acc(1) - keep;
  s_m = w * s_eff;
  const acc t_m = w * t;
  return kReverse ? x * exp_(-s_m) - t_m : (x + t_m) * exp_(s_m);
}

// Gradients of one element given dL/dy = gy and dL/dsldj_out[b] = gl. Writes dL/dx, dL/ds, dL/dt and returns the
// element's contribution to dL/dscale[c] (0 without scale).
template <typename acc, bool kScale, bool kReverse>
FG_HD acc coupling_backward(acc gy, acc gl, acc x, acc s, acc t, acc scale, acc keep, acc& gx, acc& gs, acc& gt) {
  acc th = acc(0), slope = acc(0);
  if (kScale) tanh_and_slope(s, th, slope);
  const acc s_eff = kScale ? scale * th : s;
  const acc w = acc(1) - keep;
  const acc s_m = w * s_eff;
  acc g_sm;
  if (kReverse) {
    const acc e = exp_(-s_m);
    gx = gy * e;
    gt = -gy * w;
    g_sm = -(gy * x * e) - gl;
  } else {
    const acc e = exp_(s_m);
    gx = gy * e;
    gt = gx * w;
    g_sm = gx * (x + w * t) + gl;
  }
  const acc g_seff = w * g_sm;
  if (kScale) {
    gs = g_seff * scale * slope;
    return g_seff * th;
  }
  gs = g_seff;
  return acc(0);
}

// ---------------------------------------------------------------------------------------------------------------
// 2x2 squeeze: squeezed[b, o, h, w] = unsqueezed[b, c, 2h + i, 2w + j] with o the squeezed channel of unsqueezed
// channel c, row parity i and column parity j. Default order o = 4c + 2i + j; alt order o = kC + c with
// (i, j) = (0,0), (1,1), (0,1), (1,0) for k = 0..3, i.e. k = 2 (i xor j) + i. Forward gathers, reverse scatters
// (a permutation).
template <typename index_t>
FG_HD index_t squeeze_channel(index_t c, index_t i, index_t j, index_t C, bool alt) {
  return alt ? (2 * (i ^ j) + i) * C + c : 4 * c + 2 * i + j;
}

// ---------------------------------------------------------------------------------------------------------------
// Logit preprocessing (RealNVP). forward: u = (255 x + noise) / 256 (or x), p = alpha + (1 - 2 alpha) u,
// y = log p - log(1 - p), log-det term log(1 - 2 alpha) - log p - log(1 - p).
// reverse: p = sigmoid(x), y = (p - alpha) / (1 - 2 alpha), log-det term log(1 - 2 alpha) + softplus(x) + softplus(-x)
// (the caller subtracts it).
// `scale` = 1 - 2 alpha and `log_scale` = log(1 - 2 alpha) are formed in double by the caller and rounded once: formed
// in float, 1 - 2 alpha loses up to 2^-24 / (1 - 2 alpha) relative (1.3e-4 at alpha = 0.4999), and y with it.

template <typename acc>
FG_HD acc logit_forward(acc u, acc alpha, acc scale, acc log_scale, acc& ldj) {
  const acc p = alpha + scale * u;
  const acc lp = log_(p), l1p = log1p_(-p);
  ldj = log_scale - lp - l1p;
  return lp - l1p;
}

// dL/du for the forward transform given gy = dL/dy and gl = dL/dsldj_out[b]
template <typename acc>
FG_HD acc logit_forward_grad(acc gy, acc gl, acc u, acc alpha, acc scale) {
  const acc p = alpha + scale * u;
  const acc ip = acc(1) / p, iq = acc(1) / (acc(1) - p);
  return scale * (gy * (ip + iq) + gl * (iq - ip));
}

template <typename acc>
FG_HD acc logit_reverse(acc x, acc alpha, acc scale, acc log_scale, acc& ldj) {
  const acc ax = x < acc(0) ? -x : x;
  const acc p = acc(1) / (acc(1) + exp_(-x));
  ldj = log_scale + ax + acc(2) * log1p_(exp_(-ax));
  return (p - alpha) / scale;
}

// dL/dx for the reverse transform (sldj_out = sldj - ldj): dy/dx = p (1 - p) / (1 - 2 alpha), dldj/dx = 2p - 1
template <typename acc>
FG_HD acc logit_reverse_grad(acc gy, acc gl, acc x, acc scale) {
  const acc p = acc(1) / (acc(1) + exp_(-x));
  return gy * p * (acc(1) - p) / scale - gl * (acc(2) * p - acc(1));
}

// Dequantisation u = (255 x + noise) / 256 of 8-bit data scaled to [0, 1].
template <typename acc>
FG_HD acc dequantize(acc x, acc noise) {
  return (x * acc(255) + noise) / acc(256);
}

// The gradient of the whole logit op at one element, in the compute dtype: dL/dx for the reverse transform, dL/du for
// the forward one (u the dequantised value, or x without noise). The caller forms dL/dx = dL/du 255/256 and
// dL/dnoise = dL/du / 256 from it, each rounded once: dL/dnoise fits a half even where dL/dx overflows it (u near 0).
// One copy for the CPU loop and the CUDA kernel.
template <typename acc>
FG_HD acc logit_grad(acc gy, acc gl, acc x, bool has_noise, acc noise, acc alpha, acc scale, bool reverse) {
  if (reverse) return logit_reverse_grad(gy, gl, x, scale);
  return logit_forward_grad(gy, gl, has_noise ? dequantize(x, noise) : x, alpha, scale);
}

// ---------------------------------------------------------------------------------------------------------------
// Gaussian mixture (Izmailov et al. 2020, eq. 1-3). Per sample b, with maha_k = sum_d (z_d - mu_kd)^2 / sigma_kd^2:
//   log N_k = -0.5 maha_k - log_det_k - 0.5 D log(2 pi);   logits_k = log N_k + log pi_k
//   nll = -logsumexp_k logits_k (label -1), -label_weight log N_y (label y).

constexpr double kLog2Pi = 1.8378770664093454835606594728112;

// log-softmax of K weight logits (or uniform when w == nullptr) into out[K]
template <typename acc, typename wt>
FG_HD void log_weights(const wt* w, int64_t K, acc* out) {
  if (w == nullptr) {
    const acc v = -log_(acc(K));
    for (int64_t k = 0; k < K; ++k) out[k] = v;
    return;
  }
  acc m = acc(w[0]);
  for (int64_t k = 1; k < K; ++k) m = acc(w[k]) > m ? acc(w[k]) : m;
  acc sum = 0;
  for (int64_t k = 0; k < K; ++k) sum += exp_(acc(w[k]) - m);
  const acc lse = m + log_(sum);
  for (int64_t k = 0; k < K; ++k) out[k] = acc(w[k]) - lse;
}

// logsumexp of a row of K logits (strided by 1)
template <typename acc>
FG_HD acc row_logsumexp(const acc* row, int64_t K) {
  acc m = row[0];
  for (int64_t k = 1; k < K; ++k) m = row[k] > m ? row[k] : m;
  if (m == acc(-INFINITY)) return m;
  acc sum = 0;
  for (int64_t k = 0; k < K; ++k) sum += exp_(row[k] - m);
  return m + log_(sum);
}

// A label outside [-1, K) is never read as an index: the sample's nll and gradients are NaN instead (a poison value
// the non-finite guard reports), so a bad label on CUDA, where labels are range-checked only in debug mode (a host
// sync), cannot read or write out of bounds.
FG_HD bool label_invalid(int64_t label, int64_t K) { return label < -1 || label >= K; }

// nll of one sample from its logits row: label -1 -> -logsumexp, else -label_weight * (logits_y - log pi_y)
template <typename acc>
FG_HD acc row_nll(const acc* logits, const acc* log_pi, int64_t K, int64_t label, acc label_weight) {
  if (label_invalid(label, K)) return acc(NAN);
  if (label >= 0) return -label_weight * (logits[label] - log_pi[label]);
  return -row_logsumexp(logits, K);
}

// Gradient of one sample w.r.t. its log N row (G) and its log pi terms (P):
//   P_k = g_logits_k - [unlabeled] g_nll softmax(logits)_k;   G_k = P_k - [labeled, k == y] g_nll label_weight.
// g_logits may be nullptr (zero). Writes G[K] and P[K].
template <typename acc>
FG_HD void row_grad(const acc* logits, const acc* g_logits, acc g_nll, int64_t K, int64_t label, acc label_weight,
                    acc* G, acc* P) {
  if (label_invalid(label, K)) {
    for (int64_t k = 0; k < K; ++k) G[k] = P[k] = acc(NAN);
    return;
  }
  const acc lse = label < 0 ? row_logsumexp(logits, K) : acc(0);
  for (int64_t k = 0; k < K; ++k) {
    acc p = g_logits ? g_logits[k] : acc(0);
    if (label < 0) p -= g_nll * exp_(logits[k] - lse);
    P[k] = p;
    G[k] = (label == k) ? p - g_nll * label_weight : p;
  }
}

}  // namespace math
}  // namespace flowgmm
