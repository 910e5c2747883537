#!/usr/bin/env python3
"""Writes the files of docs/BENCHMARKS.md, "LoRA adapters applied while streaming", into OUT (default .):
base.safetensors (16 BF16 tensors [2048, 2048]) and lora/ (a PEFT rank-16 F32 adapter on all 16).
Needs numpy only.  Usage: python3 benchmarks/make_lora_bench.py [OUT]"""
import json
import os
import struct
import sys

import numpy as np


def save(path, tensors):
    header, off = {}, 0
    for name, (dtype, array) in tensors.items():
        n = array.nbytes
        header[name] = {"dtype": dtype, "shape": list(array.shape), "data_offsets": [off, off + n]}
        off += n
    text = json.dumps(header).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for _, array in tensors.values():
            f.write(array.tobytes())


def bf16(a):
    return (a.astype("<f4").view("<u4") >> 16).astype("<u2")  # truncation: any BF16 values will do


out = sys.argv[1] if len(sys.argv) > 1 else "."
os.makedirs(os.path.join(out, "lora"), exist_ok=True)
rng = np.random.default_rng(0)
base, lora = {}, {}
for i in range(16):
    base[f"layers.{i}.proj.weight"] = ("BF16", bf16(rng.standard_normal((2048, 2048), dtype=np.float32)))
    lora[f"base_model.model.layers.{i}.proj.lora_A.weight"] = ("F32", rng.standard_normal((16, 2048), dtype=np.float32))
    lora[f"base_model.model.layers.{i}.proj.lora_B.weight"] = ("F32", 0.01 * rng.standard_normal((2048, 16), dtype=np.float32))
save(os.path.join(out, "base.safetensors"), base)
save(os.path.join(out, "lora", "adapter_model.safetensors"), lora)
with open(os.path.join(out, "lora", "adapter_config.json"), "w") as f:
    json.dump({"peft_type": "LORA", "r": 16, "lora_alpha": 16, "target_modules": ["proj"], "bias": "none"}, f)
