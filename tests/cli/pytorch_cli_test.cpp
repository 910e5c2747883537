// PyTorch checkpoints end to end, on files torch.save writes at test time (/usr/bin/python3 with
// torch; skipped without it): a pytorch_model.bin folder, a sharded folder with
// pytorch_model.bin.index.json and a transposed (non-contiguous) view, a state dict nested under
// 'state_dict'. The expected edit is computed by torch itself; a pickle that would run os.system is
// refused with exit 4 and never executed.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "cli/cli_run.hpp"
#include "support/model_files.hpp"
#include "support/temp_dir.hpp"

namespace taskvec {
namespace {

namespace fs = std::filesystem;
using test::read_values;
using test::Result;
using test::run;
using test::TempDir;

constexpr const char* kPython = "/usr/bin/python3";

constexpr const char* kScript = R"PY(
import json, os, pickle, sys, zipfile
import torch
out = sys.argv[1]
g = torch.Generator().manual_seed(3)
pre = {'a.weight': torch.randn(4, 3, generator=g), 'b.weight': torch.randn(3, 2, generator=g).bfloat16(),
       'ids': torch.arange(3)}
ft = {'a.weight': pre['a.weight'] + 0.25 * torch.randn(4, 3, generator=g),
      'b.weight': (pre['b.weight'].float() + 0.5).bfloat16(), 'ids': torch.arange(3)}
os.makedirs(os.path.join(out, 'pre')); os.makedirs(os.path.join(out, 'ft'))
torch.save(pre, os.path.join(out, 'pre', 'pytorch_model.bin'))
# ft as two shards; b.weight saved as a transposed view of a [2, 3] storage
torch.save({'a.weight': ft['a.weight']}, os.path.join(out, 'ft', 'pytorch_model-00001-of-00002.bin'))
torch.save({'b.weight': ft['b.weight'].t().contiguous().t(), 'ids': ft['ids']},
           os.path.join(out, 'ft', 'pytorch_model-00002-of-00002.bin'))
json.dump({'metadata': {'total_size': 0}, 'weight_map': {'a.weight': 'pytorch_model-00001-of-00002.bin',
           'b.weight': 'pytorch_model-00002-of-00002.bin', 'ids': 'pytorch_model-00002-of-00002.bin'}},
          open(os.path.join(out, 'ft', 'pytorch_model.bin.index.json'), 'w'))
torch.save({'state_dict': pre, 'epoch': 3}, os.path.join(out, 'nested.pt'))
# the expected 'pre + 2*tau(ft)', in f32, rounded once to the base dtype
for k in ('a.weight', 'b.weight'):
    want = (pre[k].float() + 2 * (ft[k].float() - pre[k].float())).to(pre[k].dtype).float()
    open(os.path.join(out, k + '.expected'), 'wb').write(want.contiguous().numpy().tobytes())
# a PEFT adapter whose weights are adapter_model.bin: dW = (alpha / r) * B @ A on a.weight
os.makedirs(os.path.join(out, 'lora'))
A = torch.randn(2, 3, generator=g); B = torch.randn(4, 2, generator=g)
torch.save({'base_model.model.a.lora_A.weight': A, 'base_model.model.a.lora_B.weight': B},
           os.path.join(out, 'lora', 'adapter_model.bin'))
json.dump({'peft_type': 'LORA', 'r': 2, 'lora_alpha': 4, 'target_modules': ['a'], 'bias': 'none'},
          open(os.path.join(out, 'lora', 'adapter_config.json'), 'w'))
want = (pre['a.weight'].double() + 0.5 * 2 * (B.double() @ A.double())).float()
open(os.path.join(out, 'lora.expected'), 'wb').write(want.contiguous().numpy().tobytes())
# a pickle whose REDUCE would call os.system: it must never run
class Evil:
    def __reduce__(self):
        return (os.system, ('touch ' + os.path.join(out, 'pwned'),))
with zipfile.ZipFile(os.path.join(out, 'evil.bin'), 'w', zipfile.ZIP_STORED) as z:
    z.writestr('archive/data.pkl', pickle.dumps({'w': Evil()}, protocol=2))
    z.writestr('archive/version', '3\n')
)PY";

class PytorchCli : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!fs::exists(kPython) || std::system((std::string(kPython) + " -c 'import torch' >/dev/null 2>&1").c_str()) != 0) {
      GTEST_SKIP() << kPython << " with torch is not installed (apt-get install python3-torch)";
    }
    std::ofstream(dir / "make.py") << kScript;
    ASSERT_EQ(std::system((std::string(kPython) + " " + (dir / "make.py").string() + " " + dir.path().string()).c_str()), 0);
  }
  std::string p(const std::string& name) const { return (dir / name).string(); }
  std::vector<float> expected(const std::string& name) const {
    std::ifstream in(dir / (name + ".expected"), std::ios::binary);
    const std::string raw{std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
    std::vector<float> v(raw.size() / 4);
    std::memcpy(v.data(), raw.data(), raw.size());
    return v;
  }
  TempDir dir;
};

TEST_F(PytorchCli, EditOfPytorchFoldersMatchesTorch) {
  Result r = run("edit -m pre=" + p("pre") + " -m ft=" + p("ft") + " 'pre + 2*tau(ft)' -o " + p("out.safetensors"), dir);
  ASSERT_EQ(r.status, 0) << r.err;
  for (const char* name : {"a.weight", "b.weight"}) {
    const auto got = read_values(dir / "out.safetensors", name);
    const auto want = expected(name);
    ASSERT_EQ(got.size(), want.size()) << name;
    // f32: the same three roundings as torch, up to the order of the ops (one ulp); bf16: one bf16 ulp.
    const double ulp = std::string(name) == "a.weight" ? std::ldexp(1.0, -23) : std::ldexp(1.0, -7);
    for (std::size_t i = 0; i < got.size(); ++i) EXPECT_NEAR(got[i], want[i], 2 * ulp * std::abs(want[i]) + 1e-30) << name << i;
  }
  EXPECT_EQ(read_values(dir / "out.safetensors", "ids"), (std::vector<double>{0, 1, 2}));
}

TEST_F(PytorchCli, AnAdapterWithPytorchWeightsIsApplied) {
  Result r = run("apply " + p("pre") + " -t " + p("lora") + ":0.5 -o " + p("lora.safetensors"), dir);
  ASSERT_EQ(r.status, 0) << r.err;
  const auto got = read_values(dir / "lora.safetensors", "a.weight");
  const auto want = expected("lora");
  ASSERT_EQ(got.size(), want.size());
  for (std::size_t i = 0; i < got.size(); ++i) EXPECT_NEAR(got[i], want[i], 4e-7 * std::abs(want[i]) + 1e-30) << i;
}

TEST_F(PytorchCli, InspectNamesTheFormatAndTheNestedKey) {
  Result r = run("inspect " + p("pre"), dir);
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_NE(r.out.find("3 tensors, 21 parameters"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("(pytorch)"), std::string::npos) << r.out;
  r = run("inspect " + p("nested.pt"), dir);
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_NE(r.err.find("'state_dict'"), std::string::npos) << r.err;
  r = run("validate " + p("ft"), dir);
  EXPECT_EQ(r.status, 0) << r.err;
  EXPECT_NE(r.out.find("3 tensors in 2 shard(s)"), std::string::npos) << r.out;
}

TEST_F(PytorchCli, APickleThatCallsOsSystemIsRefusedAndNeverRun) {
  Result r = run("--json validate " + p("evil.bin"), dir);
  EXPECT_EQ(r.status, 4) << r.out << r.err;
  EXPECT_NE(r.out.find("unsafe_pickle"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("system"), std::string::npos) << r.out;
  r = run("edit -m pre=" + p("pre") + " -m ft=" + p("evil.bin") + " 'pre + tau(ft)' -o " + p("x.safetensors"), dir);
  EXPECT_EQ(r.status, 4) << r.err;
  EXPECT_FALSE(fs::exists(dir / "pwned"));
  EXPECT_FALSE(fs::exists(dir / "x.safetensors"));
}

}  // namespace
}  // namespace taskvec
