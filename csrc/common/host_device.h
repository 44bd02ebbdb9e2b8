// PYLLM_HD: a function usable from host code and from CUDA kernels alike, for the small pieces
// (index arithmetic, hashes) that the CPU and CUDA twins share.
#pragma once

#if defined(__CUDACC__)
#define PYLLM_HD __host__ __device__ __forceinline__
#else
#define PYLLM_HD inline
#endif
