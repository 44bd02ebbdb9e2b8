// The only pybind11 code: module pyllm._C. One m.def per launcher, no logic. Launchers release
// the GIL so that Python threads (and encode_batch-style callers) run kernels concurrently.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "cpu/bpe.h"
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

  // Byte-level BPE (csrc/cpu/bpe*.cpp): classes, as the encoder and trainer hold state. Strings
  // arrive as UTF-8 views of the Python str objects (no copy); ids return as lists.
  {
    using pyllm::bpe::Encoder;
    using pyllm::bpe::Trainer;
    py::class_<Encoder>(m, "BpeEncoder")
        .def(py::init<const std::vector<std::string>&, const std::vector<uint32_t>&, int,
                      const std::vector<std::string>&, const std::vector<uint32_t>&>(),
             nogil, arg("tokens"), arg("ranks"), arg("pattern"), arg("special_tokens"), arg("special_ids"))
        .def("encode_ordinary", &Encoder::encode_ordinary, nogil, arg("text"))
        .def("encode", &Encoder::encode, nogil, arg("text"), arg("allowed"), arg("disallowed"))
        .def("encode_batch", &Encoder::encode_batch, nogil, arg("texts"), arg("allowed"), arg("disallowed"),
             arg("num_threads"))
        .def("encode_pieces", &Encoder::encode_pieces, nogil, arg("pieces"))
        .def("decode_bytes", [](const Encoder& e, const std::vector<uint32_t>& ids) { return py::bytes(e.decode_bytes(ids)); },
             arg("ids"))
        .def("merge_triples", &Encoder::merge_triples)
        .def("byte_ranks", &Encoder::byte_ranks);
    py::class_<Trainer>(m, "BpeTrainer")
        .def(py::init<int>(), arg("pattern"))
        .def("count_texts", &Trainer::count_texts, nogil, arg("texts"), arg("num_threads"))
        .def("count_pieces", &Trainer::count_pieces, nogil, arg("pieces"), arg("counts"))
        .def("unique_pieces", &Trainer::unique_pieces)
        .def("merge", &Trainer::merge, nogil, arg("max_new_tokens"));
    m.def("bpe_pretokenize", &pyllm::bpe::pretokenize_offsets, nogil, arg("pattern"), arg("text"));
  }

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
#else
  m.attr("has_cuda") = false;
  m.attr("cuda_archs") = "";
#endif
}
