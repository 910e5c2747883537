#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <string>
#include <system_error>
#include <unordered_set>

#include <fmt/format.h>

#include "format/internal.hpp"
#include "taskvec/safetensors.hpp"

namespace taskvec::format_detail {

bool is_valid_utf8(std::string_view bytes) noexcept {
  const auto* s = reinterpret_cast<const unsigned char*>(bytes.data());
  const std::size_t n = bytes.size();
  std::size_t i = 0;
  while (i < n) {
    const unsigned c = s[i];
    if (c < 0x80) {
      ++i;
      continue;
    }
    std::size_t len = 0;
    std::uint32_t cp = 0;
    std::uint32_t min = 0;
    if ((c & 0xE0) == 0xC0) {
      len = 2, cp = c & 0x1F, min = 0x80;
    } else if ((c & 0xF0) == 0xE0) {
      len = 3, cp = c & 0x0F, min = 0x800;
    } else if ((c & 0xF8) == 0xF0) {
      len = 4, cp = c & 0x07, min = 0x10000;
    } else {
      return false;  // stray continuation byte or 0xF8..0xFF
    }
    if (n - i < len) return false;
    for (std::size_t k = 1; k < len; ++k) {
      const unsigned cc = s[i + k];
      if ((cc & 0xC0) != 0x80) return false;
      cp = (cp << 6) | (cc & 0x3F);
    }
    if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return false;
    i += len;
  }
  return true;
}

std::string name_problem(std::string_view name) {
  if (name.empty()) return "the name is empty";
  // Real tensor names are under 200 bytes; std::regex (--include, recipe filters) recurses per
  // character, so a megabyte-long name could overflow the stack.
  if (name.size() > taskvec::kMaxTensorNameLength) {
    return "the name is " + std::to_string(name.size()) + " bytes long, over the limit of " +
           std::to_string(taskvec::kMaxTensorNameLength);
  }
  for (const char ch : name) {
    const auto c = static_cast<unsigned char>(ch);
    if (c == 0) return "the name contains a NUL character";
    if (c < 0x20 || c == 0x7F) return "the name contains a control character";
  }
  if (!is_valid_utf8(name)) return "the name is not valid UTF-8";
  return {};
}

namespace {

struct DuplicateKeyFound {
  std::string key;
};

}  // namespace

// The SAX handler of that pass: accepts every value, throws DuplicateKeyFound at a repeated key.
class DuplicateKeyCheck : public nlohmann::json_sax<nlohmann::json> {
 public:
  bool null() override { return true; }
  bool boolean(bool) override { return true; }
  bool number_integer(number_integer_t) override { return true; }
  bool number_unsigned(number_unsigned_t) override { return true; }
  bool number_float(number_float_t, const string_t&) override { return true; }
  bool string(string_t&) override { return true; }
  bool binary(binary_t&) override { return true; }
  bool start_object(std::size_t) override {
    open_.emplace_back();
    return true;
  }
  bool key(string_t& key) override {
    if (!open_.empty() && !open_.back().insert(key).second) throw DuplicateKeyFound{key};
    return true;
  }
  bool end_object() override {
    if (!open_.empty()) open_.pop_back();
    return true;
  }
  bool start_array(std::size_t) override { return true; }
  bool end_array() override { return true; }
  bool parse_error(std::size_t, const std::string&, const nlohmann::detail::exception&) override { return false; }

 private:
  std::vector<std::unordered_set<std::string>> open_;
};

nlohmann::json parse_json_strict(std::string_view text, const std::string& label, ErrorCode syntax_code,
                                 ErrorCode duplicate_code) {
  // nlohmann builds nested values with heap nodes; cap nesting before parsing so a hostile 100 MB
  // header of '[' cannot make it allocate millions of nodes. Real headers nest 3 deep.
  constexpr int kMaxDepth = 64;
  int depth = 0;
  bool in_string = false;
  for (std::size_t i = 0; i < text.size(); ++i) {
    const char c = text[i];
    if (c == '\0') {
      // nlohmann stops at a NUL as if the input ended, which would let "{...}\0<anything>" pass.
      throw Error(syntax_code, label + ": NUL byte at header offset " + std::to_string(i));
    }
    if (in_string) {
      if (c == '\\') {
        ++i;
      } else if (c == '"') {
        in_string = false;
      }
    } else if (c == '"') {
      in_string = true;
    } else if (c == '{' || c == '[') {
      if (++depth > kMaxDepth) {
        throw Error(syntax_code, label + ": JSON nests deeper than " + std::to_string(kMaxDepth) + " levels");
      }
    } else if (c == '}' || c == ']') {
      --depth;
    }
  }
  try {
    // nlohmann keeps the last of two equal keys without telling: a SAX pass over the text finds them
    // first (a key set per open object). Its callback parser could too, but it rescans the parent
    // object every time a child object ends: quadratic in the number of tensors (22 s for 64k).
    DuplicateKeyCheck check;
    (void)nlohmann::json::sax_parse(text.begin(), text.end(), &check);  // false on a syntax error: parse says which
    return nlohmann::json::parse(text.begin(), text.end());
  } catch (const DuplicateKeyFound& dup) {
    throw Error(duplicate_code, label + ": duplicate JSON key " + quote_name(dup.key));
  } catch (const nlohmann::json::exception& e) {
    throw Error(syntax_code, label + ": not valid JSON: " + e.what());
  }
}

std::string quote_name(std::string_view text) {
  std::string out = "'";
  for (const char ch : text) {
    const auto c = static_cast<unsigned char>(ch);
    if (c < 0x20 || c == 0x7F) {
      static constexpr char kHex[] = "0123456789abcdef";
      out += "\\x";
      out += kHex[c >> 4];
      out += kHex[c & 15];
    } else {
      out += ch;
    }
  }
  out += '\'';
  return out;
}

std::string format_dims(const std::vector<std::uint64_t>& dims) {
  std::string out = "[";
  for (std::size_t i = 0; i < dims.size(); ++i) {
    if (i) out += ", ";
    out += std::to_string(dims[i]);
  }
  out += ']';
  return out;
}

std::string errno_text(int err) {
  char buf[256];
  // GNU strerror_r returns the message pointer (which may or may not be buf).
  const char* msg = strerror_r(err, buf, sizeof buf);
  return msg;
}

bool same_path(const std::filesystem::path& a, const std::filesystem::path& b) noexcept {
  std::error_code ec1;
  std::error_code ec2;
  if (std::filesystem::exists(a, ec1) && std::filesystem::exists(b, ec2)) {
    std::error_code ec;
    const bool eq = std::filesystem::equivalent(a, b, ec);
    if (!ec) return eq;
  }
  std::error_code ec;
  const auto ca = std::filesystem::weakly_canonical(a, ec);
  if (ec) return false;
  const auto cb = std::filesystem::weakly_canonical(b, ec);
  if (ec) return false;
  return ca == cb;
}

bool path_inside(const std::filesystem::path& folder, const std::filesystem::path& inner) noexcept {
  auto f = folder.begin();
  auto i = inner.begin();
  for (; f != folder.end(); ++f, ++i) {
    if (f->empty() && std::next(f) == folder.end()) return true;  // trailing separator
    if (i == inner.end() || *f != *i) return false;
  }
  return true;
}

std::filesystem::path resolve_inside(const std::filesystem::path& folder, const std::filesystem::path& path,
                                     const std::string& what) {
  namespace fs = std::filesystem;
  std::error_code ec;
  const fs::path root = fs::canonical(folder, ec);
  if (ec) throw Error(ErrorCode::kIo, fmt::format("{}: cannot resolve: {}", folder.string(), ec.message()));
  fs::path candidate = path.is_absolute() ? path : fs::absolute(path, ec);
  // Follow the symlink chain by hand so a dangling link that points outside is still caught.
  for (int hops = 0; hops < 40; ++hops) {
    const fs::path resolved = fs::weakly_canonical(candidate, ec);
    if (ec || !path_inside(root, resolved)) {
      throw Error(ErrorCode::kShardEscapes,
                  fmt::format("{}: {} resolves outside the model folder {} (a symlink out of the folder is refused, "
                              "so no file from elsewhere is read or copied; replace the link by the file itself)",
                              path.string(), what, root.string()));
    }
    const auto st = fs::symlink_status(resolved, ec);
    if (ec || !fs::is_symlink(st)) return resolved;
    const fs::path target = fs::read_symlink(resolved, ec);
    if (ec) return resolved;
    candidate = target.is_absolute() ? target : resolved.parent_path() / target;
  }
  throw Error(ErrorCode::kShardEscapes, fmt::format("{}: {} is a chain of more than 40 symlinks", path.string(), what));
}

std::string read_folder_file(const std::filesystem::path& folder, const std::filesystem::path& path,
                             std::uint64_t max_bytes, ErrorCode too_large_code) {
  (void)resolve_inside(folder, path, "the file");
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (fd < 0) {
    const int err = errno;
    throw Error(ErrorCode::kIo, fmt::format("{}: cannot open: {}", path.string(), errno_text(err)));
  }
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    throw Error(ErrorCode::kIo, fmt::format("{}: not a regular file (a FIFO, device or folder is refused, never "
                                            "waited on or read)", path.string()));
  }
  if (static_cast<std::uint64_t>(st.st_size) > max_bytes) {
    ::close(fd);
    throw Error(too_large_code, fmt::format("{}: the file is {} bytes, over the limit of {} for a metadata file of a "
                                            "model folder", path.string(), st.st_size, max_bytes));
  }
  std::string text(static_cast<std::size_t>(st.st_size) + 1, '\0');
  std::size_t done = 0;
  while (done < text.size()) {
    const ssize_t n = ::read(fd, text.data() + done, text.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      const int err = errno;
      ::close(fd);
      throw Error(ErrorCode::kIo, fmt::format("{}: cannot read: {}", path.string(), errno_text(err)));
    }
    if (n == 0) break;
    done += static_cast<std::size_t>(n);
  }
  ::close(fd);
  if (done != static_cast<std::size_t>(st.st_size)) {
    throw Error(ErrorCode::kIo, fmt::format("{}: changed size while being read", path.string()));
  }
  text.resize(done);
  return text;
}

}  // namespace taskvec::format_detail
