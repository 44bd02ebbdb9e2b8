// The gated activations act(gate) * up that the swiglu kernels (cpu/swiglu.cpp, cuda/swiglu.cu)
// take, written once for both. Each is gate * sigmoid(z(gate)):
//   silu       (SwiGLU: LLaMA, Qwen, Mistral):  z = g
//   gelu_tanh  (GeGLU: Gemma 1-3; GPT-2's GELU): 0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3)))
//              = g * sigmoid(z), z = 2 sqrt(2/pi) (g + 0.044715 g^3), since 1 + tanh(y) = 2 sigmoid(2y)
// so one kernel body serves both, and the derivative is one formula too:
//   d act / dg = s (1 + g (1 - s) z'(g)) = s + (g s) (z'(g) (1 - s)),  s = sigmoid(z),
// the kernels' grouping: g z'(g) overflows fp32 from |g| ~ 1.2e13 where its partner factor is 0.
// The sigmoid form also keeps the tanh GELU's small negative outputs: torch's 1 + tanh(y) cancels
// to 0 in fp32 from y ~ -9 (g ~ -5.3), where g * sigmoid(2y) is still ~1e-7 g.
#pragma once
#include "common/checks.h"
#include "common/host_device.h"

namespace pyllm {

enum GluActivation : int { kGluSilu = 0, kGluGeluTanh = 1 };

// 2 sqrt(2 / pi) and 2 sqrt(2 / pi) * 0.044715, in double so that the fp64 kernels get them whole.
constexpr double kGeluZ0 = 1.5957691216057308;
constexpr double kGeluZ1 = 0.07135481627260025;

// z(g): the sigmoid's argument. g (Z0 + Z1 g^2) instead of Z0 (g + k g^3): one multiply fewer.
template <int ACT, typename A>
PYLLM_HD A glu_z(A g) {
  if constexpr (ACT == kGluSilu) return g;
  else return g * (A(kGeluZ0) + A(kGeluZ1) * g * g);
}

// z'(g) (1 for silu, so its kernels skip the multiply).
template <int ACT, typename A>
PYLLM_HD A glu_dz(A g) {
  if constexpr (ACT == kGluSilu) return A(1);
  else return A(kGeluZ0) + A(3 * kGeluZ1) * g * g;
}

inline void check_glu_activation(int activation) {
  PYLLM_CHECK(activation == kGluSilu || activation == kGluGeluTanh,
              "swiglu: activation code must be 0 (silu) or 1 (gelu_tanh), got ", activation);
}

// Runs the statement with ACT the activation as a compile-time constant (a checked code).
#define PYLLM_DISPATCH_GLU(activation, ACT, ...)                                   \
  do {                                                                             \
    if ((activation) == ::pyllm::kGluSilu) {                                       \
      constexpr int ACT = ::pyllm::kGluSilu;                                       \
      __VA_ARGS__;                                                                 \
    } else {                                                                       \
      constexpr int ACT = ::pyllm::kGluGeluTanh;                                   \
      __VA_ARGS__;                                                                 \
    }                                                                              \
  } while (0)

}  // namespace pyllm
