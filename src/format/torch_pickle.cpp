// The restricted unpickler for torch's data.pkl (what it accepts: torch_pickle.hpp).
//
// Objects live in one arena (a vector) and refer to each other by index, so hostile pickles cannot
// build reference cycles that leak or chains whose destruction recurses: nothing here is recursive.
#include "format/torch_pickle.hpp"

#include <bit>
#include <cstring>
#include <optional>
#include <unordered_map>

#include <fmt/format.h>

#include "format/internal.hpp"
#include "taskvec/error.hpp"

namespace taskvec::format_detail {

bool torch_storage_dtype(std::string_view class_name, DType& out) noexcept {
  static constexpr std::pair<std::string_view, DType> kTable[] = {
      {"FloatStorage", DType::kF32}, {"HalfStorage", DType::kF16},  {"BFloat16Storage", DType::kBF16},
      {"DoubleStorage", DType::kF64}, {"LongStorage", DType::kI64}, {"IntStorage", DType::kI32},
      {"ShortStorage", DType::kI16}, {"CharStorage", DType::kI8},   {"ByteStorage", DType::kU8},
      {"BoolStorage", DType::kBool},
  };
  for (const auto& [name, dtype] : kTable) {
    if (name == class_name) {
      out = dtype;
      return true;
    }
  }
  return false;
}

namespace {

enum class Kind : std::uint8_t { kNone, kBool, kInt, kFloat, kStr, kBytes, kTuple, kList, kDict, kGlobal, kStorage, kTensor };

const char* kind_name(Kind k) {
  switch (k) {
    case Kind::kNone: return "None";
    case Kind::kBool: return "a bool";
    case Kind::kInt: return "an int";
    case Kind::kFloat: return "a float";
    case Kind::kStr: return "a str";
    case Kind::kBytes: return "a bytes";
    case Kind::kTuple: return "a tuple";
    case Kind::kList: return "a list";
    case Kind::kDict: return "a dict";
    case Kind::kGlobal: return "a global";
    case Kind::kStorage: return "a storage";
    case Kind::kTensor: return "a tensor";
  }
  return "an object";
}

enum class Callable : std::uint8_t { kOrderedDict, kRebuildTensorV2, kRebuildParameter, kRebuildParameterWithState, kStorageClass };

struct Obj {
  Kind kind = Kind::kNone;
  std::int64_t i = 0;               // bool/int value; storage numel
  double f = 0;                     // float
  std::string s;                    // str/bytes; global "module.name"; storage key
  std::vector<std::uint32_t> items; // tuple/list elements; dict: key, value, key, value, ...
  std::uint32_t aux = 0;            // global: Callable; storage: DType; tensor: record index
};

Obj obj_of(Kind kind) {
  Obj o;
  o.kind = kind;
  return o;
}

struct View {  // a tensor without its name
  std::uint32_t storage = 0;  // object index of the storage
  std::uint64_t offset = 0;
  std::vector<std::uint64_t> shape, stride;
};

class Unpickler {
 public:
  Unpickler(std::span<const std::byte> pkl, const std::string& label) : p_(pkl), label_(label) {}

  TorchStateDict run();

 private:
  [[noreturn]] void fail(ErrorCode code, const std::string& what) const {
    throw Error(code, fmt::format("{}: data.pkl byte {}: {}", label_, op_pos_, what));
  }
  [[noreturn]] void invalid(const std::string& what) const { fail(ErrorCode::kInvalidPickle, what); }

  std::span<const std::byte> take(std::uint64_t n, const char* what) {
    if (n > p_.size() - pos_) invalid(fmt::format("{} needs {} bytes but only {} are left (truncated pickle)", what, n, p_.size() - pos_));
    const auto out = p_.subspan(static_cast<std::size_t>(pos_), static_cast<std::size_t>(n));
    pos_ += n;
    return out;
  }
  std::uint64_t le(std::uint64_t n, const char* what) {
    const auto b = take(n, what);
    std::uint64_t v = 0;
    for (std::uint64_t k = 0; k < n; ++k) v |= std::uint64_t{std::to_integer<unsigned>(b[k])} << (8 * k);
    return v;
  }
  std::string text(std::uint64_t n, const char* what) {
    const auto b = take(n, what);
    return std::string(reinterpret_cast<const char*>(b.data()), b.size());
  }
  std::string line(const char* what) {
    constexpr std::size_t kMaxLine = 256;
    std::string out;
    while (true) {
      if (pos_ >= p_.size()) invalid(fmt::format("{} has no end of line (truncated pickle)", what));
      const char c = static_cast<char>(p_[static_cast<std::size_t>(pos_++)]);
      if (c == '\n') return out;
      if (out.size() >= kMaxLine) invalid(fmt::format("{} is longer than {} bytes", what, kMaxLine));
      out.push_back(c);
    }
  }

  std::uint32_t make(Obj o) {
    if (objs_.size() >= kMaxPickleObjects) invalid(fmt::format("more than {} objects", kMaxPickleObjects));
    objs_.push_back(std::move(o));
    return static_cast<std::uint32_t>(objs_.size() - 1);
  }
  void push(std::uint32_t id) {
    if (stack_.size() >= kMaxPickleStack) invalid(fmt::format("stack deeper than {}", kMaxPickleStack));
    if (++pushes_ > kMaxPickleReferences) invalid(fmt::format("more than {} references", kMaxPickleReferences));
    stack_.push_back(id);
  }
  void push_new(Obj o) { push(make(std::move(o))); }
  std::uint32_t pop(const char* op) {
    if (stack_.size() <= floor()) invalid(fmt::format("{} on an empty stack", op));
    const std::uint32_t id = stack_.back();
    stack_.pop_back();
    return id;
  }
  std::uint32_t top(const char* op) const {
    if (stack_.size() <= floor()) invalid(fmt::format("{} on an empty stack", op));
    return stack_.back();
  }
  std::size_t floor() const { return marks_.empty() ? 0 : marks_.back(); }
  // Pops everything above the last MARK, and the mark.
  std::vector<std::uint32_t> pop_mark(const char* op) {
    if (marks_.empty()) invalid(fmt::format("{} without a MARK", op));
    const std::size_t m = marks_.back();
    marks_.pop_back();
    std::vector<std::uint32_t> out(stack_.begin() + static_cast<std::ptrdiff_t>(m), stack_.end());
    stack_.resize(m);
    return out;
  }
  void memo_put(std::uint64_t index, const char* op) {
    if (index > kMaxPickleMemoIndex) invalid(fmt::format("{} memo index {} above the limit of {}", op, index, kMaxPickleMemoIndex));
    memo_[static_cast<std::uint32_t>(index)] = top(op);
  }
  void memo_get(std::uint64_t index, const char* op) {
    const auto it = index > kMaxPickleMemoIndex ? memo_.end() : memo_.find(static_cast<std::uint32_t>(index));
    if (it == memo_.end()) invalid(fmt::format("{} of memo index {}, which was never set", op, index));
    push(it->second);
  }

  void global(const std::string& module, const std::string& name);
  void reduce();
  void persistent_id();
  void dict_set(std::uint32_t dict, std::uint32_t key, std::uint32_t value);
  std::optional<std::uint64_t> key_hash(std::uint32_t key);
  bool key_equal(std::uint32_t a, std::uint32_t b) const;
  std::uint64_t natural(std::uint32_t id, const char* what) const;
  std::vector<std::uint64_t> naturals(std::uint32_t id, const char* what) const;
  TorchStateDict extract(std::uint32_t root);

  std::span<const std::byte> p_;
  const std::string& label_;
  std::uint64_t pos_ = 0, op_pos_ = 0, pushes_ = 0;
  std::vector<Obj> objs_;
  std::vector<std::uint32_t> stack_;
  std::vector<std::size_t> marks_;
  std::unordered_map<std::uint32_t, std::uint32_t> memo_;
  // dict -> key hash -> positions in its items. Hashes, not key copies: a pickle repeating one long
  // string as the key of many dicts (BINGET) costs nothing per dict.
  std::unordered_map<std::uint32_t, std::unordered_multimap<std::uint64_t, std::size_t>> dict_index_;
  std::unordered_map<std::uint32_t, std::uint64_t> string_hash_;  // str/bytes object -> hash, computed once
  std::vector<View> views_;
  std::unordered_map<std::string, std::uint32_t> storages_;  // key -> storage object
};

void Unpickler::global(const std::string& module, const std::string& name) {
  const std::string full = module + "." + name;
  Obj g;
  g.kind = Kind::kGlobal;
  g.s = full;
  DType dtype{};
  if (module == "collections" && name == "OrderedDict") {
    g.aux = static_cast<std::uint32_t>(Callable::kOrderedDict);
  } else if (module == "torch._utils" && name == "_rebuild_tensor_v2") {
    g.aux = static_cast<std::uint32_t>(Callable::kRebuildTensorV2);
  } else if (module == "torch._utils" && name == "_rebuild_parameter") {
    g.aux = static_cast<std::uint32_t>(Callable::kRebuildParameter);
  } else if (module == "torch._utils" && name == "_rebuild_parameter_with_state") {
    g.aux = static_cast<std::uint32_t>(Callable::kRebuildParameterWithState);
  } else if (module == "torch" && torch_storage_dtype(name, dtype)) {
    g.aux = static_cast<std::uint32_t>(Callable::kStorageClass);
    g.i = static_cast<std::int64_t>(dtype);
  } else if (module == "torch" && name.size() > 7 && name.ends_with("Storage") && is_valid_utf8(name)) {
    fail(ErrorCode::kUnsupported, fmt::format("storage class {} holds a dtype taskvec does not read (supported: Float, Half, "
                                              "BFloat16, Double, Long, Int, Short, Char, Byte, Bool)", quote_name(full)));
  } else {
    fail(ErrorCode::kUnsafePickle, fmt::format("global {} is not allowed: a torch state dict references only collections.OrderedDict, "
                                               "torch._utils._rebuild_tensor_v2 / _rebuild_parameter and torch.*Storage "
                                               "(nothing was imported or executed)", quote_name(full)));
  }
  push_new(std::move(g));
}

std::uint64_t Unpickler::natural(std::uint32_t id, const char* what) const {
  const Obj& o = objs_[id];
  if (o.kind != Kind::kInt) invalid(fmt::format("{} is {}, not an int", what, kind_name(o.kind)));
  if (o.i < 0) invalid(fmt::format("{} is negative ({})", what, o.i));
  return static_cast<std::uint64_t>(o.i);
}

std::vector<std::uint64_t> Unpickler::naturals(std::uint32_t id, const char* what) const {
  const Obj& o = objs_[id];
  if (o.kind != Kind::kTuple) invalid(fmt::format("{} is {}, not a tuple", what, kind_name(o.kind)));
  if (o.items.size() > kMaxTorchDims) invalid(fmt::format("{} has {} dimensions, more than {}", what, o.items.size(), kMaxTorchDims));
  std::vector<std::uint64_t> out;
  for (const std::uint32_t item : o.items) out.push_back(natural(item, what));
  return out;
}

void Unpickler::reduce() {
  const std::uint32_t args_id = pop("REDUCE");
  const std::uint32_t fn_id = pop("REDUCE");
  const Obj& fn = objs_[fn_id];
  if (fn.kind != Kind::kGlobal) fail(ErrorCode::kUnsafePickle, fmt::format("REDUCE calls {}, not an allowed function", kind_name(fn.kind)));
  const auto callable = static_cast<Callable>(fn.aux);
  if (callable == Callable::kStorageClass) {
    fail(ErrorCode::kUnsafePickle, fmt::format("REDUCE calls {}, which a state dict never calls", quote_name(fn.s)));
  }
  const Obj& args = objs_[args_id];
  if (args.kind != Kind::kTuple) invalid(fmt::format("arguments of {} are {}, not a tuple", quote_name(fn.s), kind_name(args.kind)));
  const std::vector<std::uint32_t> a = args.items;  // copy: make() may move objs_
  const std::string fn_name = fn.s;
  switch (callable) {
    case Callable::kOrderedDict: {
      if (!a.empty()) invalid("collections.OrderedDict called with arguments (torch calls it with none)");
      Obj d;
      d.kind = Kind::kDict;
      push_new(std::move(d));
      return;
    }
    case Callable::kRebuildTensorV2: {
      if (a.size() != 6 && a.size() != 7) invalid(fmt::format("_rebuild_tensor_v2 called with {} arguments, not 6 or 7", a.size()));
      if (objs_[a[0]].kind != Kind::kStorage) invalid(fmt::format("_rebuild_tensor_v2's storage is {}", kind_name(objs_[a[0]].kind)));
      View v;
      v.storage = a[0];
      v.offset = natural(a[1], "storage offset");
      v.shape = naturals(a[2], "size");
      v.stride = naturals(a[3], "stride");
      if (v.shape.size() != v.stride.size()) invalid(fmt::format("size has {} dimensions but stride {}", v.shape.size(), v.stride.size()));
      if (objs_[a[4]].kind != Kind::kBool) invalid(fmt::format("requires_grad is {}, not a bool", kind_name(objs_[a[4]].kind)));
      if (objs_[a[5]].kind != Kind::kDict) invalid(fmt::format("backward hooks are {}, not a dict", kind_name(objs_[a[5]].kind)));
      views_.push_back(std::move(v));
      Obj t;
      t.kind = Kind::kTensor;
      t.aux = static_cast<std::uint32_t>(views_.size() - 1);
      push_new(std::move(t));
      return;
    }
    case Callable::kRebuildParameter:
    case Callable::kRebuildParameterWithState: {
      const std::size_t want = callable == Callable::kRebuildParameter ? 3 : 4;
      if (a.size() != want) invalid(fmt::format("{} called with {} arguments, not {}", quote_name(fn_name), a.size(), want));
      if (objs_[a[0]].kind != Kind::kTensor) invalid(fmt::format("{} of {}, not a tensor", quote_name(fn_name), kind_name(objs_[a[0]].kind)));
      if (objs_[a[1]].kind != Kind::kBool) invalid(fmt::format("requires_grad is {}, not a bool", kind_name(objs_[a[1]].kind)));
      if (objs_[a[2]].kind != Kind::kDict) invalid(fmt::format("backward hooks are {}, not a dict", kind_name(objs_[a[2]].kind)));
      push(a[0]);  // a Parameter is its tensor
      return;
    }
    case Callable::kStorageClass: break;
  }
  fail(ErrorCode::kInternal, "unknown callable");
}

void Unpickler::persistent_id() {
  const std::uint32_t pid_id = pop("BINPERSID");
  const Obj& pid = objs_[pid_id];
  if (pid.kind != Kind::kTuple || pid.items.size() != 5) {
    invalid(fmt::format("persistent id is {}{}, not ('storage', StorageClass, key, location, numel)", kind_name(pid.kind),
                        pid.kind == Kind::kTuple ? fmt::format(" of {} items", pid.items.size()) : ""));
  }
  const std::vector<std::uint32_t> a = pid.items;
  if (objs_[a[0]].kind != Kind::kStr || objs_[a[0]].s != "storage") invalid("persistent id does not start with 'storage'");
  const Obj& cls = objs_[a[1]];
  if (cls.kind != Kind::kGlobal || static_cast<Callable>(cls.aux) != Callable::kStorageClass) {
    invalid(fmt::format("persistent id's storage class is {}", cls.kind == Kind::kGlobal ? quote_name(cls.s) : kind_name(cls.kind)));
  }
  const Obj& key = objs_[a[2]];
  if (key.kind != Kind::kStr) invalid(fmt::format("persistent id's key is {}, not a str", kind_name(key.kind)));
  if (key.s.empty() || key.s == "." || key.s == ".." || key.s.find_first_of("/\\") != std::string::npos || !name_problem(key.s).empty()) {
    invalid(fmt::format("storage key {} is not a plain entry name", quote_name(key.s)));
  }
  if (objs_[a[3]].kind != Kind::kStr) invalid(fmt::format("persistent id's location is {}, not a str", kind_name(objs_[a[3]].kind)));
  const std::uint64_t numel = natural(a[4], "storage numel");
  const auto dtype = static_cast<DType>(cls.i);
  const auto it = storages_.find(key.s);
  if (it != storages_.end()) {
    const Obj& prev = objs_[it->second];
    if (static_cast<DType>(prev.aux) != dtype || static_cast<std::uint64_t>(prev.i) != numel) {
      invalid(fmt::format("storage {} is {} x {} here but {} x {} earlier", quote_name(key.s), numel, dtype_name(dtype), prev.i,
                          dtype_name(static_cast<DType>(prev.aux))));
    }
    push(it->second);
    return;
  }
  Obj s;
  s.kind = Kind::kStorage;
  s.s = key.s;
  s.i = static_cast<std::int64_t>(numel);
  s.aux = static_cast<std::uint32_t>(dtype);
  const std::string k = key.s;
  const std::uint32_t id = make(std::move(s));
  storages_.emplace(k, id);
  push(id);
}

// Python's dict-key equality for the hashable scalars: str, bytes, and numbers (True == 1 == 1.0).
// Other keys (tuples, ...) are never merged (nullopt): they stay separate entries.
std::optional<std::uint64_t> Unpickler::key_hash(std::uint32_t key) {
  const Obj& k = objs_[key];
  switch (k.kind) {
    case Kind::kStr:
    case Kind::kBytes: {
      const auto [it, fresh] = string_hash_.emplace(key, 0);
      if (fresh) it->second = std::hash<std::string>{}(k.s) ^ (k.kind == Kind::kStr ? 0x5bd1e995u : 0x1b873593u);
      return it->second;
    }
    case Kind::kInt:
    case Kind::kBool: return std::hash<std::int64_t>{}(k.i);
    case Kind::kNone: return 0x9e3779b97f4a7c15u;
    case Kind::kFloat:
      if (k.f > -9.2e18 && k.f < 9.2e18 && k.f == static_cast<double>(static_cast<std::int64_t>(k.f))) {  // NaN: false
        return std::hash<std::int64_t>{}(static_cast<std::int64_t>(k.f));
      }
      return std::hash<std::uint64_t>{}(std::bit_cast<std::uint64_t>(k.f)) ^ 0x85ebca6bu;
    default: return std::nullopt;
  }
}

bool Unpickler::key_equal(std::uint32_t a, std::uint32_t b) const {
  if (a == b) return true;
  const Obj& x = objs_[a];
  const Obj& y = objs_[b];
  auto numeric = [](const Obj& o) { return o.kind == Kind::kInt || o.kind == Kind::kBool || o.kind == Kind::kFloat; };
  if (numeric(x) && numeric(y)) {
    if (x.kind != Kind::kFloat && y.kind != Kind::kFloat) return x.i == y.i;
    const double dx = x.kind == Kind::kFloat ? x.f : static_cast<double>(x.i);
    const double dy = y.kind == Kind::kFloat ? y.f : static_cast<double>(y.i);
    return dx == dy;
  }
  if (x.kind != y.kind) return false;
  if (x.kind == Kind::kNone) return true;
  return (x.kind == Kind::kStr || x.kind == Kind::kBytes) && x.s == y.s;
}

void Unpickler::dict_set(std::uint32_t dict, std::uint32_t key, std::uint32_t value) {
  if (const auto h = key_hash(key)) {
    auto& index = dict_index_[dict];
    Obj& d = objs_[dict];
    const auto [lo, hi] = index.equal_range(*h);
    int same_hash = 0;
    for (auto it = lo; it != hi; ++it) {
      // Distinct keys sharing a 64-bit hash are crafted, never real: a bound keeps this loop short.
      if (++same_hash > 16) invalid("more than 16 distinct dict keys share one hash (a crafted pickle)");
      if (key_equal(d.items[it->second], key)) {
        d.items[it->second + 1] = value;  // Python: a repeated key keeps its place, takes the new value
        return;
      }
    }
    index.emplace(*h, d.items.size());
  }
  Obj& d = objs_[dict];
  d.items.push_back(key);
  d.items.push_back(value);
}

TorchStateDict Unpickler::run() {
  if (p_.size() > kMaxPickleBytes) {
    throw Error(ErrorCode::kInvalidPickle, fmt::format("{}: data.pkl is {} bytes, more than the limit of {}", label_, p_.size(), kMaxPickleBytes));
  }
  while (true) {
    op_pos_ = pos_;
    if (pos_ >= p_.size()) invalid("the pickle ends without STOP (truncated)");
    const auto op = std::to_integer<std::uint8_t>(p_[static_cast<std::size_t>(pos_++)]);
    switch (op) {
      case 0x80: {  // PROTO
        const std::uint64_t v = le(1, "PROTO");
        if (v < 2 || v > 5) invalid(fmt::format("pickle protocol {} (torch writes 2)", v));
        break;
      }
      case 0x95: {  // FRAME: a length hint; the bytes follow inline
        const std::uint64_t n = le(8, "FRAME");
        if (n > p_.size() - pos_) invalid(fmt::format("FRAME of {} bytes but only {} are left (truncated pickle)", n, p_.size() - pos_));
        break;
      }
      case '.': {  // STOP
        if (!marks_.empty()) invalid("STOP with an open MARK");
        if (stack_.size() != 1) invalid(fmt::format("STOP with {} objects on the stack, not 1", stack_.size()));
        if (pos_ != p_.size()) invalid(fmt::format("{} bytes after STOP", p_.size() - pos_));
        return extract(stack_.back());
      }
      case '(':  // MARK
        if (marks_.size() >= kMaxPickleMarks) invalid(fmt::format("more than {} open MARKs", kMaxPickleMarks));
        marks_.push_back(stack_.size());
        break;
      case '}': push_new(obj_of(Kind::kDict)); break;  // EMPTY_DICT
      case ']': push_new(obj_of(Kind::kList)); break;  // EMPTY_LIST
      case ')': push_new(obj_of(Kind::kTuple)); break;  // EMPTY_TUPLE
      case 't': {  // TUPLE
        Obj t = obj_of(Kind::kTuple);
        t.items = pop_mark("TUPLE");
        push_new(std::move(t));
        break;
      }
      case 0x85: case 0x86: case 0x87: {  // TUPLE1, TUPLE2, TUPLE3
        const std::size_t n = op - 0x84u;
        Obj t = obj_of(Kind::kTuple);
        t.items.resize(n);
        for (std::size_t k = n; k-- > 0;) t.items[k] = pop("TUPLEn");
        push_new(std::move(t));
        break;
      }
      case 'a': {  // APPEND
        const std::uint32_t v = pop("APPEND");
        const std::uint32_t l = top("APPEND");
        if (objs_[l].kind != Kind::kList) invalid(fmt::format("APPEND to {}, not a list", kind_name(objs_[l].kind)));
        objs_[l].items.push_back(v);
        break;
      }
      case 'e': {  // APPENDS
        const std::vector<std::uint32_t> items = pop_mark("APPENDS");
        const std::uint32_t l = top("APPENDS");
        if (objs_[l].kind != Kind::kList) invalid(fmt::format("APPENDS to {}, not a list", kind_name(objs_[l].kind)));
        objs_[l].items.insert(objs_[l].items.end(), items.begin(), items.end());
        break;
      }
      case 's': {  // SETITEM
        const std::uint32_t v = pop("SETITEM");
        const std::uint32_t k = pop("SETITEM");
        const std::uint32_t d = top("SETITEM");
        if (objs_[d].kind != Kind::kDict) invalid(fmt::format("SETITEM on {}, not a dict", kind_name(objs_[d].kind)));
        dict_set(d, k, v);
        break;
      }
      case 'u': {  // SETITEMS
        const std::vector<std::uint32_t> items = pop_mark("SETITEMS");
        const std::uint32_t d = top("SETITEMS");
        if (objs_[d].kind != Kind::kDict) invalid(fmt::format("SETITEMS on {}, not a dict", kind_name(objs_[d].kind)));
        if (items.size() % 2 != 0) invalid("SETITEMS with an odd number of items");
        for (std::size_t k = 0; k < items.size(); k += 2) dict_set(d, items[k], items[k + 1]);
        break;
      }
      case 'X': case 0x8c: case 'T': case 'U': case 'B': case 'C': {  // (SHORT_)BINUNICODE/BINSTRING/BINBYTES
        const bool short_len = op == 0x8c || op == 'U' || op == 'C';
        std::uint64_t n = le(short_len ? 1 : 4, "string length");
        if (op == 'T' && n > 0x7FFFFFFF) invalid("BINSTRING with a negative length");
        Obj s = obj_of((op == 'B' || op == 'C') ? Kind::kBytes : Kind::kStr);
        s.s = text(n, "string");
        push_new(std::move(s));
        break;
      }
      case 'J': {  // BININT: signed 32-bit
        Obj i = obj_of(Kind::kInt);
        i.i = static_cast<std::int32_t>(static_cast<std::uint32_t>(le(4, "BININT")));
        push_new(std::move(i));
        break;
      }
      case 'K': case 'M': {  // BININT1, BININT2: unsigned
        Obj i = obj_of(Kind::kInt);
        i.i = static_cast<std::int64_t>(le(op == 'K' ? 1 : 2, "BININTn"));
        push_new(std::move(i));
        break;
      }
      case 0x8a: {  // LONG1: n-byte little-endian two's complement
        const std::uint64_t n = le(1, "LONG1");
        if (n > 8) invalid(fmt::format("LONG1 of {} bytes: integers above 64 bits are not part of a state dict", n));
        std::uint64_t v = le(n, "LONG1");
        if (n > 0 && n < 8 && (v >> (8 * n - 1)) != 0) v |= ~std::uint64_t{0} << (8 * n);  // sign-extend
        Obj i = obj_of(Kind::kInt);
        i.i = static_cast<std::int64_t>(v);
        push_new(std::move(i));
        break;
      }
      case 'G': {  // BINFLOAT: big-endian double
        const auto b = take(8, "BINFLOAT");
        std::uint64_t v = 0;
        for (std::size_t k = 0; k < 8; ++k) v = (v << 8) | std::to_integer<std::uint64_t>(b[k]);
        Obj f = obj_of(Kind::kFloat);
        f.f = std::bit_cast<double>(v);
        push_new(std::move(f));
        break;
      }
      case 0x88: case 0x89: {  // NEWTRUE, NEWFALSE
        Obj b = obj_of(Kind::kBool);
        b.i = op == 0x88 ? 1 : 0;
        push_new(std::move(b));
        break;
      }
      case 'N': push_new(obj_of(Kind::kNone)); break;
      case 'q': memo_put(le(1, "BINPUT"), "BINPUT"); break;
      case 'r': memo_put(le(4, "LONG_BINPUT"), "LONG_BINPUT"); break;
      case 0x94: memo_put(memo_.size(), "MEMOIZE"); break;
      case 'h': memo_get(le(1, "BINGET"), "BINGET"); break;
      case 'j': memo_get(le(4, "LONG_BINGET"), "LONG_BINGET"); break;
      case 'c': {  // GLOBAL "module\nname\n"
        const std::string module = line("GLOBAL module");
        const std::string name = line("GLOBAL name");
        global(module, name);
        break;
      }
      case 0x93: {  // STACK_GLOBAL
        const std::uint32_t name = pop("STACK_GLOBAL");
        const std::uint32_t module = pop("STACK_GLOBAL");
        if (objs_[name].kind != Kind::kStr || objs_[module].kind != Kind::kStr) invalid("STACK_GLOBAL of a non-string");
        const std::string m = objs_[module].s, n = objs_[name].s;
        global(m, n);
        break;
      }
      case 'R': reduce(); break;
      case 'b': {  // BUILD
        const std::uint32_t state = pop("BUILD");
        const std::uint32_t target = top("BUILD");
        if (objs_[target].kind != Kind::kDict) {
          fail(ErrorCode::kUnsafePickle, fmt::format("BUILD sets the state of {}; a state dict only sets an OrderedDict's", kind_name(objs_[target].kind)));
        }
        (void)state;  // the OrderedDict's attributes (_metadata: module versions); not tensors
        break;
      }
      case 'Q': persistent_id(); break;
      default: {
        const bool printable = op >= 0x20 && op < 0x7F;
        fail(ErrorCode::kUnsafePickle, fmt::format("opcode 0x{:02x}{} is not one torch.save uses for a state dict (refused, not executed)",
                                                   op, printable ? fmt::format(" ('{}')", static_cast<char>(op)) : ""));
      }
    }
  }
}

TorchStateDict Unpickler::extract(std::uint32_t root) {
  TorchStateDict out;
  op_pos_ = p_.size();
  if (objs_[root].kind != Kind::kDict) {
    invalid(fmt::format("the pickled object is {}, not a state dict (a dict of tensors)", kind_name(objs_[root].kind)));
  }
  auto has_tensor = [&](std::uint32_t dict) {
    const auto& items = objs_[dict].items;
    for (std::size_t k = 1; k < items.size(); k += 2) {
      if (objs_[items[k]].kind == Kind::kTensor) return true;
    }
    return false;
  };
  std::uint32_t sd = root;
  if (!objs_[root].items.empty() && !has_tensor(root)) {
    bool found = false;
    for (const char* key : {"state_dict", "model", "module"}) {
      const auto& items = objs_[root].items;
      for (std::size_t k = 0; k + 1 < items.size() && !found; k += 2) {
        const Obj& kk = objs_[items[k]];
        if (kk.kind == Kind::kStr && kk.s == key && objs_[items[k + 1]].kind == Kind::kDict && has_tensor(items[k + 1])) {
          sd = items[k + 1];
          out.nested_key = key;
          found = true;
        }
      }
      if (found) break;
    }
    if (!found) {
      std::string keys;
      const auto& items = objs_[root].items;
      for (std::size_t k = 0; k < items.size() && k < 40; k += 2) {
        if (!keys.empty()) keys += ", ";
        keys += objs_[items[k]].kind == Kind::kStr ? quote_name(objs_[items[k]].s) : kind_name(objs_[items[k]].kind);
      }
      invalid(fmt::format("no tensors: the top-level dict has none, and no 'state_dict', 'model' or 'module' dict of tensors "
                          "(its keys: {}{})", keys, items.size() > 40 ? ", ..." : ""));
    }
    out.notes.push_back(fmt::format("tensors read from the top-level key '{}'; the other {} top-level entries are ignored", out.nested_key,
                                    objs_[root].items.size() / 2 - 1));
  }
  constexpr std::size_t kMaxNamedSkips = 20;
  std::size_t skipped = 0;
  const std::vector<std::uint32_t> items = objs_[sd].items;
  for (std::size_t k = 0; k + 1 < items.size(); k += 2) {
    const Obj& key = objs_[items[k]];
    const Obj& value = objs_[items[k + 1]];
    if (value.kind != Kind::kTensor) {
      if (skipped++ < kMaxNamedSkips) {
        out.notes.push_back(fmt::format("skipped state-dict entry {}: {}, not a tensor",
                                        key.kind == Kind::kStr ? quote_name(key.s) : kind_name(key.kind), kind_name(value.kind)));
      }
      continue;
    }
    if (key.kind != Kind::kStr) invalid(fmt::format("a tensor's key is {}, not a str", kind_name(key.kind)));
    if (const std::string why = name_problem(key.s); !why.empty()) {
      throw Error(ErrorCode::kInvalidName, fmt::format("{}: tensor {}: {}", label_, quote_name(key.s), why));
    }
    const View& v = views_[value.aux];
    const Obj& storage = objs_[v.storage];
    TorchTensorRecord r;
    r.name = key.s;
    r.storage_key = storage.s;
    r.dtype = static_cast<DType>(storage.aux);
    r.storage_numel = static_cast<std::uint64_t>(storage.i);
    r.storage_offset = v.offset;
    r.shape = v.shape;
    r.stride = v.stride;
    out.tensors.push_back(std::move(r));
  }
  if (skipped > kMaxNamedSkips) out.notes.push_back(fmt::format("skipped {} more non-tensor entries", skipped - kMaxNamedSkips));
  return out;
}

}  // namespace

TorchStateDict parse_torch_pickle(std::span<const std::byte> pkl, const std::string& label) {
  return Unpickler(pkl, label).run();
}

}  // namespace taskvec::format_detail
