#!/usr/bin/env bash
# The evaluator of `taskvec sweep` for the lab's negation experiment (docs/PYTHON.md, docs/CLI.md): prints
# {"target": accuracy on TASK, "control": accuracy on the control task} of the candidate, on validation
# data, with the heads of the lab's work folder. Usage, with `--select negation:target,control,0.95`:
#   WORK=/tmp/lab TASK=mnist examples/sweep/eval_lab_negation.sh CANDIDATE
# WORK: the --work folder of `taskvec-lab negation --quick --work WORK --keep-work`; LAB_FLAGS: the flags
# of that run (default --quick); TASKVEC_LAB: the lab binary (default build/bin/taskvec-lab).
set -euo pipefail
candidate=$1
[[ -d $candidate ]] && candidate=$candidate/model.safetensors
# shellcheck disable=SC2086
exec "${TASKVEC_LAB:-build/bin/taskvec-lab}" eval ${LAB_FLAGS:---quick} --work "${WORK:?set WORK}" \
  --seed "${SEED:-0}" --task "${TASK:?set TASK}" --split val "$candidate"
