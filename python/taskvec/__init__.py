"""taskvec: task arithmetic (Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023) and model
merging, from Python, on the checkpoints people hold (safetensors files and sharded Hugging Face folders,
PyTorch .bin, PEFT LoRA adapters).

Every computation runs in taskvec's C++ engine (the one the `taskvec` command uses), streamed with bounded
memory and with the GIL released; this module only builds lazy linear expressions over checkpoints and
hands them to it. Nothing is read until a tensor is asked for or an expression is saved.

    import taskvec as tv
    pre, ft_a, ft_b = tv.open("pretrained/"), tv.open("a/"), tv.open("b/")
    tau_a = tv.task_vector(pre, ft_a)                  # lazy: ft_a - pre
    edit = pre + 0.3 * (tau_a + tv.task_vector(pre, ft_b))
    edit["model.norm.weight"]                          # numpy: just that tensor
    edit.save("out/", dtype="bf16")                    # streams, like `taskvec edit`

docs/PYTHON.md has the whole API.
"""

import json
import numbers
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import weakref

import numpy as np

from . import _taskvec
from ._taskvec import Error

__version__ = _taskvec.__version__
__all__ = ["Error", "Checkpoint", "Expression", "TaskVector", "open", "task_vector", "merge", "similarity",
           "save", "to_torch", "sweep", "__version__"]

_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def _parse_size(value, what):
    """Bytes from an int or a text such as "5GB" / "512MiB" (decimal and binary units, as the CLI)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, str)):
        raise TypeError(f"{what} must be a number of bytes or a text such as '5GB', not {type(value).__name__}")
    if isinstance(value, numbers.Integral):
        return int(value)
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", value)
    if not m or m.group(2).upper() not in _SIZE_UNITS or m.group(2) == "":
        raise ValueError(f"{what}={value!r}: expected a size with a unit, e.g. '5GB', '500MB', '4GiB'")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).upper()])


def _options(dtype=None, threads=0, memory_budget=None, max_shard_size=None, force=False, progress=None,
             include=None, exclude=None, allow_nonfinite=False, clamp_overflow=False, untie_embeddings=False,
             dry_run=False, allow_crimes=None, only_selected=None):
    if progress is not None and not callable(progress):
        raise TypeError("progress must be callable(tensors_done, tensors_total, bytes_done, bytes_total)")
    return {"dtype": dtype, "threads": threads, "memory_budget": _parse_size(memory_budget, "memory_budget"),
            "max_shard_size": _parse_size(max_shard_size, "max_shard_size"), "force": force, "progress": progress,
            "include": include, "exclude": exclude, "allow_nonfinite": allow_nonfinite,
            "clamp_overflow": clamp_overflow, "untie_embeddings": untie_embeddings, "dry_run": dry_run,
            "allow_crimes": allow_crimes, "only_selected": only_selected}


def _regex_literal(text):
    """An ECMAScript regular expression matching exactly `text` (the engine's --include syntax)."""
    return "^" + "".join("\\" + c if c in ".^$|?*+()[]{}\\/" else c for c in text) + "$"


_opened = weakref.WeakValueDictionary()  # real path -> Checkpoint: one object per file, so terms combine


def open(path):  # noqa: A001 - the module's verb, as in tv.open
    """Opens a checkpoint: a .safetensors file, an index .json, a Hugging Face folder (sharded or not,
    safetensors or PyTorch .bin) or a PEFT adapter folder, its format detected from the bytes. Reads the
    headers only. The same path opened twice gives the same object. Raises taskvec.Error."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, not {type(path).__name__}")
    key = os.path.realpath(os.fspath(path))
    found = _opened.get(key)
    if found is not None:
        return found
    c = Checkpoint(_taskvec.Checkpoint.open(os.fspath(path)))
    _opened[key] = c
    return c


def _as_checkpoint(x, what):
    if isinstance(x, Checkpoint):
        return x
    if isinstance(x, (str, os.PathLike)):
        return open(x)
    raise TypeError(f"{what} must be a taskvec.Checkpoint or a path, not {type(x).__name__}")


class _Linear:
    """Arithmetic shared by checkpoints and expressions: +, -, unary -, * and / by a number, sum()."""

    def _expr(self):
        raise NotImplementedError

    def __add__(self, other):
        if isinstance(other, numbers.Number) and other == 0:
            return self._expr()
        if not isinstance(other, _Linear):
            return NotImplemented
        return self._expr()._combine(other._expr(), 1.0)

    def __radd__(self, other):  # sum([...]) starts from 0
        if isinstance(other, numbers.Number) and other == 0:
            return self._expr()
        return NotImplemented

    def __sub__(self, other):
        if not isinstance(other, _Linear):
            return NotImplemented
        return self._expr()._combine(other._expr(), -1.0)

    def __neg__(self):
        return self._expr()._scaled(-1.0)

    def __mul__(self, k):
        if isinstance(k, bool) or not isinstance(k, numbers.Real):
            return NotImplemented  # a checkpoint times a checkpoint is not linear
        return self._expr()._scaled(float(k))

    __rmul__ = __mul__

    def __truediv__(self, k):
        if isinstance(k, bool) or not isinstance(k, numbers.Real):
            return NotImplemented
        if k == 0:
            raise ZeroDivisionError("division of a checkpoint expression by 0")
        return self._expr()._scaled(1.0 / float(k))


class Checkpoint(_Linear):
    """An opened checkpoint (taskvec.open). Tensors are read on demand: `ckpt["w"]` is a numpy array
    (float32 for BF16 / F16 / F8, F32 / F64 / integers / bool as stored), read-only."""

    def __init__(self, native):
        self._c = native

    @property
    def path(self):
        return self._c.path

    @property
    def format(self):
        """The format detected from the bytes: "safetensors", "pytorch" or "lora"."""
        return self._c.format

    @property
    def tensor_names(self):
        return list(self._c.tensor_names)

    @property
    def metadata(self):
        """__metadata__ of the (first) safetensors shard: a dict of str."""
        return dict(self._c.metadata)

    def dtype(self, name):
        """The stored dtype of tensor `name`, e.g. "BF16". KeyError if absent."""
        return self._c.dtype(name)

    def shape(self, name):
        return self._c.shape(name)

    def raw(self, name):
        """The tensor's bytes (little-endian, row-major, its stored dtype)."""
        return self._c.read_raw(name)

    def __contains__(self, name):
        return isinstance(name, str) and self._c.contains(name)

    def __len__(self):
        return len(self._c.tensor_names)

    def __iter__(self):
        return iter(self._c.tensor_names)

    def __getitem__(self, name):
        if not isinstance(name, str):
            raise TypeError(f"tensor names are str, not {type(name).__name__}")
        return self._c.read(name)

    def __repr__(self):
        return f"taskvec.Checkpoint({os.fspath(self.path)!r}, {len(self)} tensors, {self.format})"

    def _expr(self):
        return Expression({self: 1.0}, None)

    def save(self, path, **options):
        """Writes this checkpoint (e.g. in another dtype or shard size) as Expression.save does."""
        return self._expr().save(path, **options)


class Expression(_Linear):
    """A lazy linear combination sum_i c_i * theta_i of checkpoints, e.g. pre + 0.4 * (ft - pre). Its
    pretrained checkpoint (from task_vector) is the base of the edit: out = pre + sum c_i (theta_i - pre)
    for a model (coefficients summing to 1), sum c_i (theta_i - pre) for a task vector (summing to 0)."""

    def __init__(self, coefficients, pretrained):
        self._coef = dict(coefficients)  # Checkpoint -> float, in the order the terms came
        self._pretrained = pretrained

    def _expr(self):
        return self

    def _scaled(self, k):
        return Expression({c: k * v for c, v in self._coef.items()}, self._pretrained)

    def _combine(self, other, sign):
        if self._pretrained is not None and other._pretrained is not None and self._pretrained is not other._pretrained:
            raise ValueError(f"task vectors of different pretrained checkpoints ({os.fspath(self._pretrained.path)} "
                             f"and {os.fspath(other._pretrained.path)}) do not add up")
        coef = dict(self._coef)
        for c, v in other._coef.items():
            coef[c] = coef.get(c, 0.0) + sign * v
        return Expression(coef, self._pretrained if self._pretrained is not None else other._pretrained)

    @property
    def coefficients(self):
        """{path: coefficient} of the checkpoints with a nonzero coefficient."""
        return {os.fspath(c.path): v for c, v in self._coef.items() if v != 0}

    def total(self):
        """Sum of the coefficients: 1 for a model, 0 for a task vector."""
        return sum(self._coef.values())

    def is_task_vector(self):
        return abs(self.total()) < 1e-9

    def _base(self):
        if self._pretrained is not None:
            return self._pretrained
        for c in self._coef:
            return c
        raise ValueError("an empty expression")

    def _task_vector_pair(self):
        """(pretrained, finetuned) when this is exactly finetuned - pretrained."""
        nonzero = {c: v for c, v in self._coef.items() if v != 0}
        if self._pretrained is None or len(nonzero) != 2 or nonzero.get(self._pretrained) != -1.0:
            return None
        ft = next(c for c in nonzero if c is not self._pretrained)
        return (self._pretrained, ft) if nonzero[ft] == 1.0 else None

    def save(self, path, dtype=None, threads=0, memory_budget=None, max_shard_size=None, force=False,
             progress=None, include=None, exclude=None, allow_nonfinite=False, clamp_overflow=False,
             untie_embeddings=False, dry_run=False):
        """Streams the expression into `path` (a .safetensors file, or a folder that gets shards, an index,
        and the base's config and tokenizer files), as `taskvec edit` does. A task vector (coefficients
        summing to 0) is written as F32 unless `dtype` says otherwise, a model in its base's dtypes.
        `progress(tensors_done, tensors_total, bytes_done, bytes_total)` is called now and then.
        Returns a dict (files, tensors_edited, bytes_written, seconds, warnings, ...). Raises taskvec.Error."""
        return self._save(path, _options(dtype, threads, memory_budget, max_shard_size, force, progress, include,
                                         exclude, allow_nonfinite, clamp_overflow, untie_embeddings, dry_run))

    def _save(self, path, options):
        path = os.fspath(path)
        base = self._base()
        pair = self._task_vector_pair()
        if pair is not None and not options.get("only_selected"):
            # Exactly finetuned - pretrained: `taskvec diff`, whose file records the pretrained fingerprint.
            return _taskvec.make_task_vector(pair[0]._c, pair[1]._c, path, options)
        if self.is_task_vector() and options.get("dtype") is None:
            options = dict(options, dtype="f32")
        scale = self.total()
        terms = [(c._c, v, True) for c, v in self._coef.items() if c is not base and v != 0]
        return _taskvec.linear_edit(base._c, scale, terms, path, options)

    def tensor(self, name, dtype=None):
        """Computes tensor `name` only (numpy; the dtype save() would write, decoded as Checkpoint reads it):
        the engine writes just that tensor to a temporary file, which is removed."""
        if not isinstance(name, str):
            raise TypeError(f"tensor names are str, not {type(name).__name__}")
        base = self._base()
        if name not in base:
            raise KeyError(f"{name} is not a tensor of {os.fspath(base.path)}")
        with tempfile.TemporaryDirectory(prefix="taskvec-tensor-") as d:
            out = os.path.join(d, "tensor.safetensors")
            self._save(out, _options(dtype=dtype, threads=1, include=_regex_literal(name), only_selected=True))
            return _taskvec.Checkpoint.open(out).read(name)

    __getitem__ = tensor

    @property
    def tensor_names(self):
        return self._base().tensor_names

    def __repr__(self):
        text = ""
        for c, v in self._coef.items():
            if v == 0:
                continue
            sign = "-" if v < 0 else "+"
            text += (f"{'-' if v < 0 else ''}" if not text else f" {sign} ") + f"{abs(v):g}*{os.fspath(c.path)}"
        return f"taskvec.Expression({text or '0'})"


def task_vector(pretrained, finetuned):
    """tau = finetuned - pretrained (Ilharco et al. eq. 1), lazy. Either may be a path or a Checkpoint."""
    pre = _as_checkpoint(pretrained, "pretrained")
    ft = _as_checkpoint(finetuned, "finetuned")
    if pre is ft:
        raise ValueError(f"pretrained and finetuned are the same checkpoint ({os.fspath(pre.path)}): tau would be 0")
    return Expression({ft: 1.0, pre: -1.0}, pre)


class TaskVector(Expression):
    """The official repository's API (task_vectors/src/task_vectors.py), lazily:
    TaskVector(pretrained_checkpoint, finetuned_checkpoint) or TaskVector(vector=...), +, unary -, * by a
    number, sum([...]), and apply_to(pretrained_checkpoint, scaling_coef) -> a lazy model (an Expression:
    save() it, read tensors from it, or to_torch() it). `vector` is an Expression, a task-vector file or
    its path."""

    def __init__(self, pretrained_checkpoint=None, finetuned_checkpoint=None, vector=None):
        if vector is not None:
            if pretrained_checkpoint is not None or finetuned_checkpoint is not None:
                raise ValueError("give vector=, or pretrained_checkpoint and finetuned_checkpoint, not both")
            e = vector._expr() if isinstance(vector, _Linear) else _as_checkpoint(vector, "vector")._expr()
        else:
            if pretrained_checkpoint is None or finetuned_checkpoint is None:
                raise ValueError("TaskVector needs pretrained_checkpoint and finetuned_checkpoint, or vector=")
            e = task_vector(pretrained_checkpoint, finetuned_checkpoint)
        super().__init__(e._coef, e._pretrained)

    def _wrap(self, e):
        return e if e is NotImplemented else TaskVector(vector=e)

    def __add__(self, other):
        return self._wrap(super().__add__(other))

    def __radd__(self, other):
        return self._wrap(super().__radd__(other))

    def __sub__(self, other):
        return self._wrap(super().__sub__(other))

    def __neg__(self):
        return TaskVector(vector=super().__neg__())

    def __mul__(self, k):
        return self._wrap(super().__mul__(k))

    __rmul__ = __mul__

    def apply_to(self, pretrained_checkpoint, scaling_coef=1.0):
        """pretrained + scaling_coef * tau, lazy (the paper's λ is scaling_coef)."""
        pre = _as_checkpoint(pretrained_checkpoint, "pretrained_checkpoint")
        return Expression(pre._expr()._coef, self._pretrained)._combine(self._scaled(float(scaling_coef)), 1.0)

    def __repr__(self):
        return "taskvec.TaskVector" + super().__repr__()[len("taskvec.Expression"):]


def merge(recipe, output, dtype=None, threads=0, memory_budget=None, max_shard_size=None, force=False,
          progress=None, allow_crimes=False, untie_embeddings=False, dry_run=False):
    """Runs a merge recipe as `taskvec merge` (mergekit's YAML with mergekit's meaning, docs/MERGEKIT.md):
    `recipe` is a path to a YAML file, YAML text, or a dict (one recipe). Returns the report dict."""
    options = _options(dtype, threads, memory_budget, max_shard_size, force, progress,
                       untie_embeddings=untie_embeddings, dry_run=dry_run, allow_crimes=allow_crimes)
    if isinstance(recipe, dict):
        import json  # JSON is YAML: the engine reads the dict as written
        return _taskvec.merge(json.dumps(recipe), True, os.fspath(output), options)
    if isinstance(recipe, os.PathLike) or (isinstance(recipe, str) and (os.path.exists(recipe) or
                                                                         ("\n" not in recipe and ":" not in recipe))):
        return _taskvec.merge(os.fspath(recipe), False, os.fspath(output), options)
    if isinstance(recipe, str):
        return _taskvec.merge(recipe, True, os.fspath(output), options)
    raise TypeError(f"recipe must be a path, YAML text or a dict, not {type(recipe).__name__}")


def similarity(task_vectors, names=None, threads=0, include=None, exclude=None):
    """Cosine similarities, norms and sign conflicts of task vectors (as `taskvec similarity`): a list of
    task_vector(pre, ft) expressions of one pretrained checkpoint, or of task-vector checkpoints. Returns
    {"names", "norms" (numpy), "cosine" (numpy, n x n), "sign_conflict" (n x n), "compared", "warnings"}."""
    items = list(task_vectors)
    if len(items) < 2:
        raise ValueError("similarity needs at least two task vectors")
    names = list(names) if names is not None else [f"tau{i}" for i in range(len(items))]
    if len(names) != len(items):
        raise ValueError(f"{len(names)} names for {len(items)} task vectors")
    options = _options(threads=threads, include=include, exclude=exclude)
    pairs = [x._expr()._task_vector_pair() if isinstance(x, Expression) else None for x in items]
    if all(p is not None for p in pairs):
        pres = {id(p[0]) for p in pairs}
        if len(pres) != 1:
            raise ValueError("the task vectors come from different pretrained checkpoints")
        return _taskvec.similarity(pairs[0][0]._c, [(n, p[1]._c) for n, p in zip(names, pairs)], options)
    if all(isinstance(x, Checkpoint) for x in items):
        return _taskvec.similarity(None, [(n, x._c) for n, x in zip(names, items)], options)
    # General expressions: each is written as an F32 task vector file first, then compared.
    with tempfile.TemporaryDirectory(prefix="taskvec-similarity-") as d:
        files = []
        for i, x in enumerate(items):
            e = _as_checkpoint(x, "task vector")._expr() if not isinstance(x, _Linear) else x._expr()
            if not e.is_task_vector():
                raise ValueError(f"{names[i]} is not a task vector (its coefficients sum to {e.total():g}, not 0)")
            out = os.path.join(d, f"{i}.safetensors")
            e._save(out, _options(threads=threads))
            files.append(_taskvec.Checkpoint.open(out))
        return _taskvec.similarity(None, list(zip(names, files)), options)


_NUMPY_DTYPES = {np.dtype(np.float32): "F32", np.dtype(np.float64): "F64", np.dtype(np.float16): "F16",
                 np.dtype(np.int64): "I64", np.dtype(np.int32): "I32", np.dtype(np.int16): "I16",
                 np.dtype(np.int8): "I8", np.dtype(np.uint8): "U8", np.dtype(np.uint16): "U16",
                 np.dtype(np.uint32): "U32", np.dtype(np.uint64): "U64", np.dtype(np.bool_): "BOOL"}


def _tensor_bytes(name, value):
    """(dtype, shape, bytes) of a numpy array or a torch tensor (torch.bfloat16 kept as BF16)."""
    if type(value).__module__.startswith("torch"):
        import torch
        t = value.detach().cpu().contiguous()
        if t.dtype == torch.bfloat16:
            return "BF16", list(t.shape), t.view(torch.int16).numpy().tobytes()
        value = t.numpy()
    if not isinstance(value, np.ndarray):
        raise TypeError(f"tensor '{name}': expected a numpy array or a torch tensor, not {type(value).__name__}")
    dtype = _NUMPY_DTYPES.get(value.dtype)
    if dtype is None:
        raise TypeError(f"tensor '{name}': numpy dtype {value.dtype} has no safetensors dtype taskvec writes")
    return dtype, list(value.shape), np.ascontiguousarray(value).astype(value.dtype.newbyteorder("<"), copy=False).tobytes()


def save(tensors, path, metadata=None):
    """Writes {name: numpy array | torch tensor} as one safetensors file, atomically (the engine's writer)."""
    if not isinstance(tensors, dict):
        raise TypeError(f"tensors must be a dict of name -> array, not {type(tensors).__name__}")
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    data = []
    for name, value in tensors.items():
        if not isinstance(name, str):
            raise TypeError(f"tensor names are str, not {type(name).__name__}")
        data.append((name, *_tensor_bytes(name, value)))
    _taskvec.write_safetensors(os.fspath(path), data, meta)


_TORCH_DTYPES = None


def to_torch(x):
    """A dict {name: torch tensor} of a checkpoint (stored dtypes kept: BF16 stays torch.bfloat16) or of an
    expression (computed first, in its base's dtypes). Loads every tensor: the one call here that does."""
    import torch
    global _TORCH_DTYPES
    if _TORCH_DTYPES is None:
        _TORCH_DTYPES = {"F32": torch.float32, "F64": torch.float64, "F16": torch.float16, "BF16": torch.bfloat16,
                         "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                         "U8": torch.uint8, "BOOL": torch.bool}
    if isinstance(x, Expression):
        with tempfile.TemporaryDirectory(prefix="taskvec-torch-") as d:
            out = os.path.join(d, "model.safetensors")
            x._save(out, _options())
            return to_torch(Checkpoint(_taskvec.Checkpoint.open(out)))
    c = _as_checkpoint(x, "checkpoint")
    result = {}
    for name in c.tensor_names:
        dt = _TORCH_DTYPES.get(c.dtype(name))
        if dt is None:  # F8 and other dtypes torch may lack: decoded to float32
            result[name] = torch.from_numpy(np.array(c[name]))
            continue
        raw = bytearray(c.raw(name))
        t = torch.frombuffer(raw, dtype=dt) if raw else torch.empty(0, dtype=dt)
        result[name] = t.reshape(c.shape(name))
    return result


def _scores(result, label):
    """{name: number} from an evaluation's result: a number ("score"), a dict, or printed text whose last
    non-empty line is a number or a JSON object (as `taskvec sweep` reads a command's output)."""
    if isinstance(result, str):
        lines = [ln.strip() for ln in result.splitlines() if ln.strip()]
        last = lines[-1] if lines else ""
        try:
            result = json.loads(last) if last.startswith("{") else float(last)
        except ValueError:
            raise ValueError(f"{label} printed {last!r} as its last line: expected a number or a JSON object of numbers")
    if isinstance(result, bool):
        raise TypeError(f"{label} returned a bool, not a score")
    if isinstance(result, numbers.Real):
        return {"score": float(result)}
    if isinstance(result, dict) and result and all(isinstance(v, numbers.Real) and not isinstance(v, bool)
                                                   for v in result.values()):
        return {str(k): float(v) for k, v in result.items()}
    raise TypeError(f"{label} returned {result!r}: expected a number or a dict of numbers")


def _parse_select(select):
    kind, _, rest = select.partition(":")
    if kind in ("max", "min"):
        return kind, rest or "score", None, None
    if kind == "negation":
        parts = rest.split(",")
        if len(parts) not in (2, 3) or not all(parts[:2]):
            raise ValueError(f"select={select!r}: expected negation:TARGET,CONTROL[,RATIO]")
        ratio = float(parts[2]) if len(parts) == 3 else 0.95
        if not 0 < ratio <= 1:
            raise ValueError(f"select={select!r}: RATIO must be in (0, 1]")
        return kind, parts[0], parts[1], ratio
    raise ValueError(f"select={select!r}: expected max:NAME, min:NAME or negation:TARGET,CONTROL,RATIO")


def sweep(expression, values, evaluate, select="max:score", output=None, keep_all=None, **save_options):
    """Chooses a scaling coefficient on validation data, as `taskvec sweep`: for each value L of `values`,
    `expression(L)` (an Expression, e.g. lambda L: pre + L * tau) is saved as a candidate folder and
    evaluated: `evaluate(path)` returns a number or a dict of named numbers, or `evaluate` is a shell
    command with {model} whose last line of output is one. The candidate is deleted unless `keep_all`
    (a folder that keeps them). `select`: "max:NAME" (default max:score), "min:NAME", or the paper's
    negation rule "negation:TARGET,CONTROL,RATIO" (lowest TARGET with CONTROL >= RATIO x its value at L =
    0; L = 0 is evaluated for it when not among the values). With `output`, the chosen candidate is
    saved there (with `save_options`). Returns {"curve": [{"value", "scores"}], "chosen", "chosen_scores",
    "output"}. A failing command raises subprocess.CalledProcessError; nothing is left behind."""
    kind, score, control, ratio = _parse_select(select)
    values = [float(v) for v in values]
    if not values:
        raise ValueError("sweep needs at least one value")
    if not callable(expression):
        raise TypeError("expression must be a callable L -> Expression, e.g. lambda L: pre + L * tau")
    if isinstance(evaluate, str) and "{model}" not in evaluate:
        raise ValueError(f"evaluate={evaluate!r} has no {{model}} to replace by a candidate's path")
    if not (callable(evaluate) or isinstance(evaluate, str)):
        raise TypeError("evaluate must be a callable(path) or a shell command with {model}")
    where = keep_all if keep_all is not None else tempfile.mkdtemp(
        prefix=".taskvec-sweep-", dir=os.path.dirname(os.path.abspath(os.fspath(output))) if output else None)
    os.makedirs(where, exist_ok=True)
    curve = []
    try:
        todo = ([0.0] if kind == "negation" and 0.0 not in values else []) + values
        for v in todo:
            cand = os.path.join(where, f"L_{v:g}")
            e = expression(v)
            if not isinstance(e, _Linear):
                raise TypeError(f"expression({v:g}) returned {type(e).__name__}, not a taskvec expression")
            e._expr()._save(cand, _options())
            label = f"the evaluation of L={v:g}"
            if callable(evaluate):
                result = evaluate(cand)
            else:
                done = subprocess.run(evaluate.replace("{model}", shlex.quote(cand)), shell=True, stdout=subprocess.PIPE,
                                      text=True, check=True)
                result = done.stdout
            curve.append({"value": v, "scores": _scores(result, label)})
            if keep_all is None:
                shutil.rmtree(cand, ignore_errors=True)
    finally:
        if keep_all is None:
            shutil.rmtree(where, ignore_errors=True)

    def get(c, name):
        if name not in c["scores"]:
            raise KeyError(f"select={select!r}: the evaluation of L={c['value']:g} gave no score {name!r} "
                           f"(it gave {sorted(c['scores'])})")
        return c["scores"][name]

    if kind == "negation":
        zero = next(c for c in curve if c["value"] == 0.0)
        threshold = ratio * get(zero, control)
        allowed = [c for c in curve if get(c, control) >= threshold]
        if not allowed:
            raise ValueError(f"select={select!r}: no candidate has {control} >= {threshold:.6g} "
                             f"({ratio} x its value at L = 0)")
        best = min(allowed, key=lambda c: get(c, score))
    elif kind == "max":
        best = max(curve, key=lambda c: get(c, score))
    else:
        best = min(curve, key=lambda c: get(c, score))
    result = {"curve": curve, "chosen": best["value"], "chosen_scores": best["scores"], "output": None}
    if output is not None:
        expression(best["value"]).save(output, **save_options)
        result["output"] = os.fspath(output)
    return result
