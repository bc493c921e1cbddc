#!/usr/bin/env bash
# Runs `python -m MODULE ARGS...` on every worker of a TPU VM (one process per host; jax.distributed joins them).
#
#   launch/run_tpu.sh --name=hm3 --zone=us-central2-b [--project=P] [--remote_dir=hm3_jax] [--dry_run] \
#       -- experiments.run_hm3 --config=experiments/configs/llama2_7b.py:/data/llama2_7b/spec.yaml \
#          --workdir=gs://BUCKET/hm3 --mesh=paths:16
#   launch/run_tpu.sh --name=hm3 --zone=us-central2-b -- experiments.plan \
#       --config=experiments/configs/llama2_7b.py:/data/llama2_7b/spec.yaml --mesh=paths:16 --simulate=false
#
# The paper's settings: experiments/configs/llama2_7b.py, qwen25_1p5b.py (their docstrings: spec, data, meshes;
# plan first, docs/scaling.md).
# --multihost=on is added so every worker calls jax.distributed.initialize() (TPU VMs need no other flag).
# The workdir must be shared storage (a GCS bucket) on multi-host slices: orbax writes from every host.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"
}

NAME="" ZONE="" PROJECT="" REMOTE_DIR="hm3_jax"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name=*) NAME="${1#*=}" ;;
    --zone=*) ZONE="${1#*=}" ;;
    --project=*) PROJECT="${1#*=}" ;;
    --remote_dir=*) REMOTE_DIR="${1#*=}" ;;
    --dry_run) DRY_RUN=1 ;;
    -h | --help) usage; exit 0 ;;
    --) shift; break ;;
    *) die "unknown argument '$1' (put the module and its flags after --)" ;;
  esac
  shift
done
need_value --name "$NAME"
need_value --zone "$ZONE"
[[ $# -ge 1 ]] || die "missing the module to run after --, e.g. -- experiments.run_hm3 --config=..."
MODULE="$1"
shift
[[ "$MODULE" =~ ^[A-Za-z_][A-Za-z0-9_.]*$ ]] || die "module '$MODULE' is not a python module name like experiments.run_hm3"
require_tool gcloud

mapfile -t SCOPE < <(gcloud_scope)
REMOTE="cd ~/$REMOTE_DIR && .venv/bin/python -m $MODULE --multihost=on"
if [[ $# -gt 0 ]]; then REMOTE+=" $(quote "$@")"; fi
run gcloud compute tpus tpu-vm ssh "$NAME" "${SCOPE[@]}" --worker=all "--command=$REMOTE"
