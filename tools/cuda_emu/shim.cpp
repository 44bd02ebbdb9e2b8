// Plain C entry points over pyllm's CUDA launchers (csrc/cuda/cuda_ops.h), for ctypes: the same
// arguments as bind.cpp's *_cuda functions (strides as a pointer and a count), 0 on success, else -1
// with the launcher's exception message in emu_error().
#include <string>
#include <vector>

#include "common/checks.h"
#include "cpu/bpe.h"
#include "cuda/cuda_ops.h"

namespace {
std::string error;

template <typename F>
int guarded(F&& f) {
  try {
    f();
    return 0;
  } catch (const std::exception& e) {
    error = e.what();
  } catch (...) {
    error = "unknown exception";
  }
  return -1;
}

std::vector<int64_t> vec(const int64_t* p, int n) { return std::vector<int64_t>(p, p + n); }
}  // namespace

extern "C" {

const char* emu_error() { return error.c_str(); }

int emu_swiglu_fwd(uintptr_t gate, uintptr_t up, uintptr_t out, int64_t rows, int64_t cols, int64_t in_stride,
                   int64_t out_stride, int dtype, int activation) {
  return guarded([&] { pyllm::swiglu_fwd_cuda(gate, up, out, rows, cols, in_stride, out_stride, dtype, activation, 0, 0); });
}

int emu_swiglu_bwd(uintptr_t dout, uintptr_t gate, uintptr_t up, uintptr_t dgate, uintptr_t dup, int64_t rows,
                   int64_t cols, int64_t in_stride, int64_t out_stride, int dtype, int activation) {
  return guarded([&] {
    pyllm::swiglu_bwd_cuda(dout, gate, up, dgate, dup, rows, cols, in_stride, out_stride, dtype, activation, 0, 0);
  });
}

int emu_rms_norm_fwd(uintptr_t x, uintptr_t weight, uintptr_t out, uintptr_t rstd, int64_t rows, int64_t cols,
                     double eps, double offset, int cast_first, int dtype) {
  return guarded([&] { pyllm::rms_norm_fwd_cuda(x, weight, out, rstd, rows, cols, eps, offset, cast_first, dtype, 0, 0); });
}

int emu_rms_norm_bwd(uintptr_t dout, uintptr_t x, uintptr_t weight, uintptr_t rstd, uintptr_t dx,
                     uintptr_t dweight_partials, int64_t n_partials, int64_t rows, int64_t cols, double offset,
                     int cast_first, int dtype) {
  return guarded([&] {
    pyllm::rms_norm_bwd_cuda(dout, x, weight, rstd, dx, dweight_partials, n_partials, rows, cols, offset, cast_first,
                             dtype, 0, 0);
  });
}

int64_t emu_rms_norm_partials(int64_t rows, int64_t cols, int dtype) {
  int64_t n = -1;
  guarded([&] { n = pyllm::rms_norm_partials_cuda(rows, cols, dtype, 0); });
  return n;
}

int emu_cross_entropy(uintptr_t logits, uintptr_t targets, uintptr_t loss, uintptr_t z_part, uintptr_t grad,
                      uintptr_t grad_rows, int64_t rows, int64_t vocab, int64_t stride, int64_t grad_stride,
                      int64_t ignore_index, double scale, double softcap, double label_smoothing, double z_loss,
                      double grad_scale, int dtype, int token_scaling) {
  return guarded([&] {
    pyllm::cross_entropy_cuda(logits, targets, loss, z_part, grad, grad_rows, rows, vocab, stride, grad_stride,
                              ignore_index, scale, softcap, label_smoothing, z_loss, grad_scale, dtype, 0, 0,
                              token_scaling != 0);
  });
}

int emu_distill(uintptr_t student, uintptr_t teacher, uintptr_t loss, uintptr_t grad, uintptr_t grad_rows, int64_t rows,
                int64_t vocab, int64_t student_stride, int64_t teacher_stride, int64_t grad_stride, double scale,
                double softcap, double teacher_scale, double teacher_softcap, double temperature, double beta,
                double grad_scale, int dtype) {
  return guarded([&] {
    pyllm::distill_cuda(student, teacher, loss, grad, grad_rows, rows, vocab, student_stride, teacher_stride,
                        grad_stride, scale, softcap, teacher_scale, teacher_softcap, temperature, beta, grad_scale,
                        dtype, 0, 0);
  });
}

int emu_rope(uintptr_t x, uintptr_t cos, uintptr_t sin, uintptr_t out, int64_t batch, int64_t seqlen, int64_t n_heads,
             int64_t head_dim, int64_t half, const int64_t* x_strides, const int64_t* out_strides,
             int64_t cs_batch_stride, int inverse, int dtype, int interleaved) {
  return guarded([&] {
    pyllm::rope_cuda(x, cos, sin, out, batch, seqlen, n_heads, head_dim, half, vec(x_strides, 3), vec(out_strides, 3),
                     cs_batch_stride, inverse, dtype, 0, 0, interleaved);
  });
}

int emu_adamw_grad_sumsq(uintptr_t table, int64_t n_tensors, int dtype, uintptr_t partials, int64_t partials_len,
                         uintptr_t sumsq) {
  return guarded([&] { pyllm::adamw_grad_sumsq_cuda(table, n_tensors, dtype, partials, partials_len, sumsq, 0, 0); });
}

int emu_adamw_step(uintptr_t table, int64_t n_tensors, int param_dtype, int has_master, double lr, double beta1,
                   double beta2, double eps, double weight_decay, uintptr_t sumsq, uintptr_t loss_scale,
                   double max_grad_norm, int stochastic_rounding, uint64_t seed) {
  return guarded([&] {
    pyllm::adamw_step_cuda(table, n_tensors, param_dtype, has_master, lr, beta1, beta2, eps, weight_decay, sumsq,
                           loss_scale, max_grad_norm, stochastic_rounding, seed, 0, 0);
  });
}

int emu_flash_attn_decode(uintptr_t q, uintptr_t k_cache, uintptr_t v_cache, uintptr_t out, uintptr_t lse,
                          uintptr_t seqused_k, int64_t batch, int64_t seqlen_q, int64_t capacity, int64_t n_heads,
                          int64_t n_kv_heads, int64_t head_dim, const int64_t* q_strides, const int64_t* k_strides,
                          const int64_t* v_strides, const int64_t* o_strides, const int64_t* lse_strides, double scale,
                          int64_t window_left, int64_t window_right, int dtype, uintptr_t workspace,
                          int64_t workspace_bytes, uintptr_t kv_batch_idx, uintptr_t kv_leftpad, uintptr_t block_table,
                          int64_t block_table_stride, int64_t page_size, int64_t kv_rows, double softcap,
                          uintptr_t alibi_slopes, int64_t alibi_batch_stride) {
  return guarded([&] {
    pyllm::flash_attn_decode_cuda(q, k_cache, v_cache, out, lse, seqused_k, batch, seqlen_q, capacity, n_heads,
                                  n_kv_heads, head_dim, vec(q_strides, 3), vec(k_strides, 3), vec(v_strides, 3),
                                  vec(o_strides, 3), vec(lse_strides, 2), scale, window_left, window_right, dtype, 0, 0,
                                  workspace, workspace_bytes, kv_batch_idx, kv_leftpad, block_table,
                                  block_table_stride, page_size, kv_rows, softcap, alibi_slopes, alibi_batch_stride);
  });
}

int64_t emu_flash_attn_decode_workspace(int64_t batch, int64_t seqlen_q, int64_t capacity, int64_t n_heads,
                                        int64_t head_dim) {
  int64_t n = -1;
  guarded([&] { n = pyllm::flash_attn_decode_workspace_cuda(batch, seqlen_q, capacity, n_heads, head_dim, 0); });
  return n;
}

int emu_flash_attn_fwd(uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out, uintptr_t lse, uintptr_t cu_seqlens_q,
                       uintptr_t cu_seqlens_k, uintptr_t seqused_k, int64_t batch, int64_t seqlen_q, int64_t seqlen_k,
                       int64_t n_heads, int64_t n_kv_heads, int64_t head_dim, const int64_t* q_strides,
                       const int64_t* k_strides, const int64_t* v_strides, const int64_t* o_strides,
                       const int64_t* lse_strides, double scale, int64_t window_left, int64_t window_right, int dtype,
                       int64_t total_q, int64_t total_k, double softcap, uintptr_t alibi_slopes,
                       int64_t alibi_batch_stride, double dropout_p, uint64_t dropout_seed) {
  return guarded([&] {
    pyllm::flash_attn_fwd_cuda(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, seqused_k, batch, seqlen_q, seqlen_k,
                               n_heads, n_kv_heads, head_dim, vec(q_strides, 3), vec(k_strides, 3), vec(v_strides, 3),
                               vec(o_strides, 3), vec(lse_strides, 2), scale, window_left, window_right, dtype, 0, 0,
                               total_q, total_k, softcap, alibi_slopes, alibi_batch_stride, dropout_p, dropout_seed);
  });
}

int emu_flash_attn_bwd(uintptr_t dout, uintptr_t dlse, uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out,
                       uintptr_t lse, uintptr_t dq, uintptr_t dk, uintptr_t dv, uintptr_t cu_seqlens_q,
                       uintptr_t cu_seqlens_k, int64_t batch, int64_t seqlen_q, int64_t seqlen_k, int64_t n_heads,
                       int64_t n_kv_heads, int64_t head_dim, const int64_t* q_strides, const int64_t* k_strides,
                       const int64_t* v_strides, const int64_t* o_strides, const int64_t* dkv_strides,
                       const int64_t* lse_strides, double scale, int64_t window_left, int64_t window_right, int dtype,
                       int deterministic, int algo, int64_t total_q, int64_t total_k, uintptr_t delta_ws,
                       int64_t delta_capacity, uintptr_t dq_accum_ws, int64_t dq_accum_capacity, double softcap,
                       uintptr_t alibi_slopes, int64_t alibi_batch_stride, double dropout_p, uint64_t dropout_seed) {
  return guarded([&] {
    pyllm::flash_attn_bwd_cuda(dout, dlse, q, k, v, out, lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, batch, seqlen_q,
                               seqlen_k, n_heads, n_kv_heads, head_dim, vec(q_strides, 3), vec(k_strides, 3),
                               vec(v_strides, 3), vec(o_strides, 3), vec(dkv_strides, 3), vec(lse_strides, 2), scale,
                               window_left, window_right, dtype, deterministic, 0, 0, algo, total_q, total_k, delta_ws,
                               delta_capacity, dq_accum_ws, dq_accum_capacity, softcap, alibi_slopes,
                               alibi_batch_stride, dropout_p, dropout_seed);
  });
}

// The BPE batch encoder (CudaEncoder over an Encoder of these tokens and ranks, as the binding builds
// them): tokens' bytes end to end with n_tokens + 1 offsets, the texts likewise; each text's ids
// land at its byte offset in ids (a text never has more ids than bytes), their count in counts.
int emu_bpe_encode(const char* token_bytes, const int64_t* token_offsets, const uint32_t* ranks, int64_t n_tokens,
                   int pattern, const char* text_bytes, const int64_t* text_offsets, int64_t n_texts,
                   int num_threads, uint32_t* ids, int64_t* counts) {
  return guarded([&] {
    std::vector<std::string> tokens;
    for (int64_t i = 0; i < n_tokens; ++i)
      tokens.emplace_back(token_bytes + token_offsets[i], size_t(token_offsets[i + 1] - token_offsets[i]));
    const pyllm::bpe::Encoder encoder(tokens, std::vector<uint32_t>(ranks, ranks + n_tokens), pattern, {}, {});
    const pyllm::bpe::CudaEncoder cuda(encoder, 0);
    std::vector<std::string_view> texts;
    for (int64_t t = 0; t < n_texts; ++t)
      texts.emplace_back(text_bytes + text_offsets[t], size_t(text_offsets[t + 1] - text_offsets[t]));
    const auto out = cuda.encode_batch(texts, {}, {}, 0, num_threads);
    for (int64_t t = 0; t < n_texts; ++t) {
      PYLLM_CHECK(int64_t(out[t].size()) <= text_offsets[t + 1] - text_offsets[t], "emu_bpe_encode: more ids than bytes");
      std::copy(out[t].begin(), out[t].end(), ids + text_offsets[t]);
      counts[t] = int64_t(out[t].size());
    }
  });
}

}  // extern "C"
