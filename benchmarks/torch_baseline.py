#!/usr/bin/python3
"""PyTorch baselines for the end-to-end benchmark (docs/BENCHMARKS.md): the task-arithmetic edit

    out = s * pre + sum_i a_i * (ft_i - pre)

over safetensors checkpoints (a .safetensors file or a Hugging Face folder with an index), two ways:

  official  as the task-vectors paper's code does (mlfoundations/task_vectors, task_vectors.py): every
            checkpoint is read whole into memory; each TaskVector loads the pretrained and one fine-tuned
            state dict and keeps ft - pre (in the checkpoint dtype); the task vectors are summed with
            sum(); apply_to loads the pretrained state dict again and adds s_coef * sum; the whole
            result dict is then saved.
  mmap      as a careful user does: zero-copy memory-mapped tensors (numpy.memmap + torch.from_numpy,
            what safetensors' own loader does), tensor by tensor, f32 accumulation in taskvec's order
            (acc = s*pre; acc += a_i * (ft_i - pre)), each result written as soon as it is computed.

Both write one .safetensors file and fsync it (taskvec fsyncs its outputs too). The safetensors
Python package is not in Debian, so this file carries a minimal reader and writer (8-byte little-endian
header length, JSON header, data buffer).
"""
import argparse
import json
import os
import struct
import sys
import warnings

import numpy as np
import torch

TORCH_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
                "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                "BOOL": torch.bool}
NUMPY_DTYPES = {"BF16": np.int16,  # torch 1.13 has no uint16; same bits
                "F16": np.float16, "F32": np.float32, "F64": np.float64, "I64": np.int64,
                "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
SAFETENSORS_NAMES = {v: k for k, v in TORCH_DTYPES.items()}


def shard_files(path):
    """The .safetensors files of a checkpoint: a file, an index .json, or a folder."""
    if os.path.isdir(path):
        index = os.path.join(path, "model.safetensors.index.json")
        if not os.path.exists(index):
            return [os.path.join(path, "model.safetensors")]
        path = index
    if path.endswith(".json"):
        with open(path) as f:
            weight_map = json.load(f)["weight_map"]
        folder = os.path.dirname(path)
        return [os.path.join(folder, name) for name in sorted(set(weight_map.values()))]
    return [path]


def parse_header(prefix):
    (n,) = struct.unpack("<Q", prefix[:8])
    header = json.loads(bytes(prefix[8:8 + n]))
    header.pop("__metadata__", None)
    return 8 + n, header


def load_whole(path):
    """Reads every shard whole into memory (one bytearray each); tensors are views into it."""
    tensors = {}
    for file in shard_files(path):
        size = os.path.getsize(file)
        buf = bytearray(size)
        with open(file, "rb") as f:
            f.readinto(buf)
        start, header = parse_header(memoryview(buf))
        for name, info in header.items():
            begin, end = info["data_offsets"]
            dtype = TORCH_DTYPES[info["dtype"]]
            count = (end - begin) // torch.empty((), dtype=dtype).element_size()
            t = torch.frombuffer(buf, dtype=dtype, count=count, offset=start + begin) if count else torch.empty(0, dtype=dtype)
            tensors[name] = t.reshape(info["shape"])
    return tensors


def load_mmap(path):
    """Zero-copy tensors over numpy memory maps (kept alive by the tensors)."""
    tensors = {}
    for file in shard_files(path):
        mm = np.memmap(file, dtype=np.uint8, mode="r")
        start, header = parse_header(mm[:8 + struct.unpack("<Q", mm[:8].tobytes())[0]].tobytes())
        for name, info in header.items():
            begin, end = info["data_offsets"]
            arr = mm[start + begin:start + end].view(NUMPY_DTYPES[info["dtype"]]).reshape(info["shape"])
            t = torch.from_numpy(arr)
            if info["dtype"] == "BF16":
                t = t.view(torch.bfloat16)
            tensors[name] = t
    return tensors


class SafetensorsStreamWriter:
    """Writes a .safetensors file from (name, dtype, shape) known up front; tensor data appended in order."""

    def __init__(self, path, specs, metadata=None):
        self.order = sorted(specs)  # all one dtype size here: name order is the reference writer's order
        header, offset = {}, 0
        for name in self.order:
            dtype, shape = specs[name]
            nbytes = int(np.prod(shape, dtype=np.int64)) * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": SAFETENSORS_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        if metadata:
            header["__metadata__"] = metadata
        text = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
        text += b" " * (-len(text) % 8)
        self.f = open(path, "wb")
        self.f.write(struct.pack("<Q", len(text)) + text)
        self.expected = dict((n, header[n]["data_offsets"]) for n in self.order)
        self.written = 0

    def write(self, name, tensor):
        begin, end = self.expected[name]
        assert self.written == begin, f"{name} written out of order"
        t = tensor.contiguous()
        if t.dtype == torch.bfloat16:
            t = t.view(torch.int16)
        self.f.write(memoryview(t.numpy()).cast("B"))
        self.written = end

    def close(self):
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()


def is_float(t):
    return t.dtype.is_floating_point


def run_official(args):
    # task_vectors.py: TaskVector(pretrained_checkpoint, finetuned_checkpoint), sum(task_vectors),
    # task_vector_sum.apply_to(pretrained_checkpoint, scaling_coef).
    class TaskVector:
        def __init__(self, pre_path=None, ft_path=None, vector=None):
            if vector is not None:
                self.vector = vector
                return
            with torch.no_grad():
                pre = load_whole(pre_path)
                ft = load_whole(ft_path)
                self.vector = {k: ft[k] - pre[k] for k in pre if is_float(pre[k])}

        def __add__(self, other):
            with torch.no_grad():
                return TaskVector(vector={k: self.vector[k] + other.vector[k] for k in self.vector})

        def __radd__(self, other):
            return self if other in (None, 0) else self.__add__(other)

        def apply_to(self, pre_path, scaling_coef):
            with torch.no_grad():
                pre = load_whole(pre_path)
                return {k: (pre[k] + scaling_coef * self.vector[k]) if k in self.vector else pre[k] for k in pre}

    if len(set(args.coef)) != 1:
        sys.exit("official: the paper's code applies one scaling coefficient to the sum of task vectors")
    task_vectors = [TaskVector(args.pre, ft) for ft in args.ft]
    result = sum(task_vectors).apply_to(args.pre, args.coef[0])
    writer = SafetensorsStreamWriter(args.output, {k: (v.dtype, tuple(v.shape)) for k, v in result.items()}, {"format": "pt"})
    for name in writer.order:
        writer.write(name, result[name])
    writer.close()


def run_mmap(args):
    pre = load_mmap(args.pre)
    fts = [load_mmap(p) for p in args.ft]
    writer = SafetensorsStreamWriter(args.output, {k: (v.dtype, tuple(v.shape)) for k, v in pre.items()}, {"format": "pt"})
    with torch.no_grad():
        for name in writer.order:
            p = pre[name]
            if not is_float(p):
                writer.write(name, p)
                continue
            base = p.float()
            acc = base.clone() if args.base_scale == 1.0 else base * args.base_scale
            for a, ft in zip(args.coef, fts):
                tmp = ft[name].float()
                tmp.sub_(base)
                tmp.mul_(a)
                acc.add_(tmp)
            writer.write(name, acc.to(p.dtype))
    writer.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["official", "mmap"])
    ap.add_argument("--pre", required=True, help="pretrained checkpoint")
    ap.add_argument("--ft", nargs="+", required=True, help="fine-tuned checkpoints")
    ap.add_argument("--coef", type=float, nargs="+", default=[0.3], help="a_i (one value: the same for all)")
    ap.add_argument("--base-scale", type=float, default=1.0, help="s (mmap mode)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    ap.add_argument("-o", "--output", required=True, help="output .safetensors file")
    args = ap.parse_args()
    if len(args.coef) == 1:
        args.coef = args.coef * len(args.ft)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*not writable.*")
    warnings.filterwarnings("ignore", message=".*non-writable.*")
    (run_official if args.mode == "official" else run_mmap)(args)


if __name__ == "__main__":
    main()
