// Fused SwiGLU on the CPU: out = silu(gate) * up, silu(g) = g * sigmoid(g); and GeGLU,
// gelu_tanh(gate) * up, the same kernels with gelu_tanh(g) = g * sigmoid(z(g)) (common/glu.h).
//
// Layout: `rows` rows of `cols` elements; gate and up rows start `in_stride` elements apart, out
// rows `out_stride` apart. Separate contiguous tensors come in as one long row; the packed form
// (last dim = [gate | up], the output of one fused matmul) as rows of 2H with up = gate + H.
//
// Forward reads gate and up, writes out: 3 elements moved per output element (6 B in bf16).
// Backward recomputes sigmoid from the saved inputs (nothing else is saved) and in one pass
//   dgate = dout * up * (s + (g s) (z'(g) (1 - s))),  dup = dout * g * s,  s = sigmoid(z(g)),
// reading dout, gate, up and writing dgate, dup: 5 elements per element (10 B in bf16). 1 - s is
// taken as exp(-z) * s (common/cpu_math.h: sigmoid_pair_acc), and g z'(g) is never formed: it
// overflows fp32 from |g| ~ 1.2e13 where the product with 1 - s (or s) is 0, and inf * 0 is NaN.
// GeGLU's z(g) costs 3 more multiply-adds per element, far from the bound.
//
// Threading: OpenMP over blocks of kBlock elements (a row, or a slice of a long row). Inner loop:
// on AVX-512 builds, 16 lanes of intrinsics (common/cpu_math.h: vscalefps exp, vrcp14ps sigmoid
// for 16-bit outputs, vcvtneps2bf16); on AVX2 + FMA + F16C builds, 8 lanes of the same steps
// (avx2:: in common/cpu_math.h; GCC's own vectorisation of the loop below spent the bf16 forward's
// time on widening and packing shuffles: 1.2x slower, 2026-12-02); everywhere else plain fp32
// arithmetic that the compiler vectorises. Below kParallelMin
// elements the fork/join costs more than it saves, so small calls run on the calling thread.
#include <algorithm>
#include <cstdint>

#include "common/checks.h"
#include "common/cpu_math.h"
#include "common/dtype.h"
#include "common/glu.h"
#include "cpu/cpu_ops.h"

namespace pyllm {
namespace {

// 8K elements = 48 KB of bf16 traffic per block: fits L2 with room to spare and gives each of
// 2 threads hundreds of blocks at 8M elements (measured on the 2-core dev VM, 2026-11-23: 4K-32K
// blocks within 3% of each other, 1K blocks 10% slower).
constexpr int64_t kBlock = 8192;
constexpr int64_t kParallelMin = 32768;

struct Layout {
  int64_t rows, cols, in_stride, out_stride;
};

void check_layout(const Layout& l, int dtype, int activation, std::initializer_list<uintptr_t> ptrs) {
  check_glu_activation(activation);
  PYLLM_CHECK(l.rows >= 0 && l.cols >= 0, "swiglu: rows and cols must be >= 0, got ", l.rows, " and ", l.cols);
  PYLLM_CHECK(l.rows <= 1 || (l.in_stride >= l.cols && l.out_stride >= l.cols),
              "swiglu: row strides (", l.in_stride, ", ", l.out_stride, ") must be >= cols (", l.cols, ")");
  dtype_size(dtype);  // throws on an unknown code
  if (l.rows * l.cols > 0)
    for (uintptr_t p : ptrs) PYLLM_CHECK(p != 0, "swiglu: null data pointer for a non-empty tensor");
}

template <typename T, typename Body>
void for_each_block(const Layout& l, Body body) {
  const int64_t blocks_per_row = (l.cols + kBlock - 1) / kBlock;
  const int64_t n_blocks = l.rows * blocks_per_row;
#pragma omp parallel for schedule(static) if (l.rows * l.cols >= kParallelMin)
  for (int64_t b = 0; b < n_blocks; ++b) {
    const int64_t row = b / blocks_per_row, c0 = (b % blocks_per_row) * kBlock;
    body(row, c0, std::min(l.cols, c0 + kBlock));
  }
}

#ifdef PYLLM_AVX512
// glu_z and x * glu_dz (common/glu.h) in 16 lanes.
template <int ACT>
inline __m512 z_of(__m512 g) {
  if constexpr (ACT == kGluSilu) return g;
  else return _mm512_mul_ps(g, _mm512_fmadd_ps(_mm512_mul_ps(g, g), _mm512_set1_ps(float(kGeluZ1)),
                                               _mm512_set1_ps(float(kGeluZ0))));
}
template <int ACT>
inline __m512 times_dz(__m512 x, __m512 g) {
  if constexpr (ACT == kGluSilu) return x;
  else return _mm512_mul_ps(x, _mm512_fmadd_ps(_mm512_mul_ps(g, g), _mm512_set1_ps(float(3 * kGeluZ1)),
                                               _mm512_set1_ps(float(kGeluZ0))));
}
#endif
#ifdef PYLLM_AVX2
// The same in 8 lanes.
template <int ACT>
inline __m256 z_of(__m256 g) {
  if constexpr (ACT == kGluSilu) return g;
  else return _mm256_mul_ps(g, _mm256_fmadd_ps(_mm256_mul_ps(g, g), _mm256_set1_ps(float(kGeluZ1)),
                                               _mm256_set1_ps(float(kGeluZ0))));
}
template <int ACT>
inline __m256 times_dz(__m256 x, __m256 g) {
  if constexpr (ACT == kGluSilu) return x;
  else return _mm256_mul_ps(x, _mm256_fmadd_ps(_mm256_mul_ps(g, g), _mm256_set1_ps(float(3 * kGeluZ1)),
                                               _mm256_set1_ps(float(kGeluZ0))));
}

// One output vector of the forward and of the backward, in 8 lanes.
template <typename T, int ACT>
inline __m256 fwd8(__m256 g, __m256 u) {
  const __m256 sig = avx2::sigmoid<std::is_same_v<T, float>>(z_of<ACT>(g));
  return _mm256_mul_ps(_mm256_mul_ps(g, sig), u);
}
template <typename T, int ACT>
inline void bwd8(__m256 d, __m256 g, __m256 u, __m256& dg, __m256& du) {
  __m256 sig, one_minus_sig;
  avx2::sigmoid_pair<std::is_same_v<T, float>>(z_of<ACT>(g), sig, one_minus_sig);
  const __m256 act = _mm256_mul_ps(g, sig);
  const __m256 dact = _mm256_fmadd_ps(act, times_dz<ACT>(one_minus_sig, g), sig);  // s + (g s) (z' (1 - s))
  dg = _mm256_mul_ps(_mm256_mul_ps(d, u), dact);
  du = _mm256_mul_ps(d, act);
}
#endif

template <typename T, int ACT>
void fwd(const T* gate, const T* up, T* out, Layout l) {
  using A = acc_t<T>;
  for_each_block<T>(l, [&](int64_t row, int64_t c0, int64_t c1) {
    const T* __restrict g_row = gate + row * l.in_stride;
    const T* __restrict u_row = up + row * l.in_stride;
    T* __restrict o_row = out + row * l.out_stride;
    int64_t c = c0;
#ifdef PYLLM_AVX512
    if constexpr (avx512::has_lanes<T>) {
      for (; c < c1; c += 16) {
        const int64_t n = c1 - c;
        const __m512 g = avx512::load(g_row + c, n), u = avx512::load(u_row + c, n);
        const __m512 sig = avx512::sigmoid<std::is_same_v<T, float>>(z_of<ACT>(g));
        avx512::store(o_row + c, _mm512_mul_ps(_mm512_mul_ps(g, sig), u), n);
      }
    }
#elif defined(PYLLM_AVX2)
    if constexpr (avx2::has_lanes<T>) {
      for (; c + 8 <= c1; c += 8) avx2::store(o_row + c, fwd8<T, ACT>(avx2::load(g_row + c), avx2::load(u_row + c)));
      if (c < c1) {
        const int64_t n = c1 - c;
        avx2::store_tail(o_row + c, fwd8<T, ACT>(avx2::load_tail(g_row + c, n), avx2::load_tail(u_row + c, n)), n);
        c = c1;
      }
    }
#endif
#pragma omp simd
    for (int64_t t = c; t < c1; ++t) {
      A g = to_float(g_row[t]), u = to_float(u_row[t]);
      A sig = sigmoid_acc<T>(glu_z<ACT>(g));
      o_row[t] = from_acc<T>(g * sig * u);
    }
  });
}

template <typename T, int ACT>
void bwd(const T* dout, const T* gate, const T* up, T* dgate, T* dup, Layout l) {
  using A = acc_t<T>;
  for_each_block<T>(l, [&](int64_t row, int64_t c0, int64_t c1) {
    const T* __restrict d_row = dout + row * l.out_stride;
    const T* __restrict g_row = gate + row * l.in_stride;
    const T* __restrict u_row = up + row * l.in_stride;
    T* __restrict dg_row = dgate + row * l.in_stride;
    T* __restrict du_row = dup + row * l.in_stride;
    int64_t c = c0;
#ifdef PYLLM_AVX512
    if constexpr (avx512::has_lanes<T>) {
      for (; c < c1; c += 16) {
        const int64_t n = c1 - c;
        const __m512 d = avx512::load(d_row + c, n), g = avx512::load(g_row + c, n), u = avx512::load(u_row + c, n);
        __m512 sig, one_minus_sig;
        avx512::sigmoid_pair<std::is_same_v<T, float>>(z_of<ACT>(g), sig, one_minus_sig);
        const __m512 act = _mm512_mul_ps(g, sig);
        const __m512 dact = _mm512_fmadd_ps(act, times_dz<ACT>(one_minus_sig, g), sig);  // s + (g s) (z' (1 - s))
        avx512::store(dg_row + c, _mm512_mul_ps(_mm512_mul_ps(d, u), dact), n);
        avx512::store(du_row + c, _mm512_mul_ps(d, act), n);
      }
    }
#elif defined(PYLLM_AVX2)
    if constexpr (avx2::has_lanes<T>) {
      __m256 dg, du;
      for (; c + 8 <= c1; c += 8) {
        bwd8<T, ACT>(avx2::load(d_row + c), avx2::load(g_row + c), avx2::load(u_row + c), dg, du);
        avx2::store(dg_row + c, dg);
        avx2::store(du_row + c, du);
      }
      if (c < c1) {
        const int64_t n = c1 - c;
        bwd8<T, ACT>(avx2::load_tail(d_row + c, n), avx2::load_tail(g_row + c, n), avx2::load_tail(u_row + c, n), dg, du);
        avx2::store_tail(dg_row + c, dg, n);
        avx2::store_tail(du_row + c, du, n);
        c = c1;
      }
    }
#endif
#pragma omp simd
    for (int64_t t = c; t < c1; ++t) {
      A d = to_float(d_row[t]), g = to_float(g_row[t]), u = to_float(u_row[t]);
      A sig, one_minus_sig;
      sigmoid_pair_acc<T>(glu_z<ACT>(g), sig, one_minus_sig);
      A act = g * sig;
      dg_row[t] = from_acc<T>(d * u * (sig + act * (glu_dz<ACT>(g) * one_minus_sig)));
      du_row[t] = from_acc<T>(d * act);
    }
  });
}

}  // namespace

void swiglu_fwd_cpu(uintptr_t gate, uintptr_t up, uintptr_t out, int64_t rows, int64_t cols,
                    int64_t in_stride, int64_t out_stride, int dtype, int activation) {
  Layout l{rows, cols, in_stride, out_stride};
  check_layout(l, dtype, activation, {gate, up, out});
  if (rows * cols == 0) return;
  PYLLM_DISPATCH_CPU(dtype, T, PYLLM_DISPATCH_GLU(activation, ACT,
                     fwd<T, ACT>(reinterpret_cast<const T*>(gate), reinterpret_cast<const T*>(up),
                            reinterpret_cast<T*>(out), l)));
}

void swiglu_bwd_cpu(uintptr_t dout, uintptr_t gate, uintptr_t up, uintptr_t dgate, uintptr_t dup,
                    int64_t rows, int64_t cols, int64_t in_stride, int64_t out_stride, int dtype,
                    int activation) {
  Layout l{rows, cols, in_stride, out_stride};
  check_layout(l, dtype, activation, {dout, gate, up, dgate, dup});
  if (rows * cols == 0) return;
  PYLLM_DISPATCH_CPU(dtype, T, PYLLM_DISPATCH_GLU(activation, ACT,
                     bwd<T, ACT>(reinterpret_cast<const T*>(dout), reinterpret_cast<const T*>(gate),
                            reinterpret_cast<const T*>(up), reinterpret_cast<T*>(dgate),
                            reinterpret_cast<T*>(dup), l)));
}

}  // namespace pyllm
