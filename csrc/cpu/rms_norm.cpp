// Fused RMSNorm on the CPU (Zhang & Sennrich 2019): y = x * rstd * (offset + w),
// rstd = 1 / sqrt(mean(x^2) + eps), one row of `cols` at a time, math in fp32 (fp64 for fp64).
//
// Two roundings, as the models this replaces write it (cast_first):
//   cast_first = true  (LLaMA, Qwen, Mistral, pyllm.nn.RMSNorm): y = T(T(x * rstd) * (offset + w))
//   cast_first = false (Gemma):                                     y = T(x * rstd * (offset + w))
// In fp32 the two are the same. weight may be absent (0): w = 1 and offset is ignored.
//
// Backward, from the saved rstd (one fp32 per row) and x, with h = x * rstd, g = dy * (offset + w):
//   dx = rstd * (g - h * mean(g * h)),   dw = sum over rows of dy * h  (h rounded to T first
// when cast_first: it is what multiplied w in the forward). dw is written in T, or in fp32 for an
// fp32 weight on 16-bit activations (mixed precision: the weight rounded to T for the product, its
// gradient left unrounded, as torch's autograd gives an fp32 parameter).
//
// Traffic per element: forward reads x, writes y (4 B bf16); backward reads dy and x, writes dx
// (6 B bf16), plus a cols-wide partial of dw per segment of rows (at most 128 segments), summed in
// segment order at the end: the same bits on any thread count. Every row is read twice (sum of
// squares, then the output), the second time from L1/L2: rows up to 16K bf16 elements are 32 KB.
//
// Threading: OpenMP over rows in static blocks; calls under kParallelMin elements run on the calling
// thread (the fork/join costs more than it saves, as in swiglu.cpp). Inner loops: on AVX-512 builds,
// 16 lanes of intrinsics (common/cpu_math.h); elsewhere plain fp32 arithmetic over 16-bit loads
// that the compiler vectorises (`omp simd`, with reductions).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "common/checks.h"
#include "common/cpu_math.h"
#include "common/dtype.h"
#include "common/parallel.h"
#include "cpu/cpu_ops.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace pyllm {
namespace {

constexpr int64_t kParallelMin = 32768;

struct Args {
  int64_t rows, cols;
  double eps, offset;
  bool cast_first, has_weight;
};

void check_args(const char* what, const Args& a, int dtype, std::initializer_list<uintptr_t> ptrs) {
  PYLLM_CHECK(a.rows >= 0 && a.cols >= 1, what, ": rows must be >= 0 and cols >= 1, got ", a.rows, " and ", a.cols);
  PYLLM_CHECK(std::isfinite(a.eps) && a.eps >= 0, what, ": eps must be finite and >= 0, got ", a.eps);
  PYLLM_CHECK(std::isfinite(a.offset), what, ": offset must be finite, got ", a.offset);
  dtype_size(dtype);  // throws on an unknown code
  if (a.rows > 0)
    for (uintptr_t p : ptrs) PYLLM_CHECK(p != 0, what, ": null data pointer for a non-empty tensor");
}

// Sums over a row (squares, g * h) and over rows (dw): fp64 for fp32 inputs, whose outputs would
// otherwise carry the rounding of 8K sequential fp32 adds (2x torch's error at 8,200 columns,
// which sums pairwise); fp32 for 16-bit inputs, whose rounding dwarfs it.
template <typename T> using sum_t = std::conditional_t<std::is_same_v<T, float>, double, acc_t<T>>;

// T(v) back in the math type: the rounding a cast to T and back makes.
template <typename T>
inline acc_t<T> round_to(acc_t<T> v) {
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) return v;
  else return to_float(from_float<T>(v));
}

// 1 / sqrt(mean(x^2) + eps) from the row's sum of squares.
template <typename T>
acc_t<T> rstd_of(sum_t<T> sum_squares, int64_t cols, double eps) {
  using S = sum_t<T>;
  return acc_t<T>(S(1) / std::sqrt(sum_squares / S(cols) + S(eps)));
}

template <typename T>
acc_t<T> row_rstd(const T* __restrict x, int64_t cols, double eps) {
  using S = sum_t<T>;
  S ss = 0;
#pragma omp simd reduction(+ : ss)
  for (int64_t c = 0; c < cols; ++c) {
    const S v = to_float(x[c]);
    ss += v * v;
  }
  return rstd_of<T>(ss, cols, eps);
}

#ifdef PYLLM_AVX512
// The same rows on 16 fp32 lanes (common/cpu_math.h's loads, stores and roundings; masked tails, so
// every element takes one path). fp32 inputs sum in two 8-lane fp64 halves, as sum_t says.
using avx512::high_pd;
using avx512::low_pd;

template <typename T>
struct RowSum {  // sum of 16-lane products in sum_t<T>
  __m512 f = _mm512_setzero_ps();
  __m512d lo = _mm512_setzero_pd(), hi = _mm512_setzero_pd();
  void add(__m512 v) {
    if constexpr (std::is_same_v<T, float>) {
      lo = _mm512_add_pd(lo, low_pd(v));
      hi = _mm512_add_pd(hi, high_pd(v));
    } else {
      f = _mm512_add_ps(f, v);
    }
  }
  void add_square(__m512 v) {
    if constexpr (std::is_same_v<T, float>) {
      const __m512d l = low_pd(v), h = high_pd(v);
      lo = _mm512_fmadd_pd(l, l, lo);
      hi = _mm512_fmadd_pd(h, h, hi);
    } else {
      f = _mm512_fmadd_ps(v, v, f);
    }
  }
  sum_t<T> total() const {
    if constexpr (std::is_same_v<T, float>) return _mm512_reduce_add_pd(_mm512_add_pd(lo, hi));
    else return _mm512_reduce_add_ps(f);
  }
};

template <typename T>
float fwd_row_avx512(const T* x_row, const T* w, T* o_row, const Args& a) {
  RowSum<T> ss;
  for (int64_t c = 0; c < a.cols; c += 16) ss.add_square(avx512::load(x_row + c, a.cols - c));
  const float rstd = rstd_of<T>(ss.total(), a.cols, a.eps);
  const __m512 s = _mm512_set1_ps(rstd), offset = _mm512_set1_ps(float(a.offset));
  for (int64_t c = 0; c < a.cols; c += 16) {
    const int64_t n = a.cols - c;
    __m512 y = _mm512_mul_ps(avx512::load(x_row + c, n), s);
    if (a.has_weight) {
      if (a.cast_first) y = avx512::round_trip<T>(y);
      y = _mm512_mul_ps(y, _mm512_add_ps(offset, avx512::load(w + c, n)));
    }
    avx512::store(o_row + c, y, n);
  }
  return rstd;
}

template <typename T, bool kWeight>
void bwd_row_avx512(const T* d_row, const T* x_row, const T* w, float rstd, T* dx_row, sum_t<T>* dw_partial,
                    const Args& a) {
  using S = sum_t<T>;
  const __m512 s = _mm512_set1_ps(rstd), offset = _mm512_set1_ps(float(a.offset));
  auto scaled = [&](__m512 d, int64_t c, int64_t n) {  // g = dy * (offset + w)
    if constexpr (kWeight) return _mm512_mul_ps(d, _mm512_add_ps(offset, avx512::load(w + c, n)));
    else return d;
  };
  RowSum<T> gh;
  for (int64_t c = 0; c < a.cols; c += 16) {
    const int64_t n = a.cols - c;
    const __m512 g = scaled(avx512::load(d_row + c, n), c, n);
    gh.add(_mm512_mul_ps(g, _mm512_mul_ps(avx512::load(x_row + c, n), s)));
  }
  const __m512 mean_gh = _mm512_set1_ps(float(gh.total() / S(a.cols)));
  for (int64_t c = 0; c < a.cols; c += 16) {
    const int64_t n = a.cols - c;
    const __m512 d = avx512::load(d_row + c, n), h = _mm512_mul_ps(avx512::load(x_row + c, n), s);
    const __m512 g = scaled(d, c, n);
    avx512::store(dx_row + c, _mm512_mul_ps(s, _mm512_fnmadd_ps(h, mean_gh, g)), n);
    if (dw_partial == nullptr) continue;
    const __m512 contribution = _mm512_mul_ps(d, a.cast_first ? avx512::round_trip<T>(h) : h);
    const __mmask16 m = avx512::first(n);
    if constexpr (std::is_same_v<T, float>) {
      const __mmask8 m_lo = __mmask8(m & 0xff), m_hi = __mmask8(m >> 8);
      double* p = dw_partial + c;
      _mm512_mask_storeu_pd(p, m_lo, _mm512_add_pd(_mm512_maskz_loadu_pd(m_lo, p), low_pd(contribution)));
      _mm512_mask_storeu_pd(p + 8, m_hi, _mm512_add_pd(_mm512_maskz_loadu_pd(m_hi, p + 8), high_pd(contribution)));
    } else {
      float* p = dw_partial + c;
      _mm512_mask_storeu_ps(p, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, p), contribution));
    }
  }
}
#endif

template <typename T>
void fwd(const T* x, const T* w, T* out, acc_t<T>* rstd, const Args& a) {
  using A = acc_t<T>;
  const A offset = A(a.offset);
#pragma omp parallel for schedule(static) if (a.rows * a.cols >= kParallelMin)
  for (int64_t r = 0; r < a.rows; ++r) {
    const T* __restrict x_row = x + r * a.cols;
    T* __restrict o_row = out + r * a.cols;
#ifdef PYLLM_AVX512
    if constexpr (avx512::has_lanes<T>) {
      rstd[r] = fwd_row_avx512(x_row, w, o_row, a);
      continue;
    }
#endif
    const A s = row_rstd(x_row, a.cols, a.eps);
    rstd[r] = s;
    if (!a.has_weight) {
#pragma omp simd
      for (int64_t c = 0; c < a.cols; ++c) o_row[c] = from_acc<T>(to_float(x_row[c]) * s);
    } else if (a.cast_first) {
#pragma omp simd
      for (int64_t c = 0; c < a.cols; ++c)
        o_row[c] = from_acc<T>(round_to<T>(to_float(x_row[c]) * s) * (offset + A(to_float(w[c]))));
    } else {
#pragma omp simd
      for (int64_t c = 0; c < a.cols; ++c)
        o_row[c] = from_acc<T>(to_float(x_row[c]) * s * (offset + A(to_float(w[c]))));
    }
  }
}

template <typename T, bool kWeight>
void bwd_rows(const T* dout, const T* x, const T* w, const acc_t<T>* rstd, T* dx, sum_t<T>* dw_partial, int64_t r0,
              int64_t r1, const Args& a) {
  using A = acc_t<T>;
  using S = sum_t<T>;
  const A offset = A(a.offset);
  for (int64_t r = r0; r < r1; ++r) {
    const T* __restrict d_row = dout + r * a.cols;
    const T* __restrict x_row = x + r * a.cols;
    T* __restrict dx_row = dx + r * a.cols;
    const A s = rstd[r];
#ifdef PYLLM_AVX512
    if constexpr (avx512::has_lanes<T>) {
      bwd_row_avx512<T, kWeight>(d_row, x_row, w, s, dx_row, dw_partial, a);
      continue;
    }
#endif
    S gh = 0;  // sum of g * h
#pragma omp simd reduction(+ : gh)
    for (int64_t c = 0; c < a.cols; ++c) {
      A g = to_float(d_row[c]);
      if constexpr (kWeight) g *= offset + A(to_float(w[c]));
      gh += S(g * (A(to_float(x_row[c])) * s));  // h = x * rstd first, as the AVX-512 path: (g * x) overflowed fp32 for |x| ~ 1e38
    }
    const A mean_gh = A(gh / S(a.cols));
#pragma omp simd
    for (int64_t c = 0; c < a.cols; ++c) {
      const A d = to_float(d_row[c]), h = A(to_float(x_row[c])) * s;
      A g = d;
      if constexpr (kWeight) g *= offset + A(to_float(w[c]));
      dx_row[c] = from_acc<T>(s * (g - h * mean_gh));
    }
    if (dw_partial != nullptr) {
      if (a.cast_first) {
#pragma omp simd
        for (int64_t c = 0; c < a.cols; ++c)
          dw_partial[c] += S(A(to_float(d_row[c])) * round_to<T>(A(to_float(x_row[c])) * s));
      } else {
#pragma omp simd
        for (int64_t c = 0; c < a.cols; ++c) dw_partial[c] += S(A(to_float(d_row[c])) * A(to_float(x_row[c])) * s);
      }
    }
  }
}

// 16-bit inputs with an fp32 dw wanted (a master weight): the fp32 partials are summed this many rows
// at a time into fp64 ones, so the fp32 gradient carries the rounding of 32 adds, not of a segment's
// sequential ones (3.7e-6 relative at 512 rows in fp16 against torch's 1.3e-7: 4e-8 now, 1 block).
constexpr int64_t kDwBlockRows = 32;

// dw's rows are cut into segments that the row count alone sets, never the thread count: whichever
// thread takes a segment sums it into that segment's partial, and the partials are added in segment
// order, so dw has the same bits on 1 thread or 64 (one partial per thread had made it depend on
// OMP_NUM_THREADS). At least 32 rows a segment, so that the partials weigh at most 1/32 of the bytes
// of the segment's dy and x (1/16 for 16-bit x with an fp32 dw, whose partials are fp64), but at
// least 8 segments (of fewer rows: one each under 8), so that a call of few long rows still runs on
// up to 8 threads; at most 128 segments (4 MB of partials at 4,096 fp32 columns), so a static
// schedule leaves a thread at most 1/128 of the rows behind another.
constexpr int64_t kDwSegmentMinRows = 32;
constexpr int64_t kDwSegmentsMin = 8;
constexpr int64_t kDwSegments = 128;

// The partials live in a buffer the calling thread keeps across calls (as flash_attn.h's tiles), each
// zeroed by the thread that sums into it just before, while it is in that thread's cache. 1-thread
// backward, 2048 x 4096 bf16, 2 EPYC cores shared with other work (thread CPU time, best of 3 runs
// of 40, 2026-12-06; the runs of a build vary by ~10%): one partial per thread (thread-count
// dependent) 4.7-4.9 ms; 128 segments in a fresh zeroed buffer, summed a column at a time, 7.2;
// kept, zeroed in place, summed in runs of columns, 5.4 at 16-row segments, 5.2 at 32 (the last
// pair of runs: 4.94 vs 5.15 ms, 4%; 8192 x 1024 bf16 and 2048 x 4096 fp32 alike). A call that
// needed more than 32 MB (of fp64 partials: 128 x 32K columns) frees it at the end.
constexpr size_t kKeptScratchBytes = size_t(32) << 20;
constexpr int64_t kDwColumnRun = 256;  // 2 KB of fp64 sums, in L1 beside a segment's run of partials

template <typename T>
void bwd(const T* dout, const T* x, const T* w, const acc_t<T>* rstd, T* dx, void* dw, bool dw_fp32, const Args& a) {
  using S = sum_t<T>;
  const int threads = row_team(a.rows, a.rows * a.cols, kParallelMin);
  auto rows = [&](S* partial, int64_t r0, int64_t r1) {
    if (a.has_weight) bwd_rows<T, true>(dout, x, w, rstd, dx, partial, r0, r1, a);
    else bwd_rows<T, false>(dout, x, w, rstd, dx, partial, r0, r1, a);
  };
  if (dw == nullptr) {  // dx alone: each row on its own, one static block of rows per thread
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int t = 0; t < threads; ++t) rows(nullptr, a.rows * t / threads, a.rows * (t + 1) / threads);
    return;
  }
  const bool blocked = dw_fp32 && !std::is_same_v<S, double>;
  const int64_t segments =
      std::clamp<int64_t>(a.rows / kDwSegmentMinRows, std::min<int64_t>(a.rows, kDwSegmentsMin), kDwSegments);
  const size_t cols = size_t(a.cols);
  // one partial per segment (fp64 when blocked), then, blocked, each thread's sums of a block of rows
  static thread_local std::vector<double> kept;
  const size_t partial_doubles = blocked ? cols : (cols * sizeof(S) + sizeof(double) - 1) / sizeof(double);
  const size_t doubles = size_t(segments) * partial_doubles + (blocked ? size_t(threads) * cols : 0);
  if (kept.size() < doubles) kept.resize(doubles);
  double* scratch = kept.data();
  auto partial_of = [&](int64_t seg) { return scratch + size_t(seg) * partial_doubles; };
  S* block = reinterpret_cast<S*>(scratch + size_t(segments) * partial_doubles);
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    int t = 0;
#ifdef _OPENMP
    t = omp_get_thread_num();
#endif
#pragma omp for schedule(static)
    for (int64_t seg = 0; seg < segments; ++seg) {
      const int64_t r0 = a.rows * seg / segments, r1 = a.rows * (seg + 1) / segments;
      if (!blocked) {
        S* partial = reinterpret_cast<S*>(partial_of(seg));
        std::fill_n(partial, a.cols, S(0));
        rows(partial, r0, r1);
        continue;
      }
      S* sums32 = block + size_t(t) * cols;
      double* sums = partial_of(seg);
      std::fill_n(sums, a.cols, 0.0);
      for (int64_t b0 = r0; b0 < r1; b0 += kDwBlockRows) {
        std::fill_n(sums32, a.cols, S(0));
        rows(sums32, b0, std::min(r1, b0 + kDwBlockRows));
        for (size_t c = 0; c < cols; ++c) sums[c] += double(sums32[c]);
      }
    }  // the loop's barrier: every segment summed before any column is
    // Columns in runs of kDwColumnRun, each run's partials added segment after segment along the row
    // (a column at a time down the segments, 16 KB apart per add, had been slower: above)
    const int64_t runs = (a.cols + kDwColumnRun - 1) / kDwColumnRun;
#pragma omp for schedule(static)
    for (int64_t run = 0; run < runs; ++run) {
      const int64_t c0 = run * kDwColumnRun, n = std::min(kDwColumnRun, a.cols - c0);
      double total[kDwColumnRun] = {};
      for (int64_t seg = 0; seg < segments; ++seg) {
        if (blocked) {
          const double* p = partial_of(seg) + c0;
#pragma omp simd
          for (int64_t c = 0; c < n; ++c) total[c] += p[c];
        } else {
          const S* p = reinterpret_cast<const S*>(partial_of(seg)) + c0;
#pragma omp simd
          for (int64_t c = 0; c < n; ++c) total[c] += double(p[c]);
        }
      }
      for (int64_t c = 0; c < n; ++c) {
        if (dw_fp32)  // an fp32 weight (master) on 16-bit activations: its gradient unrounded
          static_cast<float*>(dw)[c0 + c] = float(total[c]);
        else
          static_cast<T*>(dw)[c0 + c] = from_acc<T>(acc_t<T>(S(total[c])));
      }
    }
  }
  if (kept.size() * sizeof(double) > kKeptScratchBytes) std::vector<double>().swap(kept);
}

}  // namespace

void rms_norm_fwd_cpu(uintptr_t x, uintptr_t weight, uintptr_t out, uintptr_t rstd, int64_t rows, int64_t cols,
                      double eps, double offset, bool cast_first, int dtype) {
  Args a{rows, cols, eps, offset, cast_first, weight != 0};
  check_args("rms_norm", a, dtype, {x, out, rstd});
  if (rows == 0) return;
  PYLLM_DISPATCH_CPU(dtype, T,
                     fwd<T>(reinterpret_cast<const T*>(x), reinterpret_cast<const T*>(weight),
                            reinterpret_cast<T*>(out), reinterpret_cast<acc_t<T>*>(rstd), a));
}

void rms_norm_bwd_cpu(uintptr_t dout, uintptr_t x, uintptr_t weight, uintptr_t rstd, uintptr_t dx, uintptr_t dweight,
                      int64_t rows, int64_t cols, double offset, bool cast_first, int dtype, bool dweight_fp32) {
  Args a{rows, cols, 0.0, offset, cast_first, weight != 0};
  check_args("rms_norm_backward", a, dtype, {dout, x, rstd, dx});
  PYLLM_CHECK(dweight == 0 || weight != 0, "rms_norm_backward: dweight given without a weight");
  if (rows == 0) {  // no rows: the weight's gradient is zero
    if (dweight != 0 && dweight_fp32)
      std::fill_n(reinterpret_cast<float*>(dweight), cols, 0.f);
    else if (dweight != 0)
      PYLLM_DISPATCH_CPU(dtype, T, std::fill_n(reinterpret_cast<T*>(dweight), cols, from_acc<T>(acc_t<T>(0))));
    return;
  }
  PYLLM_DISPATCH_CPU(dtype, T,
                     bwd<T>(reinterpret_cast<const T*>(dout), reinterpret_cast<const T*>(x),
                            reinterpret_cast<const T*>(weight), reinterpret_cast<const acc_t<T>*>(rstd),
                            reinterpret_cast<T*>(dx), reinterpret_cast<void*>(dweight), dweight_fp32, a));
}

}  // namespace pyllm
