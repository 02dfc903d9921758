// Gaussian-mixture likelihood on the CPU (isotropic (K,) or diagonal (K, D) log_std); (B, K, D) is never formed.
//
// Isotropic (the FlowGMM prior): one fused parallel pass over the batch per direction, in the closed form of the
// reference, maha = (|z|^2 - 2 z.mu + |mu|^2) / s^2, on z and mu centred on the mean of the means c (maha is unchanged
// by the shift; without it the three terms cancel: at D = 3072 with means ~5 per dimension the logits lost ~0.03-0.1).
// Each sample's z - c is formed once in a per-thread row buffer. Forward: per sample the K dot products and |z|^2 (vectorised
// over D), the logits row (log N + log pi), logsumexp over K or the label gather with label_weight, the nll.
// Backward (from the inputs and the saved (B, K) logits): per sample the softmax / label weights G = dL/dlog N,
// dL/dz = sum_k G_k (mu_k - z) / s_k^2 written once, and per-thread partial sums of sum_b G_bk z_b / s_k^2 (for
// dL/dmu), G, G |z|^2 and dL/dlog pi, combined after the pass. The float32 loops are compiled per ISA
// (FLOWGMM_CPU_CLONES). Diagonal: the D-reductions as matrix products (at::mm) plus a fused per-sample pass.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <type_traits>
#include <vector>

#include "flowgmm_math.h"
#include "ops.h"

namespace flowgmm {
namespace cpu {
namespace {

struct Inputs {
  Tensor z, means, centre, log_std, log_pi;  // in the compute dtype, contiguous; means centred on `centre` (D,), the
                                             // mean of the means; z not centred; log_pi (K,)
  int64_t B, K, D;
  bool diag;
};

Inputs prepare(const Tensor& z, const Tensor& means, const Tensor& log_std, const OptTensor& weight_logits) {
  const auto cdt = ldj_dtype(z.scalar_type(), means.scalar_type(), log_std.scalar_type());
  Inputs in;
  in.z = z.to(cdt).contiguous();
  const Tensor mu = means.to(cdt);
  in.centre = mu.mean(0).contiguous();
  in.means = (mu - in.centre).contiguous();
  in.log_std = log_std.to(cdt).contiguous();
  in.B = z.size(0);
  in.D = z.size(1);
  in.K = means.size(0);
  in.diag = log_std.dim() == 2;
  in.log_pi = at::empty({in.K}, in.z.options());
  const Tensor w = weight_logits ? weight_logits->to(cdt).contiguous() : Tensor();
  AT_DISPATCH_FLOATING_TYPES(cdt, "gmm_log_pi_cpu", [&] {
    math::log_weights<scalar_t, scalar_t>(weight_logits ? w.data_ptr<scalar_t>() : nullptr, in.K,
                                          in.log_pi.data_ptr<scalar_t>());
  });
  return in;
}

int64_t grain(int64_t D) { return std::max<int64_t>(1, 8192 / std::max<int64_t>(1, D)); }

template <typename T>
inline __attribute__((always_inline)) T dot(const T* a, const T* b, int64_t D) {
  T acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t d = 0; d < D; ++d) acc += a[d] * b[d];
  return acc;
}

// four dot products of z with rows m0..m3 at once: four independent accumulator chains (a single chain is
// FMA-latency bound)
template <typename T>
inline __attribute__((always_inline)) void dot4(const T* z, const T* m, int64_t D, T* out) {
  const T *m0 = m, *m1 = m + D, *m2 = m + 2 * D, *m3 = m + 3 * D;
  T a0 = 0, a1 = 0, a2 = 0, a3 = 0;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
  for (int64_t d = 0; d < D; ++d) {
    const T zd = z[d];
    a0 += zd * m0[d];
    a1 += zd * m1[d];
    a2 += zd * m2[d];
    a3 += zd * m3[d];
  }
  out[0] = a0;
  out[1] = a1;
  out[2] = a2;
  out[3] = a3;
}

template <typename T>
inline __attribute__((always_inline)) void axpy(T* y, T a, const T* x, int64_t D) {
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) y[d] += a * x[d];
}

// zc = z - c over D elements (the centred row)
template <typename T>
inline __attribute__((always_inline)) void centre_row(const T* z, const T* c, T* zc, int64_t D) {
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) zc[d] = z[d] - c[d];
}

// ---- isotropic forward (means, musq: centred on c)
template <typename T>
struct IsoFwd {
  const T *z, *centre, *means, *musq, *iv, *log_det, *log_pi;
  const int64_t* labels;
  T *logits, *nll;
  int64_t K, D;
  T half_d_log2pi, lw;
};

template <typename T>
inline __attribute__((always_inline)) void iso_fwd_range(const IsoFwd<T>& a, int64_t begin, int64_t end, T* zr) {
  for (int64_t b = begin; b < end; ++b) {
    centre_row(a.z + b * a.D, a.centre, zr, a.D);
    T* row = a.logits + b * a.K;
    const T zsq = dot(zr, zr, a.D);
    int64_t k = 0;
    for (; k + 4 <= a.K; k += 4) dot4(zr, a.means + k * a.D, a.D, row + k);
    for (; k < a.K; ++k) row[k] = dot(zr, a.means + k * a.D, a.D);
    for (k = 0; k < a.K; ++k) {
      const T maha = (zsq - 2 * row[k] + a.musq[k]) * a.iv[k];
      row[k] = -T(0.5) * maha - a.log_det[k] - a.half_d_log2pi + a.log_pi[k];
    }
    a.nll[b] = math::row_nll(row, a.log_pi, a.K, a.labels ? a.labels[b] : -1, a.lw);
  }
}

FLOWGMM_CPU_CLONES void iso_fwd_range_f32(const IsoFwd<float>& a, int64_t begin, int64_t end, float* zc) {
  iso_fwd_range(a, begin, end, zc);
}

// ---- isotropic backward (means centred on c; z centred per row as in the forward)
template <typename T>
struct IsoBwd {
  const T *z, *centre, *means, *iv, *logits, *g_logits, *g_nll;
  const int64_t* labels;
  T* gz;
  int64_t K, D;
  T lw;
};

template <typename T>
inline __attribute__((always_inline)) void iso_bwd_range(const IsoBwd<T>& a, int64_t begin, int64_t end, T* part,
                                                         T* scratch) {
  const int64_t K = a.K, D = a.D;
  T *N = part, *colG = part + K * D, *colP = colG + K, *colGz = colP + K;
  T *G = scratch, *P = scratch + K, *zr = scratch + 2 * K;
  for (int64_t b = begin; b < end; ++b) {
    math::row_grad(a.logits + b * K, a.g_logits ? a.g_logits + b * K : nullptr, a.g_nll ? a.g_nll[b] : T(0), K,
                   a.labels ? a.labels[b] : -1, a.lw, G, P);
    centre_row(a.z + b * D, a.centre, zr, D);
    T* gzr = a.gz + b * D;
    const T zsq = dot(zr, zr, D);
    T hsum = 0;
    for (int64_t k = 0; k < K; ++k) {
      hsum += G[k] * a.iv[k];
      colG[k] += G[k];
      colP[k] += P[k];
      colGz[k] += G[k] * zsq;
    }
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) gzr[d] = -hsum * zr[d];
    for (int64_t k = 0; k < K; ++k) {
      const T h = G[k] * a.iv[k];
      if (h == T(0)) continue;
      axpy(gzr, h, a.means + k * D, D);
      axpy(N + k * D, h, zr, D);
    }
  }
}

FLOWGMM_CPU_CLONES void iso_bwd_range_f32(const IsoBwd<float>& a, int64_t begin, int64_t end, float* part,
                                          float* scratch) {
  iso_bwd_range(a, begin, end, part, scratch);
}

template <typename T>
void iso_fwd_run(const IsoFwd<T>& a, int64_t B) {
  at::parallel_for(0, B, grain(a.D), [&](int64_t begin, int64_t end) {
    std::vector<T> zc(a.D);
    if constexpr (std::is_same_v<T, float>) iso_fwd_range_f32(a, begin, end, zc.data());
    else iso_fwd_range(a, begin, end, zc.data());
  });
}

// rows summed in the compute dtype before their block's sums join the thread's float64 partials: a float running
// sum over 10^5 rows loses digits that the log-std and weight gradients (differences of such sums) then amplify
constexpr int64_t kBwdBlockRows = 64;

template <typename T>
void iso_bwd_run(const IsoBwd<T>& a, int64_t B, int64_t stride, double* partials) {
  at::parallel_for(0, B, grain(a.D), [&](int64_t begin, int64_t end) {
    std::vector<T> scratch(2 * a.K + a.D), block(stride);
    double* part = partials + at::get_thread_num() * stride;
    for (int64_t lo = begin; lo < end; lo += kBwdBlockRows) {
      std::fill(block.begin(), block.end(), T(0));
      const int64_t hi = std::min(end, lo + kBwdBlockRows);
      if constexpr (std::is_same_v<T, float>) iso_bwd_range_f32(a, lo, hi, block.data(), scratch.data());
      else iso_bwd_range(a, lo, hi, block.data(), scratch.data());
      for (int64_t i = 0; i < stride; ++i) part[i] += static_cast<double>(block[i]);
    }
  });
}

}  // namespace

std::tuple<Tensor, Tensor> gmm_fwd(const Tensor& z, const Tensor& means, const Tensor& log_std,
                                   const OptTensor& weight_logits, const OptTensor& labels, double label_weight) {
  const Inputs in = prepare(z, means, log_std, weight_logits);
  const int64_t B = in.B, K = in.K, D = in.D;
  Tensor logits = at::empty({B, K}, in.z.options());
  Tensor nll = at::empty({B}, in.z.options());
  if (B == 0) return {nll, logits};
  const Tensor lab = labels ? labels->contiguous() : Tensor();
  const Tensor inv_var = at::exp(in.log_std * -2);
  AT_DISPATCH_FLOATING_TYPES(in.z.scalar_type(), "gmm_fwd_cpu", [&] {
    using T = scalar_t;
    const T half_d_log2pi = static_cast<T>(0.5 * D * math::kLog2Pi), lw = static_cast<T>(label_weight);
    const int64_t* lp = labels ? lab.data_ptr<int64_t>() : nullptr;
    if (!in.diag) {
      // per component: |mu_k|^2 and the log-det D log s_k
      std::vector<T> musq(K), log_det(K);
      const T *mp = in.means.data_ptr<T>(), *ls = in.log_std.data_ptr<T>();
      for (int64_t k = 0; k < K; ++k) {
        musq[k] = dot(mp + k * D, mp + k * D, D);
        log_det[k] = static_cast<T>(D) * ls[k];
      }
      const IsoFwd<T> a{in.z.data_ptr<T>(), in.centre.data_ptr<T>(), mp, musq.data(), inv_var.data_ptr<T>(), log_det.data(),
                        in.log_pi.data_ptr<T>(), lp, logits.data_ptr<T>(), nll.data_ptr<T>(), K, D, half_d_log2pi,
                        lw};
      iso_fwd_run(a, B);
      return;
    }
    // diagonal: maha = (z^2) iv^T - 2 z (mu iv)^T + sum_d mu^2 iv, on z and mu centred on c
    const Tensor zc = in.z - in.centre;
    const Tensor cross = at::mm(zc, (in.means * inv_var).t());
    const Tensor quad = at::mm(zc.square(), inv_var.t());
    const Tensor comp_const = (in.means.square() * inv_var).sum(1);
    const Tensor log_det = in.log_std.sum(1);
    const T *cp = cross.data_ptr<T>(), *qp = quad.data_ptr<T>(), *cc = comp_const.data_ptr<T>();
    const T *ld = log_det.data_ptr<T>(), *lpi = in.log_pi.data_ptr<T>();
    T *outl = logits.data_ptr<T>(), *outn = nll.data_ptr<T>();
    at::parallel_for(0, B, grain(K), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        T* row = outl + b * K;
        for (int64_t k = 0; k < K; ++k)
          row[k] = -T(0.5) * (qp[b * K + k] - 2 * cp[b * K + k] + cc[k]) - ld[k] - half_d_log2pi + lpi[k];
        outn[b] = math::row_nll(row, lpi, K, lp ? lp[b] : -1, lw);
      }
    });
  });
  return {nll, logits};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> gmm_bwd(const OptTensor& grad_nll, const OptTensor& grad_logits,
                                                   const Tensor& z, const Tensor& means, const Tensor& log_std,
                                                   const OptTensor& weight_logits, const OptTensor& labels,
                                                   double label_weight, const Tensor& logits_) {
  const Inputs in = prepare(z, means, log_std, weight_logits);
  const int64_t B = in.B, K = in.K, D = in.D;
  const auto cdt = in.z.scalar_type();
  const Tensor logits = logits_.to(cdt).contiguous();
  const Tensor gn = grad_nll ? grad_nll->to(cdt).contiguous() : Tensor();
  const Tensor gL = grad_logits ? grad_logits->to(cdt).contiguous() : Tensor();
  const Tensor lab = labels ? labels->contiguous() : Tensor();
  const Tensor inv_var = at::exp(in.log_std * -2);
  Tensor gz = at::empty({B, D}, in.z.options()), gmeans, glog_std;
  Tensor colP = at::zeros({K}, in.z.options().dtype(at::kDouble));  // float64: the weight gradient cancels
  AT_DISPATCH_FLOATING_TYPES(cdt, "gmm_bwd_cpu", [&] {
    using T = scalar_t;
    const T *lg = logits.data_ptr<T>(), *gnp = grad_nll ? gn.data_ptr<T>() : nullptr;
    const T* gLp = grad_logits ? gL.data_ptr<T>() : nullptr;
    const T *zp = in.z.data_ptr<T>(), *iv = inv_var.data_ptr<T>(), *mp = in.means.data_ptr<T>();
    const int64_t* lp = labels ? lab.data_ptr<int64_t>() : nullptr;
    const T lw = static_cast<T>(label_weight);
    double* cP = colP.data_ptr<double>();
    if (!in.diag) {
      const int64_t stride = K * D + 3 * K, nthreads = at::get_num_threads();
      Tensor partials = at::zeros({nthreads, stride}, in.z.options().dtype(at::kDouble));
      const IsoBwd<T> a{zp, in.centre.data_ptr<T>(), mp, iv, lg, gLp, gnp, lp, gz.data_ptr<T>(), K, D, lw};
      iso_bwd_run(a, B, stride, partials.data_ptr<double>());
      const Tensor total = partials.sum(0);
      const double* tp = total.data_ptr<double>();
      const double *N = tp, *colG = tp + K * D, *colPt = colG + K, *colGz = colPt + K;
      // dL/dmu_k = N_k - colG_k mu_k / s_k^2;
      // dL/dlog s_k = sum_b G_bk (maha_bk - D) = (sum_b G_bk |z_b|^2 + colG_k |mu_k|^2) / s_k^2 - 2 N_k.mu_k - D colG_k
      gmeans = at::empty({K, D}, in.z.options());
      glog_std = at::empty({K}, in.z.options());
      T *gmp = gmeans.data_ptr<T>(), *glp = glog_std.data_ptr<T>();
      for (int64_t k = 0; k < K; ++k) {  // in float64: the terms cancel
        const double ivk = iv[k], ch = colG[k] * ivk;
        double musq = 0, nmu = 0;
        for (int64_t d = 0; d < D; ++d) {
          const double m = mp[k * D + d];
          gmp[k * D + d] = static_cast<T>(N[k * D + d] - ch * m);
          musq += m * m;
          nmu += N[k * D + d] * m;
        }
        glp[k] = static_cast<T>(ivk * (colGz[k] + colG[k] * musq) - 2 * nmu - static_cast<double>(D) * colG[k]);
        cP[k] = colPt[k];
      }
      return;
    }
    // diagonal: G (B, K) from the rows, then the D-reductions as matrix products
    Tensor G = at::empty({B, K}, in.z.options()), P = at::empty({B, K}, in.z.options());
    T *Gp = G.data_ptr<T>(), *Pp = P.data_ptr<T>();
    at::parallel_for(0, B, 256, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b)
        math::row_grad(lg + b * K, gLp ? gLp + b * K : nullptr, gnp ? gnp[b] : T(0), K, lp ? lp[b] : -1, lw,
                       Gp + b * K, Pp + b * K);
    });
    colP.copy_(P.sum(0, false, at::kDouble));
    const Tensor zc = in.z - in.centre;               // centred as in the forward
    const Tensor A = at::mm(G, inv_var);              // (B, D): sum_k G_bk iv_kd
    const Tensor Mm = at::mm(G, in.means * inv_var);  // (B, D): sum_k G_bk mu_kd iv_kd
    gz = Mm - zc * A;
    // the sums over rows, and the log-std expansion whose terms cancel, in float64 (as the isotropic path)
    const Tensor Gt = G.t().to(at::kDouble), zcd = zc.to(at::kDouble), mud = in.means.to(at::kDouble);
    const Tensor ivd = inv_var.to(at::kDouble), cg = Gt.sum(1, true);
    const Tensor Gz = at::mm(Gt, zcd);                // (K, D)
    const Tensor Gz2 = at::mm(Gt, zcd.square());      // (K, D)
    gmeans = (ivd * (Gz - mud * cg)).to(cdt);
    glog_std = (ivd * (Gz2 - 2 * mud * Gz + mud.square() * cg) - cg).to(cdt);
  });
  Tensor gw = at::empty({0}, in.z.options());
  if (weight_logits) {
    gw = (colP - at::softmax(weight_logits->to(at::kDouble), 0) * colP.sum()).to(weight_logits->scalar_type());
  }
  return {gz.to(z.scalar_type()), gmeans.to(means.scalar_type()), glog_std.to(log_std.scalar_type()), gw};
}

}  // namespace cpu
}  // namespace flowgmm
