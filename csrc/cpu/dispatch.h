// Which copy of the CPU kernels this process runs, as a table of their entry points
// (cpu/cpu_ops.h). A default build has one copy, compiled for its -march (native: the building
// machine). A dispatch build (PYLLM_CPU_DISPATCH=1, x86-64) has one more per instruction-set level,
// each compiled with that level's -march in a namespace of its own (see CMakeLists.txt), and runs
// the highest level the CPU and the OS allow. A new entry point of cpu_ops.h gets a field here and
// a place in dispatch.cpp's PYLLM_CPU_KERNELS (a field left out there fails the build).
#pragma once
#include <string>
#include <utility>
#include <vector>

#include "cpu/cpu_ops.h"

namespace pyllm {

struct CpuKernels {
  // The base level: "native", "portable" (the compiler's default -march) or the -march value; a
  // dispatch build's others: "avx2" (-march=x86-64-v3), "avx512" (x86-64-v4), "avx512bf16"
  // (x86-64-v4 -mavx512bf16).
  const char* level;
  decltype(&pyllm::cpu_isa) cpu_isa;
  decltype(&pyllm::swiglu_fwd_cpu) swiglu_fwd_cpu;
  decltype(&pyllm::swiglu_bwd_cpu) swiglu_bwd_cpu;
  decltype(&pyllm::rms_norm_fwd_cpu) rms_norm_fwd_cpu;
  decltype(&pyllm::rms_norm_bwd_cpu) rms_norm_bwd_cpu;
  decltype(&pyllm::cross_entropy_cpu) cross_entropy_cpu;
  decltype(&pyllm::distill_cpu) distill_cpu;
  decltype(&pyllm::rope_cpu) rope_cpu;
  decltype(&pyllm::adamw_grad_sumsq_cpu) adamw_grad_sumsq_cpu;
  decltype(&pyllm::adamw_step_cpu) adamw_step_cpu;
  decltype(&pyllm::flash_attn_cpu_scratch_bytes) flash_attn_cpu_scratch_bytes;
  decltype(&pyllm::flash_attn_cpu_bf16_dot) flash_attn_cpu_bf16_dot;
  decltype(&pyllm::flash_attn_cpu_amx) flash_attn_cpu_amx;
  decltype(&pyllm::flash_attn_fwd_cpu) flash_attn_fwd_cpu;
  decltype(&pyllm::flash_attn_bwd_cpu) flash_attn_bwd_cpu;
};

// The levels this build has, lowest first, each with whether this CPU and OS run it.
std::vector<std::pair<std::string, bool>> cpu_levels();

// The table this process runs: the highest level this CPU runs, or the one the environment's
// PYLLM_CPU_LEVEL names (a level this build lacks or this CPU cannot run throws
// std::invalid_argument naming the ones there are). Chosen on the first call, for the process.
const CpuKernels& cpu_kernels();

}  // namespace pyllm
