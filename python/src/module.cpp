// taskvec._taskvec: the Python binding of taskvec's engine (pybind11). The pure-Python layer
// (python/taskvec/__init__.py) builds on it; everything here calls the same engine functions as the CLI,
// with the GIL released while they run (docs/PYTHON.md).
//
//   Checkpoint.open(path)            include/taskvec/checkpoint.hpp: any format the CLI opens
//   Checkpoint.read(name)            numpy array: the tensor decoded (float32 for F16/BF16/F8; F32/F64 and
//                                    integers as they are; BOOL as bool)
//   Checkpoint.read_raw(name)        bytes of its canonical little-endian encoding (for torch bf16)
//   linear_edit(base, scale, terms, output, options)         include/taskvec/engine.hpp
//   merge(recipe_file_or_text, output, options)              include/taskvec/merge.hpp (merge_stages)
//   similarity(pretrained|None, [(name, ckpt)], options)     task_vector_similarity
//   write_safetensors(path, [(name, dtype, shape, bytes)], metadata)
// Errors are taskvec.Error with .code = error_code_name (e.g. "shape_mismatch") and the engine's message.
#include <pybind11/functional.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <pybind11/stl/filesystem.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "taskvec/checkpoint.hpp"
#include "taskvec/dtype.hpp"
#include "taskvec/engine.hpp"
#include "taskvec/error.hpp"
#include "taskvec/merge.hpp"
#include "taskvec/safetensors.hpp"

namespace py = pybind11;
namespace fs = std::filesystem;

namespace {

using taskvec::Checkpoint;
using taskvec::DType;

PyObject* g_error = nullptr;  // taskvec.Error

// A Checkpoint shared by every Python object that refers to it (expressions keep their inputs alive).
struct PyCheckpoint {
  std::shared_ptr<Checkpoint> ckpt;
  // Read-only maps of its safetensors files, made on the first zero-copy read of each (shared by copies).
  std::shared_ptr<std::map<fs::path, std::shared_ptr<const taskvec::SafetensorsFile>>> maps =
      std::make_shared<std::map<fs::path, std::shared_ptr<const taskvec::SafetensorsFile>>>();
  const taskvec::CheckpointTensor& at(const std::string& name) const {
    if (const auto* t = ckpt->find(name)) return *t;
    throw py::key_error(name + " is not a tensor of " + ckpt->path().string());
  }
};

py::dtype numpy_dtype(DType d) {
  switch (d) {
    case DType::kF64: return py::dtype::of<double>();
    case DType::kI64: return py::dtype::of<std::int64_t>();
    case DType::kI32: return py::dtype::of<std::int32_t>();
    case DType::kI16: return py::dtype::of<std::int16_t>();
    case DType::kI8: return py::dtype::of<std::int8_t>();
    case DType::kU64: return py::dtype::of<std::uint64_t>();
    case DType::kU32: return py::dtype::of<std::uint32_t>();
    case DType::kU16: return py::dtype::of<std::uint16_t>();
    case DType::kU8: return py::dtype::of<std::uint8_t>();
    case DType::kBool: return py::dtype::of<bool>();
    default: return py::dtype::of<float>();  // F32 as is; F16, BF16, F8 decoded to float32
  }
}

bool stored_as_is(DType d) {
  switch (d) {
    case DType::kF32: case DType::kF64: case DType::kI64: case DType::kI32: case DType::kI16: case DType::kI8:
    case DType::kU64: case DType::kU32: case DType::kU16: case DType::kU8: case DType::kBool:
      return true;
    default:
      return false;
  }
}

// A zero-copy view of a tensor stored as is in a safetensors file: the array points into a read-only
// map of the file, which it keeps alive; pages are read when the array is. Empty when the tensor is
// not plainly in such a file (an alias, an adapter's computed tensor, another format).
std::optional<py::array> mapped_view(const PyCheckpoint& c, const std::string& name, const taskvec::CheckpointTensor& t) {
  if (t.source->format() != "safetensors" || t.file().extension() != ".safetensors") return std::nullopt;
  auto& slot = (*c.maps)[t.file()];
  if (!slot) slot = taskvec::SafetensorsFile::open(t.file());
  const taskvec::TensorInfo* entry = slot->header().find(name);
  if (entry == nullptr || entry->dtype != t.info->dtype || entry->shape != t.info->shape ||
      entry->num_bytes() != t.info->num_bytes())
    return std::nullopt;
  const std::span<const std::byte> bytes = slot->tensor_bytes(*entry);
  std::vector<py::ssize_t> shape(entry->shape.begin(), entry->shape.end());
  auto* keep = new std::shared_ptr<const taskvec::SafetensorsFile>(slot);
  py::capsule owner(keep, [](void* p) { delete static_cast<std::shared_ptr<const taskvec::SafetensorsFile>*>(p); });
  // numpy computes C-contiguous strides from the shape; the data pointer is the map's (read-only).
  py::array view(numpy_dtype(entry->dtype), shape, static_cast<const void*>(bytes.data()), owner);
  py::detail::array_proxy(view.ptr())->flags &= ~py::detail::npy_api::NPY_ARRAY_WRITEABLE_;
  return view;
}

// The tensor as a numpy array, read-only: a zero-copy view of the file's map for F32 / F64 / integers /
// bool stored in a safetensors file, else a new array (one pread from the page cache; F16 / BF16 / F8
// decoded to float32).
py::array read_tensor(const PyCheckpoint& c, const std::string& name) {
  const taskvec::CheckpointTensor& t = c.at(name);
  const DType d = t.info->dtype;
  if (stored_as_is(d) && t.info->num_bytes() > 0)
    if (auto view = mapped_view(c, name, t)) return *view;
  std::vector<py::ssize_t> shape(t.info->shape.begin(), t.info->shape.end());
  py::array out(numpy_dtype(d), shape);
  const std::uint64_t n = t.info->num_elements();
  {
    py::gil_scoped_release release;
    if (stored_as_is(d)) {
      t.read(0, std::span<std::byte>(static_cast<std::byte*>(out.mutable_data()), t.info->num_bytes()));
    } else if (taskvec::dtype_is_editable(d)) {
      // Decode in pieces of 1 Mi elements: the raw bytes are never all in memory beside the floats.
      const std::uint64_t esize = taskvec::dtype_bits(d) / 8;
      constexpr std::uint64_t kPiece = 1u << 20;
      std::vector<std::byte> raw;
      float* dst = static_cast<float*>(out.mutable_data());
      for (std::uint64_t b = 0; b < n; b += kPiece) {
        const std::uint64_t m = std::min(kPiece, n - b);
        raw.resize(m * esize);
        t.read(b * esize, raw);
        taskvec::decode_to_f32(d, raw.data(), dst + b, m);
      }
    } else {
      throw taskvec::Error(taskvec::ErrorCode::kUnsupported,
                           "tensor '" + name + "' is " + std::string(taskvec::dtype_name(d)) +
                               ": read_raw() gives its bytes (no numpy dtype holds it)");
    }
  }
  py::detail::array_proxy(out.ptr())->flags &= ~py::detail::npy_api::NPY_ARRAY_WRITEABLE_;
  return out;
}

taskvec::EditOptions edit_options(const py::dict& o) {
  taskvec::EditOptions opt;
  // The options that are a flag or a text of EditOptions, by the Python keyword that sets them.
  const std::pair<const char*, bool*> flags[] = {
      {"force", &opt.write.force},           {"only_selected", &opt.only_selected},
      {"allow_nonfinite", &opt.allow_nonfinite}, {"clamp_overflow", &opt.clamp_overflow},
      {"untie_embeddings", &opt.untie_embeddings}, {"allow_crimes", &opt.allow_crimes},
      {"dry_run", &opt.dry_run}};
  const std::pair<const char*, std::string*> texts[] = {{"include", &opt.include}, {"exclude", &opt.exclude}};
  for (const auto& [k, v] : o) {
    const std::string key = py::cast<std::string>(k);
    if (v.is_none()) continue;
    const auto flag = std::find_if(std::begin(flags), std::end(flags), [&](const auto& f) { return key == f.first; });
    const auto text = std::find_if(std::begin(texts), std::end(texts), [&](const auto& t) { return key == t.first; });
    if (flag != std::end(flags)) {
      *flag->second = py::cast<bool>(v);
    } else if (text != std::end(texts)) {
      *text->second = py::cast<std::string>(v);
    } else if (key == "dtype") {
      const std::string name = py::cast<std::string>(v);
      const auto d = taskvec::parse_dtype_user(name);
      if (!d || !taskvec::dtype_is_writable_float(*d))
        throw py::value_error("dtype='" + name + "' is not a float dtype taskvec writes (f32, f16, bf16, f64, ...)");
      opt.out_dtype = *d;
    } else if (key == "threads") {
      const long t = py::cast<long>(v);
      if (t < 0) throw py::value_error("threads must be >= 0 (0 = every core)");
      opt.threads = static_cast<unsigned>(t);
    } else if (key == "memory_budget") {
      const long long b = py::cast<long long>(v);
      if (b < (1 << 20)) throw py::value_error("memory_budget must be at least 1 MiB (bytes)");
      opt.memory_budget = static_cast<std::uint64_t>(b);
    } else if (key == "max_shard_size") {
      const long long b = py::cast<long long>(v);
      if (b <= 0) throw py::value_error("max_shard_size must be > 0 bytes");
      opt.write.max_shard_size = static_cast<std::uint64_t>(b);
    } else if (key == "progress") {
      // Called from the engine's thread with the GIL taken again; an exception in it is printed as
      // unraisable and the edit goes on (it is not interrupted mid-write).
      auto fn = std::make_shared<py::function>(py::cast<py::function>(v));
      opt.on_progress = [fn](const taskvec::Progress& p) {
        py::gil_scoped_acquire gil;
        try {
          (*fn)(p.tensors_done, p.tensors_total, p.bytes_done, p.bytes_total);
        } catch (py::error_already_set& e) {
          e.discard_as_unraisable("taskvec progress callback");
        }
      };
    } else {
      throw py::type_error("unknown option '" + key + "'");
    }
  }
  return opt;
}

py::dict report_dict(const taskvec::EditReport& r) {
  py::dict d;
  std::vector<std::string> files;
  for (const auto& s : r.plan.shards) files.push_back(s.path.string());
  d["files"] = files;
  d["tensors_edited"] = r.tensors_edited;
  d["tensors_copied"] = r.tensors_copied;
  d["bytes_read"] = r.bytes_read;
  d["bytes_written"] = r.bytes_written;
  d["seconds"] = r.seconds;
  d["peak_chunk_bytes"] = r.peak_chunk_bytes;
  d["warnings"] = r.warnings;
  d["auxiliary_files"] = r.auxiliary_files;
  return d;
}

}  // namespace

PYBIND11_MODULE(_taskvec, m) {
  m.doc() = "taskvec's engine (C++), for the taskvec Python package";
  m.attr("__version__") = taskvec::taskvec_version();

  static py::exception<taskvec::Error> error(m, "Error", PyExc_Exception);
  g_error = error.ptr();
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const taskvec::Error& e) {
      py::object exc = py::reinterpret_steal<py::object>(PyObject_CallFunction(g_error, "s", e.what()));
      if (!exc) return;  // the Python error of the call is set
      exc.attr("code") = std::string(taskvec::error_code_name(e.code()));
      PyErr_SetObject(g_error, exc.ptr());
    }
  });

  py::class_<PyCheckpoint>(m, "Checkpoint")
      .def_static(
          "open",
          [](const fs::path& path) {
            std::shared_ptr<Checkpoint> c;
            {
              py::gil_scoped_release release;
              c = std::make_shared<Checkpoint>(Checkpoint::open(path));
            }
            return PyCheckpoint{std::move(c)};
          },
          py::arg("path"))
      .def_property_readonly("path", [](const PyCheckpoint& c) { return c.ckpt->path(); })
      .def_property_readonly("format", [](const PyCheckpoint& c) { return c.ckpt->format(); })
      .def_property_readonly("tensor_names", [](const PyCheckpoint& c) { return c.ckpt->tensor_names(); })
      .def_property_readonly("metadata", [](const PyCheckpoint& c) { return c.ckpt->metadata(); })
      .def_property_readonly("is_adapter", [](const PyCheckpoint& c) { return c.ckpt->is_adapter(); })
      .def("dtype", [](const PyCheckpoint& c, const std::string& n) { return std::string(taskvec::dtype_name(c.at(n).info->dtype)); })
      .def("shape", [](const PyCheckpoint& c, const std::string& n) {
        py::tuple t(c.at(n).info->shape.size());
        for (std::size_t i = 0; i < c.at(n).info->shape.size(); ++i) t[i] = c.at(n).info->shape[i];
        return t;
      })
      .def("contains", [](const PyCheckpoint& c, const std::string& n) { return c.ckpt->find(n) != nullptr; })
      .def("read", &read_tensor)
      .def("read_raw",
           [](const PyCheckpoint& c, const std::string& n) {
             const auto& t = c.at(n);
             std::string bytes(t.info->num_bytes(), '\0');
             {
               py::gil_scoped_release release;
               t.read(0, std::span<std::byte>(reinterpret_cast<std::byte*>(bytes.data()), bytes.size()));
             }
             return py::bytes(bytes);
           })
      .def("same", [](const PyCheckpoint& a, const PyCheckpoint& b) { return a.ckpt == b.ckpt; });

  m.def(
      "linear_edit",
      [](const PyCheckpoint& base, double base_scale, const std::vector<std::tuple<PyCheckpoint, double, bool>>& terms,
         const fs::path& output, const py::dict& options) {
        const taskvec::EditOptions opt = edit_options(options);
        std::vector<taskvec::LinearTerm> t;
        for (const auto& [c, coef, relative] : terms) t.push_back({c.ckpt.get(), coef, relative});
        taskvec::EditReport r;
        {
          py::gil_scoped_release release;
          r = taskvec::linear_edit(*base.ckpt, base_scale, t, output, opt);
        }
        return report_dict(r);
      },
      py::arg("base"), py::arg("base_scale"), py::arg("terms"), py::arg("output"), py::arg("options"));

  m.def(
      "make_task_vector",
      [](const PyCheckpoint& pretrained, const PyCheckpoint& finetuned, const fs::path& output, const py::dict& options) {
        const taskvec::EditOptions opt = edit_options(options);
        taskvec::EditReport r;
        {
          py::gil_scoped_release release;
          r = taskvec::make_task_vector(*pretrained.ckpt, *finetuned.ckpt, output, opt);
        }
        return report_dict(r);
      },
      py::arg("pretrained"), py::arg("finetuned"), py::arg("output"), py::arg("options"));

  m.def(
      "merge",
      [](const std::string& recipe, bool is_text, const fs::path& output, const py::dict& options) {
        const taskvec::EditOptions opt = edit_options(options);
        taskvec::EditReport r;
        {
          py::gil_scoped_release release;
          const std::vector<taskvec::Recipe> stages =
              is_text ? taskvec::parse_recipe_stages(recipe, "<recipe>") : taskvec::load_recipe_stages(recipe);
          r = taskvec::merge_stages(stages, output, opt);
        }
        return report_dict(r);
      },
      py::arg("recipe"), py::arg("is_text"), py::arg("output"), py::arg("options"));

  m.def(
      "similarity",
      [](std::optional<PyCheckpoint> pretrained, const std::vector<std::pair<std::string, PyCheckpoint>>& models,
         const py::dict& options) {
        const taskvec::EditOptions opt = edit_options(options);
        std::vector<std::pair<std::string, const Checkpoint*>> in;
        for (const auto& [n, c] : models) in.emplace_back(n, c.ckpt.get());
        taskvec::SimilarityReport r;
        {
          py::gil_scoped_release release;
          r = taskvec::task_vector_similarity(pretrained ? pretrained->ckpt.get() : nullptr, in, opt);
        }
        const auto matrix = [](const std::vector<std::vector<double>>& v) {
          py::array_t<double> a({v.size(), v.size()});
          auto w = a.mutable_unchecked<2>();
          for (std::size_t i = 0; i < v.size(); ++i)
            for (std::size_t j = 0; j < v.size(); ++j) w(i, j) = v[i][j];
          return a;
        };
        py::dict d;
        d["names"] = r.names;
        d["norms"] = py::array_t<double>(r.norms.size(), r.norms.data());
        d["cosine"] = matrix(r.cosine);
        d["sign_conflict"] = matrix(r.sign_conflict);
        d["compared"] = r.compared;
        d["warnings"] = r.warnings;
        return d;
      },
      py::arg("pretrained"), py::arg("models"), py::arg("options"));

  m.def(
      "write_safetensors",
      [](const fs::path& path, const std::vector<std::tuple<std::string, std::string, std::vector<std::uint64_t>, py::bytes>>& tensors,
         const std::map<std::string, std::string>& metadata) {
        std::vector<std::pair<taskvec::TensorSpec, std::vector<std::byte>>> data;
        for (const auto& [name, dtype, shape, bytes] : tensors) {
          const auto d = taskvec::parse_dtype(dtype);
          if (!d) throw py::value_error("unknown safetensors dtype '" + dtype + "' for tensor '" + name + "'");
          const std::string_view b = bytes;
          taskvec::TensorSpec spec{name, *d, shape};
          if (spec.num_bytes() != b.size())
            throw py::value_error("tensor '" + name + "': " + std::to_string(b.size()) + " bytes for shape and dtype " +
                                  dtype + " that need " + std::to_string(spec.num_bytes()));
          std::vector<std::byte> v(b.size());
          std::memcpy(v.data(), b.data(), b.size());
          data.emplace_back(std::move(spec), std::move(v));
        }
        py::gil_scoped_release release;
        taskvec::write_safetensors(path, data, metadata);
      },
      py::arg("path"), py::arg("tensors"), py::arg("metadata"));
}
