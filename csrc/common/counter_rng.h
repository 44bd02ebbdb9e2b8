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

// Attention dropout (flash_attn's dropout_p): the random word of (query i, key j) of sequence b's
// query head h, positions counted within the sequence, is
//   mix32(row_hash(i) + col_hash(j)),  row_hash(i) = mix32(i ^ rk),  col_hash(j) = mix32(j ^ ck)
// with rk = stream_key(seed, b, h) and ck = mix32(rk ^ 0x632be5ab). A pure function of (seed, b, h,
// i, j), so every kernel (CPU tiles, CUDA forward, both backwards, with any tile shape or block
// order) draws the same mask, and pyllm.ops.flash_attn.dropout_mask gives it in torch ops. Per
// element one add and one mix32 (~9 integer ops), the row and column hashes computed once per tile
// row / column. Hashing the sum of two hashed coordinates, not a hash of i * Tk + j or of j ^ key_i:
// with a single hash of a coordinate shifted or XOR-ed by a per-row key, two rows whose keys differ
// by less than Tk draw permutations of one another's words (same dropped count); here such
// collisions are as rare and as unstructured as for independent 32-bit words.
// Kept iff the word >= threshold = round(p * 2^32) (attn_params.h's set_dropout); the kept values
// are scaled by 1 / (1 - p).
struct AttnDropoutKey {
  uint32_t rk = 0, ck = 0;
  PYLLM_HD AttnDropoutKey() {}
  PYLLM_HD AttnDropoutKey(uint64_t seed, int64_t b, int64_t h)
      : rk(stream_key(seed, uint32_t(b), uint32_t(h))), ck(mix32(rk ^ 0x632be5abu)) {}
  PYLLM_HD uint32_t row_hash(int64_t i) const { return mix32(uint32_t(i) ^ rk); }
  PYLLM_HD uint32_t col_hash(int64_t j) const { return mix32(uint32_t(j) ^ ck); }
};

PYLLM_HD uint32_t attn_dropout_bits(uint32_t row_hash, uint32_t col_hash) { return mix32(row_hash + col_hash); }

}  // namespace pyllm
