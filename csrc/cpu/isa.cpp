// The kernel paths the instruction-set flags of this copy of the CPU kernels select (one copy in a
// default build; one per level in a dispatch build, see CMakeLists.txt): the same macros the
// kernels' files test. `pyllm info` prints it for the level the process runs.
#include "cpu/cpu_ops.h"

namespace pyllm {

const char* cpu_isa() {
  return ""
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
         "avx512 "
#endif
#if defined(__AVX512BF16__)
         "avx512bf16 "
#endif
#if defined(__AVX2__) && defined(__FMA__)
         "avx2+fma "
#endif
         "portable";
}

}  // namespace pyllm
