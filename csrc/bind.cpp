// The only pybind11 code: module pyllm._C. One m.def per launcher, no logic. Launchers release
// the GIL so that Python threads (and encode_batch-style callers) run kernels concurrently.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "cpu/bpe.h"
#include "cpu/dispatch.h"
#ifdef PYLLM_WITH_CUDA
#include "cuda/cuda_ops.h"
#endif

namespace py = pybind11;
using py::arg;

namespace {
// BPE ids go back as Python lists of ints. A fresh int object per token costs more than encoding
// the token; ids repeat, so each list refers to one shared int per id value (made on first use,
// kept for the process; ids >= kSharedIds get fresh ints). Runs with the GIL held.
py::list bpe_ids_to_list(const std::vector<uint32_t>& ids) {
  constexpr uint32_t kSharedIds = 1u << 22;
  static std::vector<PyObject*> shared;
  py::list out(ids.size());
  for (size_t k = 0; k < ids.size(); ++k) {
    const uint32_t id = ids[k];
    PyObject* obj;
    if (id < kSharedIds) {
      if (id >= shared.size()) shared.resize(std::min<size_t>(kSharedIds, std::max<size_t>(id + 1, 2 * shared.size())), nullptr);
      if (shared[id] == nullptr && (shared[id] = PyLong_FromUnsignedLong(id)) == nullptr) throw py::error_already_set();
      obj = shared[id];
      Py_INCREF(obj);
    } else if ((obj = PyLong_FromUnsignedLong(id)) == nullptr) {
      throw py::error_already_set();
    }
    PyList_SET_ITEM(out.ptr(), k, obj);
  }
  return out;
}

// Runs a const member of the encoder with the GIL released and returns its ids as a list.
template <typename... Args>
auto bpe_ids(std::vector<uint32_t> (pyllm::bpe::Encoder::*method)(Args...) const) {
  return [method](const pyllm::bpe::Encoder& e, Args... args) {
    std::vector<uint32_t> ids;
    {
      py::gil_scoped_release nogil;
      ids = (e.*method)(args...);
    }
    return bpe_ids_to_list(ids);
  };
}

// A batch as (ids uint32, offsets int64 of len(batch) + 1) numpy arrays that own their memory:
// no Python int per token. The flattening runs with the GIL released.
py::tuple bpe_batch_to_arrays(std::vector<std::vector<uint32_t>>&& batch) {
  auto* ids = new std::vector<uint32_t>();
  auto* offsets = new std::vector<int64_t>(batch.size() + 1, 0);
  {
    py::gil_scoped_release nogil;
    for (size_t k = 0; k < batch.size(); ++k) (*offsets)[k + 1] = (*offsets)[k] + int64_t(batch[k].size());
    ids->reserve(size_t(offsets->back()));
    for (auto& part : batch) {
      ids->insert(ids->end(), part.begin(), part.end());
      std::vector<uint32_t>().swap(part);
    }
  }
  py::capsule own_ids(ids, [](void* p) { delete static_cast<std::vector<uint32_t>*>(p); });
  py::capsule own_offsets(offsets, [](void* p) { delete static_cast<std::vector<int64_t>*>(p); });
  return py::make_tuple(py::array_t<uint32_t>({ids->size()}, {sizeof(uint32_t)}, ids->data(), own_ids),
                        py::array_t<int64_t>({offsets->size()}, {sizeof(int64_t)}, offsets->data(), own_offsets));
}

py::list bpe_batch_to_list(const std::vector<std::vector<uint32_t>>& batch) {
  py::list out(batch.size());
  for (size_t k = 0; k < batch.size(); ++k) out[k] = bpe_ids_to_list(batch[k]);
  return out;
}

#ifdef PYLLM_WITH_CUDA
// The CUDA encoder's destructor waits for the whole device (cudaDeviceSynchronize) before freeing
// its tables, which can take as long as any kernel another thread queued: it runs without the GIL.
// Safe: the destructor touches no Python object, pybind11 deregisters the instance before it
// destroys the holder (no other thread can reach it) and drops keep_alive's Encoder only after.
struct DeleteWithoutGil {
  void operator()(pyllm::bpe::CudaEncoder* encoder) const {
    py::gil_scoped_release nogil;
    delete encoder;
  }
};
#endif
}  // namespace

// The contract between pyllm's Python and this module: bumped with pyllm/__init__.py's _ABI whenever
// a binding's arguments or the buffers it writes change meaning (2: the cross-entropy kernel's token
// statistics went from two per row to three; 3: cross_entropy_cpu / _cuda take token_scaling). A build
// left from older sources fails the import instead of writing an old layout into new buffers (an
// editable install pulled, not rebuilt).
constexpr int kAbi = 3;

PYBIND11_MODULE(_C, m) {
  m.doc() = "pyllm kernels (C++ CPU; CUDA when built with nvcc)";
  m.attr("abi") = kAbi;
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  // The CPU kernels' copy this process runs (one in a default build; a dispatch build's highest
  // level this CPU runs, or PYLLM_CPU_LEVEL's: a bad value fails the import with the levels).
  const pyllm::CpuKernels& cpu = pyllm::cpu_kernels();

  m.def("swiglu_fwd_cpu", cpu.swiglu_fwd_cpu, nogil, arg("gate"), arg("up"), arg("out"), arg("rows"),
        arg("cols"), arg("in_stride"), arg("out_stride"), arg("dtype"), arg("activation"));
  m.def("swiglu_bwd_cpu", cpu.swiglu_bwd_cpu, nogil, arg("dout"), arg("gate"), arg("up"), arg("dgate"),
        arg("dup"), arg("rows"), arg("cols"), arg("in_stride"), arg("out_stride"), arg("dtype"), arg("activation"));

  m.def("rms_norm_fwd_cpu", cpu.rms_norm_fwd_cpu, nogil, arg("x"), arg("weight"), arg("out"), arg("rstd"),
        arg("rows"), arg("cols"), arg("eps"), arg("offset"), arg("cast_first"), arg("dtype"));
  m.def("rms_norm_bwd_cpu", cpu.rms_norm_bwd_cpu, nogil, arg("dout"), arg("x"), arg("weight"), arg("rstd"),
        arg("dx"), arg("dweight"), arg("rows"), arg("cols"), arg("offset"), arg("cast_first"), arg("dtype"),
        arg("dweight_fp32") = false);

  m.def("cross_entropy_cpu", cpu.cross_entropy_cpu, nogil, arg("logits"), arg("targets"), arg("loss"),
        arg("z_part"), arg("grad"), arg("grad_rows"), arg("rows"), arg("vocab"), arg("stride"), arg("grad_stride"), arg("ignore_index"),
        arg("scale"), arg("softcap"), arg("label_smoothing"), arg("z_loss"), arg("grad_scale"), arg("dtype"),
        arg("stats") = 0, arg("token_scaling") = false);

  m.def("distill_cpu", cpu.distill_cpu, nogil, arg("student"), arg("teacher"), arg("loss"), arg("grad"),
        arg("grad_rows"), arg("rows"), arg("vocab"), arg("student_stride"), arg("teacher_stride"), arg("grad_stride"),
        arg("scale"), arg("softcap"), arg("teacher_scale"), arg("teacher_softcap"), arg("temperature"), arg("beta"),
        arg("grad_scale"), arg("dtype"));

  m.def("rope_cpu", cpu.rope_cpu, nogil, arg("x"), arg("cos"), arg("sin"), arg("out"), arg("batch"),
        arg("seqlen"), arg("n_heads"), arg("head_dim"), arg("half"), arg("x_strides"), arg("out_strides"),
        arg("cs_batch_stride"), arg("inverse"), arg("dtype"), arg("interleaved") = false);

  m.def("adamw_grad_sumsq_cpu", cpu.adamw_grad_sumsq_cpu, nogil, arg("table"), arg("n_tensors"), arg("dtype"),
        arg("sumsq"));
  m.def("adamw_step_cpu", cpu.adamw_step_cpu, nogil, arg("table"), arg("n_tensors"), arg("param_dtype"),
        arg("has_master"), arg("lr"), arg("beta1"), arg("beta2"), arg("eps"), arg("weight_decay"), arg("sumsq"),
        arg("loss_scale"), arg("max_grad_norm"), arg("stochastic_rounding"), arg("seed"));
  // Byte-level BPE (csrc/cpu/bpe*.cpp): classes, as the encoder and trainer hold state. Strings
  // arrive as UTF-8 views of the Python str objects (no copy); ids return as lists.
  {
    using pyllm::bpe::Encoder;
    using pyllm::bpe::Trainer;
    py::class_<Encoder>(m, "BpeEncoder")
        .def(py::init<const std::vector<std::string>&, const std::vector<uint32_t>&, int,
                      const std::vector<std::string>&, const std::vector<uint32_t>&>(),
             nogil, arg("tokens"), arg("ranks"), arg("pattern"), arg("special_tokens"), arg("special_ids"))
        .def(py::init<const std::vector<std::string>&, const std::vector<uint32_t>&, const std::vector<std::string>&,
                      const std::vector<uint32_t>&, const std::vector<uint32_t>&, const std::vector<uint32_t>&, uint32_t,
                      bool, bool>(),
             nogil, arg("tokens"), arg("ranks"), arg("special_tokens"), arg("special_ids"), arg("merges"),
             arg("byte_fallback"), arg("unk_id"), arg("fuse_unk"), arg("whole_first"))
        .def_property_readonly("char_level", &Encoder::char_level)
        .def("encode_ordinary", bpe_ids(&Encoder::encode_ordinary), arg("text"))
        .def("encode", bpe_ids(&Encoder::encode), arg("text"), arg("allowed"), arg("disallowed"))
        .def("encode_batch",
             [](const Encoder& e, const std::vector<std::string_view>& texts, const std::vector<uint32_t>& allowed,
                const std::vector<uint32_t>& disallowed, int num_threads) {
               std::vector<std::vector<uint32_t>> ids;
               {
                 py::gil_scoped_release nogil;
                 ids = e.encode_batch(texts, allowed, disallowed, num_threads);
               }
               return bpe_batch_to_list(ids);
             },
             arg("texts"), arg("allowed"), arg("disallowed"), arg("num_threads"))
        .def("encode_batch_packed",
             [](const Encoder& e, const std::vector<std::string_view>& texts, const std::vector<uint32_t>& allowed,
                const std::vector<uint32_t>& disallowed, int num_threads) {
               std::vector<std::vector<uint32_t>> ids;
               {
                 py::gil_scoped_release nogil;
                 ids = e.encode_batch(texts, allowed, disallowed, num_threads);
               }
               return bpe_batch_to_arrays(std::move(ids));
             },
             arg("texts"), arg("allowed"), arg("disallowed"), arg("num_threads"))
        .def("encode_pieces", bpe_ids(&Encoder::encode_pieces), arg("pieces"))
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
    m.def("bpe_safe_cuts", &pyllm::bpe::safe_cut_offsets, nogil, arg("pattern"), arg("text"), arg("span_bytes"));
  }
  // flash_attn
  m.def("flash_attn_fwd_cpu", cpu.flash_attn_fwd_cpu, nogil, arg("q"), arg("k"), arg("v"), arg("out"),
        arg("lse"), arg("cu_seqlens_q"), arg("cu_seqlens_k"), arg("seqused_k"), arg("batch"), arg("seqlen_q"),
        arg("seqlen_k"), arg("n_heads"), arg("n_kv_heads"), arg("head_dim"), arg("q_strides"), arg("k_strides"),
        arg("v_strides"), arg("o_strides"), arg("lse_strides"), arg("scale"), arg("window_left"),
        arg("window_right"), arg("dtype"), arg("softcap") = 0.0, arg("alibi_slopes") = 0,
        arg("alibi_batch_stride") = 0, arg("kv_batch_idx") = 0, arg("kv_leftpad") = 0, arg("block_table") = 0,
        arg("block_table_stride") = 0, arg("page_size") = 0, arg("kv_rows") = 0, arg("dropout_p") = 0.0,
        arg("dropout_seed") = 0);
  m.def("flash_attn_bwd_cpu", cpu.flash_attn_bwd_cpu, nogil, arg("dout"), arg("dlse"), arg("q"), arg("k"),
        arg("v"), arg("out"), arg("lse"), arg("dq"), arg("dk"), arg("dv"), arg("cu_seqlens_q"),
        arg("cu_seqlens_k"), arg("batch"), arg("seqlen_q"), arg("seqlen_k"), arg("n_heads"), arg("n_kv_heads"),
        arg("head_dim"), arg("q_strides"), arg("k_strides"), arg("v_strides"), arg("o_strides"),
        arg("dkv_strides"), arg("lse_strides"), arg("scale"), arg("window_left"), arg("window_right"),
        arg("dtype"), arg("softcap") = 0.0, arg("alibi_slopes") = 0, arg("alibi_batch_stride") = 0,
        arg("dropout_p") = 0.0, arg("dropout_seed") = 0);

  m.def("flash_attn_cpu_bf16_dot", cpu.flash_attn_cpu_bf16_dot);
  m.def("flash_attn_cpu_amx", cpu.flash_attn_cpu_amx);
  m.def("flash_attn_cpu_scratch_bytes", cpu.flash_attn_cpu_scratch_bytes);
  // Which CPU kernel paths the running copy was compiled with, its level and the build's levels.
  m.attr("cpu_isa") = cpu.cpu_isa();
  m.attr("cpu_level") = cpu.level;
  m.attr("cpu_levels") = pyllm::cpu_levels();
  // Whether the CPU kernels were built with OpenMP (without it, e.g. Apple clang, they run on one thread).
#ifdef _OPENMP
  m.attr("cpu_openmp") = true;
#else
  m.attr("cpu_openmp") = false;
#endif

#ifdef PYLLM_WITH_CUDA
  m.attr("has_cuda") = true;
  m.attr("cuda_archs") = PYLLM_CUDA_ARCHS;
  m.def("cuda_device_count", &pyllm::cuda_device_count);
  m.def("cuda_runtime_version", &pyllm::cuda_runtime_version);

  py::class_<pyllm::bpe::CudaEncoder, std::unique_ptr<pyllm::bpe::CudaEncoder, DeleteWithoutGil>>(m, "BpeCudaEncoder")
      .def(py::init<const pyllm::bpe::Encoder&, int>(), py::keep_alive<1, 2>(), nogil, arg("encoder"), arg("device"))
      .def("encode_batch",
           [](const pyllm::bpe::CudaEncoder& e, const std::vector<std::string_view>& texts,
              const std::vector<uint32_t>& allowed, const std::vector<uint32_t>& disallowed, uintptr_t stream,
              int num_threads) {
             std::vector<std::vector<uint32_t>> ids;
             {
               py::gil_scoped_release nogil;
               ids = e.encode_batch(texts, allowed, disallowed, stream, num_threads);
             }
             return bpe_batch_to_list(ids);
           },
           arg("texts"), arg("allowed"), arg("disallowed"), arg("stream"), arg("num_threads"))
      .def("last_kernel_ms", &pyllm::bpe::CudaEncoder::last_kernel_ms);

  m.def("swiglu_fwd_cuda", &pyllm::swiglu_fwd_cuda, nogil, arg("gate"), arg("up"), arg("out"), arg("rows"),
        arg("cols"), arg("in_stride"), arg("out_stride"), arg("dtype"), arg("activation"), arg("device"),
        arg("stream"));
  m.def("swiglu_bwd_cuda", &pyllm::swiglu_bwd_cuda, nogil, arg("dout"), arg("gate"), arg("up"), arg("dgate"),
        arg("dup"), arg("rows"), arg("cols"), arg("in_stride"), arg("out_stride"), arg("dtype"), arg("activation"),
        arg("device"), arg("stream"));

  m.def("rms_norm_fwd_cuda", &pyllm::rms_norm_fwd_cuda, nogil, arg("x"), arg("weight"), arg("out"), arg("rstd"),
        arg("rows"), arg("cols"), arg("eps"), arg("offset"), arg("cast_first"), arg("dtype"), arg("device"),
        arg("stream"));
  m.def("rms_norm_bwd_cuda", &pyllm::rms_norm_bwd_cuda, nogil, arg("dout"), arg("x"), arg("weight"), arg("rstd"),
        arg("dx"), arg("dweight_partials"), arg("n_partials"), arg("rows"), arg("cols"), arg("offset"),
        arg("cast_first"), arg("dtype"), arg("device"), arg("stream"));
  m.def("rms_norm_partials_cuda", &pyllm::rms_norm_partials_cuda, nogil, arg("rows"), arg("cols"), arg("dtype"),
        arg("device"));

  m.def("cross_entropy_cuda", &pyllm::cross_entropy_cuda, nogil, arg("logits"), arg("targets"), arg("loss"),
        arg("z_part"), arg("grad"), arg("grad_rows"), arg("rows"), arg("vocab"), arg("stride"), arg("grad_stride"), arg("ignore_index"),
        arg("scale"), arg("softcap"), arg("label_smoothing"), arg("z_loss"), arg("grad_scale"), arg("dtype"),
        arg("device"), arg("stream"), arg("token_scaling") = false);

  m.def("distill_cuda", &pyllm::distill_cuda, nogil, arg("student"), arg("teacher"), arg("loss"), arg("grad"),
        arg("grad_rows"), arg("rows"), arg("vocab"), arg("student_stride"), arg("teacher_stride"), arg("grad_stride"),
        arg("scale"), arg("softcap"), arg("teacher_scale"), arg("teacher_softcap"), arg("temperature"), arg("beta"),
        arg("grad_scale"), arg("dtype"), arg("device"), arg("stream"));

  m.def("rope_cuda", &pyllm::rope_cuda, nogil, arg("x"), arg("cos"), arg("sin"), arg("out"), arg("batch"),
        arg("seqlen"), arg("n_heads"), arg("head_dim"), arg("half"), arg("x_strides"), arg("out_strides"),
        arg("cs_batch_stride"), arg("inverse"), arg("dtype"), arg("device"), arg("stream"),
        arg("interleaved") = false);

  m.def("adamw_grad_sumsq_cuda", &pyllm::adamw_grad_sumsq_cuda, nogil, arg("table"), arg("n_tensors"), arg("dtype"),
        arg("partials"), arg("partials_len"), arg("sumsq"), arg("device"), arg("stream"));
  m.def("adamw_step_cuda", &pyllm::adamw_step_cuda, nogil, arg("table"), arg("n_tensors"), arg("param_dtype"),
        arg("has_master"), arg("lr"), arg("beta1"), arg("beta2"), arg("eps"), arg("weight_decay"), arg("sumsq"),
        arg("loss_scale"), arg("max_grad_norm"), arg("stochastic_rounding"), arg("seed"), arg("device"),
        arg("stream"));
  // flash_attn
  m.def("flash_attn_fwd_cuda", &pyllm::flash_attn_fwd_cuda, nogil, arg("q"), arg("k"), arg("v"), arg("out"),
        arg("lse"), arg("cu_seqlens_q"), arg("cu_seqlens_k"), arg("seqused_k"), arg("batch"), arg("seqlen_q"),
        arg("seqlen_k"), arg("n_heads"), arg("n_kv_heads"), arg("head_dim"), arg("q_strides"), arg("k_strides"),
        arg("v_strides"), arg("o_strides"), arg("lse_strides"), arg("scale"), arg("window_left"),
        arg("window_right"), arg("dtype"), arg("device"), arg("stream"), arg("total_q") = -1, arg("total_k") = -1,
        arg("softcap") = 0.0, arg("alibi_slopes") = 0, arg("alibi_batch_stride") = 0, arg("dropout_p") = 0.0,
        arg("dropout_seed") = 0);
  m.def("flash_attn_bwd_cuda", &pyllm::flash_attn_bwd_cuda, nogil, arg("dout"), arg("dlse"), arg("q"), arg("k"),
        arg("v"), arg("out"), arg("lse"), arg("dq"), arg("dk"), arg("dv"), arg("cu_seqlens_q"),
        arg("cu_seqlens_k"), arg("batch"), arg("seqlen_q"), arg("seqlen_k"), arg("n_heads"), arg("n_kv_heads"),
        arg("head_dim"), arg("q_strides"), arg("k_strides"), arg("v_strides"), arg("o_strides"),
        arg("dkv_strides"), arg("lse_strides"), arg("scale"), arg("window_left"), arg("window_right"),
        arg("dtype"), arg("deterministic"), arg("device"), arg("stream"), arg("algo") = 0, arg("total_q") = -1,
        arg("total_k") = -1, arg("delta") = 0, arg("delta_capacity") = 0, arg("dq_accum") = 0,
        arg("dq_accum_capacity") = 0, arg("softcap") = 0.0, arg("alibi_slopes") = 0, arg("alibi_batch_stride") = 0,
        arg("dropout_p") = 0.0, arg("dropout_seed") = 0);
  m.def("flash_attn_decode_cuda", &pyllm::flash_attn_decode_cuda, nogil, arg("q"), arg("k_cache"), arg("v_cache"),
        arg("out"), arg("lse"), arg("seqused_k"), arg("batch"), arg("seqlen_q"), arg("capacity"), arg("n_heads"),
        arg("n_kv_heads"), arg("head_dim"), arg("q_strides"), arg("k_strides"), arg("v_strides"),
        arg("o_strides"), arg("lse_strides"), arg("scale"), arg("window_left"), arg("window_right"),
        arg("dtype"), arg("device"), arg("stream"), arg("workspace"), arg("workspace_bytes"), arg("kv_batch_idx") = 0,
        arg("kv_leftpad") = 0, arg("block_table") = 0, arg("block_table_stride") = 0, arg("page_size") = 0,
        arg("kv_rows") = 0, arg("softcap") = 0.0, arg("alibi_slopes") = 0, arg("alibi_batch_stride") = 0);
  m.def("flash_attn_decode_workspace_cuda", &pyllm::flash_attn_decode_workspace_cuda, arg("batch"), arg("seqlen_q"),
        arg("capacity"), arg("n_heads"), arg("head_dim"), arg("device"));
#else
  m.attr("has_cuda") = false;
  m.attr("cuda_archs") = "";
#endif
}
