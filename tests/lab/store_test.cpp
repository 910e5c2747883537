// torch <-> taskvec safetensors round trip, and the lab's edits through taskvec's engine.
#include <gtest/gtest.h>

#include <unistd.h>

#include "lab/model.hpp"
#include "lab/store.hpp"
#include "taskvec/checkpoint.hpp"
#include "taskvec/error.hpp"

namespace taskvec::lab {
namespace {

class StoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    torch::set_num_threads(1);
    dir_ = std::filesystem::temp_directory_path() /
           ("taskvec_lab_store_" + std::to_string(::getpid()) + "_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    std::filesystem::create_directories(dir_);
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }
  std::filesystem::path dir_;
};

TEST_F(StoreTest, BackboneRoundTripIsExact) {
  torch::manual_seed(1);
  Backbone a;
  save_backbone(a, dir_ / "a.safetensors", {{"role", "test"}});
  const auto ckpt = Checkpoint::open(dir_ / "a.safetensors");
  EXPECT_EQ(ckpt.tensor_names().size(), 8u);  // conv1..3 + fc, weight and bias
  EXPECT_EQ(ckpt.total_elements(), 355456u);
  EXPECT_EQ(ckpt.metadata().at("role"), "test");
  EXPECT_EQ(ckpt.at("conv1.weight").info->shape, (std::vector<std::uint64_t>{32, 1, 5, 5}));
  torch::manual_seed(2);
  Backbone b;
  load_backbone(b, dir_ / "a.safetensors");
  auto pa = a->named_parameters(), pb = b->named_parameters();
  for (const auto& p : pa) EXPECT_TRUE(p.value().equal(pb[p.key()])) << p.key();  // bit-exact
  const auto x = torch::rand({4, 28, 28});
  EXPECT_TRUE(a->forward(x).equal(b->forward(x)));
}

TEST_F(StoreTest, LoadRejectsWrongShapes) {
  write_tensors(dir_ / "bad.safetensors", {{"conv1.weight", torch::zeros({2, 2})}});
  Backbone b;
  EXPECT_THROW(load_backbone(b, dir_ / "bad.safetensors"), Error);
}

TEST_F(StoreTest, EngineEditsMatchTorchArithmetic) {
  torch::manual_seed(3);
  Backbone pre, ft;
  {
    torch::NoGradGuard g;
    auto pp = pre->named_parameters();
    for (auto& p : ft->named_parameters()) p.value().copy_(pp[p.key()] + 0.01f * torch::randn_like(p.value()));
  }
  save_backbone(pre, dir_ / "pre.safetensors");
  save_backbone(ft, dir_ / "ft.safetensors");
  Editor editor;
  editor.task_vector(dir_ / "pre.safetensors", dir_ / "ft.safetensors", dir_ / "tau.safetensors");
  const auto tau = read_tensors(dir_ / "tau.safetensors");
  const auto pre_t = read_tensors(dir_ / "pre.safetensors"), ft_t = read_tensors(dir_ / "ft.safetensors");
  for (const auto& [name, t] : tau) EXPECT_TRUE(t.allclose(ft_t.at(name) - pre_t.at(name), 0, 1e-7)) << name;

  for (double lambda : {-1.0, -0.35, 0.5, 1.0}) {
    editor.apply(dir_ / "pre.safetensors", {{dir_ / "tau.safetensors", lambda}}, dir_ / "edit.safetensors");
    const auto out = read_tensors(dir_ / "edit.safetensors");
    for (const auto& [name, t] : out)
      EXPECT_TRUE(t.allclose(pre_t.at(name) + lambda * tau.at(name), 1e-6, 1e-7)) << name << " lambda " << lambda;
  }
  // lambda = 1 gives the fine-tuned model back (to f32 rounding)
  editor.apply(dir_ / "pre.safetensors", {{dir_ / "tau.safetensors", 1.0}}, dir_ / "edit.safetensors");
  Backbone back;
  load_backbone(back, dir_ / "edit.safetensors");
  const auto x = torch::rand({8, 28, 28});
  EXPECT_TRUE(back->forward(x).allclose(ft->forward(x), 1e-4, 1e-5));

  // the random baseline keeps tau's per-tensor norms and is a valid task vector of pre
  editor.random_like(dir_ / "pre.safetensors", dir_ / "tau.safetensors", 7, dir_ / "rnd.safetensors");
  const auto rnd = read_tensors(dir_ / "rnd.safetensors");
  for (const auto& [name, t] : rnd) {
    EXPECT_NEAR(t.norm().item<double>(), tau.at(name).norm().item<double>(), 1e-4 * tau.at(name).norm().item<double>() + 1e-9);
    EXPECT_FALSE(t.allclose(tau.at(name)));
  }
  editor.apply(dir_ / "pre.safetensors", {{dir_ / "rnd.safetensors", -0.5}}, dir_ / "edit.safetensors");

  const auto sim = editor.similarity({{"tau", dir_ / "tau.safetensors"}, {"rnd", dir_ / "rnd.safetensors"}});
  ASSERT_EQ(sim.cosine.size(), 2u);
  EXPECT_NEAR(sim.cosine[0][0], 1.0, 1e-9);
  EXPECT_LT(std::abs(sim.cosine[0][1]), 0.05);
}

}  // namespace
}  // namespace taskvec::lab
