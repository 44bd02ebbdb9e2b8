// The only pybind11 code: module pyllm._C. One m.def per launcher, no logic. Launchers release
// the GIL so that Python threads (and encode_batch-style callers) run kernels concurrently.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "cpu/cpu_ops.h"
#ifdef PYLLM_WITH_CUDA
#include "cuda/cuda_ops.h"
#endif

namespace py = pybind11;
using py::arg;

PYBIND11_MODULE(_C, m) {
  m.doc() = "pyllm kernels (C++ CPU; CUDA when built with nvcc)";
  const auto nogil = py::call_guard<py::gil_scoped_release>();

  m.def("swiglu_fwd_cpu", &pyllm::swiglu_fwd_cpu, nogil, arg("gate"), arg("up"), arg("out"), arg("rows"),
        arg("cols"), arg("in_stride"), arg("out_stride"), arg("dtype"));
  m.def("swiglu_bwd_cpu", &pyllm::swiglu_bwd_cpu, nogil, arg("dout"), arg("gate"), arg("up"), arg("dgate"),
        arg("dup"), arg("rows"), arg("cols"), arg("in_stride"), arg("out_stride"), arg("dtype"));

  // flash_attn
  m.def("flash_attn_fwd_cpu", &pyllm::flash_attn_fwd_cpu, nogil, arg("q"), arg("k"), arg("v"), arg("out"),
        arg("lse"), arg("cu_seqlens_q"), arg("cu_seqlens_k"), arg("seqused_k"), arg("batch"), arg("seqlen_q"),
        arg("seqlen_k"), arg("n_heads"), arg("n_kv_heads"), arg("head_dim"), arg("q_strides"), arg("k_strides"),
        arg("v_strides"), arg("o_strides"), arg("lse_strides"), arg("scale"), arg("window_left"),
        arg("window_right"), arg("dtype"));
  m.def("flash_attn_bwd_cpu", &pyllm::flash_attn_bwd_cpu, nogil, arg("dout"), arg("dlse"), arg("q"), arg("k"),
        arg("v"), arg("out"), arg("lse"), arg("dq"), arg("dk"), arg("dv"), arg("cu_seqlens_q"),
        arg("cu_seqlens_k"), arg("batch"), arg("seqlen_q"), arg("seqlen_k"), arg("n_heads"), arg("n_kv_heads"),
        arg("head_dim"), arg("q_strides"), arg("k_strides"), arg("v_strides"), arg("o_strides"),
        arg("dkv_strides"), arg("lse_strides"), arg("scale"), arg("window_left"), arg("window_right"),
        arg("dtype"));

#ifdef PYLLM_WITH_CUDA
  m.attr("has_cuda") = true;
  m.attr("cuda_archs") = PYLLM_CUDA_ARCHS;
  m.def("cuda_device_count", &pyllm::cuda_device_count);
  m.def("cuda_runtime_version", &pyllm::cuda_runtime_version);

  m.def("swiglu_fwd_cuda", &pyllm::swiglu_fwd_cuda, nogil, arg("gate"), arg("up"), arg("out"), arg("rows"),
        arg("cols"), arg("in_stride"), arg("out_stride"), arg("dtype"), arg("device"), arg("stream"));
  m.def("swiglu_bwd_cuda", &pyllm::swiglu_bwd_cuda, nogil, arg("dout"), arg("gate"), arg("up"), arg("dgate"),
        arg("dup"), arg("rows"), arg("cols"), arg("in_stride"), arg("out_stride"), arg("dtype"), arg("device"),
        arg("stream"));

  // flash_attn
  m.def("flash_attn_fwd_cuda", &pyllm::flash_attn_fwd_cuda, nogil, arg("q"), arg("k"), arg("v"), arg("out"),
        arg("lse"), arg("cu_seqlens_q"), arg("cu_seqlens_k"), arg("seqused_k"), arg("batch"), arg("seqlen_q"),
        arg("seqlen_k"), arg("n_heads"), arg("n_kv_heads"), arg("head_dim"), arg("q_strides"), arg("k_strides"),
        arg("v_strides"), arg("o_strides"), arg("lse_strides"), arg("scale"), arg("window_left"),
        arg("window_right"), arg("dtype"), arg("device"), arg("stream"));
  m.def("flash_attn_bwd_cuda", &pyllm::flash_attn_bwd_cuda, nogil, arg("dout"), arg("dlse"), arg("q"), arg("k"),
        arg("v"), arg("out"), arg("lse"), arg("dq"), arg("dk"), arg("dv"), arg("cu_seqlens_q"),
        arg("cu_seqlens_k"), arg("batch"), arg("seqlen_q"), arg("seqlen_k"), arg("n_heads"), arg("n_kv_heads"),
        arg("head_dim"), arg("q_strides"), arg("k_strides"), arg("v_strides"), arg("o_strides"),
        arg("dkv_strides"), arg("lse_strides"), arg("scale"), arg("window_left"), arg("window_right"),
        arg("dtype"), arg("deterministic"), arg("device"), arg("stream"));
  m.def("flash_attn_decode_cuda", &pyllm::flash_attn_decode_cuda, nogil, arg("q"), arg("k_cache"), arg("v_cache"),
        arg("out"), arg("lse"), arg("seqused_k"), arg("batch"), arg("seqlen_q"), arg("capacity"), arg("n_heads"),
        arg("n_kv_heads"), arg("head_dim"), arg("q_strides"), arg("k_strides"), arg("v_strides"),
        arg("o_strides"), arg("lse_strides"), arg("scale"), arg("window_left"), arg("window_right"),
        arg("dtype"), arg("device"), arg("stream"));
#else
  m.attr("has_cuda") = false;
  m.attr("cuda_archs") = "";
#endif
}
