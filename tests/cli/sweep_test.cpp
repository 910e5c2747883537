// `taskvec sweep`: the scaling coefficient chosen by an evaluation command, end to end. The evaluation
// script (Python, reading the candidate's safetensors header and data itself) scores each candidate by
// its distance to a known target, so the right choice is known here: the chosen output equals
// `taskvec edit` at that value byte for byte, sweep.json holds the whole curve with the scores computed
// here, the negation rule picks the lowest target whose control stays >= 95% of L = 0's, a failing
// evaluation stops the sweep with its status, and nothing is left behind (also on SIGINT).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "cli/cli_run.hpp"
#include "support/model_files.hpp"
#include "support/temp_dir.hpp"

namespace taskvec {
namespace {

namespace fs = std::filesystem;
using Json = nlohmann::json;
using test::read_text;
using test::Result;
using test::run;
using test::TempDir;
using test::TensorValues;

// Prints {"distance": |w - TARGET*ft|^2 negated as "score", "norm": |w|^2} for the candidate's tensor w.
constexpr const char* kEval = R"PY(
import json, os, struct, sys
path = sys.argv[1]
if os.path.isdir(path): path = os.path.join(path, 'model.safetensors')
data = open(path, 'rb').read()
n = struct.unpack('<Q', data[:8])[0]
h = json.loads(data[8:8 + n])
b, e = h['w']['data_offsets']
w = struct.unpack('<%df' % ((e - b) // 4), data[8 + n + b:8 + n + e])
target = float(os.environ.get('TARGET', '0.5'))
ft = [1.0, 2.0, 3.0, 4.0]
print('evaluating', path, file=sys.stderr)
print('some log line')
print(json.dumps({'score': -sum((x - target * f) ** 2 for x, f in zip(w, ft)), 'norm': sum(x * x for x in w)}))
)PY";

class Sweep : public ::testing::Test {
 protected:
  TempDir dir;
  void SetUp() override {
    test::write_model(dir / "pre.safetensors", {TensorValues{"w", DType::kF32, {4}, {0, 0, 0, 0}}});
    test::write_model(dir / "ft.safetensors", {TensorValues{"w", DType::kF32, {4}, {1, 2, 3, 4}}});
    std::ofstream(dir / "eval.py") << kEval;
  }
  static std::string sweep_args() {
    return "sweep -m pre=pre.safetensors -m ft=ft.safetensors 'pre + L*tau(ft)' --values 0:1:0.25 "
           "--eval '/usr/bin/python3 eval.py {model}'";
  }
  bool no_temp_left() const {
    for (const auto& e : fs::directory_iterator(dir.path()))
      if (e.path().filename().string().rfind(".taskvec-sweep-", 0) == 0) return false;
    return true;
  }
};

TEST_F(Sweep, ChoosesTheBestValueAndWritesItAndTheCurve) {
  const Result r = run(sweep_args() + " -o best.safetensors", dir);
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_NE(r.out.find("chose L=0.5"), std::string::npos) << r.out;
  // The chosen output is the edit at L = 0.5, byte for byte.
  ASSERT_EQ(run("edit -q -m pre=pre.safetensors -m ft=ft.safetensors 'pre + 0.5*tau(ft)' -o by_hand.safetensors", dir).status, 0);
  EXPECT_EQ(test::file_bytes(dir / "best.safetensors"), test::file_bytes(dir / "by_hand.safetensors"));
  const Json doc = Json::parse(read_text(dir / "best.safetensors.sweep.json"));
  ASSERT_EQ(doc["curve"].size(), 5u);
  for (int i = 0; i < 5; ++i) {
    const double l = 0.25 * i;
    double score = 0, norm = 0;
    for (int k = 1; k <= 4; ++k) {
      score -= (l * k - 0.5 * k) * (l * k - 0.5 * k);
      norm += l * k * l * k;
    }
    EXPECT_DOUBLE_EQ(doc["curve"][i]["value"].get<double>(), l);
    EXPECT_NEAR(doc["curve"][i]["scores"]["score"].get<double>(), score, 1e-9) << i;
    EXPECT_NEAR(doc["curve"][i]["scores"]["norm"].get<double>(), norm, 1e-9) << i;
  }
  EXPECT_EQ(doc["chosen"], 0.5);
  EXPECT_TRUE(no_temp_left());
  // min:norm picks L = 0; a folder output gets sweep.json inside; --keep-all keeps every candidate.
  const Result m = run(sweep_args() + " --select min:norm -o best_dir --keep-all cands --json", dir);
  ASSERT_EQ(m.status, 0) << m.err;
  EXPECT_EQ(Json::parse(m.out)["chosen"], 0.0);
  EXPECT_TRUE(fs::exists(dir / "best_dir" / "sweep.json"));
  EXPECT_TRUE(fs::exists(dir / "best_dir" / "model.safetensors"));
  for (const char* v : {"0", "0.25", "0.5", "0.75", "1"})
    EXPECT_TRUE(fs::exists(dir / "cands" / (std::string("L_") + v) / "model.safetensors")) << v;
}

// The paper's negation rule: the lowest target among the candidates whose control is >= 95% of its value
// at L = 0 (evaluated for the rule, as 0 is not among the values). target(L) = (L + 0.5)^2, control(L) =
// 1 - L/10: L = 0.6 and 1 fall below 0.95 of control(0) = 1, and of -1, -0.5, 0, 0.25 the target is
// lowest at -0.5.
TEST_F(Sweep, NegationRuleKeepsTheControl) {
  std::ofstream(dir / "neg.py") << R"PY(
import json, os, struct, sys
data = open(sys.argv[1], 'rb').read()
n = struct.unpack('<Q', data[:8])[0]
h = json.loads(data[8:8 + n]); b, e = h['w']['data_offsets']
w = struct.unpack('<4f', data[8 + n + b:8 + n + e])
L = w[0]  # ft's first element is 1: w[0] = L
print(json.dumps({'target': (L + 0.5) ** 2, 'control': 1 - L / 10}))
)PY";
  const Result r = run("sweep -m pre=pre.safetensors -m ft=ft.safetensors 'pre + L*tau(ft)' --values -1,-0.5,0.25,0.6,1 "
                       "--eval '/usr/bin/python3 neg.py {model}' --select negation:target,control,0.95 -o neg.safetensors --json", dir);
  ASSERT_EQ(r.status, 0) << r.err;
  const Json doc = Json::parse(r.out);
  EXPECT_EQ(doc["chosen"], -0.5);
  EXPECT_NEAR(doc["control_threshold"].get<double>(), 0.95, 1e-12);  // L = 0 was evaluated for the rule
  EXPECT_EQ(doc["curve"].size(), 6u);
}

TEST_F(Sweep, AFailingEvaluationStopsTheSweepWithItsStatus) {
  std::ofstream(dir / "fail.sh") << "echo 'broken evaluator' >&2\nexit 3\n";
  const Result r = run("sweep -m pre=pre.safetensors -m ft=ft.safetensors 'pre + L*tau(ft)' --values 0:1:0.5 "
                       "--eval 'sh fail.sh {model}' -o out.safetensors", dir);
  EXPECT_EQ(r.status, 3) << r.err;
  EXPECT_NE(r.err.find("broken evaluator"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("exited with status 3"), std::string::npos) << r.err;
  EXPECT_FALSE(fs::exists(dir / "out.safetensors"));
  EXPECT_TRUE(no_temp_left());
  // A last line that is no score is an error naming it.
  std::ofstream(dir / "words.sh") << "echo 'accuracy: high'\n";
  const Result w = run("sweep -m pre=pre.safetensors -m ft=ft.safetensors 'pre + L*tau(ft)' --values 0:1:0.5 "
                       "--eval 'sh words.sh {model}' -o out.safetensors", dir);
  EXPECT_EQ(w.status, 2) << w.err;
  EXPECT_NE(w.err.find("printed 'accuracy: high' as its last line"), std::string::npos) << w.err;
  EXPECT_TRUE(no_temp_left());
  const Result bad = run("sweep -m pre=pre.safetensors -m ft=ft.safetensors 'pre + 0.5*tau(ft)' --values 0:1:0.5 "
                         "--eval 'sh words.sh {model}' -o out.safetensors", dir);
  EXPECT_NE(bad.err.find("has no parameter L"), std::string::npos) << bad.err;
}

// Interrupted while an evaluation runs: the temporary folder of candidates is removed. SIGTERM (the same
// handler as SIGINT and SIGHUP; a background job of a non-interactive shell ignores SIGINT).
TEST_F(Sweep, InterruptLeavesNoTemporaryFolder) {
  std::ofstream(dir / "slow.sh") << "touch started\nsleep 20\necho 1\n";
  const std::string cmd = "cd '" + dir.path().string() + "' && (" + TASKVEC_BIN +
                          " sweep -m pre=pre.safetensors -m ft=ft.safetensors 'pre + L*tau(ft)' --values 0:1:0.5 "
                          "--eval 'sh slow.sh {model}' -o out.safetensors 2>/dev/null & pid=$!; "
                          "while [ ! -e started ]; do sleep 0.05; done; kill -TERM $pid; wait $pid; echo status=$?)";
  FILE* p = popen(cmd.c_str(), "r");
  ASSERT_NE(p, nullptr);
  std::string out;
  char buf[256];
  for (std::size_t n; (n = fread(buf, 1, sizeof buf, p)) > 0;) out.append(buf, n);
  pclose(p);
  EXPECT_NE(out.find("status=143"), std::string::npos) << out;  // ended by SIGTERM
  EXPECT_TRUE(no_temp_left());
  EXPECT_FALSE(fs::exists(dir / "out.safetensors"));
}

}  // namespace
}  // namespace taskvec
