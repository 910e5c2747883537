#!/usr/bin/python3
"""End-to-end benchmark of taskvec against PyTorch and the `cat` read floor (docs/BENCHMARKS.md).

For a preset (benchmarks/gen_checkpoints.cpp) it generates, once, a pretrained and 3 fine-tuned BF16
Llama-shaped checkpoints, then times on the same files in one run:

  taskvec   diff x3 + apply of the 3 task vectors; the one-pass edit
            'pre + 0.3*(tau(a)+tau(b)+tau(c))' (the headline) with 2 and 1 threads, warm and cold;
            TIES and DARE merges from a generated recipe (when `taskvec merge` exists), 1 and 2 threads
  torch     the same edit as the task-vectors paper's code does it, and with mmap'd tensors
            (benchmarks/torch_baseline.py)
  cat       all input files to /dev/null, warm and cold: the read floor

Each run: wall time, CPU time (user+sys, from wait4), peak RSS (ru_maxrss) and peak anonymous RSS
(RssAnon of /proc/PID/status sampled every 20 ms), GB/s of input. Cold runs drop the page cache first
(sync; echo 1 > /proc/sys/vm/drop_caches: needs root). Results go to RESULTS/<preset>-<time>.{json,md}.

  benchmarks/run_e2e.py --preset 125m                 # the headline table
  benchmarks/run_e2e.py --scaling 125m,350m,1.3b      # time and memory against model size
  benchmarks/run_e2e.py --dry-run-70b                 # plan of a 70B-shaped edit on sparse files
"""
import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PYTHON = "/usr/bin/python3"  # Debian's, which has python3-torch
EXPR = "pre + 0.3*(tau(a)+tau(b)+tau(c))"
GB = 1e9
MIB = 1 << 20


# ---------------------------------------------------------------------------------------------
# measuring one process
# ---------------------------------------------------------------------------------------------

def read_status(pid):
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                    out[key] = int(value.split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError, ValueError):
        pass
    return out


def drop_caches():
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("1\n")


def load_average():
    return os.getloadavg()[0]


def child_of(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            kids = f.read().split()
        return int(kids[0]) if kids else None
    except (FileNotFoundError, ProcessLookupError, ValueError):
        return None


def run_measured(argv, input_bytes, cold=False, warm_files=None, label=""):
    """Runs argv once; returns its measurements. stdout is kept (taskvec --json reports).

    The command runs under GNU time: a process forked from this (large) Python process would inherit
    its RSS high-water mark across exec, so ru_maxrss is taken from time's small child instead. CPU
    time comes from wait4 on time, which includes its waited-for child."""
    if cold:
        drop_caches()
    else:
        if warm_files:
            subprocess.run(["cat", *warm_files], stdout=subprocess.DEVNULL, check=True)
        os.sync()  # do not pay for someone else's write-back
    load = load_average()
    out_path = f"/tmp/taskvec-bench-{os.getpid()}.out"
    time_path = f"/tmp/taskvec-bench-{os.getpid()}.time"
    with open(out_path, "w+b") as out:
        start = time.perf_counter()
        # cat's output goes to /dev/null (the read floor); everything else's is kept for its --json report.
        stdout = subprocess.DEVNULL if argv[0] == "cat" else out
        proc = subprocess.Popen(["/usr/bin/time", "-f", "%M", "-o", time_path, *argv], stdout=stdout, stderr=out)
        peak = {"RssAnon": 0, "VmHWM": 0, "samples": 0}
        done = threading.Event()

        def sample():
            pid = None
            while not done.is_set():
                pid = pid or child_of(proc.pid)
                if pid:
                    s = read_status(pid)
                    for k in ("RssAnon", "VmHWM"):
                        if k in s:
                            peak[k] = max(peak[k], s[k])
                    peak["samples"] += 1
                done.wait(0.02)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        done.set()
        sampler.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read().decode(errors="replace")
    os.unlink(out_path)
    with open(time_path) as f:
        time_lines = f.read().split()
    os.unlink(time_path)
    maxrss_kib = int(time_lines[-1]) if time_lines and time_lines[-1].isdigit() else 0
    if proc.returncode != 0:
        raise RuntimeError(f"{label}: {' '.join(argv)} exited with {proc.returncode}:\n{text[-3000:]}")
    r = {
        "label": label,
        "argv": argv,
        "cold": cold,
        "wall_s": wall,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "user_s": usage.ru_utime,
        "sys_s": usage.ru_stime,
        "peak_rss_mib": max(maxrss_kib * 1024, peak["VmHWM"]) / MIB,
        "peak_anon_mib": peak["RssAnon"] / MIB,
        "rss_samples": peak["samples"],
        "major_faults": usage.ru_majflt,
        "minor_faults": usage.ru_minflt,
        "input_gb": input_bytes / GB,
        "input_gbps": input_bytes / GB / wall,
        "load_before": load,
    }
    if text.lstrip().startswith("{"):
        try:
            report = json.loads(text[text.index("{"):])
            r["taskvec_seconds"] = report.get("seconds")
            r["peak_chunk_mib"] = report.get("peak_chunk_bytes", 0) / MIB
            r["bytes_written"] = report.get("bytes_written")
        except (ValueError, KeyError):
            pass
    return r


def repeat(n, fn):
    """Runs fn n times; the result with the median wall time, plus all wall times."""
    runs = [fn() for _ in range(n)]
    runs.sort(key=lambda r: r["wall_s"])
    best = dict(runs[len(runs) // 2])
    best["walls_s"] = [round(r["wall_s"], 4) for r in runs]
    best["repeats"] = n
    return best


# ---------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------

def checkpoint_files(folder):
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".safetensors"))


def ensure_checkpoints(args, preset, sparse=False):
    folder = os.path.join(args.ckpt_root, preset + ("-sparse" if sparse else ""))
    stamp = os.path.join(folder, "generated.json")
    if os.path.exists(stamp):
        with open(stamp) as f:
            s = json.load(f)
        if s.get("preset") == preset and s.get("finetuned") == 3 and s.get("sparse") == sparse:
            return folder, s
    shutil.rmtree(folder, ignore_errors=True)
    argv = [os.path.join(args.bin, "taskvec_gen_checkpoints"), "--preset", preset, "-n", "3", "-o", folder]
    if sparse:
        argv.append("--sparse")
    print("generating:", " ".join(argv), flush=True)
    t = time.perf_counter()
    subprocess.run(argv, check=True)
    print(f"generated in {time.perf_counter() - t:.1f} s", flush=True)
    with open(stamp) as f:
        return folder, json.load(f)


def models(folder):
    return {"pre": os.path.join(folder, "pre"), "a": os.path.join(folder, "ft1"), "b": os.path.join(folder, "ft2"),
            "c": os.path.join(folder, "ft3")}


def files_of(paths):
    out = []
    for p in paths:
        out += checkpoint_files(p)
    return out


def total_size(files):
    return sum(os.path.getsize(f) for f in files)


def rm(path):
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.exists(path):
        os.unlink(path)


# ---------------------------------------------------------------------------------------------
# the benchmark of one preset
# ---------------------------------------------------------------------------------------------

def taskvec(args, *rest):
    return [os.path.join(args.bin, "taskvec"), "--json", *rest]


def edit_argv(args, m, out, threads=None, extra=()):
    # The expression first: CLI11's repeatable -m would swallow a positional after it.
    argv = taskvec(args, "edit", EXPR, "-m", f"pre={m['pre']}", "-m", f"a={m['a']}", "-m", f"b={m['b']}", "-m", f"c={m['c']}",
                   "-o", out, *extra)
    if threads:
        argv += ["--threads", str(threads)]
    return argv


def has_merge(args):
    try:
        r = subprocess.run([os.path.join(args.bin, "taskvec"), "merge", "--help"], capture_output=True)
        return r.returncode == 0
    except OSError:
        return False


def write_recipe(path, method, m, extra):
    with open(path, "w") as f:
        f.write(f"merge_method: {method}\nbase_model: {m['pre']}\nmodels:\n")
        for k in ("a", "b", "c"):
            f.write(f"  - model: {m[k]}\n")
        f.write("parameters:\n")
        for k, v in extra.items():
            f.write(f"  {k}: {v}\n")


def verify_same(a_path, b_path):
    """Tensor by tensor, the bytes of two outputs are equal (layouts may differ)."""
    sys.path.insert(0, HERE)
    import torch_baseline as tb  # noqa: E402  (numpy + torch, Debian's python)
    a, b = tb.load_mmap(a_path), tb.load_mmap(b_path)
    if sorted(a) != sorted(b):
        return False
    import torch
    return all(torch.equal(a[k].view(torch.int16) if a[k].dtype == torch.bfloat16 else a[k],
                           b[k].view(torch.int16) if b[k].dtype == torch.bfloat16 else b[k]) for k in a)


def bench_preset(args, preset):
    folder, gen = ensure_checkpoints(args, preset)
    m = models(folder)
    inputs = files_of(m.values())
    in_bytes = total_size(inputs)
    out_root = os.path.join(args.work, preset)
    os.makedirs(out_root, exist_ok=True)
    R = args.repeat
    res = {"preset": preset, "parameters": gen["parameters"], "input_files": len(inputs), "input_bytes": in_bytes,
           "runs": {}}
    runs = res["runs"]
    cold_ok = args.cold and os.geteuid() == 0

    def timed(key, argv, n=R, cold=False, nbytes=in_bytes, out=None, warm=inputs, keep=False):
        if key not in args.only_set and args.only_set:
            return None

        def once():
            if out:
                rm(out)
            r = run_measured(argv, nbytes, cold=cold, warm_files=None if cold else warm, label=key)
            if out and not keep:
                rm(out)
            return r

        r = repeat(n, once)
        runs[key] = r
        print(f"  {key:<22} wall {r['wall_s']:8.3f} s  cpu {r['cpu_s']:8.3f} s  rss {r['peak_rss_mib']:8.1f} MiB  "
              f"anon {r['peak_anon_mib']:8.1f} MiB  {r['input_gbps']:6.2f} GB/s  load {r['load_before']:.2f}", flush=True)
        return r

    print(f"{preset}: {gen['parameters'] / 1e6:.1f}M parameters, {len(inputs)} input files, {in_bytes / GB:.3f} GB", flush=True)
    # The read floor, and the write floor of the edit's output on the same filesystem (tmpfs by default):
    # an edit must at least read every input once and write its output once.
    timed("cat_warm", ["cat", *inputs], out=None)
    out_mib = max(1, total_size(checkpoint_files(m["pre"])) >> 20)
    write_floor = os.path.join(out_root, "dd.bin")
    timed("write_floor", ["dd", "if=/dev/zero", f"of={write_floor}", "bs=1M", f"count={out_mib}", "conv=fsync"],
          out=write_floor, warm=None)
    if cold_ok:
        timed("cat_cold", ["cat", *inputs], n=args.cold_repeat, cold=True)
    # The headline: one pass from the fine-tuned models.
    out = os.path.join(out_root, "edit")
    timed("taskvec_edit", edit_argv(args, m, out), out=out)
    timed("taskvec_edit_t1", edit_argv(args, m, out, threads=1), out=out)
    if cold_ok:
        timed("taskvec_edit_cold", edit_argv(args, m, out), n=args.cold_repeat, cold=True, out=out)
    # The same edit with its output on disk: taskvec fsyncs every output, so this adds the disk's durable
    # write speed, measured alone by the write floor (dd of as many bytes, fsynced, to the same folder).
    if args.disk_work:
        out_disk = os.path.join(args.disk_work, preset, "edit")
        os.makedirs(os.path.dirname(out_disk), exist_ok=True)
        out_bytes = total_size(checkpoint_files(m["pre"]))
        timed("taskvec_edit_disk", edit_argv(args, m, out_disk), n=max(1, R - 1), out=out_disk)
        floor = os.path.join(args.disk_work, preset, "dd.bin")
        timed("write_floor_disk", ["dd", "if=/dev/zero", f"of={floor}", "bs=1M", f"count={out_bytes >> 20}", "conv=fsync"],
              n=max(1, R - 1), out=floor, warm=None)
    # diff x3, then apply.
    if not args.skip_diff_apply:
        taus = [os.path.join(out_root, f"tau_{k}") for k in "abc"]
        diff_runs = []
        for k, tau in zip("abc", taus):
            files = checkpoint_files(m["pre"]) + checkpoint_files(m[k])
            r = timed(f"taskvec_diff_{k}", taskvec(args, "diff", m["pre"], m[k], "-o", tau), n=1,
                      nbytes=total_size(files), out=tau, warm=files, keep=True)
            if r:
                diff_runs.append(r)
        if len(diff_runs) == 3:
            tau_files = files_of(taus)
            apply_in = checkpoint_files(m["pre"]) + tau_files
            out = os.path.join(out_root, "apply")
            apply_r = timed("taskvec_apply", taskvec(args, "apply", m["pre"], *sum((["-t", f"{t}:0.3"] for t in taus), []),
                                                    "-o", out), n=1, nbytes=total_size(apply_in), out=out, warm=apply_in)
            runs["taskvec_diff3_apply"] = {
                "wall_s": sum(r["wall_s"] for r in diff_runs) + apply_r["wall_s"],
                "cpu_s": sum(r["cpu_s"] for r in diff_runs) + apply_r["cpu_s"],
                "peak_rss_mib": max(r["peak_rss_mib"] for r in diff_runs + [apply_r]),
                "peak_anon_mib": max(r["peak_anon_mib"] for r in diff_runs + [apply_r]),
                "input_gbps": in_bytes / GB / (sum(r["wall_s"] for r in diff_runs) + apply_r["wall_s"]),
                "task_vector_bytes": total_size(tau_files),
                "load_before": diff_runs[0]["load_before"],
            }
        for t in taus:
            rm(t)
    # Merges.
    if args.merges and has_merge(args):
        for method, params in (("ties", {"density": 0.2, "lambda": 1.0, "weight": 0.3}),
                               ("dare_linear", {"density": 0.5, "lambda": 1.0, "weight": 0.3})):
            recipe = os.path.join(out_root, f"{method}.yaml")
            write_recipe(recipe, method, m, params)
            if method.startswith("dare"):
                with open(recipe, "a") as f:
                    f.write("seed: 7\n")
            out = os.path.join(out_root, method)
            flags = list(args.merge_flags)
            if not flags:
                # Whole-tensor methods need the largest tensor in memory: ask the dry run what budget it needs.
                p = subprocess.run(taskvec(args, "merge", recipe, "-o", out, "--dry-run"), capture_output=True, text=True)
                needed = [int(w) for w in p.stderr.replace(",", " ").split() if w.isdigit()]
                if p.returncode != 0 and "--memory-budget" in p.stderr and needed:
                    # Twice the largest tensor's need, so that two workers can each hold one of the two
                    # largest tensors (embeddings, lm_head) at once; with exactly one, they run in turn.
                    flags = ["--memory-budget", str(2 * needed[-1])]
                    res.setdefault("merge_budget_bytes", {})[method] = 2 * needed[-1]
            for threads in (2, 1):
                key = f"taskvec_{method}_t{threads}"
                try:
                    timed(key, taskvec(args, "merge", recipe, "-o", out, "--threads", str(threads), *flags),
                          n=max(1, R - 1), out=out)
                except RuntimeError as e:
                    runs[key] = {"error": str(e)[-600:]}
                    print(f"  {key}: failed: {str(e)[-300:]}", flush=True)
    elif args.merges:
        res["merge_skipped"] = "taskvec merge is not available in this build"
    # PyTorch.
    tb = os.path.join(HERE, "torch_baseline.py")
    ft_args = ["--pre", m["pre"], "--ft", m["a"], m["b"], m["c"], "--coef", "0.3"]
    out_torch = os.path.join(out_root, "torch_mmap.safetensors")
    if args.torch:
        timed("torch_mmap", [PYTHON, tb, "mmap", *ft_args, "-o", out_torch], n=1, out=out_torch, keep=args.verify)
        if args.verify and "torch_mmap" in runs:
            out = os.path.join(out_root, "edit")
            rm(out)
            subprocess.run(edit_argv(args, m, out), check=True, stdout=subprocess.DEVNULL)
            res["taskvec_equals_torch_mmap"] = verify_same(out, out_torch)
            print(f"  taskvec edit output == torch mmap output, tensor by tensor: {res['taskvec_equals_torch_mmap']}")
            rm(out)
        rm(out_torch)
    if args.torch_official:
        out = os.path.join(out_root, "torch_official.safetensors")
        timed("torch_official", [PYTHON, tb, "official", *ft_args, "-o", out], n=1, out=out)
    # Ratios.
    ratios = {}

    def ratio(name, a, b):
        if a in runs and b in runs and "wall_s" in runs[a] and "wall_s" in runs[b]:
            ratios[name] = runs[a]["wall_s"] / runs[b]["wall_s"]

    ratio("torch_mmap_over_taskvec", "torch_mmap", "taskvec_edit")
    ratio("torch_official_over_taskvec", "torch_official", "taskvec_edit")
    ratio("taskvec_over_cat_warm", "taskvec_edit", "cat_warm")
    if all(k in runs and "wall_s" in runs[k] for k in ("taskvec_edit", "cat_warm", "write_floor")):
        # One core reading the inputs and then writing the output: the floor of a one-pass edit.
        ratios["taskvec_over_read_write_floor"] = runs["taskvec_edit"]["wall_s"] / (
            runs["cat_warm"]["wall_s"] + runs["write_floor"]["wall_s"])
    ratio("taskvec_over_cat_cold", "taskvec_edit_cold", "cat_cold")
    ratio("edit_threads_1_over_2", "taskvec_edit_t1", "taskvec_edit")
    ratio("ties_threads_1_over_2", "taskvec_ties_t1", "taskvec_ties_t2")
    ratio("dare_threads_1_over_2", "taskvec_dare_linear_t1", "taskvec_dare_linear_t2")
    ratio("diff3_apply_over_edit", "taskvec_diff3_apply", "taskvec_edit")
    ratio("taskvec_disk_over_write_floor", "taskvec_edit_disk", "write_floor_disk")
    res["ratios"] = ratios
    for k, v in ratios.items():
        print(f"  {k:<30} {v:8.2f}")
    return res


def dry_run_70b(args):
    folder, gen = ensure_checkpoints(args, "70b", sparse=True)
    m = models(folder)
    inputs = files_of(m.values())
    du = subprocess.run(["du", "-sk", folder], capture_output=True, text=True, check=True).stdout.split()[0]
    out = os.path.join(args.work, "70b-edit")
    r = run_measured(edit_argv(args, m, out, extra=("--dry-run",)), 0, warm_files=None, label="dry_run_70b")
    res = {"parameters": gen["parameters"], "apparent_input_bytes": total_size(inputs), "disk_usage_kib": int(du),
           "input_files": len(inputs), "dry_run": r}
    print(f"70b: {gen['parameters'] / 1e9:.1f}B parameters, {total_size(inputs) / GB:.1f} GB apparent, du {int(du) / 1024:.1f} MiB; "
          f"dry run {r['wall_s']:.2f} s, peak RSS {r['peak_rss_mib']:.1f} MiB, budgeted in flight "
          f"{r.get('peak_chunk_mib', 0):.1f} MiB", flush=True)
    if has_merge(args):
        recipe = os.path.join(args.work, "70b-ties.yaml")
        write_recipe(recipe, "ties", m, {"density": 0.2, "weight": 0.3})
        argv = taskvec(args, "merge", recipe, "-o", os.path.join(args.work, "70b-ties"), "--dry-run")
        p = subprocess.run(argv, capture_output=True, text=True)
        res["ties_dry_run"] = {"rc": p.returncode, "stderr": p.stderr.strip()[-800:]}
        print(f"70b ties dry run at the default budget: rc {p.returncode} {p.stderr.strip()[-300:]}")
        needed = [int(w) for w in p.stderr.replace(",", " ").split() if w.isdigit()]
        if p.returncode != 0 and needed:
            p = subprocess.run(argv + ["--memory-budget", str(needed[-1])], capture_output=True, text=True)
            report = json.loads(p.stdout[p.stdout.index("{"):]) if p.returncode == 0 else {}
            res["ties_dry_run_budgeted"] = {"memory_budget": needed[-1], "rc": p.returncode,
                                            "peak_chunk_bytes": report.get("peak_chunk_bytes"), "stderr": p.stderr.strip()[-800:]}
            print(f"70b ties dry run with --memory-budget {needed[-1]}: rc {p.returncode}, "
                  f"in flight {report.get('peak_chunk_bytes')}")
    if not args.keep_sparse:
        shutil.rmtree(folder, ignore_errors=True)
    return res


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------

def machine():
    info = {"cores": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version()}
    with open("/proc/meminfo") as f:
        info["mem_gib"] = round(int(f.readline().split()[1]) / (1 << 20), 1)
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    info["disk"] = subprocess.run(["df", "-h", "--output=source,fstype,size,avail", ROOT], capture_output=True,
                                  text=True).stdout.strip().splitlines()[-1]
    try:
        info["git"] = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                                     text=True).stdout.strip()
    except OSError:
        pass
    import torch
    info["torch"] = torch.__version__
    return info


ROW_ORDER = ["cat_warm", "write_floor", "cat_cold", "taskvec_edit", "taskvec_edit_t1", "taskvec_edit_cold", "write_floor_disk",
             "taskvec_edit_disk", "taskvec_diff_a",
             "taskvec_diff_b", "taskvec_diff_c", "taskvec_apply", "taskvec_diff3_apply", "taskvec_ties_t2",
             "taskvec_ties_t1", "taskvec_dare_linear_t2", "taskvec_dare_linear_t1", "torch_mmap", "torch_official"]


def markdown(results):
    lines = []
    for res in results.get("presets", []):
        lines.append(f"### {res['preset']}: {res['parameters'] / 1e6:.0f}M parameters, 4 x BF16 inputs = "
                     f"{res['input_bytes'] / GB:.3f} GB in {res['input_files']} files\n")
        lines.append("| run | wall s | CPU s | peak RSS MiB | peak anon MiB | input GB/s | vs taskvec edit | load |")
        lines.append("|---|---:|---:|---:|---:|---:|---:|---:|")
        head = res["runs"].get("taskvec_edit", {}).get("wall_s")
        for key in ROW_ORDER:
            r = res["runs"].get(key)
            if not r or "wall_s" not in r:
                if r and "error" in r:
                    lines.append(f"| {key} | failed | | | | | | |")
                continue
            rel = f"{r['wall_s'] / head:.2f}x" if head else ""
            reps = f" (median of {r['repeats']})" if r.get("repeats", 1) > 1 else ""
            lines.append(f"| {key}{reps} | {r['wall_s']:.3f} | {r['cpu_s']:.3f} | {r['peak_rss_mib']:.0f} | "
                         f"{r['peak_anon_mib']:.0f} | {r['input_gbps']:.2f} | {rel} | {r.get('load_before', 0):.2f} |")
        lines.append("")
        for k, v in res.get("ratios", {}).items():
            lines.append(f"- {k}: **{v:.2f}**")
        if "taskvec_equals_torch_mmap" in res:
            lines.append(f"- taskvec edit output equals the torch mmap output tensor by tensor: {res['taskvec_equals_torch_mmap']}")
        if "merge_skipped" in res:
            lines.append(f"- merges skipped: {res['merge_skipped']}")
        lines.append("")
    if results.get("scaling"):
        lines.append("### scaling\n")
        lines.append("| preset | parameters | input GB | cat warm s | write floor s | taskvec edit s | edit / cat | "
                     "edit GB/s | s per B params | peak RSS MiB | peak anon MiB | load |")
        lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        nan = float("nan")
        for res in results["presets"]:
            e, c, w = (res["runs"].get(k) for k in ("taskvec_edit", "cat_warm", "write_floor"))
            if not e:
                continue
            lines.append(f"| {res['preset']} | {res['parameters'] / 1e6:.0f}M | {res['input_bytes'] / GB:.2f} | "
                         f"{c['wall_s'] if c else nan:.3f} | {w['wall_s'] if w else nan:.3f} | {e['wall_s']:.3f} | "
                         f"{e['wall_s'] / c['wall_s'] if c else nan:.2f} | {e['input_gbps']:.2f} | "
                         f"{e['wall_s'] / (res['parameters'] / 1e9):.3f} | {e['peak_rss_mib']:.0f} | {e['peak_anon_mib']:.0f} | "
                         f"{e['load_before']:.2f} |")
        lines.append("")
    if results.get("dry_run_70b"):
        d = results["dry_run_70b"]
        lines.append(f"### 70B-shaped dry run\n\n{d['parameters'] / 1e9:.1f}B parameters, {d['input_files']} sparse input "
                     f"files, {d['apparent_input_bytes'] / GB:.1f} GB apparent, {d['disk_usage_kib'] / 1024:.1f} MiB on disk; "
                     f"`taskvec edit --dry-run`: {d['dry_run']['wall_s']:.2f} s, peak RSS {d['dry_run']['peak_rss_mib']:.0f} MiB, "
                     f"memory in flight budgeted at {d['dry_run'].get('peak_chunk_mib', 0):.1f} MiB.\n")
        if "ties_dry_run" in d:
            lines.append(f"TIES dry run at the default budget: exit {d['ties_dry_run']['rc']}: {d['ties_dry_run']['stderr']}\n")
        if "ties_dry_run_budgeted" in d:
            t = d["ties_dry_run_budgeted"]
            lines.append(f"TIES dry run with --memory-budget {t['memory_budget']}: exit {t['rc']}, in flight "
                         f"{(t['peak_chunk_bytes'] or 0) / MIB:.0f} MiB {t['stderr']}\n")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default=None, help="one preset: the full comparison (default tiny)")
    ap.add_argument("--scaling", default=None, help="comma-separated presets: cat + taskvec edit only")
    ap.add_argument("--dry-run-70b", action="store_true", help="plan a 70B-shaped edit on sparse files")
    ap.add_argument("--bin", default=os.path.join(ROOT, "build-bench", "bin"))
    ap.add_argument("--ckpt-root", default=os.path.join(ROOT, "build-bench", "ckpt"))
    ap.add_argument("--work", default="/dev/shm/taskvec-e2e",
                    help="outputs of every tool, deleted after each run (default: tmpfs, where fsync costs nothing)")
    ap.add_argument("--disk-work", default=os.path.join(ROOT, "build-bench", "e2e-out"),
                    help="folder on disk for the taskvec_edit_disk run and the write floor ('' to skip)")
    ap.add_argument("--results", default=os.path.join(ROOT, "build-bench", "results"))
    ap.add_argument("--repeat", type=int, default=3, help="runs of each warm taskvec/cat measurement (median kept)")
    ap.add_argument("--cold-repeat", type=int, default=2)
    ap.add_argument("--no-cold", dest="cold", action="store_false")
    ap.add_argument("--no-torch", dest="torch", action="store_false")
    ap.add_argument("--no-torch-official", dest="torch_official", action="store_false")
    ap.add_argument("--no-merges", dest="merges", action="store_false")
    ap.add_argument("--merge-flags", default="", help="extra flags for taskvec merge, e.g. '--memory-budget 2GiB'")
    ap.add_argument("--skip-diff-apply", action="store_true")
    ap.add_argument("--no-verify", dest="verify", action="store_false")
    ap.add_argument("--only", default="", help="comma-separated run keys")
    ap.add_argument("--keep-sparse", action="store_true")
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    args.only_set = set(filter(None, args.only.split(",")))
    args.merge_flags = args.merge_flags.split()
    os.makedirs(args.results, exist_ok=True)
    os.makedirs(args.work, exist_ok=True)
    results = {"started": datetime.datetime.utcnow().isoformat(timespec="seconds") + "Z", "machine": machine(),
               "expression": EXPR, "presets": []}
    if args.scaling:
        args.torch = args.torch_official = args.merges = False
        args.skip_diff_apply = True
        args.disk_work = ""
        results["scaling"] = True
        for p in args.scaling.split(","):
            results["presets"].append(bench_preset(args, p))
    elif args.preset or not args.dry_run_70b:
        results["presets"].append(bench_preset(args, args.preset or "tiny"))
    if args.dry_run_70b:
        results["dry_run_70b"] = dry_run_70b(args)
    results["finished"] = datetime.datetime.utcnow().isoformat(timespec="seconds") + "Z"
    name = args.tag or ("scaling" if args.scaling else (args.preset or "dry-run-70b"))
    stem = os.path.join(args.results, f"{name}-{time.strftime('%Y%m%dT%H%M%S')}")
    with open(stem + ".json", "w") as f:
        json.dump(results, f, indent=2)
    md = markdown(results)
    with open(stem + ".md", "w") as f:
        f.write(md + "\n")
    print(md)
    print(f"results: {stem}.json, {stem}.md")


if __name__ == "__main__":
    main()
