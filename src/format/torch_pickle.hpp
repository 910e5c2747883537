// taskvec format layer: a restricted unpickler for the data.pkl of a PyTorch checkpoint (internal
// header). It executes nothing: it interprets a fixed set of opcodes over its own object model and
// knows what the few callables torch.save references would build, without importing or calling them.
//
// What torch.save(state_dict) writes (protocol 2, `python -m pickletools data.pkl`):
//
//   \x80\x02                                   PROTO 2
//   c collections\nOrderedDict\n ) R           GLOBAL + EMPTY_TUPLE + REDUCE -> an empty dict
//   ( X'name'                                  MARK, BINUNICODE key
//     c torch._utils\n_rebuild_tensor_v2\n     the callable
//     ( ( X'storage' c torch\nFloatStorage\n X'0' X'cpu' K numel t Q    persistent id -> a storage
//       K offset  (K d0 K d1 \x86) (K s0 K s1 \x86)  \x89 (OrderedDict() R)   offset, size, stride,
//     t R                                      requires_grad, backward hooks; TUPLE + REDUCE -> tensor
//   ... u                                      SETITEMS
//   } X'_metadata' ... b                       BUILD: the OrderedDict's attribute state (ignored)
//   .                                          STOP
//
// Memo references (BINPUT / BINGET) share objects as pickle does. Parameters are
// _rebuild_parameter(tensor, requires_grad, hooks) around the same tensor.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "taskvec/dtype.hpp"

namespace taskvec::format_detail {

/// Largest data.pkl accepted, bytes (a state dict of 100,000 tensors needs ~10 MB).
inline constexpr std::uint64_t kMaxPickleBytes = std::uint64_t{64} << 20;
/// Most objects one pickle may create (each opcode makes at most one; ~25 per tensor).
inline constexpr std::uint64_t kMaxPickleObjects = 4'000'000;
/// Most references held in containers and on the stack together (BINGET repeats are counted).
inline constexpr std::uint64_t kMaxPickleReferences = 16'000'000;
/// Largest memo index accepted (picklers number memo slots 0, 1, 2, ...).
inline constexpr std::uint64_t kMaxPickleMemoIndex = kMaxPickleObjects;
/// Deepest stack and most open MARKs.
inline constexpr std::uint64_t kMaxPickleStack = 1'000'000;
inline constexpr std::uint64_t kMaxPickleMarks = 10'000;
/// Most dimensions of a tensor.
inline constexpr std::size_t kMaxTorchDims = 64;

/// One tensor of the state dict: a strided view of a storage (an archive entry `<prefix>/data/<key>`).
struct TorchTensorRecord {
  std::string name;                   ///< the state-dict key
  std::string storage_key;            ///< entry name below `<prefix>/data/`, e.g. "0"
  DType dtype = DType::kF32;          ///< from the storage class (FloatStorage -> F32, ...)
  std::uint64_t storage_numel = 0;    ///< elements in the whole storage
  std::uint64_t storage_offset = 0;   ///< elements
  std::vector<std::uint64_t> shape;   ///< empty = scalar
  std::vector<std::uint64_t> stride;  ///< elements, same rank as shape
};

/// The state dict found in a pickle.
struct TorchStateDict {
  std::vector<TorchTensorRecord> tensors;  ///< in pickle (insertion) order; names unique
  std::string nested_key;                  ///< "" when the top-level dict is the state dict, else "state_dict", "model" or "module"
  std::vector<std::string> notes;          ///< one sentence each: the nested key used, entries skipped
};

/// Interprets `pkl` (the bytes of data.pkl) without executing anything and returns its state dict.
///
/// Accepted opcodes: PROTO (2-5), FRAME, STOP, MARK, EMPTY_DICT/LIST/TUPLE, TUPLE, TUPLE1-3, APPEND(S),
/// SETITEM(S), BINUNICODE, SHORT_BINUNICODE, BINSTRING, SHORT_BINSTRING, BINBYTES, SHORT_BINBYTES,
/// BININT, BININT1, BININT2, LONG1 (<= 8 bytes), BINFLOAT, NEWTRUE, NEWFALSE, NONE, BINPUT, LONG_BINPUT,
/// MEMOIZE, BINGET, LONG_BINGET, GLOBAL, STACK_GLOBAL, REDUCE, BUILD, BINPERSID.
/// Allowed globals: collections.OrderedDict, torch._utils._rebuild_tensor_v2, _rebuild_parameter,
/// _rebuild_parameter_with_state, and torch.{Float,Half,BFloat16,Double,Long,Int,Short,Char,Byte,Bool}Storage.
/// REDUCE may call only OrderedDict() (no arguments) and the three rebuild functions; BUILD may only
/// set the attribute state of a dict (the OrderedDict's _metadata, dropped).
///
/// The result: the top-level dict if it holds a tensor (or is empty); else its "state_dict", "model"
/// or "module" value (first that is a dict holding a tensor), reported in nested_key and notes.
/// Non-tensor values of the state dict (ints, strings, nested dicts, None...) are skipped, one note each.
///
/// Throws, with messages starting with `label` and giving the byte offset in the pickle:
///  - Error{kUnsafePickle}: a GLOBAL / STACK_GLOBAL outside the allow-list (named module.name), an opcode
///    outside the set above (named), REDUCE of anything but an allowed callable, BUILD on a non-dict.
///  - Error{kUnsupported}: a torch storage class of a dtype taskvec lacks (e.g. ComplexFloatStorage).
///  - Error{kInvalidPickle}: truncated or malformed bytes, stack underflow, a missing MARK, a memo index
///    above kMaxPickleMemoIndex or unset, a string longer than the bytes left, LONG1 over 8 bytes, any
///    limit above exceeded, wrong argument types or counts for a rebuild call, a bad persistent id,
///    a storage key used with two dtypes or sizes, negative sizes/strides/offsets, shape and stride of
///    different ranks, an element count overflowing 64 bits, bytes after STOP, no STOP, a top-level
///    object that is not a dict or no state dict in it, a non-string key of a tensor.
///  - Error{kInvalidName}: a tensor name that is empty, not UTF-8 or has control characters.
TorchStateDict parse_torch_pickle(std::span<const std::byte> pkl, const std::string& label);

/// The dtype of a torch storage class name ("FloatStorage" -> F32), or false when it is not one of the
/// ten supported classes.
bool torch_storage_dtype(std::string_view class_name, DType& out) noexcept;

}  // namespace taskvec::format_detail
