// Task arithmetic through the streaming engine. Expected values are computed by hand in comments,
// or, for random data, by an independent double-precision loop in the test.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <fstream>
#include <random>

#include "support/builders.hpp"
#include "support/model_files.hpp"
#include "support/temp_dir.hpp"
#include "taskvec/engine.hpp"
#include "taskvec/error.hpp"

namespace taskvec {
namespace {

using test::read_tensor_bytes;
using test::read_values;
using test::TempDir;
using test::write_model;

ErrorCode error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.code();
  }
  return ErrorCode::kInternal;  // no error where one was expected
}

class LinearEdit : public ::testing::Test {
 protected:
  void SetUp() override {
    write_model(dir / "pre.safetensors", {{"w", DType::kF32, {2, 2}, {1, 2, 3, 4}}}, {{"format", "pt"}});
    write_model(dir / "ft.safetensors", {{"w", DType::kF32, {2, 2}, {1.5, 2, 2, 4.25}}});
  }
  TempDir dir;
  EditOptions options;
};

TEST_F(LinearEdit, DiffThenApplyByHand) {
  Checkpoint pre = Checkpoint::open(dir / "pre.safetensors");
  Checkpoint ft = Checkpoint::open(dir / "ft.safetensors");
  make_task_vector(pre, ft, dir / "tau.safetensors", options);
  EXPECT_EQ(read_values(dir / "tau.safetensors", "w"), (std::vector<double>{0.5, 0, -1, 0.25}));
  Checkpoint tau = Checkpoint::open(dir / "tau.safetensors");
  EXPECT_EQ(tau.metadata().at(kMetaKind), "task_vector");
  EXPECT_EQ(tau.metadata().at(kMetaPretrainedFingerprint), pre.fingerprint());
  EXPECT_EQ(tau.metadata().at("format"), "pt");  // the pretrained __metadata__ is kept

  apply_task_vectors(pre, {{&tau, 1.0}}, dir / "one.safetensors", options);
  EXPECT_EQ(read_tensor_bytes(dir / "one.safetensors", "w"), read_tensor_bytes(dir / "ft.safetensors", "w"));
  apply_task_vectors(pre, {{&tau, -1.0}}, dir / "neg.safetensors", options);  // negation: pre - tau
  EXPECT_EQ(read_values(dir / "neg.safetensors", "w"), (std::vector<double>{0.5, 2, 4, 3.75}));
  apply_task_vectors(pre, {{&tau, 0.5}}, dir / "half.safetensors", options);
  EXPECT_EQ(read_values(dir / "half.safetensors", "w"), (std::vector<double>{1.25, 2, 2.5, 4.125}));
  apply_task_vectors(pre, {{&tau, 0.0}}, dir / "zero.safetensors", options);
  EXPECT_EQ(read_tensor_bytes(dir / "zero.safetensors", "w"), read_tensor_bytes(dir / "pre.safetensors", "w"));
  Checkpoint out = Checkpoint::open(dir / "neg.safetensors");
  EXPECT_EQ(out.metadata().count(kMetaKind), 0u);
  EXPECT_EQ(out.metadata().at("format"), "pt");
}

TEST_F(LinearEdit, AdditionOfTwoTaskVectors) {
  write_model(dir / "ft2.safetensors", {{"w", DType::kF32, {2, 2}, {0, 2, 3, 8}}});
  Checkpoint pre = Checkpoint::open(dir / "pre.safetensors");
  make_task_vector(pre, Checkpoint::open(dir / "ft.safetensors"), dir / "t1.safetensors", options);
  make_task_vector(pre, Checkpoint::open(dir / "ft2.safetensors"), dir / "t2.safetensors", options);
  Checkpoint t1 = Checkpoint::open(dir / "t1.safetensors");
  Checkpoint t2 = Checkpoint::open(dir / "t2.safetensors");
  // t1 = [0.5, 0, -1, 0.25], t2 = [-1, 0, 0, 4]; pre + 0.5 t1 + 0.25 t2 = [1, 2, 2.5, 5.125]
  apply_task_vectors(pre, {{&t1, 0.5}, {&t2, 0.25}}, dir / "sum.safetensors", options);
  EXPECT_EQ(read_values(dir / "sum.safetensors", "w"), (std::vector<double>{1, 2, 2.5, 5.125}));
}

TEST_F(LinearEdit, F64TensorsUseF64AndStayF64) {
  write_model(dir / "p64.safetensors", {{"w", DType::kF64, {2}, {0.5, 0.25}}});
  write_model(dir / "f64.safetensors", {{"w", DType::kF64, {2}, {0.75, -1.125}}});
  Checkpoint pre = Checkpoint::open(dir / "p64.safetensors");
  make_task_vector(pre, Checkpoint::open(dir / "f64.safetensors"), dir / "tau.safetensors", options);
  EXPECT_EQ(test::read_dtype(dir / "tau.safetensors", "w"), DType::kF64);
  Checkpoint tau = Checkpoint::open(dir / "tau.safetensors");
  apply_task_vectors(pre, {{&tau, 2.0}}, dir / "out.safetensors", options);
  // 0.5 + 2*0.25 = 1.0; 0.25 + 2*(-1.375) = -2.5
  EXPECT_EQ(read_values(dir / "out.safetensors", "w"), (std::vector<double>{1.0, -2.5}));
  // 1e-300 is far below f32's range: only an f64 path keeps it.
  write_model(dir / "tiny.safetensors", {{"w", DType::kF64, {2}, {0.5 + 1e-12, 1e-300}}});
  make_task_vector(pre, Checkpoint::open(dir / "tiny.safetensors"), dir / "tau2.safetensors", options);
  auto tau2 = read_values(dir / "tau2.safetensors", "w");
  EXPECT_DOUBLE_EQ(tau2[0], (0.5 + 1e-12) - 0.5);
  EXPECT_DOUBLE_EQ(tau2[1], 1e-300 - 0.25);
}

TEST_F(LinearEdit, F32ModelsRoundTripExactlyThroughAnF64TaskVector) {
  // pre = 1e-3 and ft = -3e-7 (a weight crossing zero): ft - pre needs ~35 significant bits, so an F32
  // task vector rounds it; an F64 one holds it exactly and apply computes in f64.
  const float pre_value = 1e-3f, ft_value = -3e-7f;
  write_model(dir / "p.safetensors", {{"w", DType::kF32, {2}, {pre_value, 0.5f}}});
  write_model(dir / "f.safetensors", {{"w", DType::kF32, {2}, {ft_value, 0.75f}}});
  Checkpoint pre = Checkpoint::open(dir / "p.safetensors");
  options.out_dtype = DType::kF64;
  make_task_vector(pre, Checkpoint::open(dir / "f.safetensors"), dir / "tau.safetensors", options);
  EXPECT_EQ(read_values(dir / "tau.safetensors", "w")[0], double(ft_value) - double(pre_value));
  Checkpoint tau = Checkpoint::open(dir / "tau.safetensors");
  options.out_dtype.reset();
  apply_task_vectors(pre, {{&tau, 1.0}}, dir / "back.safetensors", options);
  EXPECT_EQ(test::read_dtype(dir / "back.safetensors", "w"), DType::kF32);
  EXPECT_EQ(read_tensor_bytes(dir / "back.safetensors", "w"), read_tensor_bytes(dir / "f.safetensors", "w"));
  // The F32 task vector of the same pair misses: fl32(pre + fl32(ft - pre)) != ft here.
  float tau32 = ft_value - pre_value;
  EXPECT_NE(pre_value + tau32, ft_value);
}

TEST_F(LinearEdit, OutputDtypeRoundsToNearestEven) {
  // 1 + 2^-7 is a bf16 value; 1 + 0.5 * 2^-7 = 1 + 2^-8 is halfway between bf16 1.0 and 1 + 2^-7:
  // ties go to the even significand, 1.0. With 0.75, 1 + 0.75 * 2^-7 is nearer 1 + 2^-7.
  write_model(dir / "p.safetensors", {{"w", DType::kF32, {1}, {1.0}}});
  write_model(dir / "f.safetensors", {{"w", DType::kF32, {1}, {1.0078125}}});
  std::map<std::string, const Checkpoint*> models;
  Checkpoint p = Checkpoint::open(dir / "p.safetensors");
  Checkpoint f = Checkpoint::open(dir / "f.safetensors");
  models["pre"] = &p;
  models["f"] = &f;
  options.out_dtype = DType::kBF16;
  edit_expression(models, "pre", "pre + 0.5*tau(f)", dir / "half.safetensors", options);
  EXPECT_EQ(test::read_dtype(dir / "half.safetensors", "w"), DType::kBF16);
  EXPECT_EQ(read_values(dir / "half.safetensors", "w"), std::vector<double>{1.0});
  edit_expression(models, "pre", "pre + 0.75*tau(f)", dir / "most.safetensors", options);
  EXPECT_EQ(read_values(dir / "most.safetensors", "w"), std::vector<double>{1.0078125});
}

TEST_F(LinearEdit, AnalogyExpression) {
  write_model(dir / "p.safetensors", {{"w", DType::kF32, {2}, {0, 0}}});
  write_model(dir / "a.safetensors", {{"w", DType::kF32, {2}, {1, 0}}});
  write_model(dir / "b.safetensors", {{"w", DType::kF32, {2}, {0, 1}}});
  write_model(dir / "c.safetensors", {{"w", DType::kF32, {2}, {2, 2}}});
  std::vector<Checkpoint> opened;
  for (const char* n : {"p", "a", "b", "c"}) opened.push_back(Checkpoint::open(dir / (std::string(n) + ".safetensors")));
  std::map<std::string, const Checkpoint*> models{{"pre", &opened[0]}, {"a", &opened[1]}, {"b", &opened[2]}, {"c", &opened[3]}};
  edit_expression(models, "pre", "pre + 0.5*(tau(c) + tau(b) - tau(a))", dir / "out.safetensors", options);
  // 0.5 * ([2,2] + [0,1] - [1,0]) = [0.5, 1.5]
  EXPECT_EQ(read_values(dir / "out.safetensors", "w"), (std::vector<double>{0.5, 1.5}));
}

TEST_F(LinearEdit, IntegerTensorsAreCopiedAndChangesReported) {
  write_model(dir / "p.safetensors", {{"ids", DType::kI64, {3}, {0, 1, 2}}, {"w", DType::kF32, {1}, {1}}});
  write_model(dir / "f.safetensors", {{"ids", DType::kI64, {3}, {0, 1, 5}}, {"w", DType::kF32, {1}, {3}}});
  Checkpoint p = Checkpoint::open(dir / "p.safetensors");
  Checkpoint f = Checkpoint::open(dir / "f.safetensors");
  EditReport r = make_task_vector(p, f, dir / "tau.safetensors", options);
  ASSERT_EQ(r.warnings.size(), 1u);
  EXPECT_NE(r.warnings[0].find("'ids'"), std::string::npos);
  EXPECT_EQ(read_values(dir / "tau.safetensors", "ids"), (std::vector<double>{0, 1, 2}));
  EXPECT_EQ(test::read_dtype(dir / "tau.safetensors", "ids"), DType::kI64);
  Checkpoint tau = Checkpoint::open(dir / "tau.safetensors");
  apply_task_vectors(p, {{&tau, 3.0}}, dir / "out.safetensors", options);
  EXPECT_EQ(read_values(dir / "out.safetensors", "ids"), (std::vector<double>{0, 1, 2}));
  EXPECT_EQ(read_values(dir / "out.safetensors", "w"), std::vector<double>{7});
}

TEST_F(LinearEdit, IncludeExcludeLeaveOtherTensorsUnchanged) {
  write_model(dir / "p.safetensors", {{"encoder.w", DType::kBF16, {2}, {1, 2}}, {"head.w", DType::kBF16, {2}, {3, 4}}});
  write_model(dir / "f.safetensors", {{"encoder.w", DType::kBF16, {2}, {2, 2}}, {"head.w", DType::kBF16, {2}, {5, 5}}});
  Checkpoint p = Checkpoint::open(dir / "p.safetensors");
  Checkpoint f = Checkpoint::open(dir / "f.safetensors");
  std::map<std::string, const Checkpoint*> models{{"pre", &p}, {"f", &f}};
  options.exclude = "^head\\.";
  EditReport r = edit_expression(models, "pre", "pre - tau(f)", dir / "out.safetensors", options);
  EXPECT_EQ(r.tensors_edited, 1u);
  EXPECT_EQ(r.tensors_copied, 1u);
  EXPECT_EQ(read_values(dir / "out.safetensors", "encoder.w"), (std::vector<double>{0, 2}));
  EXPECT_EQ(read_tensor_bytes(dir / "out.safetensors", "head.w"), read_tensor_bytes(dir / "p.safetensors", "head.w"));
  options.exclude.clear();
  options.include = "head";
  edit_expression(models, "pre", "pre - tau(f)", dir / "out2.safetensors", options);
  EXPECT_EQ(read_values(dir / "out2.safetensors", "encoder.w"), (std::vector<double>{1, 2}));
  EXPECT_EQ(read_values(dir / "out2.safetensors", "head.w"), (std::vector<double>{1, 3}));
  options.include = "([";
  EXPECT_EQ(error_of([&] { edit_expression(models, "pre", "f", dir / "bad.safetensors", options); }),
            ErrorCode::kInvalidArgument);
}

TEST_F(LinearEdit, MismatchedInputsAreRefusedBeforeWriting) {
  Checkpoint pre = Checkpoint::open(dir / "pre.safetensors");
  write_model(dir / "missing.safetensors", {{"v", DType::kF32, {2, 2}, {1, 2, 3, 4}}});
  write_model(dir / "shape.safetensors", {{"w", DType::kF32, {4}, {1, 2, 3, 4}}});
  write_model(dir / "extra.safetensors", {{"w", DType::kF32, {2, 2}, {1, 2, 3, 4}}, {"x", DType::kF32, {1}, {1}}});
  write_model(dir / "int.safetensors", {{"w", DType::kI32, {2, 2}, {1, 2, 3, 4}}});
  auto out = dir / "out.safetensors";
  EXPECT_EQ(error_of([&] { make_task_vector(pre, Checkpoint::open(dir / "missing.safetensors"), out, options); }),
            ErrorCode::kTensorMissing);
  EXPECT_EQ(error_of([&] { make_task_vector(pre, Checkpoint::open(dir / "shape.safetensors"), out, options); }),
            ErrorCode::kShapeMismatch);
  EXPECT_EQ(error_of([&] { make_task_vector(pre, Checkpoint::open(dir / "extra.safetensors"), out, options); }),
            ErrorCode::kTensorMissing);
  EXPECT_EQ(error_of([&] { make_task_vector(pre, Checkpoint::open(dir / "int.safetensors"), out, options); }),
            ErrorCode::kDtypeMismatch);
  EXPECT_FALSE(std::filesystem::exists(out));
  try {
    make_task_vector(pre, Checkpoint::open(dir / "shape.safetensors"), out, options);
  } catch (const Error& e) {
    std::string what = e.what();
    EXPECT_NE(what.find("'w'"), std::string::npos) << what;
    EXPECT_NE(what.find("[2, 2]"), std::string::npos) << what;
    EXPECT_NE(what.find("[4]"), std::string::npos) << what;
    EXPECT_NE(what.find("shape.safetensors"), std::string::npos) << what;
  }
}

TEST_F(LinearEdit, TaskVectorFromAnotherBaseIsRefusedUnlessForced) {
  Checkpoint pre = Checkpoint::open(dir / "pre.safetensors");
  make_task_vector(pre, Checkpoint::open(dir / "ft.safetensors"), dir / "tau.safetensors", options);
  write_model(dir / "other.safetensors", {{"w", DType::kF32, {2, 2}, {9, 9, 9, 9}}});
  Checkpoint other = Checkpoint::open(dir / "other.safetensors");
  Checkpoint tau = Checkpoint::open(dir / "tau.safetensors");
  EXPECT_EQ(error_of([&] { apply_task_vectors(other, {{&tau, 1.0}}, dir / "out.safetensors", options); }),
            ErrorCode::kBaseMismatch);
  EXPECT_FALSE(std::filesystem::exists(dir / "out.safetensors"));
  options.force_base = true;
  EditReport r = apply_task_vectors(other, {{&tau, 1.0}}, dir / "out.safetensors", options);
  EXPECT_FALSE(r.warnings.empty());
  EXPECT_EQ(read_values(dir / "out.safetensors", "w"), (std::vector<double>{9.5, 9, 8, 9.25}));
}

TEST_F(LinearEdit, NonFiniteInputsAreDetected) {
  write_model(dir / "nan.safetensors", {{"w", DType::kF32, {2, 2}, {1, NAN, 3, 4}}});
  Checkpoint pre = Checkpoint::open(dir / "pre.safetensors");
  Checkpoint bad = Checkpoint::open(dir / "nan.safetensors");
  try {
    make_task_vector(pre, bad, dir / "out.safetensors", options);
    FAIL() << "expected kNonFinite";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kNonFinite);
    EXPECT_NE(std::string(e.what()).find("nan.safetensors"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("element 1"), std::string::npos) << e.what();
  }
  EXPECT_FALSE(std::filesystem::exists(dir / "out.safetensors"));
  options.allow_nonfinite = true;
  make_task_vector(pre, bad, dir / "out.safetensors", options);
  EXPECT_TRUE(std::isnan(read_values(dir / "out.safetensors", "w")[1]));
}

// BF16 inputs are widened inside the combination loop (no separate decode): a signalling NaN must still
// come out as decode_to_f32 + the arithmetic give it, quiet with its payload (0x7F81 -> 0x7FC1), and
// the finite neighbour exactly: 2 + 0.5 (3 - 2) = 2.5 = 0x4020.
TEST_F(LinearEdit, SignallingNanInABf16InputComesOutQuietWithItsPayload) {
  const std::string header = R"({"w":{"dtype":"BF16","shape":[2],"data_offsets":[0,4]}})";
  test::write_file(dir / "pre16.safetensors", test::make_safetensors_bytes(header, std::string("\x80\x3F\x00\x40", 4)));
  test::write_file(dir / "ft16.safetensors", test::make_safetensors_bytes(header, std::string("\x81\x7F\x40\x40", 4)));
  Checkpoint pre = Checkpoint::open(dir / "pre16.safetensors");
  Checkpoint ft = Checkpoint::open(dir / "ft16.safetensors");
  options.allow_nonfinite = true;
  linear_edit(pre, 1.0, {{&ft, 0.5, true}}, dir / "out16.safetensors", options);
  EXPECT_EQ(read_tensor_bytes(dir / "out16.safetensors", "w"), (std::vector<std::uint8_t>{0xC1, 0x7F, 0x20, 0x40}));
}

TEST_F(LinearEdit, DryRunWritesNothingAndExistingOutputsNeedForce) {
  Checkpoint pre = Checkpoint::open(dir / "pre.safetensors");
  Checkpoint ft = Checkpoint::open(dir / "ft.safetensors");
  options.dry_run = true;
  EditReport plan = make_task_vector(pre, ft, dir / "tau.safetensors", options);
  EXPECT_FALSE(std::filesystem::exists(dir / "tau.safetensors"));
  ASSERT_EQ(plan.plan.shards.size(), 1u);
  EXPECT_EQ(plan.plan.total_bytes, 16u);
  options.dry_run = false;
  make_task_vector(pre, ft, dir / "tau.safetensors", options);
  EXPECT_EQ(error_of([&] { make_task_vector(pre, ft, dir / "tau.safetensors", options); }), ErrorCode::kOutputExists);
  // The output may never be one of the inputs, even with --force.
  options.write.force = true;
  EXPECT_EQ(error_of([&] { make_task_vector(pre, ft, dir / "ft.safetensors", options); }), ErrorCode::kOutputExists);
  make_task_vector(pre, ft, dir / "tau.safetensors", options);
}

// bf16/f16 round trip: apply(pre, diff(pre, ft), 1) == ft bit for bit (docs/NUMERICS.md gives the
// condition: |ft| >= 2^-16 |pre| for BF16, 2^-13 |pre| for F16, or ft == +0; the generator keeps realistic
// pairs inside it).
void round_trip(DType dtype, TempDir& dir) {
  const double bound = dtype == DType::kBF16 ? 65536 : 8192;
  std::mt19937 rng(7);
  std::normal_distribution<double> weight(0.0, 0.05), delta(0.0, 0.002);
  std::vector<double> pre, ft;
  while (pre.size() < 100000) {
    double p = weight(rng);
    double f = pre.size() % 10 == 0 ? -p + delta(rng) * 0.01 : p + delta(rng);  // every 10th crosses zero
    // round both to the dtype through the writer, then keep pairs inside the documented bound
    pre.push_back(p);
    ft.push_back(f);
  }
  write_model(dir / "p.safetensors", {{"w", dtype, {pre.size()}, pre}});
  write_model(dir / "f.safetensors", {{"w", dtype, {ft.size()}, ft}});
  auto p = read_values(dir / "p.safetensors", "w");
  auto f = read_values(dir / "f.safetensors", "w");
  std::vector<double> keep_p, keep_f;
  for (std::size_t i = 0; i < p.size(); ++i) {
    if ((f[i] == 0 && !std::signbit(f[i])) || std::abs(p[i]) <= bound * std::abs(f[i])) {
      keep_p.push_back(p[i]);
      keep_f.push_back(f[i]);
    }
  }
  ASSERT_GT(keep_p.size(), 99000u);
  write_model(dir / "p.safetensors", {{"w", dtype, {keep_p.size()}, keep_p}});
  write_model(dir / "f.safetensors", {{"w", dtype, {keep_f.size()}, keep_f}});
  Checkpoint pc = Checkpoint::open(dir / "p.safetensors");
  EditOptions options;
  options.write.force = true;
  make_task_vector(pc, Checkpoint::open(dir / "f.safetensors"), dir / "tau.safetensors", options);
  EXPECT_EQ(test::read_dtype(dir / "tau.safetensors", "w"), DType::kF32);
  Checkpoint tau = Checkpoint::open(dir / "tau.safetensors");
  apply_task_vectors(pc, {{&tau, 1.0}}, dir / "back.safetensors", options);
  EXPECT_EQ(test::read_dtype(dir / "back.safetensors", "w"), dtype);
  EXPECT_EQ(read_tensor_bytes(dir / "back.safetensors", "w"), read_tensor_bytes(dir / "f.safetensors", "w"));
}

TEST(TaskVectorRoundTrip, Bf16BitForBit) {
  TempDir dir;
  round_trip(DType::kBF16, dir);
}

TEST(TaskVectorRoundTrip, F16BitForBit) {
  TempDir dir;
  round_trip(DType::kF16, dir);
}

TEST(LinearEditThreads, SameBytesForAnyThreadCountAndChunking) {
  TempDir dir;
  std::mt19937 rng(11);
  std::normal_distribution<double> n01(0.0, 1.0);
  const std::size_t n = 50000;
  std::vector<std::vector<double>> models(4, std::vector<double>(n));
  for (auto& m : models) {
    for (auto& v : m) v = n01(rng);
  }
  for (int i = 0; i < 4; ++i) {
    write_model(dir / ("m" + std::to_string(i) + ".safetensors"),
                {{"big", DType::kBF16, {n}, models[i]}, {"small", DType::kF16, {3}, {1, 2, 3}}});
  }
  std::vector<Checkpoint> ck;
  for (int i = 0; i < 4; ++i) ck.push_back(Checkpoint::open(dir / ("m" + std::to_string(i) + ".safetensors")));
  std::vector<LinearTerm> terms{{&ck[1], 0.3, true}, {&ck[2], -0.2, true}, {&ck[3], 0.45, true}};
  std::vector<std::uint8_t> first;
  for (unsigned threads : {1u, 2u, 3u}) {
    for (std::uint64_t budget : {std::uint64_t(1), std::uint64_t(512) << 20}) {
      EditOptions options;
      options.threads = threads;
      options.memory_budget = budget;  // 1 byte: the smallest chunks (1024 elements), ~49 per tensor
      auto out = dir / ("out" + std::to_string(threads) + "_" + std::to_string(budget) + ".safetensors");
      EditReport r = linear_edit(ck[0], 1.0, terms, out, options);
      // Per element in flight: 4 staged BF16 inputs + the BF16 output = 10 B; per worker also the
      // block lanes (3 x 2048 x 8 B) and one 256 KiB read piece. The smallest chunk is 1024 elements.
      const std::uint64_t fixed = 3 * 2048 * 8 + (256 << 10);
      if (budget == 1) {
        EXPECT_EQ(r.peak_chunk_bytes, threads * (1024 * 10 + fixed));
      } else {
        EXPECT_EQ(r.peak_chunk_bytes, threads * (n * 10 + fixed));  // chunk = the whole 50000-element tensor
        EXPECT_LE(r.peak_chunk_bytes, budget);
      }
      auto bytes = test::file_bytes(out);
      if (first.empty()) {
        first = bytes;
      } else {
        EXPECT_EQ(bytes, first) << threads << " threads, budget " << budget;
      }
    }
  }
  // Independent check in double precision: within half a bf16 ulp of the exact value, plus the f32
  // rounding of the accumulation (a few 2^-24 of the magnitudes summed).
  auto pre = read_values(dir / "m0.safetensors", "big");
  std::vector<std::vector<double>> x;
  for (int i = 1; i < 4; ++i) x.push_back(read_values(dir / ("m" + std::to_string(i) + ".safetensors"), "big"));
  auto out = read_values(dir / "out1_1.safetensors", "big");
  for (std::size_t i = 0; i < n; ++i) {
    double exact = pre[i] + 0.3 * (x[0][i] - pre[i]) - 0.2 * (x[1][i] - pre[i]) + 0.45 * (x[2][i] - pre[i]);
    double magnitude = std::abs(pre[i]) + 0.3 * std::abs(x[0][i] - pre[i]) + 0.2 * std::abs(x[1][i] - pre[i]) +
                       0.45 * std::abs(x[2][i] - pre[i]);
    double ulp = exact == 0 ? 0.0 : std::ldexp(1.0, std::ilogb(exact) - 7);
    ASSERT_LE(std::abs(out[i] - exact), 0.5 * ulp + 8 * std::ldexp(magnitude, -24)) << i;
  }
}

TEST(LinearEditFolders, ShardedOutputWithAuxiliaryFiles) {
  TempDir dir;
  auto pre_dir = dir / "pre";
  auto ft_dir = dir / "ft";
  std::filesystem::create_directories(pre_dir);
  std::filesystem::create_directories(ft_dir);
  std::vector<double> zeros(1000, 0.0), ones(1000, 1.0);
  write_model(pre_dir / "model.safetensors",
              {{"a", DType::kF32, {1000}, zeros}, {"b", DType::kF32, {1000}, zeros}, {"c", DType::kF32, {1000}, zeros}},
              {{"format", "pt"}});
  write_model(ft_dir / "model.safetensors",
              {{"a", DType::kF32, {1000}, ones}, {"b", DType::kF32, {1000}, ones}, {"c", DType::kF32, {1000}, ones}});
  std::ofstream(pre_dir / "config.json") << "{\"model_type\": \"toy\"}";
  std::ofstream(pre_dir / "tokenizer.json") << "{}";
  Checkpoint pre = Checkpoint::open(pre_dir);
  Checkpoint ft = Checkpoint::open(ft_dir);
  EditOptions options;
  options.write.max_shard_size = 5000;  // each tensor is 4000 bytes: one per shard
  std::map<std::string, const Checkpoint*> models{{"pre", &pre}, {"ft", &ft}};
  edit_expression(models, "pre", "pre + 0.25*tau(ft)", dir / "out", options);
  EXPECT_TRUE(std::filesystem::exists(dir / "out" / kIndexFileName));
  EXPECT_TRUE(std::filesystem::exists(dir / "out" / "model-00001-of-00003.safetensors"));
  EXPECT_TRUE(std::filesystem::exists(dir / "out" / "model-00003-of-00003.safetensors"));
  EXPECT_EQ(test::file_bytes(dir / "out" / "config.json"), test::file_bytes(pre_dir / "config.json"));
  EXPECT_TRUE(std::filesystem::exists(dir / "out" / "tokenizer.json"));
  Checkpoint out = Checkpoint::open(dir / "out");
  EXPECT_EQ(out.files().size(), 3u);
  EXPECT_EQ(out.metadata().at("format"), "pt");
  for (const char* name : {"a", "b", "c"}) EXPECT_EQ(read_values(dir / "out", name), std::vector<double>(1000, 0.25));
}

// Tensors larger than one 256 KiB read piece: integer and unselected tensors are copied piece by piece
// (bytes unchanged), and a merge-extra-rows tensor is read and decoded piece by piece.
TEST(LinearEditPieces, LargeCopiedTensorsKeepTheirBytes) {
  TempDir dir;
  const std::size_t n = 300000;  // 1.2 MB of I32, 600 KB of BF16: several pieces each
  std::vector<double> ints(n), base(n), ft(n);
  for (std::size_t i = 0; i < n; ++i) {
    ints[i] = static_cast<double>((i * 7919) % 100003) - 50000;
    base[i] = std::ldexp(static_cast<double>(i % 251) - 125, -6);  // exact in BF16
    ft[i] = base[i] + std::ldexp(static_cast<double>(i % 3), -4);
  }
  write_model(dir / "pre.safetensors", {{"ids", DType::kI32, {n}, ints}, {"frozen", DType::kBF16, {n}, base},
                                        {"w", DType::kBF16, {n}, base}});
  write_model(dir / "ft.safetensors", {{"ids", DType::kI32, {n}, ints}, {"frozen", DType::kBF16, {n}, ft},
                                       {"w", DType::kBF16, {n}, ft}});
  auto pre = Checkpoint::open(dir / "pre.safetensors");
  auto ft_ck = Checkpoint::open(dir / "ft.safetensors");
  EditOptions options;
  options.threads = 2;
  options.exclude = "frozen";
  const auto out = dir / "out.safetensors";
  linear_edit(pre, 1.0, {{&ft_ck, 1.0, true}}, out, options);
  EXPECT_EQ(test::read_tensor_bytes(out, "ids"), test::read_tensor_bytes(dir / "pre.safetensors", "ids"));
  EXPECT_EQ(test::read_tensor_bytes(out, "frozen"), test::read_tensor_bytes(dir / "pre.safetensors", "frozen"));
  EXPECT_EQ(test::read_tensor_bytes(out, "w"), test::read_tensor_bytes(dir / "ft.safetensors", "w"));
}

TEST(LinearEditPieces, ResizedRowsAreReadPieceByPiece) {
  TempDir dir;
  const std::uint64_t cols = 1000, rows = 200, extra = 7;  // 200k elements: 400 KB of BF16
  std::vector<double> base(rows * cols), ft((rows + extra) * cols);
  for (std::size_t i = 0; i < base.size(); ++i) base[i] = std::ldexp(static_cast<double>(i % 97) - 48, -5);
  for (std::size_t i = 0; i < ft.size(); ++i) ft[i] = std::ldexp(static_cast<double>(i % 89) - 44, -5);
  write_model(dir / "pre.safetensors", {{"embed", DType::kBF16, {rows, cols}, base}});
  write_model(dir / "ft.safetensors", {{"embed", DType::kBF16, {rows + extra, cols}, ft}});
  auto pre = Checkpoint::open(dir / "pre.safetensors");
  auto ft_ck = Checkpoint::open(dir / "ft.safetensors");
  EditOptions options;
  options.merge_extra_rows = true;
  options.memory_budget = 1;  // chunks of 1024 elements
  const auto out = dir / "out.safetensors";
  linear_edit(pre, 1.0, {{&ft_ck, 0.5, true}}, out, options);
  const auto got = read_values(out, "embed");
  ASSERT_EQ(got.size(), ft.size());
  for (std::size_t i = 0; i < ft.size(); ++i) {
    // Shared rows: base + 0.5 (ft - base), a multiple of 2^-6 below 64: exact in BF16. Extra rows: ft.
    const double want = i < base.size() ? base[i] + 0.5 * (ft[i] - base[i]) : ft[i];
    ASSERT_EQ(got[i], want) << i;
  }
}

// An input that shrinks after it was opened (another process truncating it) is a clean kIo error naming
// the file, not a SIGBUS: headers, integer-tensor comparisons and data are all read with pread.
TEST(LinearEditPieces, InputTruncatedAfterOpeningIsAnIoError) {
  TempDir dir;
  const std::size_t n = 100000;
  std::vector<double> ids(n), w(n, 0.5);
  for (std::size_t i = 0; i < n; ++i) ids[i] = static_cast<double>(i);
  write_model(dir / "pre.safetensors", {{"ids", DType::kI64, {n}, ids}, {"w", DType::kF32, {n}, w}});
  write_model(dir / "ft.safetensors", {{"ids", DType::kI64, {n}, ids}, {"w", DType::kF32, {n}, w}});
  auto pre = Checkpoint::open(dir / "pre.safetensors");
  auto ft = Checkpoint::open(dir / "ft.safetensors");
  std::filesystem::resize_file(dir / "ft.safetensors", 4096 * 50);  // inside "ids", page-aligned
  try {
    linear_edit(pre, 1.0, {{&ft, 0.5, true}}, dir / "out.safetensors", EditOptions{});
    FAIL() << "expected kIo";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kIo);
    EXPECT_NE(std::string(e.what()).find("ft.safetensors"), std::string::npos) << e.what();
  }
  EXPECT_FALSE(std::filesystem::exists(dir / "out.safetensors"));
  try {
    Checkpoint::open(dir / "ft.safetensors");  // now shorter than its header says
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kIncompleteBuffer);
  }
}

// --merge-extra-rows with a base of no rows: the rows come from the input that has them.
TEST(LinearEditPieces, ResizedFromABaseWithNoRows) {
  TempDir dir;
  write_model(dir / "pre.safetensors", {{"embed", DType::kF32, {0, 4}, {}}});
  std::vector<double> rows(3 * 4);
  for (std::size_t i = 0; i < rows.size(); ++i) rows[i] = static_cast<double>(i) + 0.5;
  write_model(dir / "ft.safetensors", {{"embed", DType::kF32, {3, 4}, rows}});
  auto pre = Checkpoint::open(dir / "pre.safetensors");
  auto ft = Checkpoint::open(dir / "ft.safetensors");
  EditOptions options;
  options.merge_extra_rows = true;
  linear_edit(pre, 1.0, {{&ft, 0.5, true}}, dir / "out.safetensors", options);
  EXPECT_EQ(read_values(dir / "out.safetensors", "embed"), rows);
}

// In 'pre + 1.1*tau(a) - 0.3*tau(b) + 0.45*tau(c)' the coefficients (pre: 1 - 1.1 + 0.3 - 0.45) sum
// to 1 - 2^-53 in doubles. The base scale must still be exactly 1: with a = b = c = pre the F64 output
// is pre bit for bit (it was pre * (1 - 2^-53) before).
TEST_F(LinearEdit, CoefficientsThatSumToOneUpToRoundingKeepTheBaseExact) {
  write_model(dir / "p64.safetensors", {{"w", DType::kF64, {4}, {0.1, 1.0 / 3.0, 1e10 + 1, -2.5}}});
  Checkpoint pre = Checkpoint::open(dir / "p64.safetensors");
  Checkpoint same = Checkpoint::open(dir / "p64.safetensors");
  const std::string expression = "pre + 1.1*tau(a) - 0.3*tau(b) + 0.45*tau(c)";
  const LinearExpression parsed = parse_expression(expression, {"pre", "a", "b", "c"}, "pre");
  ASSERT_NE(parsed.total(), 1.0);  // the premise: the sum is off by rounding
  edit_expression({{"pre", &pre}, {"a", &same}, {"b", &same}, {"c", &same}}, "pre", expression, dir / "o64.safetensors",
                  options);
  EXPECT_EQ(read_tensor_bytes(dir / "o64.safetensors", "w"), read_tensor_bytes(dir / "p64.safetensors", "w"));
}

// The report counts a tensor as edited only when its values are recomputed from terms or a scale:
// 'pre' alone copies every tensor, '0.5*pre' scales (edits) them.
TEST_F(LinearEdit, EditedAndCopiedCounts) {
  Checkpoint pre = Checkpoint::open(dir / "pre.safetensors");
  Checkpoint ft = Checkpoint::open(dir / "ft.safetensors");
  const std::map<std::string, const Checkpoint*> models{{"pre", &pre}, {"a", &ft}};
  EditReport copy = edit_expression(models, "pre", "pre", dir / "copy.safetensors", options);
  EXPECT_EQ(copy.tensors_edited, 0u);
  EXPECT_EQ(copy.tensors_copied, 1u);
  EXPECT_EQ(read_tensor_bytes(dir / "copy.safetensors", "w"), read_tensor_bytes(dir / "pre.safetensors", "w"));
  EditReport scaled = edit_expression(models, "pre", "0.5*pre", dir / "half.safetensors", options);
  EXPECT_EQ(scaled.tensors_edited, 1u);
  EXPECT_EQ(read_values(dir / "half.safetensors", "w"), (std::vector<double>{0.5, 1, 1.5, 2}));
  EditReport edited = edit_expression(models, "pre", "pre + tau(a)", dir / "ft_again.safetensors", options);
  EXPECT_EQ(edited.tensors_edited, 1u);
  EXPECT_EQ(read_values(dir / "ft_again.safetensors", "w"), (std::vector<double>{1.5, 2, 2, 4.25}));
}

TEST(Similarity, CosineNormsAndSignConflictsByHand) {
  TempDir dir;
  write_model(dir / "p.safetensors", {{"w", DType::kF32, {3}, {1, 1, 1}}});
  write_model(dir / "a.safetensors", {{"w", DType::kF32, {3}, {4, 5, 1}}});    // tau [3, 4, 0]
  write_model(dir / "b.safetensors", {{"w", DType::kF32, {3}, {-2, -3, 1}}});  // tau [-3, -4, 0]
  write_model(dir / "c.safetensors", {{"w", DType::kF32, {3}, {1, 1, 3}}});    // tau [0, 0, 2]
  Checkpoint p = Checkpoint::open(dir / "p.safetensors");
  std::vector<Checkpoint> m;
  for (const char* n : {"a", "b", "c"}) m.push_back(Checkpoint::open(dir / (std::string(n) + ".safetensors")));
  std::vector<std::pair<std::string, const Checkpoint*>> models{{"a", &m[0]}, {"b", &m[1]}, {"c", &m[2]}};
  for (unsigned threads : {1u, 2u}) {
    EditOptions options;
    options.threads = threads;
    SimilarityReport r = task_vector_similarity(&p, models, options);
    EXPECT_DOUBLE_EQ(r.norms[0], 5.0);
    EXPECT_DOUBLE_EQ(r.norms[1], 5.0);
    EXPECT_DOUBLE_EQ(r.norms[2], 2.0);
    EXPECT_DOUBLE_EQ(r.cosine[0][1], -1.0);
    EXPECT_DOUBLE_EQ(r.cosine[0][2], 0.0);
    EXPECT_DOUBLE_EQ(r.cosine[2][2], 1.0);
    EXPECT_DOUBLE_EQ(r.sign_conflict[0][1], 1.0);  // both non-zero on 2 coordinates, opposite on both
    EXPECT_DOUBLE_EQ(r.sign_conflict[0][2], 0.0);
  }
}

}  // namespace
}  // namespace taskvec
