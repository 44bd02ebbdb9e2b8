// Picks the copy of the CPU kernels this process runs (cpu/dispatch.h). Compiled once, with the
// base level's flags: everything here runs on any CPU the build does.
//
// A level's copy may use every instruction its -march allows the compiler, so a level runs only
// where the CPU has all of them and the OS saves the registers they use (XGETBV: the AVX state
// for 256-bit code, the opmask and upper ZMM state for AVX-512): the features below are those of
// GCC's and clang's x86-64-v2 / v3 / v4 definitions, read from cpuid.
#define PYLLM_CPU_OPS_EACH_LEVEL  // cpu_ops.h is included again below, once per level's namespace
#include "cpu/dispatch.h"

#include <cstdlib>
#include <stdexcept>
#include <string>

#if defined(_OPENMP) && !defined(_WIN32)
#include <omp.h>
#include <pthread.h>
#define PYLLM_OMP_AFTER_FORK 1
#endif

#include "common/checks.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#define PYLLM_X86_CPUID 1
#endif

#ifdef PYLLM_CPU_LEVEL_avx2
#define pyllm pyllm_isa_avx2
#include "cpu/cpu_ops.h"
#undef pyllm
#endif
#ifdef PYLLM_CPU_LEVEL_avx512
#define pyllm pyllm_isa_avx512
#include "cpu/cpu_ops.h"
#undef pyllm
#endif
#ifdef PYLLM_CPU_LEVEL_avx512bf16
#define pyllm pyllm_isa_avx512bf16
#include "cpu/cpu_ops.h"
#undef pyllm
#endif

namespace pyllm {
namespace {

#define PYLLM_CPU_KERNELS(ns, name)                                                                \
  CpuKernels {                                                                                     \
    name, &ns::cpu_isa, &ns::swiglu_fwd_cpu, &ns::swiglu_bwd_cpu, &ns::rms_norm_fwd_cpu,           \
        &ns::rms_norm_bwd_cpu, &ns::cross_entropy_cpu, &ns::distill_cpu, &ns::rope_cpu,            \
        &ns::adamw_grad_sumsq_cpu, &ns::adamw_step_cpu, &ns::flash_attn_cpu_scratch_bytes,         \
        &ns::flash_attn_cpu_bf16_dot, &ns::flash_attn_cpu_amx, &ns::flash_attn_fwd_cpu,            \
        &ns::flash_attn_bwd_cpu                                                                    \
  }

struct X86Levels {
  bool avx2 = false, avx512 = false, avx512bf16 = false;
};

[[maybe_unused]] X86Levels x86_levels() {
  X86Levels out;
#ifdef PYLLM_X86_CPUID
  auto bit = [](unsigned reg, int i) { return ((reg >> i) & 1u) != 0; };
  unsigned a1 = 0, b1 = 0, c1 = 0, d1 = 0, a7 = 0, b7 = 0, c7 = 0, d7 = 0, a71 = 0, b71 = 0, c71 = 0, d71 = 0;
  unsigned ax = 0, bx = 0, cx = 0, dx = 0;
  if (!__get_cpuid(1, &a1, &b1, &c1, &d1)) return out;
  __get_cpuid_count(7, 0, &a7, &b7, &c7, &d7);  // leaves zeros where the CPU lacks the leaf
  if (a7 >= 1) __get_cpuid_count(7, 1, &a71, &b71, &c71, &d71);  // a7: the highest sub-leaf
  __get_cpuid(0x80000001u, &ax, &bx, &cx, &dx);
  unsigned long long xcr0 = 0;
  if (bit(c1, 27)) {  // OSXSAVE: the OS enabled XGETBV
    unsigned lo = 0, hi = 0;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    xcr0 = (static_cast<unsigned long long>(hi) << 32) | lo;
  }
  // macOS turns the AVX-512 state on at a thread's first AVX-512 instruction, so XCR0 shows it off
  // and Intel Macs get the avx2 level: slower there, never wrong.
  const bool ymm_state = (xcr0 & 0x6) == 0x6, zmm_state = (xcr0 & 0xe6) == 0xe6;
  // x86-64-v2: SSE3, SSSE3, CMPXCHG16B, SSE4.1, SSE4.2, POPCNT, LAHF/SAHF.
  const bool v2 = bit(c1, 0) && bit(c1, 9) && bit(c1, 13) && bit(c1, 19) && bit(c1, 20) && bit(c1, 23) && bit(cx, 0);
  // x86-64-v3: + FMA, MOVBE, XSAVE, AVX, F16C; BMI1, AVX2, BMI2; LZCNT.
  const bool v3 = v2 && ymm_state && bit(c1, 12) && bit(c1, 22) && bit(c1, 26) && bit(c1, 28) && bit(c1, 29) &&
                  bit(b7, 3) && bit(b7, 5) && bit(b7, 8) && bit(cx, 5);
  // x86-64-v4: + AVX512F, AVX512DQ, AVX512CD, AVX512BW, AVX512VL.
  const bool v4 = v3 && zmm_state && bit(b7, 16) && bit(b7, 17) && bit(b7, 28) && bit(b7, 30) && bit(b7, 31);
  out.avx2 = v3;
  out.avx512 = v4;
  out.avx512bf16 = v4 && bit(a71, 5);
#endif
  return out;
}

struct Level {
  CpuKernels kernels;
  bool runs;
};

std::vector<Level> levels() {
  [[maybe_unused]] const X86Levels x86 = x86_levels();
  // The base level runs wherever the module loads (pyllm/_cpu_guard.py checked its flags).
  std::vector<Level> out{{PYLLM_CPU_KERNELS(pyllm, PYLLM_BASE_LEVEL), true}};
#ifdef PYLLM_CPU_LEVEL_avx2
  out.push_back({PYLLM_CPU_KERNELS(pyllm_isa_avx2, "avx2"), x86.avx2});
#endif
#ifdef PYLLM_CPU_LEVEL_avx512
  out.push_back({PYLLM_CPU_KERNELS(pyllm_isa_avx512, "avx512"), x86.avx512});
#endif
#ifdef PYLLM_CPU_LEVEL_avx512bf16
  out.push_back({PYLLM_CPU_KERNELS(pyllm_isa_avx512bf16, "avx512bf16"), x86.avx512bf16});
#endif
  return out;
}

std::string names(const std::vector<Level>& all, bool runnable_only) {
  std::string out;
  for (const Level& l : all) {
    if (runnable_only && !l.runs) continue;
    out += (out.empty() ? "" : ", ") + std::string(l.kernels.level);
  }
  return out;
}

CpuKernels choose() {
  const std::vector<Level> all = levels();
  const char* wanted = std::getenv("PYLLM_CPU_LEVEL");
  if (wanted == nullptr || *wanted == '\0') {
    for (auto it = all.rbegin(); it != all.rend(); ++it)
      if (it->runs) return it->kernels;
  }
  for (const Level& l : all) {
    if (std::string(l.kernels.level) != wanted) continue;
    PYLLM_CHECK(l.runs, "PYLLM_CPU_LEVEL=", wanted, ": this CPU lacks instructions that level's kernels use; it runs ",
                names(all, true));
    return l.kernels;
  }
  throw std::invalid_argument(concat(
      "pyllm: PYLLM_CPU_LEVEL=", wanted, ": this build's CPU kernels have the level", all.size() > 1 ? "s " : " ",
      names(all, false),
      all.size() > 1 ? "" : " (a build with PYLLM_CPU_DISPATCH=1 has portable, avx2, avx512 and avx512bf16 on x86-64)"));
}

}  // namespace

std::vector<std::pair<std::string, bool>> cpu_levels() {
  std::vector<std::pair<std::string, bool>> out;
  for (const Level& l : levels()) out.emplace_back(l.kernels.level, l.runs);
  return out;
}

#ifdef PYLLM_OMP_AFTER_FORK
// A process forked after a CPU kernel ran had hung at its next one (a DataLoader worker, a fork
// Pool's): GCC's libgomp keeps the parent's thread pool, whose threads the child does not have, and
// waits for them. The child runs the kernels on its one thread instead, as torch's DataLoader
// workers run torch's (a spawned process has every thread; LLVM's libomp, which re-creates its pool
// in a child, gets one thread too).
void one_thread_after_fork() { omp_set_num_threads(1); }
#endif

const CpuKernels& cpu_kernels() {
  static const CpuKernels chosen = [] {
    CpuKernels kernels = choose();
#ifdef PYLLM_OMP_AFTER_FORK
    pthread_atfork(nullptr, nullptr, one_thread_after_fork);
#endif
    return kernels;
  }();
  return chosen;
}

}  // namespace pyllm
