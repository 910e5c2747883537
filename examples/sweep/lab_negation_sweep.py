"""The lab's negation search (docs/REPRODUCTION.md, Table 1) done from Python with tv.sweep on the lab's
checkpoints: lambda in 0..1 by 0.1, the paper's rule (the lowest target accuracy whose control accuracy
stays >= 95% of the pretrained model's), evaluated by examples/sweep/eval_lab_negation.sh.
Usage (after `build/bin/taskvec-lab negation --quick --work WORK --keep-work`):
  PYTHONPATH=build/python /usr/bin/python3 examples/sweep/lab_negation_sweep.py WORK TASK"""
import os
import sys

import taskvec as tv

work, task = sys.argv[1], sys.argv[2]
pre = tv.open(os.path.join(work, "seed0", "pre.safetensors"))
tau = tv.task_vector(pre, os.path.join(work, "seed0", f"ft_{task}.safetensors"))
evaluator = f"WORK={work} TASK={task} examples/sweep/eval_lab_negation.sh {{model}}"
r = tv.sweep(lambda L: pre - L * tau, [i / 10 for i in range(11)], evaluator, select="negation:target,control,0.95")
for c in r["curve"]:
    print(f"L={c['value']:.1f}  target {c['scores']['target']:.6f}  control {c['scores']['control']:.6f}")
print("chosen L =", r["chosen"])
