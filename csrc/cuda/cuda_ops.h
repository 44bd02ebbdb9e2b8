// Entry points of the CUDA launchers, bound in csrc/bind.cpp when the CUDA sources were built.
// Every launcher takes the device index and the stream (torch's current stream, as an integer).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace pyllm {

// runtime.cu
int cuda_device_count();  // 0 where there is no GPU or no driver; never throws
std::string cuda_runtime_version();

// swiglu.cu: activation as in swiglu_fwd_cpu (common/glu.h).
void swiglu_fwd_cuda(uintptr_t gate, uintptr_t up, uintptr_t out, int64_t rows, int64_t cols,
                     int64_t in_stride, int64_t out_stride, int dtype, int activation, int device, uintptr_t stream);
void swiglu_bwd_cuda(uintptr_t dout, uintptr_t gate, uintptr_t up, uintptr_t dgate, uintptr_t dup,
                     int64_t rows, int64_t cols, int64_t in_stride, int64_t out_stride, int dtype,
                     int activation, int device, uintptr_t stream);

// rms_norm.cu: the arguments of the CPU twin (csrc/cpu/cpu_ops.h); rstd fp32. The backward writes
// dweight as fp32 partials, n_partials rows of cols (rms_norm_partials_cuda says how many it
// needs), for the caller to sum over the first dim.
void rms_norm_fwd_cuda(uintptr_t x, uintptr_t weight, uintptr_t out, uintptr_t rstd, int64_t rows, int64_t cols,
                       double eps, double offset, bool cast_first, int dtype, int device, uintptr_t stream);
void rms_norm_bwd_cuda(uintptr_t dout, uintptr_t x, uintptr_t weight, uintptr_t rstd, uintptr_t dx,
                       uintptr_t dweight_partials, int64_t n_partials, int64_t rows, int64_t cols, double offset,
                       bool cast_first, int dtype, int device, uintptr_t stream);
int64_t rms_norm_partials_cuda(int64_t rows, int64_t cols, int dtype, int device);

// cross_entropy.cu: the arguments of the CPU twin (csrc/cpu/cpu_ops.h); loss and z_part fp32. A
// target outside [0, vocab) that is not ignore_index gives its row a NaN loss and gradient.
// token_scaling as the CPU's (its stats are torch ops' in pyllm/ops/cross_entropy.py).
void cross_entropy_cuda(uintptr_t logits, uintptr_t targets, uintptr_t loss, uintptr_t z_part, uintptr_t grad,
                        uintptr_t grad_rows, int64_t rows, int64_t vocab, int64_t stride, int64_t grad_stride, int64_t ignore_index,
                        double scale, double softcap, double label_smoothing, double z_loss, double grad_scale,
                        int dtype, int device, uintptr_t stream, bool token_scaling);

// distill.cu: the arguments of the CPU twin (csrc/cpu/cpu_ops.h); loss and grad_rows fp32.
void distill_cuda(uintptr_t student, uintptr_t teacher, uintptr_t loss, uintptr_t grad, uintptr_t grad_rows,
                  int64_t rows, int64_t vocab, int64_t student_stride, int64_t teacher_stride, int64_t grad_stride,
                  double scale, double softcap, double teacher_scale, double teacher_softcap, double temperature,
                  double beta, double grad_scale, int dtype, int device, uintptr_t stream);

// rope.cu: the arguments of the CPU twin (csrc/cpu/cpu_ops.h); cos / sin fp32.
void rope_cuda(uintptr_t x, uintptr_t cos, uintptr_t sin, uintptr_t out, int64_t batch, int64_t seqlen,
               int64_t n_heads, int64_t head_dim, int64_t half, const std::vector<int64_t>& x_strides,
               const std::vector<int64_t>& out_strides, int64_t cs_batch_stride, bool inverse, int dtype, int device,
               uintptr_t stream, bool interleaved = false);

// adamw.cu: `table` is the host int64[7][n_tensors] of csrc/cpu/adamw.cpp; partials a device
// double[>= total chunks] workspace; sumsq a device double, added to.
void adamw_grad_sumsq_cuda(uintptr_t table, int64_t n_tensors, int dtype, uintptr_t partials, int64_t partials_len,
                           uintptr_t sumsq, int device, uintptr_t stream);
void adamw_step_cuda(uintptr_t table, int64_t n_tensors, int param_dtype, bool has_master, double lr, double beta1,
                     double beta2, double eps, double weight_decay, uintptr_t sumsq, uintptr_t loss_scale,
                     double max_grad_norm, bool stochastic_rounding, uint64_t seed, int device, uintptr_t stream);
// flash_attn_fwd.cu, flash_attn_bwd.cu, flash_attn_decode.cu: the arguments of the CPU twins
// (csrc/cpu/cpu_ops.h), plus the device and stream. fp16 / bf16 only, sm80+. alibi_slopes: fp32 in
// device memory, not read on the host (finite: the caller's to check).
void flash_attn_fwd_cuda(uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out, uintptr_t lse, uintptr_t cu_seqlens_q,
                         uintptr_t cu_seqlens_k, uintptr_t seqused_k, int64_t batch, int64_t seqlen_q,
                         int64_t seqlen_k, int64_t n_heads, int64_t n_kv_heads, int64_t head_dim,
                         const std::vector<int64_t>& q_strides, const std::vector<int64_t>& k_strides,
                         const std::vector<int64_t>& v_strides, const std::vector<int64_t>& o_strides,
                         const std::vector<int64_t>& lse_strides, double scale, int64_t window_left,
                         int64_t window_right, int dtype, int device, uintptr_t stream, int64_t total_q = -1,
                         int64_t total_k = -1,  // total_*: varlen's packed token counts (cu_seqlens clamped to them)
                         double softcap = 0.0, uintptr_t alibi_slopes = 0, int64_t alibi_batch_stride = 0,
                         double dropout_p = 0.0, uint64_t dropout_seed = 0);
void flash_attn_bwd_cuda(uintptr_t dout, uintptr_t dlse, uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out,
                         uintptr_t lse, uintptr_t dq, uintptr_t dk, uintptr_t dv, uintptr_t cu_seqlens_q,
                         uintptr_t cu_seqlens_k, int64_t batch, int64_t seqlen_q, int64_t seqlen_k,
                         int64_t n_heads, int64_t n_kv_heads, int64_t head_dim,
                         const std::vector<int64_t>& q_strides, const std::vector<int64_t>& k_strides,
                         const std::vector<int64_t>& v_strides, const std::vector<int64_t>& o_strides,
                         const std::vector<int64_t>& dkv_strides, const std::vector<int64_t>& lse_strides,
                         double scale, int64_t window_left, int64_t window_right, int dtype, bool deterministic,
                         int device, uintptr_t stream, int algo = 0,  // algo: 0 = mma, 1 = simt, 2 = atomic
                         int64_t total_q = -1, int64_t total_k = -1,
                         uintptr_t delta_ws = 0, int64_t delta_capacity = 0,  // fp32 scratch, lse's layout
                         uintptr_t dq_accum_ws = 0, int64_t dq_accum_capacity = 0,  // fp32, algo 2 (see .cu)
                         double softcap = 0.0, uintptr_t alibi_slopes = 0, int64_t alibi_batch_stride = 0,
                         double dropout_p = 0.0, uint64_t dropout_seed = 0);
void flash_attn_decode_cuda(uintptr_t q, uintptr_t k_cache, uintptr_t v_cache, uintptr_t out, uintptr_t lse,
                            uintptr_t seqused_k, int64_t batch, int64_t seqlen_q, int64_t capacity, int64_t n_heads,
                            int64_t n_kv_heads, int64_t head_dim, const std::vector<int64_t>& q_strides,
                            const std::vector<int64_t>& k_strides, const std::vector<int64_t>& v_strides,
                            const std::vector<int64_t>& o_strides, const std::vector<int64_t>& lse_strides,
                            double scale, int64_t window_left, int64_t window_right, int dtype, int device,
                            uintptr_t stream, uintptr_t workspace, int64_t workspace_bytes,
                            uintptr_t kv_batch_idx = 0, uintptr_t kv_leftpad = 0, uintptr_t block_table = 0,
                            int64_t block_table_stride = 0, int64_t page_size = 0, int64_t kv_rows = 0,
                            double softcap = 0.0, uintptr_t alibi_slopes = 0, int64_t alibi_batch_stride = 0);
int64_t flash_attn_decode_workspace_cuda(int64_t batch, int64_t seqlen_q, int64_t capacity, int64_t n_heads,
                                         int64_t head_dim, int device);

}  // namespace pyllm
