// Parsers on the real files, and the deterministic splits. Expected values were computed
// independently with python3 on the same files (gzip + struct / json / csv modules), e.g.
//   python3 -c "import gzip;b=gzip.open('train-images-idx3-ubyte.gz').read();print(sum(b[16:16+784]))"
#include <gtest/gtest.h>

#include <unistd.h>

#include <fstream>
#include <set>

#include "lab/data.hpp"
#include "lab/lab_test_util.hpp"
#include "taskvec/error.hpp"

namespace taskvec::lab {
namespace {

// Sum of the first image's bytes: pixels are byte/255, so round(x*255) recovers them exactly.
std::int64_t byte_sum(const torch::Tensor& image) {
  return image.mul(255.0f).round().to(torch::kInt64).sum().item<std::int64_t>();
}

TEST(FashionIdx, TrainImagesAndLabels) {
  TASKVEC_LAB_REQUIRE_DATA(paths);
  const auto x = read_idx_images(paths.fashion_dir / "train-images-idx3-ubyte.gz");
  const auto y = read_idx_labels(paths.fashion_dir / "train-labels-idx1-ubyte.gz");
  ASSERT_EQ(x.sizes(), (std::vector<std::int64_t>{60000, 28, 28}));
  ASSERT_EQ(y.size(0), 60000);
  EXPECT_GE(x.min().item<float>(), 0.0f);
  EXPECT_LE(x.max().item<float>(), 1.0f);
  EXPECT_EQ(byte_sum(x[0]), 76247);  // python3: sum(b[16:16+784]) of the decompressed file
  EXPECT_EQ(y.slice(0, 0, 10).to(torch::kInt64).equal(torch::tensor({9, 0, 0, 3, 0, 2, 7, 2, 5, 5}, torch::kInt64)), true);
  EXPECT_EQ(y.min().item<std::int64_t>(), 0);
  EXPECT_EQ(y.max().item<std::int64_t>(), 9);
  EXPECT_TRUE(torch::bincount(y).equal(torch::full({10}, 6000, torch::kInt64)));  // 6,000 per class
}

TEST(FashionIdx, TestImages) {
  TASKVEC_LAB_REQUIRE_DATA(paths);
  const auto x = read_idx_images(paths.fashion_dir / "t10k-images-idx3-ubyte.gz");
  const auto y = read_idx_labels(paths.fashion_dir / "t10k-labels-idx1-ubyte.gz");
  ASSERT_EQ(x.size(0), 10000);
  ASSERT_EQ(y.size(0), 10000);
  EXPECT_EQ(byte_sum(x[0]), 33456);
  EXPECT_EQ(y[0].item<std::int64_t>(), 9);
  EXPECT_TRUE(torch::bincount(y).equal(torch::full({10}, 1000, torch::kInt64)));
}

TEST(FashionIdx, RejectsWrongMagic) {
  TASKVEC_LAB_REQUIRE_DATA(paths);
  // a label file is not an image file, and vice versa
  try {
    read_idx_images(paths.fashion_dir / "t10k-labels-idx1-ubyte.gz");
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument);
  }
  EXPECT_THROW(read_idx_labels(paths.fashion_dir / "t10k-images-idx3-ubyte.gz"), Error);
  EXPECT_THROW(read_idx_labels("/nonexistent/file.gz"), Error);
}

TEST(MnistJson, CountsRangesAndFirstImage) {
  TASKVEC_LAB_REQUIRE_DATA(paths);
  const auto zeros = read_mnist_json(paths.mnist_dir / "0.json");
  ASSERT_EQ(zeros.sizes(), (std::vector<std::int64_t>{1001, 28, 28}));
  // python3: sum(json.load(open('0.json'))['data'][:784]) = 121.921 (3-decimal values)
  EXPECT_NEAR(zeros[0].sum().item<double>(), 121.921, 1e-3);
  const auto all = read_mnist_dir(paths.mnist_dir);
  ASSERT_EQ(all.size(), 10000);
  EXPECT_GE(all.x.min().item<float>(), 0.0f);
  EXPECT_LE(all.x.max().item<float>(), 1.0f);
  // python3: len(data)/784 per file
  EXPECT_TRUE(torch::bincount(all.y).equal(
      torch::tensor({1001, 1127, 991, 1032, 980, 863, 1014, 1070, 944, 978}, torch::kInt64)));
}

TEST(MnistJson, RejectsMalformedFiles) {
  const auto dir = std::filesystem::temp_directory_path() / ("taskvec_lab_json_" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  auto write = [&](const std::string& name, const std::string& text) {
    std::ofstream(dir / name) << text;
    return dir / name;
  };
  EXPECT_THROW(read_mnist_json(write("a.json", "{\"data\": [0.5, 0.2]}")), Error);       // not n*784
  EXPECT_THROW(read_mnist_json(write("b.json", "{\"data\": [2.0]}")), Error);            // outside [0,1]
  EXPECT_THROW(read_mnist_json(write("c.json", "{\"pixels\": []}")), Error);             // wrong key
  EXPECT_THROW(read_mnist_json(write("d.json", "{\"data\": [0, }")), Error);              // syntax
  EXPECT_EQ(read_mnist_json(write("e.json", " { \"data\" : [ ] } ")).size(0), 0);
  std::filesystem::remove_all(dir);
}

TEST(SklearnDigits, CountsRangesAndFirstRow) {
  TASKVEC_LAB_REQUIRE_DATA(paths);
  const auto d = read_sklearn_digits(paths.digits_csv);
  ASSERT_EQ(d.x.sizes(), (std::vector<std::int64_t>{1797, 8, 8}));
  // python3 (csv module): first row's 64 pixel values sum to 294, label 0
  EXPECT_NEAR(d.x[0].sum().item<double>() * 16.0, 294.0, 1e-4);
  EXPECT_EQ(d.y[0].item<std::int64_t>(), 0);
  EXPECT_GE(d.x.min().item<float>(), 0.0f);
  EXPECT_LE(d.x.max().item<float>(), 1.0f);
  EXPECT_TRUE(torch::bincount(d.y).equal(
      torch::tensor({178, 182, 177, 183, 181, 182, 181, 179, 174, 180}, torch::kInt64)));
  const auto up = upsample_digits(d.x.slice(0, 0, 4));
  EXPECT_EQ(up.sizes(), (std::vector<std::int64_t>{4, 28, 28}));
  EXPECT_EQ(up.slice(1, 0, 4).abs().sum().item<float>(), 0.0f);  // 4-pixel zero border
}

TEST(Splits, DeterministicDisjointAndSized) {
  const auto a = split_indices(10000, 2000, 7), b = split_indices(10000, 2000, 7), c = split_indices(10000, 2000, 8);
  EXPECT_EQ(a.train, b.train);
  EXPECT_EQ(a.val, b.val);
  EXPECT_EQ(a.test, b.test);
  EXPECT_NE(a.test, c.test);
  EXPECT_EQ(a.test.size(), 2000u);
  EXPECT_EQ(a.val.size(), 800u);  // 10% of the rest
  EXPECT_EQ(a.train.size(), 7200u);
  std::set<std::int64_t> all;
  for (const auto* v : {&a.train, &a.val, &a.test}) all.insert(v->begin(), v->end());
  EXPECT_EQ(all.size(), 10000u);  // disjoint and covering
  EXPECT_EQ(*all.begin(), 0);
  EXPECT_EQ(*all.rbegin(), 9999);
  EXPECT_EQ(split_indices(60000, 0, 1).val.size(), 5000u);  // capped at 5,000
}

TEST(Sources, LoadAndSplitSizes) {
  TASKVEC_LAB_REQUIRE_DATA(paths);
  const auto s = load_sources(paths);
  EXPECT_EQ(s.fashion.train.size(), 55000);
  EXPECT_EQ(s.fashion.val.size(), 5000);
  EXPECT_EQ(s.fashion.test.size(), 10000);
  EXPECT_EQ(s.mnist.train.size() + s.mnist.val.size() + s.mnist.test.size(), 10000);
  EXPECT_EQ(s.digits.test.size(), 360);
  EXPECT_EQ(s.digits.val.size(), 143);
  EXPECT_EQ(s.digits.train.x.sizes(), (std::vector<std::int64_t>{1294, 28, 28}));
  const auto again = load_sources(paths);
  EXPECT_TRUE(s.mnist.val.x.equal(again.mnist.val.x));
  EXPECT_TRUE(s.digits.test.y.equal(again.digits.test.y));
}

TEST(Transforms, ShapesAndRanges) {
  const auto x = torch::rand({3, 28, 28});
  EXPECT_TRUE(rotate90(rotate90(x, 1), 3).equal(x));
  EXPECT_TRUE(invert(invert(x)).allclose(x));
  EXPECT_TRUE(thicken(x).ge(x).all().item<bool>());
  const auto low = low_resolution(x);
  EXPECT_EQ(low.sizes(), x.sizes());
  EXPECT_GE(low.min().item<float>(), 0.0f);
  EXPECT_LE(low.max().item<float>(), 1.0f);
}

}  // namespace
}  // namespace taskvec::lab
