"""The taskvec Python package (python/taskvec) against values computed here with numpy and torch:
reads, lazy expressions and their saved files, the paper's TaskVector API, merges, similarity, torch round
trips, laziness (a tensor of an expression reads only its own inputs), error codes, the GIL released.
Run by ctest (Python.pytest) with PYTHONPATH=build/python."""

import os
import subprocess
import sys
import threading

import numpy as np
import pytest

import taskvec as tv

torch = pytest.importorskip("torch")


def models(tmp_path, shape=(4, 3), seed=0):
    """A pretrained checkpoint and two fine-tunes (F32 weights, an I64 tensor), written with tv.save."""
    rng = np.random.default_rng(seed)
    pre = {"w": rng.standard_normal(shape).astype(np.float32), "b": rng.standard_normal(shape[-1]).astype(np.float32),
           "ids": np.arange(3, dtype=np.int64)}
    fts = []
    for _ in range(2):
        fts.append({k: (v + np.float32(0.1) * rng.standard_normal(v.shape).astype(np.float32) if v.dtype == np.float32
                        else v) for k, v in pre.items()})
    paths = [tmp_path / n for n in ("pre.safetensors", "a.safetensors", "b.safetensors")]
    for p, d in zip(paths, [pre] + fts):
        tv.save(d, p)
    return paths, pre, fts


def test_open_and_read(tmp_path):
    (p, _, _), pre, _ = models(tmp_path)
    c = tv.open(p)
    assert c.tensor_names == ["b", "ids", "w"]
    assert len(c) == 3 and "w" in c and "x" not in c
    assert c.dtype("w") == "F32" and c.shape("w") == (4, 3) and c.dtype("ids") == "I64"
    assert c.format == "safetensors"
    w = c["w"]
    assert w.dtype == np.float32 and np.array_equal(w, pre["w"])
    assert not w.flags.writeable
    assert np.array_equal(c["ids"], pre["ids"])
    # F32 in a safetensors file: a view of the file's read-only map, no copy (the array owns no data)
    assert not w.flags.owndata and w.base is not None
    with pytest.raises(ValueError):
        w[0, 0] = 1.0
    assert tv.open(str(p)) is c  # one object per file
    with pytest.raises(KeyError):
        c["nope"]
    with pytest.raises(TypeError):
        c[3]


def test_expression_values_and_save(tmp_path):
    (p, a, b), pre, (fa, fb) = models(tmp_path)
    P, A, B = tv.open(p), tv.open(a), tv.open(b)
    edit = P + 0.3 * (tv.task_vector(P, A) + tv.task_vector(P, B)) - 0.5 * tv.task_vector(P, B)
    assert edit.coefficients == pytest.approx({str(p): 1 - 0.3 - 0.3 + 0.5, str(a): 0.3, str(b): 0.3 - 0.5})
    want = pre["w"].astype(np.float64) + 0.3 * (fa["w"] - pre["w"]) + (0.3 - 0.5) * (fb["w"] - pre["w"])
    got = edit["w"]
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-6)
    report = edit.save(tmp_path / "out.safetensors")
    assert report["tensors_edited"] == 2 and report["tensors_copied"] == 1
    out = tv.open(tmp_path / "out.safetensors")
    assert np.array_equal(out["w"], got)  # the tensor alone and the saved file agree bit for bit
    assert np.array_equal(out["ids"], pre["ids"])
    # bf16 output: the f32 result rounded to nearest even, as torch rounds it
    edit.save(tmp_path / "bf16.safetensors", dtype="bf16")
    bf = tv.open(tmp_path / "bf16.safetensors")
    assert bf.dtype("w") == "BF16"
    assert np.array_equal(bf["w"], torch.from_numpy(np.array(got)).bfloat16().float().numpy())
    # the task vector alone is `taskvec diff`: F32 with the pretrained fingerprint
    tv.task_vector(P, A).save(tmp_path / "tau.safetensors")
    tau = tv.open(tmp_path / "tau.safetensors")
    assert tau.metadata["taskvec.kind"] == "task_vector"
    assert np.array_equal(tau["w"], fa["w"] - pre["w"])
    with pytest.raises(tv.Error) as e:
        edit.save(tmp_path / "out.safetensors")
    assert e.value.code == "output_exists"
    edit.save(tmp_path / "out.safetensors", force=True)


def test_paper_api(tmp_path):
    """The official repository's README, with taskvec: sum of task vectors applied with a coefficient,
    and a negated one."""
    (p, a, b), pre, (fa, fb) = models(tmp_path)
    task_vectors = [tv.TaskVector(pretrained_checkpoint=p, finetuned_checkpoint=f) for f in (a, b)]
    task_vector_sum = sum(task_vectors)
    assert isinstance(task_vector_sum, tv.TaskVector)
    model = task_vector_sum.apply_to(p, scaling_coef=0.8)
    want = pre["w"] + 0.8 * ((fa["w"] - pre["w"]) + (fb["w"] - pre["w"]))
    np.testing.assert_allclose(model["w"], want, atol=1e-6)
    neg = -task_vectors[0]
    assert isinstance(neg, tv.TaskVector)
    forget = neg.apply_to(p, scaling_coef=0.5)
    np.testing.assert_allclose(forget["b"], pre["b"] - 0.5 * (fa["b"] - pre["b"]), atol=1e-6)
    forget.save(tmp_path / "forget")
    assert os.path.exists(tmp_path / "forget" / "model.safetensors")
    # vector= takes an expression or a task-vector file
    tv.task_vector(p, a).save(tmp_path / "tau.safetensors")
    from_file = tv.TaskVector(vector=tmp_path / "tau.safetensors")
    np.testing.assert_array_equal(from_file["w"], fa["w"] - pre["w"])
    with pytest.raises(ValueError):
        tv.TaskVector(pretrained_checkpoint=p)


def test_issue_example_runs_as_written(tmp_path):
    """The example of docs/PYTHON.md, in order."""
    (p, a, b), pre, (fa, fb) = models(tmp_path)
    c = tmp_path / "c.safetensors"
    tv.save({k: (v * np.float32(1.01) if v.dtype == np.float32 else v) for k, v in pre.items()}, c)
    pre_c = tv.open(p)
    ft_a, ft_b = tv.open(a), tv.open(b)
    pre_c.tensor_names; pre_c.dtype("w"); pre_c.shape("w"); pre_c.metadata; "w" in pre_c; len(pre_c)
    pre_c["w"]
    tau_a = tv.task_vector(pre_c, ft_a)
    tau_c = tv.task_vector(pre_c, tv.open(c))
    edit = pre_c + 0.3 * (tau_a + tv.task_vector(pre_c, ft_b)) - 0.5 * tau_c
    edit["w"]
    report = edit.save(tmp_path / "out", dtype="bf16", threads=2, max_shard_size="5GB")
    assert report["files"][0].endswith("model.safetensors")
    recipe = {"merge_method": "linear", "models": [{"model": str(a), "parameters": {"weight": 1}},
                                                   {"model": str(b), "parameters": {"weight": 3}}]}
    tv.merge(recipe, tmp_path / "merged")
    merged = tv.open(tmp_path / "merged")
    np.testing.assert_allclose(merged["w"], (fa["w"] + 3 * fb["w"]) / 4, atol=1e-6)
    s = tv.similarity([tau_a, tv.task_vector(pre_c, ft_b)])
    da, db = (fa["w"] - pre["w"]).ravel(), (fb["w"] - pre["w"]).ravel()
    xa = np.concatenate([da, (fa["b"] - pre["b"])]).astype(np.float64)
    xb = np.concatenate([db, (fb["b"] - pre["b"])]).astype(np.float64)
    assert s["cosine"][0, 1] == pytest.approx(xa @ xb / np.linalg.norm(xa) / np.linalg.norm(xb), abs=1e-6)
    assert s["norms"][0] == pytest.approx(np.linalg.norm(xa), rel=1e-6)
    tv.save({"w": torch.ones(2, 2)}, tmp_path / "x.safetensors", metadata={"k": "v"})
    assert tv.open(tmp_path / "x.safetensors").metadata == {"k": "v"}
    t = tv.to_torch(pre_c)
    assert torch.equal(t["w"], torch.from_numpy(pre["w"]))


def test_merge_recipe_text_and_file(tmp_path):
    (p, a, b), pre, (fa, fb) = models(tmp_path)
    text = f"merge_method: task_arithmetic\nbase_model: {p}\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.5}}\n"
    tv.merge(text, tmp_path / "m1")
    (tmp_path / "r.yml").write_text(text)
    tv.merge(str(tmp_path / "r.yml"), tmp_path / "m2")
    for out in ("m1", "m2"):
        np.testing.assert_allclose(tv.open(tmp_path / out)["w"], pre["w"] + 0.5 * (fa["w"] - pre["w"]), atol=1e-6)
    with pytest.raises(tv.Error) as e:
        tv.merge("merge_method: linear\nmodels: []\n", tmp_path / "m3")
    assert e.value.code == "recipe"


def test_torch_round_trips(tmp_path):
    g = torch.Generator().manual_seed(1)
    tensors = {"bf": torch.randn(5, 3, generator=g).bfloat16(), "f16": torch.randn(4, generator=g).half(),
               "f32": torch.randn(2, 2, generator=g), "i": torch.arange(4), "flag": torch.tensor([True, False])}
    tv.save(tensors, tmp_path / "t.safetensors")
    c = tv.open(tmp_path / "t.safetensors")
    assert c.dtype("bf") == "BF16" and c.dtype("f16") == "F16" and c.dtype("flag") == "BOOL"
    back = tv.to_torch(c)
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype, k
        assert torch.equal(back[k], v), k
    assert np.array_equal(c["bf"], tensors["bf"].float().numpy())  # numpy: decoded to float32
    # an expression goes to torch in its base's dtypes
    tv.save({"w": tensors["bf"]}, tmp_path / "p.safetensors")
    tv.save({"w": (tensors["bf"].float() + 1).bfloat16()}, tmp_path / "f.safetensors")
    e = tv.open(tmp_path / "p.safetensors") + 0.5 * tv.task_vector(tmp_path / "p.safetensors", tmp_path / "f.safetensors")
    out = tv.to_torch(e)["w"]
    want = (tensors["bf"].float() + 0.5 * ((tensors["bf"].float() + 1).bfloat16().float() - tensors["bf"].float())).bfloat16()
    assert out.dtype == torch.bfloat16 and torch.equal(out, want)


def test_tensor_of_an_expression_reads_only_its_inputs(tmp_path):
    """A sharded folder whose shard without 'w' is cut short after opening: the tensor 'w' of an expression
    still computes (nothing else is read), while saving the whole expression fails on the cut shard."""
    rng = np.random.default_rng(3)
    big = {"a.big": rng.standard_normal((256, 256)).astype(np.float32), "w": rng.standard_normal(8).astype(np.float32)}
    tv.save(big, tmp_path / "pre.safetensors")
    tv.save({k: v + 1 for k, v in big.items()}, tmp_path / "ft.safetensors")
    tv.open(tmp_path / "pre.safetensors").save(tmp_path / "pre", max_shard_size=100_000)
    folder = tv.open(tmp_path / "pre")
    shards = sorted(f for f in os.listdir(tmp_path / "pre") if f.endswith(".safetensors"))
    assert len(shards) == 2
    edit = folder + 0.5 * tv.task_vector(folder, tmp_path / "ft.safetensors")
    first = tmp_path / "pre" / shards[0]  # 'a.big' sorts first: its own shard
    with open(first, "r+b") as f:
        f.truncate(os.path.getsize(first) // 2)
    np.testing.assert_allclose(edit["w"], big["w"] + 0.5, atol=1e-6)
    with pytest.raises(tv.Error):
        edit.save(tmp_path / "out.safetensors")
    assert not os.path.exists(tmp_path / "out.safetensors")


def test_errors(tmp_path):
    (p, a, _), _, _ = models(tmp_path)
    with pytest.raises(tv.Error) as e:
        tv.open(tmp_path / "missing.safetensors")
    assert e.value.code == "io" and "missing.safetensors" in str(e.value)
    tv.save({"w": np.zeros((2, 2), np.float32), "b": np.zeros(3, np.float32), "ids": np.arange(3)},
            tmp_path / "other.safetensors")
    with pytest.raises(tv.Error) as e:
        (tv.open(p) + tv.task_vector(p, tmp_path / "other.safetensors")).save(tmp_path / "o.safetensors")
    assert e.value.code == "shape_mismatch"
    assert isinstance(e.value, Exception)
    P = tv.open(p)
    with pytest.raises(TypeError):
        P * P
    with pytest.raises(TypeError):
        tv.open(3)
    with pytest.raises(ValueError):
        (P + 0).save(tmp_path / "x.safetensors", dtype="int8")
    with pytest.raises(ValueError):
        (P + 0).save(tmp_path / "x.safetensors", max_shard_size="5 parsecs")
    with pytest.raises(ValueError):
        tv.task_vector(P, P)
    with pytest.raises(TypeError):
        tv.save({"w": [1, 2]}, tmp_path / "x.safetensors")


def test_save_releases_the_gil(tmp_path):
    """A second Python thread keeps running while a long save runs in the engine."""
    rng = np.random.default_rng(4)
    n = 6_000_000
    tv.save({"w": rng.standard_normal(n).astype(np.float32)}, tmp_path / "pre.safetensors")
    tv.save({"w": rng.standard_normal(n).astype(np.float32)}, tmp_path / "ft.safetensors")
    e = tv.open(tmp_path / "pre.safetensors") + 0.5 * tv.task_vector(tmp_path / "pre.safetensors",
                                                                      tmp_path / "ft.safetensors")
    count = [0]
    stop = threading.Event()
    during = []

    def spin():
        while not stop.is_set():
            count[0] += 1

    t = threading.Thread(target=spin)
    t.start()
    calls = []

    def progress(done, total, bytes_done, bytes_total):
        calls.append(bytes_done)
        during.append(count[0])

    before = count[0]
    e.save(tmp_path / "out.safetensors", threads=1, progress=progress, memory_budget=4 << 20)
    after = count[0]
    stop.set()
    t.join()
    assert calls, "the progress callback was called"
    # With the GIL held for the whole save, the spinning thread could not have counted during it.
    assert after - before > 10_000, (before, after)


def test_sweep_chooses_lambda(tmp_path):
    """tv.sweep: the best L by a Python evaluator, by a shell command, and by the paper's negation rule."""
    tv.save({"w": np.zeros(4, np.float32)}, tmp_path / "pre.safetensors")
    tv.save({"w": np.array([1, 2, 3, 4], np.float32)}, tmp_path / "ft.safetensors")
    pre = tv.open(tmp_path / "pre.safetensors")
    tau = tv.task_vector(pre, tmp_path / "ft.safetensors")
    target = np.array([1, 2, 3, 4]) * 0.75
    seen = []

    def evaluate(path):
        seen.append(path)
        w = tv.open(path)["w"]
        return {"score": -float(((w - target) ** 2).sum()), "norm": float((w ** 2).sum())}

    r = tv.sweep(lambda L: pre + L * tau, np.arange(0, 1.01, 0.25), evaluate, output=tmp_path / "best")
    assert r["chosen"] == 0.75
    assert [c["value"] for c in r["curve"]] == [0, 0.25, 0.5, 0.75, 1]
    assert r["curve"][2]["scores"]["score"] == pytest.approx(-((0.5 - 0.75) ** 2) * 30)
    np.testing.assert_array_equal(tv.open(tmp_path / "best")["w"], np.array([0.75, 1.5, 2.25, 3.0], np.float32))
    assert all(not os.path.exists(p) for p in seen)  # candidates deleted
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".taskvec-sweep-")]
    assert tv.sweep(lambda L: pre + L * tau, [0, 0.5, 1], evaluate, select="min:norm")["chosen"] == 0
    # A shell command, whose last line is the score.
    script = tmp_path / "eval.py"
    script.write_text("import sys, taskvec as tv\nw = tv.open(sys.argv[1])['w']\nprint('log')\nprint(-abs(float(w[0]) - 0.25))\n")
    r = tv.sweep(lambda L: pre + L * tau, [0, 0.25, 0.5], f"{sys.executable} {script} {{model}}")
    assert r["chosen"] == 0.25
    # The negation rule: target (L+0.5)^2, control 1 - L/10, L = 0 evaluated for the threshold.
    neg = tv.sweep(lambda L: pre + L * tau, [-1, -0.5, 0.25, 0.6, 1],
                   lambda p: {"target": (float(tv.open(p)["w"][0]) + 0.5) ** 2, "control": 1 - float(tv.open(p)["w"][0]) / 10},
                   select="negation:target,control,0.95")
    assert neg["chosen"] == -0.5 and len(neg["curve"]) == 6
    with pytest.raises(subprocess.CalledProcessError):
        tv.sweep(lambda L: pre + L * tau, [0, 1], "exit 3 # {model}")
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".taskvec-sweep-")]
    with pytest.raises(ValueError):
        tv.sweep(lambda L: pre + L * tau, [0, 1], evaluate, select="best")
