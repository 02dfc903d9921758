// Gaussian-mixture likelihood on the CPU (isotropic (K,) or diagonal (K, D) log_std).
//
// The D-reductions run as matrix products (z mu^T and friends through at::mm, i.e. the BLAS), in the same closed form
// as the reference, |z|^2 / s^2 - 2 z.mu / s^2 + |mu|^2 / s^2, so (B, K, D) is never formed; everything per sample
// (Mahalanobis terms, log pi, logsumexp over K, label gather with label_weight, nll and logits; in backward the
// softmax weights and dL/dz) is one fused parallel pass over the batch with flowgmm_math.h's row functions.
// Backward recomputes from the inputs and the saved (B, K) logits.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <vector>

#include "flowgmm_math.h"
#include "ops.h"

namespace flowgmm {
namespace cpu {
namespace {

struct Inputs {
  Tensor z, means, log_std, log_pi;  // in the compute dtype, contiguous; log_pi (K,)
  int64_t B, K, D;
  bool diag;
};

Inputs prepare(const Tensor& z, const Tensor& means, const Tensor& log_std, const OptTensor& weight_logits) {
  const auto cdt = ldj_dtype(z.scalar_type(), means.scalar_type(), log_std.scalar_type());
  Inputs in;
  in.z = z.to(cdt).contiguous();
  in.means = means.to(cdt).contiguous();
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

template <typename T>
T row_sumsq(const T* z, int64_t D) {
  T acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t d = 0; d < D; ++d) acc += z[d] * z[d];
  return acc;
}

// isotropic dL/dz row: gz = sum_k H_k mu_k - (sum_k H_k) z; returns |z|^2 (needed for dL/dlog_std)
template <typename T>
T gz_row(const T* z, const T* m, T hsum, T* gz, int64_t D) {
  T sq = 0;
#pragma omp simd reduction(+ : sq)
  for (int64_t d = 0; d < D; ++d) {
    gz[d] = m[d] - hsum * z[d];
    sq += z[d] * z[d];
  }
  return sq;
}

}  // namespace

std::tuple<Tensor, Tensor> gmm_fwd(const Tensor& z, const Tensor& means, const Tensor& log_std,
                                   const OptTensor& weight_logits, const OptTensor& labels, double label_weight) {
  const Inputs in = prepare(z, means, log_std, weight_logits);
  const int64_t B = in.B, K = in.K, D = in.D;
  Tensor logits = at::empty({B, K}, in.z.options());
  Tensor nll = at::empty({B}, in.z.options());
  if (B == 0) return {nll, logits};
  // per component: iv_k (isotropic) or the constant sum_d mu^2 / s^2 (diagonal), and the log-det sum log s
  Tensor cross, quad, comp_const, inv_var, log_det;
  if (in.diag) {
    inv_var = at::exp(in.log_std * -2);
    cross = at::mm(in.z, (in.means * inv_var).t());
    quad = at::mm(in.z.square(), inv_var.t());
    comp_const = (in.means.square() * inv_var).sum(1);
    log_det = in.log_std.sum(1);
  } else {
    inv_var = at::exp(in.log_std * -2);
    cross = at::mm(in.z, in.means.t());
    comp_const = in.means.square().sum(1);
    log_det = in.log_std * static_cast<double>(D);
  }
  const Tensor lab = labels ? labels->contiguous() : Tensor();
  AT_DISPATCH_FLOATING_TYPES(in.z.scalar_type(), "gmm_fwd_cpu", [&] {
    using T = scalar_t;
    const T *zp = in.z.data_ptr<T>(), *cp = cross.data_ptr<T>(), *qp = in.diag ? quad.data_ptr<T>() : nullptr;
    const T *cc = comp_const.data_ptr<T>(), *iv = inv_var.data_ptr<T>(), *ld = log_det.data_ptr<T>();
    const T* lpi = in.log_pi.data_ptr<T>();
    const int64_t* lp = labels ? lab.data_ptr<int64_t>() : nullptr;
    T *outl = logits.data_ptr<T>(), *outn = nll.data_ptr<T>();
    const T half_d_log2pi = static_cast<T>(0.5 * D * math::kLog2Pi), lw = static_cast<T>(label_weight);
    at::parallel_for(0, B, std::max<int64_t>(1, 8192 / std::max<int64_t>(1, D)), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        T* row = outl + b * K;
        const T zsq = in.diag ? T(0) : row_sumsq(zp + b * D, D);
        for (int64_t k = 0; k < K; ++k) {
          const T maha = in.diag ? qp[b * K + k] - 2 * cp[b * K + k] + cc[k]
                                 : (zsq - 2 * cp[b * K + k] + cc[k]) * iv[k];
          row[k] = -T(0.5) * maha - ld[k] - half_d_log2pi + lpi[k];
        }
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
  // G (B, K): dL/dlog N; P (B, K): dL/dlog pi per sample
  Tensor G = at::empty({B, K}, in.z.options()), P = at::empty({B, K}, in.z.options());
  AT_DISPATCH_FLOATING_TYPES(cdt, "gmm_bwd_rows_cpu", [&] {
    using T = scalar_t;
    const T *lg = logits.data_ptr<T>(), *gnp = grad_nll ? gn.data_ptr<T>() : nullptr;
    const T* gLp = grad_logits ? gL.data_ptr<T>() : nullptr;
    const int64_t* lp = labels ? lab.data_ptr<int64_t>() : nullptr;
    T *Gp = G.data_ptr<T>(), *Pp = P.data_ptr<T>();
    const T lw = static_cast<T>(label_weight);
    at::parallel_for(0, B, 256, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b)
        math::row_grad(lg + b * K, gLp ? gLp + b * K : nullptr, gnp ? gnp[b] : T(0), K, lp ? lp[b] : -1, lw,
                       Gp + b * K, Pp + b * K);
    });
  });
  const Tensor colG = G.sum(0);
  const Tensor inv_var = at::exp(in.log_std * -2);
  Tensor gz = at::empty({B, D}, in.z.options()), gmeans, glog_std;
  if (!in.diag) {
    const Tensor H = G * inv_var;         // (B, K)
    const Tensor M = at::mm(H, in.means);  // (B, D): sum_k H_bk mu_k
    const Tensor N = at::mm(H.t(), in.z);  // (K, D): iv_k sum_b G_bk z_b
    Tensor zsq = at::empty({B}, in.z.options());
    AT_DISPATCH_FLOATING_TYPES(cdt, "gmm_bwd_gz_cpu", [&] {
      using T = scalar_t;
      const T *zp = in.z.data_ptr<T>(), *Hp = H.data_ptr<T>(), *Mp = M.data_ptr<T>();
      T *gzp = gz.data_ptr<T>(), *zs = zsq.data_ptr<T>();
      at::parallel_for(0, B, std::max<int64_t>(1, 8192 / std::max<int64_t>(1, D)), [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) {
          T hsum = 0;
          for (int64_t k = 0; k < K; ++k) hsum += Hp[b * K + k];
          const T *zr = zp + b * D, *mr = Mp + b * D;
          T* gr = gzp + b * D;
          zs[b] = gz_row(zr, mr, hsum, gr, D);
        }
      });
    });
    gmeans = N - (colG * inv_var).unsqueeze(1) * in.means;
    const Tensor musq = in.means.square().sum(1);
    glog_std = inv_var * (at::mv(G.t(), zsq) + colG * musq) - 2 * (N * in.means).sum(1) - colG * static_cast<double>(D);
  } else {
    const Tensor A = at::mm(G, inv_var);                 // (B, D): sum_k G_bk iv_kd
    const Tensor Mm = at::mm(G, in.means * inv_var);     // (B, D): sum_k G_bk mu_kd iv_kd
    gz = Mm - in.z * A;
    const Tensor Gz = at::mm(G.t(), in.z);               // (K, D)
    const Tensor Gz2 = at::mm(G.t(), in.z.square());     // (K, D)
    const Tensor cg = colG.unsqueeze(1);
    gmeans = inv_var * (Gz - in.means * cg);
    glog_std = inv_var * (Gz2 - 2 * in.means * Gz + in.means.square() * cg) - cg;
  }
  Tensor gw = at::empty({0}, in.z.options());
  if (weight_logits) {
    const Tensor colP = P.sum(0);
    gw = (colP - at::softmax(weight_logits->to(cdt), 0) * colP.sum()).to(weight_logits->scalar_type());
  }
  return {gz.to(z.scalar_type()), gmeans.to(means.scalar_type()), glog_std.to(log_std.scalar_type()), gw};
}

}  // namespace cpu
}  // namespace flowgmm
