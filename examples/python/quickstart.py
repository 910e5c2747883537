"""The Python package's quick start (docs/PYTHON.md), on small checkpoints it writes itself.
Run: PYTHONPATH=build/python /usr/bin/python3 examples/python/quickstart.py WORK_FOLDER"""
import os
import sys

import numpy as np

import taskvec as tv

work = sys.argv[1] if len(sys.argv) > 1 else "quickstart"
os.makedirs(work, exist_ok=True)
os.chdir(work)

# A pretrained model and three fine-tunes of it (bf16 weights, an integer buffer), written with tv.save.
rng = np.random.default_rng(0)
import torch  # noqa: E402  (only to write bf16 tensors)
pre = {"layer.weight": torch.from_numpy(rng.standard_normal((64, 32)).astype(np.float32)).bfloat16(),
       "layer.bias": torch.zeros(64), "position_ids": torch.arange(8)}
tv.save(pre, "pretrained.safetensors")
for name in ("a", "b", "c"):
    ft = dict(pre)
    ft["layer.weight"] = (pre["layer.weight"].float() + 0.05 * torch.from_numpy(
        rng.standard_normal((64, 32)).astype(np.float32))).bfloat16()
    ft["layer.bias"] = pre["layer.bias"] + 0.01 * torch.from_numpy(rng.standard_normal(64).astype(np.float32))
    tv.save(ft, f"{name}.safetensors")

pre = tv.open("pretrained.safetensors")
ft_a, ft_b, ft_c = tv.open("a.safetensors"), tv.open("b.safetensors"), tv.open("c.safetensors")
print(pre)
print(pre.tensor_names, pre.dtype("layer.weight"), pre.shape("layer.weight"), "layer.bias" in pre, len(pre))
w = pre["layer.weight"]
print(type(w).__name__, w.dtype, w.shape)

tau_a, tau_b, tau_c = (tv.task_vector(pre, f) for f in (ft_a, ft_b, ft_c))
edit = pre + 0.3 * (tau_a + tau_b) - 0.5 * tau_c          # lazy: nothing is read yet
print(edit)
print("layer.bias[:4] =", edit["layer.bias"][:4])         # computes just that tensor
report = edit.save("edited/", dtype="bf16", threads=2, max_shard_size="5GB")
print("wrote", report["files"], f"{report['tensors_edited']} edited, {report['tensors_copied']} copied")

s = tv.similarity([tau_a, tau_b, tau_c], names=["a", "b", "c"])
print("cosine:\n", np.round(s["cosine"], 4))
print("norms:", np.round(s["norms"], 4))

# The official repository's API (TaskVector), ported with a one-line change of the import.
from taskvec import TaskVector  # noqa: E402
task_vectors = [TaskVector("pretrained.safetensors", f"{n}.safetensors") for n in ("a", "b")]
task_vector_sum = sum(task_vectors)
model = task_vector_sum.apply_to("pretrained.safetensors", scaling_coef=0.8)
print(model)
state_dict = tv.to_torch(model)
print({k: (str(v.dtype), tuple(v.shape)) for k, v in state_dict.items()})

r = tv.merge({"merge_method": "ties", "base_model": "pretrained.safetensors",
              "models": [{"model": f"{n}.safetensors"} for n in ("a", "b", "c")],
              "parameters": {"density": 0.2}}, "ties.safetensors", force=True)
print("ties:", r["tensors_edited"], "tensors merged")
try:
    tv.open("missing.safetensors")
except tv.Error as e:
    print(f"taskvec.Error code={e.code!r}: {e}")
