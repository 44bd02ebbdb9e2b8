// Counter-based random bits for stochastic rounding (and anything else that must be reproducible
// regardless of thread count, chunking or device): the random word for element i is a pure function
// of (key, i), so the CPU and CUDA kernels produce the same bits for the same seed.
//
// mix32 is the "lowbias32" integer finaliser (Chris Wellons' hash-prospector, public domain): two
// multiply-xorshift rounds, bias ~0.17 in its avalanche measure. Cheap enough to vectorise (AVX-512
// vpmulld) and to run once per element on a GPU.
#pragma once
#include <cstdint>

#include "common/host_device.h"

namespace pyllm {

PYLLM_HD uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

// One 32-bit stream key from a 64-bit seed and two counters (e.g. the optimizer step and the tensor).
PYLLM_HD uint32_t stream_key(uint64_t seed, uint32_t a, uint32_t b) {
  uint32_t k = mix32(uint32_t(seed) ^ 0x9e3779b9u);
  k = mix32(k ^ uint32_t(seed >> 32));
  k = mix32(k ^ a);
  return mix32(k ^ (b * 0x85ebca6bu));
}

// The key of the elements [i0, i0 + 2^32) of a stream: callers walk elements in blocks that never
// straddle a multiple of 2^32 (power-of-two chunks), so the per-element hash stays one mix32.
PYLLM_HD uint32_t block_key(uint32_t key, uint64_t i0) {
  return (i0 >> 32) ? mix32(key + uint32_t(i0 >> 32)) : key;
}

// The random word of element i (its low 32 bits) in the stream `key` (from block_key).
PYLLM_HD uint32_t random_bits(uint32_t key, uint32_t i) { return mix32(i ^ key); }

}  // namespace pyllm
