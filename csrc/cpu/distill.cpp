// The generalized Jensen-Shannon divergence of GKD (Agarwal et al. 2024; TRL's generalized_jsd_loss)
// between a student's and a teacher's rows of logits on the CPU, with the gradient for the student's
// logits written in the same call (over the logits themselves when asked): what each chunk of
// pyllm.nn.linear_distill computes, where the same step in torch ops made ~20 passes over fp32
// (rows, vocab) buffers plus two dtype copies (0.7 of its 1.7 s at 2,048 x 49,152 bf16, 2-core EPYC,
// 2026-12-02).
//
// Per row, each side's logits shaped as cross_entropy.cpp's (z = scale * x, then cap * tanh(z / cap)
// when capped) and divided by the temperature T; s, t their log-softmaxes, p = e^s, q = e^t:
//   beta 0 (forward KL(q || p), Hinton's):  loss = sum q (t - s)          d/dz_s = p - q
//   beta 1 (reverse KL(p || q)):            loss = sum p (s - t) = K      d/dz_s = p (s - t - K)
//   else, M = beta q + (1 - beta) p, m = log M, K = KL(p || M) = sum p (s - m):
//     loss = beta sum q (t - m) + (1 - beta) K                           d/dz_s = (1 - beta) p (s - m - K)
// (the teacher's term's gradient cancels against part of the student's), then / T, through the cap
// (1 - tanh^2) and the scale, times grad_scale and the row's grad_rows entry when given (a row
// whose factor is 0 gets zeros, even where its logits are NaN). A term whose weight p or q is 0 (a
// -inf logit: a masked class, or an exp below fp32's range) counts 0, the limit of x log x, where
// torch's formula gives 0 * inf = NaN; a class one side masks and the other gives mass makes the
// divergence +inf where the formula has the masked side's log (beta 0: the student's; 1: the
// teacher's), as it should.
//
// Passes per row, over per-thread scratch rows in the math type (fp32; fp64 for fp64) that stay in
// L2 for vocabularies up to ~64K (two or three rows of 256 KB): (1) read both rows once, form z_s
// (and tanh, kept in a third row when the student is capped and a gradient is wanted) and z_t, their
// maxima; (2) the two sums of exp(z - max), giving both log-sum-exps in fp64; (3) beta 0: the loss
// and the gradient, written in the student's dtype; otherwise the loss terms and K, exp(z_s - max)
// kept over z_s and s - m (or s - t) over z_t; (4) otherwise the gradient from those two rows.
// Traffic per element: both logits read once, the gradient written once. The KLs are summed over
// the unnormalised exps with their constants apart in fp64 (see row()): the loss within 0.75x torch's
// own error, the gradient within 1.2x (6 seeds x fp32 / bf16 / fp16 x 4 betas x 3 logit shapes),
// where torch's formula done in the kernel's fp32 had up to 3x on the loss. Exps per element: 4 (beta 0), 3 (beta 1),
// 5 and a log (the mixture), common/cpu_math.h's exp_f32 / log_f32 (within 2 ulp), in loops
// GCC vectorises with -fno-trapping-math; sums in fp64 (fp32 adds over 256K terms would carry ~1e-5
// relative error). 512 x 49,152 fp32 logits, gradient included: 26-31 ms (beta 0), 24-28 (beta 1),
// 40-50 (beta 0.5) on the 2-core EPYC VM (2026-12-02), 1.0-2.0 ns per element.
//
// Non-finite logits: a NaN in either row, or a max of +-inf on either side, gives a NaN loss and
// gradient for the row (torch's log_softmax gives NaN there too); a capped side's +-inf is +-cap.
//
// Threading: OpenMP over rows (static), scratch rows per thread; below kParallelMin elements on the
// calling thread.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "common/checks.h"
#include "common/cpu_math.h"
#include "common/distill_args.h"
#include "common/dtype.h"
#include "common/parallel.h"
#include "cpu/cpu_ops.h"

namespace pyllm {
namespace {

constexpr int64_t kParallelMin = 32768;

struct Args {
  int64_t rows, vocab, student_stride, teacher_stride, grad_stride;
  double scale, softcap, teacher_scale, teacher_softcap, temperature, beta, grad_scale;
};

// value where weight > 0, else 0 (a term of weight 0 counts 0, whatever the value: -inf - finite,
// NaN). The value is computed whatever the weight, so that its loads stay plain loads: under the
// select, GCC masked them.
template <typename A>
inline A select_weighted(A weight, A value) {
  return weight > A(0) ? value : A(0);
}

// z = shape(x) / T into zs (tanh(scale x / cap) into tanhs when given), its max and NaN count.
// Divided by T, not times 1 / T: that rounds twice, and took the fp32 loss of 16-bit logits to 1.3x
// torch's error at T = 1.7.
template <typename T, typename A>
void shape_pass(const T* __restrict x, int64_t V, A scale, A cap, A temperature, A* __restrict zs,
                A* __restrict tanhs, A& top_out, int64_t& nans_out) {
  A top = -std::numeric_limits<A>::infinity();
  int64_t nans = 0;
  if (cap > A(0)) {
    // the tanhs kept or not in loops of their own (see with_chain in row())
    auto capped = [&](auto keep) {
#pragma omp simd reduction(max : top) reduction(+ : nans)
      for (int64_t j = 0; j < V; ++j) {
        const A th = tanh_acc(A(to_float(x[j])) * scale / cap);
        const A z = cap * th / temperature;
        keep(j, th);
        zs[j] = z;
        top = std::max(top, z);
        nans += z != z;
      }
    };
    if (tanhs)
      capped([&](int64_t j, A th) { tanhs[j] = th; });
    else
      capped([](int64_t, A) {});
  } else {
#pragma omp simd reduction(max : top) reduction(+ : nans)
    for (int64_t j = 0; j < V; ++j) {
      const A z = A(to_float(x[j])) * scale / temperature;
      zs[j] = z;
      top = std::max(top, z);
      nans += z != z;
    }
  }
  top_out = top;
  nans_out = nans;
}

// sum exp(z - top), given z's max (finite), in fp64.
template <typename A>
double sum_exp(const A* __restrict z, int64_t V, A top) {
  double sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < V; ++j) sum += double(exp_shifted(z[j] - top));
  return sum;
}

template <typename T>
void row(const T* xs, const T* xt, T* grad, acc_t<T>* loss_out, double grad_scale, acc_t<T>* __restrict zs,
         acc_t<T>* __restrict zt, acc_t<T>* __restrict tanhs, const Args& a) {
  using A = acc_t<T>;
  const int64_t V = a.vocab;
  const A temperature = A(a.temperature);
  const bool capped = a.softcap > 0;
  // (1) both sides shaped, their maxima
  A top_s, top_t;
  int64_t nans_s, nans_t;
  shape_pass(xs, V, A(a.scale), A(a.softcap), temperature, zs, capped && grad ? tanhs : static_cast<A*>(nullptr), top_s,
             nans_s);
  shape_pass(xt, V, A(a.teacher_scale), A(a.teacher_softcap), temperature, zt, static_cast<A*>(nullptr), top_t, nans_t);
  if (nans_s || nans_t || !std::isfinite(top_s) || !std::isfinite(top_t)) {
    const A nan = std::numeric_limits<A>::quiet_NaN();
    loss_out[0] = nan;
    if (grad) std::fill_n(grad, V, from_acc<T>(nan));
    return;
  }
  // (2) the log-sum-exps, in fp64
  const double sum_s = sum_exp(zs, V, top_s), sum_t = sum_exp(zt, V, top_t);
  const double lse_s = double(top_s) + std::log(sum_s), lse_t = double(top_t) + std::log(sum_t);
  // the gradient's factor per element: the row's (grad_scale / T, the scale) and the cap's 1 - tanh^2
  const A factor = A(grad_scale * a.scale / a.temperature);
  // with_chain(loop) runs loop(chain), chain(j) that factor at j: the cap's loop and the plain one
  // apart (one loop with the select masked its tanh loads off a null row when uncapped, which on
  // this EPYC cost 4x: 103 against 25 ms at 512 x 49,152 fp32, beta 0, 2026-12-02)
  auto with_chain = [&](auto loop) {
    if (capped)
      loop([&](int64_t j) { return factor * (A(1) - tanhs[j] * tanhs[j]); });
    else
      loop([&](int64_t) { return factor; });
  };
  const double beta = a.beta;
  // The KLs as sums over the unnormalised exps, their constants in fp64: KL(q || p) = sum q (t - s)
  // = sum_j exp(z_t - top_t) (z_t - z_s) / sum_t + lse_s - lse_t. Summed as torch's formula (the
  // log-softmaxes first, each with its fp32 lse), the loss had 3x torch's error at V = 1,001.
  if (beta == 0) {  // (3) one pass: no K needed
    double cross = 0;
    if (grad) {
      // p = exp((z_s - top_s) - log sum_s): z_s - lse_s in fp32 would round lse_s at the logits'
      // magnitude (3.5x torch's gradient error at logits of std 30 around 50)
      const A log_sum = A(std::log(sum_s)), inv_sum = A(1.0 / sum_t);
      with_chain([&](auto chain) {
#pragma omp simd reduction(+ : cross)
        for (int64_t j = 0; j < V; ++j) {
          const A e = exp_shifted(zt[j] - top_t);
          cross += double(select_weighted(e, e * (zt[j] - zs[j])));
          grad[j] = from_acc<T>((exp_shifted((zs[j] - top_s) - log_sum) - e * inv_sum) * chain(j));
        }
      });
    } else {
#pragma omp simd reduction(+ : cross)
      for (int64_t j = 0; j < V; ++j) {
        const A e = exp_shifted(zt[j] - top_t);
        cross += double(select_weighted(e, e * (zt[j] - zs[j])));
      }
    }
    loss_out[0] = A(cross / sum_t + (lse_s - lse_t));
    return;
  }
  if (beta == 1) {  // (3) KL(p || q) = sum_j exp(z_s - top_s) (z_s - z_t) / sum_s + lse_t - lse_s
    double cross = 0;
#pragma omp simd reduction(+ : cross)
    for (int64_t j = 0; j < V; ++j) {
      const A e = exp_shifted(zs[j] - top_s), d = zs[j] - zt[j];
      cross += double(select_weighted(e, e * d));
      zs[j] = e;
      zt[j] = d;
    }
    const double mean = cross / sum_s;  // sum p (z_s - z_t)
    loss_out[0] = A(mean + (lse_t - lse_s));
    if (!grad) return;
    // (4) p (s - t - K) = p ((z_s - z_t) - mean)
    const A inv_sum = A(1.0 / sum_s), shift = A(mean);
    with_chain([&](auto chain) {
#pragma omp simd
      for (int64_t j = 0; j < V; ++j)
        grad[j] = from_acc<T>(select_weighted(zs[j], zs[j] * inv_sum * (zt[j] - shift) * chain(j)));
    });
    return;
  }
  // (3) the mixture, in the same form: with u = s - t = z_s - z_t + lse_t - lse_s,
  // m - t = log(beta + (1 - beta) e^u) = log(beta + (1 - beta) e^u)            (u <= 0)
  //                                    = u + log(beta e^-u + (1 - beta))       (u > 0),
  // the log's argument in [min(beta, 1 - beta), 1] (no underflow, and a class masked on one side
  // only reaches it as e^-inf = 0); s - m = u - (m - t) likewise. exp(z_s - top_s) over zs, s - m
  // over zt.
  const A shift = A(lse_t - lse_s), wq = A(beta), wp = A(1 - beta);
  double kl = 0, teacher_term = 0;
#pragma omp simd reduction(+ : kl, teacher_term)
  for (int64_t j = 0; j < V; ++j) {
    const A es = exp_shifted(zs[j] - top_s), et = exp_shifted(zt[j] - top_t);
    const A u = (zs[j] - zt[j]) + shift, far = exp_shifted(-std::fabs(u));
    const A log_rest = log_acc(u > A(0) ? wq * far + wp : wq + wp * far);
    // each difference formed apart, not s - m as u - (m - t): a class the teacher alone masks
    // (u = +inf) gave inf - inf there, a NaN row
    const A m_minus_t = u > A(0) ? u + log_rest : log_rest;
    const A s_minus_m = u > A(0) ? -log_rest : u - log_rest;
    kl += double(select_weighted(es, es * s_minus_m));
    teacher_term -= double(select_weighted(et, et * m_minus_t));
    zs[j] = es;
    zt[j] = s_minus_m;
  }
  kl /= sum_s;
  loss_out[0] = A(beta * teacher_term / sum_t + (1 - beta) * kl);
  if (!grad) return;
  // (4) the gradient, (1 - beta) p (s - m - K), 0 where p is
  const A k = A(kl), w = A((1 - beta) / sum_s);
  with_chain([&](auto chain) {
#pragma omp simd
    for (int64_t j = 0; j < V; ++j) grad[j] = from_acc<T>(select_weighted(zs[j], w * zs[j] * (zt[j] - k) * chain(j)));
  });
}

template <typename T>
void run(const T* student, const T* teacher, acc_t<T>* loss, T* grad, const acc_t<T>* grad_rows, const Args& a) {
  using A = acc_t<T>;
  const int threads = row_team(a.rows, a.rows * a.vocab, kParallelMin);
  const bool keep_tanh = grad && a.softcap > 0;
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    std::vector<A> zs(size_t(a.vocab)), zt(size_t(a.vocab)), tanhs(keep_tanh ? size_t(a.vocab) : 0);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < a.rows; ++r) {
      T* grow = grad ? grad + r * a.grad_stride : nullptr;
      const double row_scale = a.grad_scale * (grad_rows ? double(grad_rows[r]) : 1.0);
      // A row of weight 0 (a masked token in generalized_jsd's backward) gets a zero gradient, whatever
      // its logits (a NaN there must not reach the student's gradient): its loss computed first, as
      // the row may be its own gradient.
      row<T>(student + r * a.student_stride, teacher + r * a.teacher_stride, row_scale == 0 ? nullptr : grow,
             loss + r, row_scale, zs.data(), zt.data(), tanhs.data(), a);
      if (grow && row_scale == 0) std::fill_n(grow, a.vocab, from_acc<T>(A(0)));
    }
  }
}

}  // namespace

void distill_cpu(uintptr_t student, uintptr_t teacher, uintptr_t loss, uintptr_t grad, uintptr_t grad_rows,
                 int64_t rows, int64_t vocab, int64_t student_stride, int64_t teacher_stride, int64_t grad_stride,
                 double scale, double softcap, double teacher_scale, double teacher_softcap, double temperature,
                 double beta, double grad_scale, int dtype) {
  check_distill_args(student, teacher, loss, grad, rows, vocab, student_stride, teacher_stride, grad_stride, scale,
                     softcap, teacher_scale, teacher_softcap, temperature, beta, grad_scale, dtype);
  if (rows == 0) return;
  const Args a{rows,          vocab,           student_stride, teacher_stride, grad_stride, scale,     softcap,
               teacher_scale, teacher_softcap, temperature,    beta,           grad_scale};
  PYLLM_DISPATCH_CPU(dtype, T,
                     run<T>(reinterpret_cast<const T*>(student), reinterpret_cast<const T*>(teacher),
                            reinterpret_cast<acc_t<T>*>(loss), reinterpret_cast<T*>(grad),
                            reinterpret_cast<const acc_t<T>*>(grad_rows), a));
}

}  // namespace pyllm
