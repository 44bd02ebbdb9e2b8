// Entry points of the CPU kernels, one block per op, bound in csrc/bind.cpp through the table of
// cpu/dispatch.h. Pointers arrive as integers (torch's data_ptr()), dtypes as the codes of
// common/dtype.h. cpu/dispatch.cpp includes this once per instruction-set level, with `pyllm`
// defined to that level's namespace (see CMakeLists.txt), so the guard is skipped there.
#ifndef PYLLM_CPU_OPS_EACH_LEVEL
#pragma once
#endif
#include <cstdint>
#include <vector>

namespace pyllm {

// isa.cpp: the kernel paths this copy of the kernels was compiled with ("avx512 avx512bf16 avx2+fma
// portable"): the code each file's #if on the compiler's instruction-set macros picks.
const char* cpu_isa();

// swiglu.cpp: activation is a GluActivation code (common/glu.h): 0 silu (SwiGLU), 1 gelu_tanh (GeGLU).
void swiglu_fwd_cpu(uintptr_t gate, uintptr_t up, uintptr_t out, int64_t rows, int64_t cols,
                    int64_t in_stride, int64_t out_stride, int dtype, int activation);
void swiglu_bwd_cpu(uintptr_t dout, uintptr_t gate, uintptr_t up, uintptr_t dgate, uintptr_t dup,
                    int64_t rows, int64_t cols, int64_t in_stride, int64_t out_stride, int dtype, int activation);

// rms_norm.cpp: x, out, dout, dx contiguous (rows, cols); weight, dweight (cols) or 0 for none;
// rstd (rows) in the math type (fp32; fp64 for fp64).
void rms_norm_fwd_cpu(uintptr_t x, uintptr_t weight, uintptr_t out, uintptr_t rstd, int64_t rows, int64_t cols,
                      double eps, double offset, bool cast_first, int dtype);
void rms_norm_bwd_cpu(uintptr_t dout, uintptr_t x, uintptr_t weight, uintptr_t rstd, uintptr_t dx, uintptr_t dweight,
                      int64_t rows, int64_t cols, double offset, bool cast_first, int dtype, bool dweight_fp32);

// cross_entropy.cpp: logits (rows, vocab), rows `stride` elements apart; targets int64 (rows), any
// value outside [0, vocab) but ignore_index throws; loss and z_part (rows) in the math type (fp32;
// fp64 for fp64), z_part 0 for none; grad 0 for none, else (rows, vocab) at grad_stride, which may
// be logits itself (the gradient then overwrites them), times grad_scale and, where grad_rows is
// not 0, that row's entry of grad_rows (rows, the math type). softcap 0: no cap. stats 0 for none,
// else (rows, 3) in the math type: each row's entropy, whether its target is the first argmax, and
// its mean final logit. token_scaling: each row's loss, z-loss share and gradient times its target's
// probability, held constant (DFT).
void cross_entropy_cpu(uintptr_t logits, uintptr_t targets, uintptr_t loss, uintptr_t z_part, uintptr_t grad,
                       uintptr_t grad_rows, int64_t rows, int64_t vocab, int64_t stride, int64_t grad_stride, int64_t ignore_index,
                       double scale, double softcap, double label_smoothing, double z_loss, double grad_scale,
                       int dtype, uintptr_t stats, bool token_scaling);

// distill.cpp: student and teacher logits (rows, vocab), rows `student_stride` / `teacher_stride`
// elements apart (the teacher's may be 0: one row for all); loss (rows) in the math type (fp32;
// fp64 for fp64); grad 0 for none, else d(row's divergence) / d(student's logits) (rows, vocab) at
// grad_stride, which may be the student's logits (then overwritten), times grad_scale and, where
// grad_rows is not 0, that row's entry of grad_rows (rows, the math type). softcaps 0: no cap.
void distill_cpu(uintptr_t student, uintptr_t teacher, uintptr_t loss, uintptr_t grad, uintptr_t grad_rows,
                 int64_t rows, int64_t vocab, int64_t student_stride, int64_t teacher_stride, int64_t grad_stride,
                 double scale, double softcap, double teacher_scale, double teacher_softcap, double temperature,
                 double beta, double grad_scale, int dtype);

// rope.cpp: x, out (batch, seqlen, n_heads, head_dim) at element strides (batch, token, head), last dim
// contiguous; cos, sin rows of `half` in the math type (fp32; fp64 for fp64), cs_batch_stride apart per
// batch row (0: shared). Rotates dims [0, 2 * half); inverse: by minus the angle; interleaved: the
// pairs (2i, 2i + 1), else (i, i + half).
void rope_cpu(uintptr_t x, uintptr_t cos, uintptr_t sin, uintptr_t out, int64_t batch, int64_t seqlen,
              int64_t n_heads, int64_t head_dim, int64_t half, const std::vector<int64_t>& x_strides,
              const std::vector<int64_t>& out_strides, int64_t cs_batch_stride, bool inverse, int dtype,
              bool interleaved = false);

// adamw.cpp: `table` is int64[7][n_tensors] (param, grad, master, exp_avg, exp_avg_sq, step, numel).
void adamw_grad_sumsq_cpu(uintptr_t table, int64_t n_tensors, int dtype, uintptr_t sumsq);
void adamw_step_cpu(uintptr_t table, int64_t n_tensors, int param_dtype, bool has_master, double lr, double beta1,
                    double beta2, double eps, double weight_decay, uintptr_t sumsq, uintptr_t loss_scale,
                    double max_grad_norm, bool stochastic_rounding, uint64_t seed);
// Bytes of CPU attention scratch held now; between calls, what the threads keep for the next one
// (at most kKeptScratchBytes per thread and kernel and kKeptScratchThreadBytes per thread, see flash_attn.h).
int64_t flash_attn_cpu_scratch_bytes();
// Whether bf16 attention takes the vdpbf16ps scores in this process (see flash_attn.cpp).
bool flash_attn_cpu_bf16_dot();
// Whether the bf16 forward runs on AMX tiles in this process: "on", "off" (PYLLM_ATTN_CPU_AMX=0) or
// "unavailable" (not in this build, or the CPU or kernel does not allow it; see flash_attn_amx.cpp).
const char* flash_attn_cpu_amx();
// flash_attn.cpp (layout and argument meaning: common/attn_params.h). Strides are
// (batch, token, head) in elements; lse_strides (batch, head). Causal is window_right = 0.
// alibi_slopes: fp32 (n_heads,) (alibi_batch_stride 0) or (batch, n_heads) rows alibi_batch_stride
// apart, or 0 for none. dropout_p, dropout_seed: dropout on the probabilities (not with seqused_k),
// see attn_params.h. KV-cache calls (seqused_k) only: kv_batch_idx, kv_leftpad (int32 (batch,)),
// block_table (int32, rows block_table_stride apart; k / v then (blocks, page_size, Hkv, D) with
// seqlen_k the capacity a row of the table addresses), kv_rows: k / v's batch rows or blocks.
void flash_attn_fwd_cpu(uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out, uintptr_t lse, uintptr_t cu_seqlens_q,
                        uintptr_t cu_seqlens_k, uintptr_t seqused_k, int64_t batch, int64_t seqlen_q,
                        int64_t seqlen_k, int64_t n_heads, int64_t n_kv_heads, int64_t head_dim,
                        const std::vector<int64_t>& q_strides, const std::vector<int64_t>& k_strides,
                        const std::vector<int64_t>& v_strides, const std::vector<int64_t>& o_strides,
                        const std::vector<int64_t>& lse_strides, double scale, int64_t window_left,
                        int64_t window_right, int dtype, double softcap = 0.0, uintptr_t alibi_slopes = 0,
                        int64_t alibi_batch_stride = 0, uintptr_t kv_batch_idx = 0, uintptr_t kv_leftpad = 0,
                        uintptr_t block_table = 0, int64_t block_table_stride = 0, int64_t page_size = 0,
                        int64_t kv_rows = 0, double dropout_p = 0.0, uint64_t dropout_seed = 0);
void flash_attn_bwd_cpu(uintptr_t dout, uintptr_t dlse, uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out,
                        uintptr_t lse, uintptr_t dq, uintptr_t dk, uintptr_t dv, uintptr_t cu_seqlens_q,
                        uintptr_t cu_seqlens_k, int64_t batch, int64_t seqlen_q, int64_t seqlen_k,
                        int64_t n_heads, int64_t n_kv_heads, int64_t head_dim,
                        const std::vector<int64_t>& q_strides, const std::vector<int64_t>& k_strides,
                        const std::vector<int64_t>& v_strides, const std::vector<int64_t>& o_strides,
                        const std::vector<int64_t>& dkv_strides, const std::vector<int64_t>& lse_strides,
                        double scale, int64_t window_left, int64_t window_right, int dtype, double softcap = 0.0,
                        uintptr_t alibi_slopes = 0, int64_t alibi_batch_stride = 0, double dropout_p = 0.0,
                        uint64_t dropout_seed = 0);

}  // namespace pyllm
