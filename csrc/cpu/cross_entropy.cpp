// Cross-entropy over rows of logits on the CPU, with label smoothing, PaLM's z-loss, a logit scale
// and a tanh cap, and the gradient written in the same call (over the logits themselves when asked:
// the fused output-layer loss keeps no second (rows, vocab) buffer).
//
// Per row, z_j = scale * x_j, then cap * tanh(z_j / cap) when capped (Gemma 2's final logits):
//   lse  = max + log(sum_j exp(z_j - max))
//   loss = lse - (1 - e) z_target - e mean_j(z_j) + zl lse^2          (e: label smoothing, zl: z-loss)
//   dloss/dz_j = softmax_j (1 + 2 zl lse) - (1 - e) [j = target] - e / vocab
// then the chain rule through the cap (1 - tanh^2) and the scale; times grad_scale and the row's
// grad_rows entry when given (a backward's incoming gradient: one rounding to x's dtype). A row whose
// target is ignore_index has loss 0 and a zero gradient.
//
// Three passes per row, the last two over a per-thread fp32 scratch row (fp64 for fp64) that stays
// in L2 for vocabularies up to ~64K (256 KB): (1) read x once, form z (and tanh, kept in a second
// scratch row when capped), the max and sum of z; (2) exp(z - max) in place, their sum; (3) the
// gradient, written in x's dtype. Traffic per element: x read once, the gradient written once (4 B
// in bf16, in place), where the same step in torch ops made ~8 passes over fp32 (rows, vocab)
// buffers plus two dtype copies (bench/bench_cross_entropy.py, 2026-12-02). Sums run in fp64: fp32
// adds over 256K terms would carry ~1e-5 relative error into lse.
//
// exp: common/cpu_math.h's exp_f32 (degree 7, 7.9e-8 relative, as libm's expf), exactly 0 below
// exp(-87) (a -inf logit's softmax is 0, as torch's). tanh: below 0.5 its Taylor series to x^17
// (truncation 1e-8 relative), above it 1 - 2 / (exp(2x) + 1) (the cancellation costs at most a bit
// there, tanh >= 0.46). The exp pass and the capped first pass run on AVX-512 lanes by hand where
// the build has them; the portable loops stay as the reference and for other CPUs, where GCC 12
// vectorises them only with -fno-trapping-math (CMakeLists.txt: otherwise their clamps and selects
// stayed branches, and an AVX2 build ran bf16 cross-entropy at 252 ms; now 101-105, AVX-512 70).
//
// Token statistics (stats, when not 0: three per row, TRL's SFT and DPO metrics): the entropy of softmax(z),
// log sum_j e_j - sum_j e_j (z_j - max) / sum_j e_j with e_j = exp(z_j - max) (the second sum formed
// in pass (2) beside the first: one multiply-add per element), and 1 where the target is the first
// largest z (torch's argmax takes the first of equal maxima, as TRL's is_top1), else 0; checked after
// pass (1), reading the row up to the target only when the target ties the maximum; the mean of z
// (pass (1)'s sum, already formed for label smoothing: TRL's DPO logits/chosen). Ignored rows: 0, 0
// and 0; a NaN row: NaN, 0 and the mean as it comes (NaN, or +-inf where the max is).
//
// Token scaling (DFT, Dynamic Fine-Tuning, arXiv 2508.05629: TRL's SFT loss_type "dft", Liger's
// use_token_scaling): each counted row's loss, z-loss share and gradient times w = exp(z_target -
// lse), its target's probability, as a constant (no gradient flows through w). Free: lse and
// z_target are at hand; the gradient's factors take w once per row.
//
// Non-finite logits: a NaN in a row, or a max of +-inf (torch's log_softmax gives NaN there too),
// gives a NaN loss and NaN gradient for the row. Targets are checked before any work: one outside
// [0, vocab) that is not ignore_index throws.
//
// Threading: OpenMP over rows (static), one scratch row per thread; below kParallelMin elements on
// the calling thread.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "common/checks.h"
#include "common/cpu_math.h"
#include "common/cross_entropy_args.h"
#include "common/dtype.h"
#include "common/parallel.h"
#include "cpu/cpu_ops.h"

namespace pyllm {
namespace {

constexpr int64_t kParallelMin = 32768;
constexpr int64_t kStats = 3;  // token statistics per row: entropy, target is the argmax, mean z

struct Args {
  int64_t rows, vocab, stride, grad_stride, ignore_index;
  double scale, softcap, label_smoothing, z_loss, grad_scale;
  bool token_scaling;
};


#ifdef PYLLM_AVX512
// tanh_f32 on 16 lanes (its loop, like the exp one, stayed scalar: ~8x the uncapped forward).
inline __m512 tanh_avx512(__m512 y) {
  const __m512 a = _mm512_abs_ps(y), a2 = _mm512_mul_ps(a, a);
  const float c[7] = {-929569.0f / 638512875.0f, 21844.0f / 6081075.0f, -1382.0f / 155925.0f, 62.0f / 2835.0f,
                      -17.0f / 315.0f, 2.0f / 15.0f, -1.0f / 3.0f};
  __m512 p = _mm512_set1_ps(6404582.0f / 10854718875.0f);
  for (int i = 0; i < 7; ++i) p = _mm512_fmadd_ps(p, a2, _mm512_set1_ps(c[i]));
  const __m512 small = _mm512_fmadd_ps(_mm512_mul_ps(p, a2), a, a);
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512 e = avx512::exp<7, true>(_mm512_add_ps(a, a));  // finite: 2 / (e + 1) stays a number
  const __m512 large = _mm512_sub_ps(one, _mm512_div_ps(_mm512_set1_ps(2.0f), _mm512_add_ps(e, one)));
  const __m512 r = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, _mm512_set1_ps(0.5f), _CMP_LT_OQ), large, small);
  const __m512 sign = _mm512_and_ps(y, _mm512_castsi512_ps(_mm512_set1_epi32(int(0x80000000u))));
  return _mm512_or_ps(r, sign);
}

// The capped first pass on 16 lanes: tanhs, zs = cap * tanh(scale * x / cap), their max, fp64 sum
// and NaN count, as row()'s loop.
template <typename T>
void capped_pass_avx512(const T* x, int64_t V, float scale, float cap, float* zs, float* tanhs, float& top_out,
                        double& sum_out, int64_t& nans_out) {
  const __m512 s = _mm512_set1_ps(scale), c = _mm512_set1_ps(cap);
  __m512 top = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512d lo = _mm512_setzero_pd(), hi = _mm512_setzero_pd();
  int64_t nans = 0;
  for (int64_t j = 0; j < V; j += 16) {
    const __mmask16 lanes = avx512::first(V - j);
    const __m512 t = tanh_avx512(_mm512_div_ps(_mm512_mul_ps(avx512::load(x + j, V - j), s), c));
    const __m512 z = _mm512_maskz_mov_ps(lanes, _mm512_mul_ps(c, t));  // lanes past the end: 0, not summed
    avx512::store(tanhs + j, t, V - j);
    avx512::store(zs + j, z, V - j);
    top = _mm512_mask_max_ps(top, lanes, top, z);
    lo = _mm512_add_pd(lo, avx512::low_pd(z));
    hi = _mm512_add_pd(hi, avx512::high_pd(z));
    nans += __builtin_popcount(unsigned(_mm512_cmp_ps_mask(z, z, _CMP_UNORD_Q) & lanes));
  }
  top_out = _mm512_reduce_max_ps(top);
  sum_out = _mm512_reduce_add_pd(_mm512_add_pd(lo, hi));
  nans_out = nans;
}
#endif

// zs[j] = exp(zs[j] - top), returning their sum in fp64, and in *ed (when kEntropy) the sum of
// exp(zs[j] - top) (zs[j] - top) (terms whose exp is 0 count 0: a -inf logit's d is -inf).
// AVX-512 builds run it on 16 lanes by hand:
// the forward of 1,024 x 49,152 fp32 logits went from 108 to 20 ms (2-core EPYC VM, 2026-12-02;
// the portable loop was scalar then, before -fno-trapping-math; not re-measured since).
template <bool kEntropy, typename A>
double exp_pass(A* __restrict zs, int64_t V, A top, double* ed) {
#ifdef PYLLM_AVX512
  if constexpr (std::is_same_v<A, float>) {
    const __m512 shift = _mm512_set1_ps(top), floor = _mm512_set1_ps(-87.0f);
    __m512d lo = _mm512_setzero_pd(), hi = _mm512_setzero_pd(), ed_lo = lo, ed_hi = hi;
    for (int64_t j = 0; j < V; j += 16) {
      const __mmask16 lanes = avx512::first(V - j);
      const __m512 d = _mm512_sub_ps(avx512::load(zs + j, V - j), shift);
      // lanes past the row's end and exp below -87 give 0, as exp_shifted
      const __mmask16 kept = lanes & _mm512_cmp_ps_mask(d, floor, _CMP_GE_OQ);
      const __m512 e = _mm512_maskz_mov_ps(kept, avx512::exp<7>(d));
      avx512::store(zs + j, e, V - j);
      lo = _mm512_add_pd(lo, avx512::low_pd(e));
      hi = _mm512_add_pd(hi, avx512::high_pd(e));
      if constexpr (kEntropy) {
        const __m512 ed_j = _mm512_maskz_mul_ps(kept, e, d);
        ed_lo = _mm512_add_pd(ed_lo, avx512::low_pd(ed_j));
        ed_hi = _mm512_add_pd(ed_hi, avx512::high_pd(ed_j));
      }
    }
    if constexpr (kEntropy) *ed = _mm512_reduce_add_pd(_mm512_add_pd(ed_lo, ed_hi));
    return _mm512_reduce_add_pd(_mm512_add_pd(lo, hi));
  }
#endif
  double sum = 0, ed_sum = 0;
#pragma omp simd reduction(+ : sum, ed_sum)
  for (int64_t j = 0; j < V; ++j) {
    const A d = zs[j] - top, e = exp_shifted(d);
    zs[j] = e;
    sum += double(e);
    if constexpr (kEntropy) ed_sum += e > A(0) ? double(e * d) : 0.0;
  }
  if constexpr (kEntropy) *ed = ed_sum;
  return sum;
}

template <typename T>
void row(const T* x, T* grad, int64_t target, acc_t<T>* loss_out, acc_t<T>* z_out, acc_t<T>* stats,
         double grad_scale, acc_t<T>* __restrict zs, acc_t<T>* __restrict tanhs, const Args& a) {
  using A = acc_t<T>;
  const int64_t V = a.vocab;
  if (target == a.ignore_index) {
    loss_out[0] = A(0);
    if (z_out) z_out[0] = A(0);
    if (stats) stats[0] = stats[1] = stats[2] = A(0);
    if (grad) std::fill_n(grad, V, from_acc<T>(A(0)));
    return;
  }
  const A scale = A(a.scale), cap = A(a.softcap);
  const bool capped = a.softcap > 0;
  // (1) z, its max and sum; NaNs counted apart (a max reduction drops them)
  A top = -std::numeric_limits<A>::infinity();
  double z_sum = 0;
  int64_t nans = 0;
  bool vectorised = false;
#ifdef PYLLM_AVX512
  if constexpr (avx512::has_lanes<T>) {
    if (capped) capped_pass_avx512(x, V, scale, cap, zs, tanhs, top, z_sum, nans);
    vectorised = capped;
  }
#endif
  if (capped && !vectorised) {
#pragma omp simd reduction(max : top) reduction(+ : z_sum, nans)
    for (int64_t j = 0; j < V; ++j) {
      const A t = tanh_acc(A(to_float(x[j])) * scale / cap);
      const A z = cap * t;
      tanhs[j] = t;
      zs[j] = z;
      top = std::max(top, z);
      z_sum += double(z);
      nans += z != z;
    }
  } else if (!capped) {
#pragma omp simd reduction(max : top) reduction(+ : z_sum, nans)
    for (int64_t j = 0; j < V; ++j) {
      const A z = A(to_float(x[j])) * scale;
      zs[j] = z;
      top = std::max(top, z);
      z_sum += double(z);
      nans += z != z;
    }
  }
  const double z_target = double(zs[target]);
  if (stats) stats[2] = A(z_sum / double(V));
  if (nans || !std::isfinite(top)) {
    const A nan = std::numeric_limits<A>::quiet_NaN();
    loss_out[0] = nan;
    if (z_out) z_out[0] = nan;
    if (stats) {
      stats[0] = nan;
      stats[1] = A(0);
    }
    if (grad) std::fill_n(grad, V, from_acc<T>(A(nan)));
    return;
  }
  if (stats) {  // the target the first maximum? (before pass (2) overwrites z)
    bool first = zs[target] == top;
    for (int64_t j = 0; first && j < target; ++j) first = zs[j] != top;
    stats[1] = A(first);
  }
  // (2) exp(z - max) over the scratch row, and their sum
  double ed = 0;
  const double sum = stats ? exp_pass<true>(zs, V, top, &ed) : exp_pass<false>(zs, V, top, nullptr);
  const double lse = double(top) + std::log(sum);
  if (stats) stats[0] = A(std::log(sum) - ed / sum);
  const double e = a.label_smoothing, z_part = a.z_loss * lse * lse;
  const double w = a.token_scaling ? std::exp(z_target - lse) : 1.0;
  // e = 0 leaves the mean out: a -inf logit (a masked class) makes it -inf, and 0 * inf is NaN
  loss_out[0] = A(w * (lse - (1 - e) * z_target - (e > 0 ? e * z_sum / double(V) : 0.0) + z_part));
  if (z_out) z_out[0] = A(w * z_part);
  if (!grad) return;
  grad_scale *= w;
  // (3) the gradient: softmax - e / V, the label's -(1 - e) after, plus the z-loss's softmax 2 zl lse
  // apart (folded into one factor, the label's 1 - p would cancel against 1 + 2 zl lse: 40x torch's
  // error at V = 1), then through the cap and the scale
  const A ce = A(grad_scale / sum), zl = A(grad_scale * 2 * a.z_loss * lse / sum);
  const A smooth = A(grad_scale * e / double(V)), hit = A(grad_scale * (1 - e));
  auto chain = [&](int64_t j) { return capped ? (A(1) - tanhs[j] * tanhs[j]) * scale : scale; };
  const A g_target = ((zs[target] * ce - smooth - hit) + zs[target] * zl) * chain(target);
  if (capped) {
#pragma omp simd
    for (int64_t j = 0; j < V; ++j)
      grad[j] = from_acc<T>(((zs[j] * ce - smooth) + zs[j] * zl) * ((A(1) - tanhs[j] * tanhs[j]) * scale));
  } else {
#pragma omp simd
    for (int64_t j = 0; j < V; ++j) grad[j] = from_acc<T>(((zs[j] * ce - smooth) + zs[j] * zl) * scale);
  }
  grad[target] = from_acc<T>(g_target);
}

template <typename T>
void run(const T* x, const int64_t* targets, acc_t<T>* loss, acc_t<T>* z_part, T* grad, const acc_t<T>* grad_rows,
         acc_t<T>* stats, const Args& a) {
  using A = acc_t<T>;
  const int threads = row_team(a.rows, a.rows * a.vocab, kParallelMin);
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    std::vector<A> zs(size_t(a.vocab)), tanhs(a.softcap > 0 ? size_t(a.vocab) : 0);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < a.rows; ++r)
      row<T>(x + r * a.stride, grad ? grad + r * a.grad_stride : nullptr, targets[r], loss + r,
             z_part ? z_part + r : nullptr, stats ? stats + kStats * r : nullptr,
             a.grad_scale * (grad_rows ? double(grad_rows[r]) : 1.0), zs.data(),
             tanhs.data(), a);
  }
}

}  // namespace

void cross_entropy_cpu(uintptr_t logits, uintptr_t targets, uintptr_t loss, uintptr_t z_part, uintptr_t grad,
                       uintptr_t grad_rows, int64_t rows, int64_t vocab, int64_t stride, int64_t grad_stride,
                       int64_t ignore_index, double scale, double softcap, double label_smoothing, double z_loss,
                       double grad_scale, int dtype, uintptr_t stats, bool token_scaling) {
  check_cross_entropy_args(logits, targets, loss, grad, rows, vocab, stride, grad_stride, scale, softcap,
                           label_smoothing, z_loss, grad_scale, dtype);
  if (rows == 0) return;
  const Args a{rows,    vocab,           stride, grad_stride, ignore_index, scale,
               softcap, label_smoothing, z_loss, grad_scale,  token_scaling};
  const auto* t = reinterpret_cast<const int64_t*>(targets);
  for (int64_t r = 0; r < rows; ++r)
    PYLLM_CHECK(t[r] == ignore_index || (t[r] >= 0 && t[r] < vocab), "cross_entropy: targets must be in [0, ", vocab,
                ") or ", ignore_index, " (ignored), got ", t[r], " at row ", r);
  PYLLM_DISPATCH_CPU(dtype, T,
                     run<T>(reinterpret_cast<const T*>(logits), t, reinterpret_cast<acc_t<T>*>(loss),
                            reinterpret_cast<acc_t<T>*>(z_part), reinterpret_cast<T*>(grad),
                            reinterpret_cast<const acc_t<T>*>(grad_rows), reinterpret_cast<acc_t<T>*>(stats), a));
}

}  // namespace pyllm
