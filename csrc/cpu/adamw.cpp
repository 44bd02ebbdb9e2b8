// Mixed-precision fused AdamW on the CPU (the optimizer-offload case; DeepSpeed's CPU Adam is the
// peer). Two passes over every parameter tensor of a group, each one call for the whole group:
//
// 1. adamw_grad_sumsq_cpu: sum of squares of all grads, the global-norm pass. Reads each grad once
//    (4 B/param fp32, 2 B/param bf16/fp16). The squares accumulate in double (an fp32 square
//    cannot overflow a double, and 50M terms lose nothing that matters at fp32 output); each
//    fixed-size chunk gets its own partial and the partials are added in chunk order, so the sum is
//    bitwise the same for any thread count. An inf/nan anywhere makes the sum inf/nan: that is the
//    found-inf flag, with no separate pass.
//
// 2. adamw_step_cpu: the update, as torch.optim.AdamW computes it (decoupled weight decay):
//      g = grad * mult,   mult = (1 / loss_scale) * min(1, max_norm / (||grad|| / loss_scale + 1e-6))
//      m = m + (1 - b1) (g - m)            v = b2 v + (1 - b2) g^2
//      p = p (1 - lr wd) - (lr / (1 - b1^t)) m / (sqrt(v) / sqrt(1 - b2^t) + eps)
//    The unscale and the clip are one multiplier: the grads are never rewritten. When the
//    sum of squares is not finite the call returns before touching anything (a skipped step).
//    Params in fp32 are their own master; bf16/fp16 params either have an fp32 master (read and
//    written, then rounded into the param) or none (the param is read, updated in fp32, rounded
//    back: llm.c's mode, best with stochastic rounding). m, v and the master are always fp32.
//    Bytes per param: fp32 4 (grad) + 3 x 8 (p, m, v read+write) = 28; bf16 with master
//    2 (grad) + 3 x 8 (master, m, v) + 2 (param write) = 28.
//    Stochastic rounding (bf16 only): add 16 random bits below the bf16 mantissa, truncate. The bits
//    come from common/counter_rng.h keyed by (seed, step, tensor index), element index as counter:
//    reproducible for a seed, independent of threads, and the same bits as the CUDA kernel.
//
// Arguments: a table of int64, 7 rows x n_tensors (pointers as integers, see kRow*), so a whole group
// is one call. The step count t is read per tensor from its fp32 step scalar (the caller increments
// it), the loss scale from an fp32 scalar and the sum of squares from a double, all by pointer,
// which is how the CUDA twin reads them without a host sync.
//
// Threading: OpenMP over chunks of kChunk elements of all tensors together (static schedule: the
// chunks are the same size); the inner loops are plain fp32 arithmetic that GCC vectorises (AVX-512
// here). This file is built with -fno-math-errno (CMakeLists.txt): with errno semantics GCC will
// not vectorise sqrt.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "common/adamw_args.h"
#include "common/checks.h"
#include "common/counter_rng.h"
#include "common/dtype.h"
#include "cpu/cpu_ops.h"

namespace pyllm {
namespace {

using namespace adamw;

// 16K elements: fp32 traffic 16K x 28 B = 448 KB per chunk, small against the 50M-param working
// set and large against the fork/join. A power of two, so no chunk straddles a 2^32 element
// boundary (common/counter_rng.h). Not yet measured against other sizes.
constexpr int64_t kChunk = 1 << 14;
constexpr int64_t kParallelMin = 1 << 16;

struct Chunk {
  int64_t tensor, begin, end;
};

std::vector<Chunk> make_chunks(const Table& tab, int64_t& total) {
  std::vector<Chunk> chunks;
  total = 0;
  for (int64_t i = 0; i < tab.n; ++i) {
    const int64_t n = tab.numel(i);
    total += n;
    for (int64_t b = 0; b < n; b += kChunk) chunks.push_back({i, b, std::min(n, b + kChunk)});
  }
  return chunks;
}

inline uint16_t bf16_stochastic(float x, uint32_t bits) {
  const uint32_t u = f32_to_bits(x);
  const uint32_t stochastic = (u + (bits & 0xffffu)) >> 16;
  // inf/nan are not rounded: adding noise to an inf's zero mantissa would make a NaN. Written as a
  // select, not through from_float<bf16>: GCC does not vectorise the loop with that call in it.
  const uint32_t special = (u >> 16) | ((u & 0x007fffffu) ? 0x40u : 0u);
  return uint16_t((u & 0x7f800000u) == 0x7f800000u ? special : stochastic);
}

template <typename G>
double sumsq_range(const G* __restrict g, int64_t begin, int64_t end) {
  double acc = 0.0;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = begin; i < end; ++i) {
    const double x = to_float(g[i]);
    acc += x * x;
  }
  return acc;
}

template <typename G>
void sumsq_chunks(const Table& tab, const std::vector<Chunk>& chunks, int64_t total, std::vector<double>& partial) {
  const int64_t n_chunks = int64_t(chunks.size());
#pragma omp parallel for schedule(static) if (total >= kParallelMin)
  for (int64_t c = 0; c < n_chunks; ++c)
    partial[c] = sumsq_range(tab.ptr<const G>(kRowGrad, chunks[c].tensor), chunks[c].begin, chunks[c].end);
}

// Per-tensor step constants, from the tensor's step count (already incremented by the caller).
struct StepConsts {
  float lr_wd_keep, step_size, inv_bc2_sqrt;
};

StepConsts step_consts(double lr, double beta1, double beta2, double weight_decay, float step) {
  const double bc1 = 1.0 - std::pow(beta1, double(step));
  const double bc2 = 1.0 - std::pow(beta2, double(step));
  return {float(1.0 - lr * weight_decay), float(lr / bc1), float(1.0 / std::sqrt(bc2))};
}

struct Hyper {
  float beta1, beta2, one_minus_beta1, one_minus_beta2, eps, grad_mult;
  double lr, beta1_d, beta2_d, weight_decay;
  uint64_t seed;
};

// P: param storage type. kMaster: a separate fp32 master exists (16-bit params only).
template <typename P, bool kMaster, bool kStochastic>
void step_range(const Table& tab, int64_t t, int64_t begin, int64_t end, const Hyper& h) {
  P* __restrict param = tab.ptr<P>(kRowParam, t);
  const P* __restrict grad = tab.ptr<const P>(kRowGrad, t);
  float* __restrict master = kMaster ? tab.ptr<float>(kRowMaster, t) : nullptr;
  float* __restrict exp_avg = tab.ptr<float>(kRowExpAvg, t);
  float* __restrict exp_avg_sq = tab.ptr<float>(kRowExpAvgSq, t);
  const float step = *tab.ptr<const float>(kRowStep, t);
  const StepConsts c = step_consts(h.lr, h.beta1_d, h.beta2_d, h.weight_decay, step);
  const uint32_t key = kStochastic ? block_key(stream_key(h.seed, uint32_t(step), uint32_t(t)), uint64_t(begin)) : 0u;
  const float b2 = h.beta2, omb1 = h.one_minus_beta1, omb2 = h.one_minus_beta2, eps = h.eps;
  const float mult = h.grad_mult, keep = c.lr_wd_keep, step_size = c.step_size, inv_bc2_sqrt = c.inv_bc2_sqrt;
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    const float g = to_float(grad[i]) * mult;
    float p;
    if constexpr (kMaster) p = master[i];
    else p = to_float(param[i]);
    float m = exp_avg[i], v = exp_avg_sq[i];
    m = m + omb1 * (g - m);
    v = b2 * v + (omb2 * g) * g;  // torch's order: g * g alone overflows fp32 from |g| ~ 1.8e19, ~32x sooner
    p = p * keep;
    p = p - step_size * m / (std::sqrt(v) * inv_bc2_sqrt + eps);
    exp_avg[i] = m;
    exp_avg_sq[i] = v;
    if constexpr (kMaster) master[i] = p;
    if constexpr (kStochastic) {
      param[i] = bf16{bf16_stochastic(p, random_bits(key, uint32_t(i)))};
    } else {
      param[i] = from_float<P>(p);
    }
  }
}

template <typename P, bool kMaster, bool kStochastic>
void step_all(const Table& tab, const std::vector<Chunk>& chunks, int64_t total, const Hyper& h) {
  const int64_t n_chunks = int64_t(chunks.size());
#pragma omp parallel for schedule(static) if (total >= kParallelMin)
  for (int64_t c = 0; c < n_chunks; ++c)
    step_range<P, kMaster, kStochastic>(tab, chunks[c].tensor, chunks[c].begin, chunks[c].end, h);
}

}  // namespace

void adamw_grad_sumsq_cpu(uintptr_t table, int64_t n_tensors, int dtype, uintptr_t sumsq) {
  const Table tab = check_table("adamw_grad_sumsq", table, n_tensors, {kRowGrad});
  PYLLM_CHECK(sumsq != 0, "adamw_grad_sumsq: null output pointer");
  PYLLM_CHECK(dtype == int(DType::f32) || dtype == int(DType::bf16) || dtype == int(DType::f16),
              "adamw_grad_sumsq: grads must be float32, bfloat16 or float16, got ", dtype_name(dtype));
  int64_t total = 0;
  const std::vector<Chunk> chunks = make_chunks(tab, total);
  std::vector<double> partial(chunks.size());
  PYLLM_DISPATCH_CPU(dtype, G, sumsq_chunks<G>(tab, chunks, total, partial));
  double acc = 0.0;
  for (double p : partial) acc += p;  // chunk order: the same sum for any thread count
  *reinterpret_cast<double*>(sumsq) += acc;
}

void adamw_step_cpu(uintptr_t table, int64_t n_tensors, int param_dtype, bool has_master, double lr, double beta1,
                    double beta2, double eps, double weight_decay, uintptr_t sumsq, uintptr_t loss_scale,
                    double max_grad_norm, bool stochastic_rounding, uint64_t seed) {
  const Table tab = check_step(table, n_tensors, param_dtype, has_master, lr, beta1, beta2, eps, weight_decay, sumsq,
                               max_grad_norm, stochastic_rounding);

  // The skip, the unscale and the clip, decided once per call from the scalars in memory.
  const double inv_scale = loss_scale ? 1.0 / double(*reinterpret_cast<const float*>(loss_scale)) : 1.0;
  // an inf/nan grad, or a loss scale unscaling past fp32: the step is skipped, nothing is written
  if (!step_goes_ahead(reinterpret_cast<const double*>(sumsq), inv_scale)) return;
  float grad_mult = float(inv_scale);
  if (sumsq) {
    const double s = *reinterpret_cast<const double*>(sumsq);
    if (max_grad_norm >= 0) {
      // torch.nn.utils.clip_grad_norm_: coef = max_norm / (norm + 1e-6), applied when below 1.
      const float norm = float(std::sqrt(s) * inv_scale);
      const float coef = float(max_grad_norm) / (norm + 1e-6f);
      if (coef < 1.0f) grad_mult = float(inv_scale) * coef;
    }
  }
  Hyper h{float(beta1), float(beta2), float(1.0 - beta1), float(1.0 - beta2), float(eps), grad_mult,
          lr, beta1, beta2, weight_decay, seed};
  int64_t total = 0;
  const std::vector<Chunk> chunks = make_chunks(tab, total);
  switch (static_cast<DType>(param_dtype)) {
    case DType::f32: step_all<float, false, false>(tab, chunks, total, h); break;
    case DType::f16:
      if (has_master) step_all<f16, true, false>(tab, chunks, total, h);
      else step_all<f16, false, false>(tab, chunks, total, h);
      break;
    case DType::bf16:
      if (has_master && stochastic_rounding) step_all<bf16, true, true>(tab, chunks, total, h);
      else if (has_master) step_all<bf16, true, false>(tab, chunks, total, h);
      else if (stochastic_rounding) step_all<bf16, false, true>(tab, chunks, total, h);
      else step_all<bf16, false, false>(tab, chunks, total, h);
      break;
    default: break;
  }
}

}  // namespace pyllm
