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
// exp(-87) (a -inf logit's softmax is 0, as torch's). tanh: below 0.5
// its Taylor series to x^17 (truncation 1e-8 relative), above it 1 - 2 / (exp(2x) + 1) (the
// cancellation costs at most a bit there, tanh >= 0.46); both vectorise, libm's tanhf does not.
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
#include "common/dtype.h"
#include "cpu/cpu_ops.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace pyllm {
namespace {

constexpr int64_t kParallelMin = 32768;

struct Args {
  int64_t rows, vocab, stride, grad_stride, ignore_index;
  double scale, softcap, label_smoothing, z_loss, grad_scale;
};

// tanh(y), vectorisable (see the header).
inline float tanh_f32(float y) {
  const float a = std::fabs(y), a2 = a * a;
  float p = 6404582.0f / 10854718875.0f;  // tanh's Taylor coefficients, x^17 down to x^3
  p = std::fma(p, a2, -929569.0f / 638512875.0f);
  p = std::fma(p, a2, 21844.0f / 6081075.0f);
  p = std::fma(p, a2, -1382.0f / 155925.0f);
  p = std::fma(p, a2, 62.0f / 2835.0f);
  p = std::fma(p, a2, -17.0f / 315.0f);
  p = std::fma(p, a2, 2.0f / 15.0f);
  p = std::fma(p, a2, -1.0f / 3.0f);
  const float small = std::fma(p * a2, a, a);
  const float large = 1.0f - 2.0f / (exp_f32<7>(2.0f * a) + 1.0f);  // exp_f32 clamps: 1 at the top
  return std::copysign(a < 0.5f ? small : large, y);
}
inline double tanh_acc(double y) { return std::tanh(y); }
inline float tanh_acc(float y) { return tanh_f32(y); }

// exp(d) for d = z - max <= 0: exactly 0 below -87 (where exp_f32 clamps: a masked class's softmax is
// 0, as torch's, not 1.6e-38). exp_f32, not exp2_nonpositive_f32: GCC 13 vectorised this loop with the
// latter at 2.3 ns per element and with this at 0.28 (AVX-512, 2026-12-02).
inline float exp_shifted(float d) {
  const float e = exp_f32<7>(d);
  return d < -87.0f ? 0.0f : e;
}
inline double exp_shifted(double d) { return std::exp(d); }

// zs[j] = exp(zs[j] - top), returning their sum in fp64. GCC 13 leaves the portable loop scalar
// (exp_f32's clamps become branches there: 2 ns per element), so AVX-512 builds run it on 16
// lanes by hand (0.1 ns per element; EPYC 9004, 2026-12-02).
template <typename A>
double exp_pass(A* __restrict zs, int64_t V, A top) {
#ifdef PYLLM_AVX512
  if constexpr (std::is_same_v<A, float>) {
    const __m512 shift = _mm512_set1_ps(top), floor = _mm512_set1_ps(-87.0f);
    __m512d lo = _mm512_setzero_pd(), hi = _mm512_setzero_pd();
    for (int64_t j = 0; j < V; j += 16) {
      const __mmask16 lanes = avx512::first(V - j);
      const __m512 d = _mm512_sub_ps(avx512::load(zs + j, V - j), shift);
      // lanes past the row's end and exp below -87 give 0, as exp_shifted
      const __m512 e = _mm512_maskz_mov_ps(lanes & _mm512_cmp_ps_mask(d, floor, _CMP_GE_OQ), avx512::exp<7>(d));
      avx512::store(zs + j, e, V - j);
      lo = _mm512_add_pd(lo, _mm512_cvtps_pd(_mm512_castps512_ps256(e)));
      hi = _mm512_add_pd(hi, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(e), 1))));
    }
    return _mm512_reduce_add_pd(_mm512_add_pd(lo, hi));
  }
#endif
  double sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < V; ++j) {
    const A e = exp_shifted(zs[j] - top);
    zs[j] = e;
    sum += double(e);
  }
  return sum;
}

template <typename T>
void row(const T* x, T* grad, int64_t target, acc_t<T>* loss_out, acc_t<T>* z_out, double grad_scale,
         acc_t<T>* __restrict zs, acc_t<T>* __restrict tanhs, const Args& a) {
  using A = acc_t<T>;
  const int64_t V = a.vocab;
  if (target == a.ignore_index) {
    loss_out[0] = A(0);
    if (z_out) z_out[0] = A(0);
    if (grad) std::fill_n(grad, V, from_acc<T>(A(0)));
    return;
  }
  const A scale = A(a.scale), cap = A(a.softcap);
  const bool capped = a.softcap > 0;
  // (1) z, its max and sum; NaNs counted apart (a max reduction drops them)
  A top = -std::numeric_limits<A>::infinity();
  double z_sum = 0;
  int64_t nans = 0;
  if (capped) {
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
  } else {
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
  if (nans || !std::isfinite(top)) {
    const A nan = std::numeric_limits<A>::quiet_NaN();
    loss_out[0] = nan;
    if (z_out) z_out[0] = nan;
    if (grad) std::fill_n(grad, V, from_acc<T>(A(nan)));
    return;
  }
  // (2) exp(z - max) over the scratch row, and their sum
  const double sum = exp_pass(zs, V, top);
  const double lse = double(top) + std::log(sum);
  const double e = a.label_smoothing, z_part = a.z_loss * lse * lse;
  // e = 0 leaves the mean out: a -inf logit (a masked class) makes it -inf, and 0 * inf is NaN
  loss_out[0] = A(lse - (1 - e) * z_target - (e > 0 ? e * z_sum / double(V) : 0.0) + z_part);
  if (z_out) z_out[0] = A(z_part);
  if (!grad) return;
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
         const Args& a) {
  using A = acc_t<T>;
  int threads = 1;
#ifdef _OPENMP
  if (a.rows * a.vocab >= kParallelMin) threads = int(std::min<int64_t>(omp_get_max_threads(), a.rows));
#endif
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    std::vector<A> zs(size_t(a.vocab)), tanhs(a.softcap > 0 ? size_t(a.vocab) : 0);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < a.rows; ++r)
      row<T>(x + r * a.stride, grad ? grad + r * a.grad_stride : nullptr, targets[r], loss + r,
             z_part ? z_part + r : nullptr, a.grad_scale * (grad_rows ? double(grad_rows[r]) : 1.0), zs.data(),
             tanhs.data(), a);
  }
}

}  // namespace

void cross_entropy_cpu(uintptr_t logits, uintptr_t targets, uintptr_t loss, uintptr_t z_part, uintptr_t grad,
                       uintptr_t grad_rows, int64_t rows, int64_t vocab, int64_t stride, int64_t grad_stride, int64_t ignore_index,
                       double scale, double softcap, double label_smoothing, double z_loss, double grad_scale,
                       int dtype) {
  const Args a{rows, vocab, stride, grad_stride, ignore_index, scale, softcap, label_smoothing, z_loss, grad_scale};
  PYLLM_CHECK(rows >= 0 && vocab >= 1, "cross_entropy: rows must be >= 0 and vocab >= 1, got ", rows, " and ", vocab);
  PYLLM_CHECK(stride >= vocab && (grad == 0 || grad_stride >= vocab), "cross_entropy: row strides must be >= vocab (",
              vocab, "), got ", stride, " and ", grad_stride);
  PYLLM_CHECK(std::isfinite(scale) && scale > 0, "cross_entropy: scale must be positive and finite, got ", scale);
  PYLLM_CHECK(std::isfinite(softcap) && softcap >= 0, "cross_entropy: softcap must be 0 (none) or positive, got ",
              softcap);
  PYLLM_CHECK(label_smoothing >= 0 && label_smoothing <= 1, "cross_entropy: label_smoothing must be in [0, 1], got ",
              label_smoothing);
  PYLLM_CHECK(std::isfinite(z_loss) && z_loss >= 0, "cross_entropy: z_loss must be >= 0 and finite, got ", z_loss);
  PYLLM_CHECK(std::isfinite(grad_scale), "cross_entropy: grad_scale must be finite, got ", grad_scale);
  dtype_size(dtype);  // throws on an unknown code
  if (rows == 0) return;
  PYLLM_CHECK(logits != 0 && targets != 0 && loss != 0, "cross_entropy: null data pointer for a non-empty tensor");
  const auto* t = reinterpret_cast<const int64_t*>(targets);
  for (int64_t r = 0; r < rows; ++r)
    PYLLM_CHECK(t[r] == ignore_index || (t[r] >= 0 && t[r] < vocab), "cross_entropy: targets must be in [0, ", vocab,
                ") or ", ignore_index, " (ignored), got ", t[r], " at row ", r);
  PYLLM_DISPATCH_CPU(dtype, T,
                     run<T>(reinterpret_cast<const T*>(logits), t, reinterpret_cast<acc_t<T>*>(loss),
                            reinterpret_cast<acc_t<T>*>(z_part), reinterpret_cast<T*>(grad),
                            reinterpret_cast<const acc_t<T>*>(grad_rows), a));
}

}  // namespace pyllm
