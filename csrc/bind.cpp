// The only pybind11 code: module pyllm._C. One m.def per launcher, no logic. Launchers release
// the GIL so that Python threads (and encode_batch-style callers) run kernels concurrently.
#include <pybind11/pybind11.h>

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

  m.def("adamw_grad_sumsq_cpu", &pyllm::adamw_grad_sumsq_cpu, nogil, arg("table"), arg("n_tensors"), arg("dtype"),
        arg("sumsq"));
  m.def("adamw_step_cpu", &pyllm::adamw_step_cpu, nogil, arg("table"), arg("n_tensors"), arg("param_dtype"),
        arg("has_master"), arg("lr"), arg("beta1"), arg("beta2"), arg("eps"), arg("weight_decay"), arg("sumsq"),
        arg("loss_scale"), arg("max_grad_norm"), arg("stochastic_rounding"), arg("seed"));

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

  m.def("adamw_grad_sumsq_cuda", &pyllm::adamw_grad_sumsq_cuda, nogil, arg("table"), arg("n_tensors"), arg("dtype"),
        arg("partials"), arg("partials_len"), arg("sumsq"), arg("device"), arg("stream"));
  m.def("adamw_step_cuda", &pyllm::adamw_step_cuda, nogil, arg("table"), arg("n_tensors"), arg("param_dtype"),
        arg("has_master"), arg("lr"), arg("beta1"), arg("beta2"), arg("eps"), arg("weight_decay"), arg("sumsq"),
        arg("loss_scale"), arg("max_grad_norm"), arg("stochastic_rounding"), arg("seed"), arg("device"),
        arg("stream"));
#else
  m.attr("has_cuda") = false;
  m.attr("cuda_archs") = "";
#endif
}
