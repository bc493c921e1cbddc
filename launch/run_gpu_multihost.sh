#!/usr/bin/env bash
# Runs `python -m MODULE ARGS...` as one process per GPU host, joined by jax.distributed.
#
#   launch/run_gpu_multihost.sh --hosts=gpu0,gpu1 [--port=12355] [--remote_dir=hm3_jax] [--dry_run] \
#       -- experiments.run_hm3 --config=experiments/configs/qwen25_1p5b.py:/shared/qwen25/spec.yaml \
#          --workdir=/shared/hm3 --mesh=paths:16
#   launch/run_gpu_multihost.sh --slurm --nodes=2 [--dry_run] -- experiments.run_hm3 ...
#
# ssh mode: process i runs on host i with --coordinator_address=HOST0:PORT --num_processes=N --process_id=i
# (hosts need the repo installed in REMOTE_DIR/.venv with jax[cuda12]). slurm mode: srun one task per node;
# jax.distributed detects SLURM's variables (--multihost=on).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"
}

HOSTS="" PORT="12355" REMOTE_DIR="hm3_jax" SLURM=0 NODES=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --hosts=*) HOSTS="${1#*=}" ;;
    --port=*) PORT="${1#*=}" ;;
    --remote_dir=*) REMOTE_DIR="${1#*=}" ;;
    --slurm) SLURM=1 ;;
    --nodes=*) NODES="${1#*=}" ;;
    --dry_run) DRY_RUN=1 ;;
    -h | --help) usage; exit 0 ;;
    --) shift; break ;;
    *) die "unknown argument '$1' (put the module and its flags after --)" ;;
  esac
  shift
done
[[ $# -ge 1 ]] || die "missing the module to run after --, e.g. -- experiments.run_hm3 --config=..."
MODULE="$1"
shift
[[ "$MODULE" =~ ^[A-Za-z_][A-Za-z0-9_.]*$ ]] || die "module '$MODULE' is not a python module name like experiments.run_hm3"
[[ "$PORT" =~ ^[0-9]+$ ]] || die "--port '$PORT' is not a number"

if [[ "$SLURM" == "1" ]]; then
  [[ -z "$HOSTS" ]] || die "--hosts and --slurm exclude each other (slurm picks the hosts)"
  [[ "$NODES" =~ ^[1-9][0-9]*$ ]] || die "--slurm needs --nodes=N (N >= 1)"
  require_tool srun
  run srun "--nodes=$NODES" --ntasks-per-node=1 "$REMOTE_DIR/.venv/bin/python" -m "$MODULE" --multihost=on "$@"
  exit 0
fi

need_value --hosts "$HOSTS"
IFS=',' read -r -a HOST_LIST <<<"$HOSTS"
NUM=${#HOST_LIST[@]}
COORD="${HOST_LIST[0]}:$PORT"
require_tool ssh
PIDS=()
for i in "${!HOST_LIST[@]}"; do
  host="${HOST_LIST[$i]}"
  [[ -n "$host" ]] || die "--hosts '$HOSTS' has an empty host name"
  REMOTE="cd $REMOTE_DIR && .venv/bin/python -m $MODULE --coordinator_address=$COORD --num_processes=$NUM"
  REMOTE+=" --process_id=$i"
  if [[ $# -gt 0 ]]; then REMOTE+=" $(quote "$@")"; fi
  if [[ "$DRY_RUN" == "1" ]]; then
    run ssh "$host" "$REMOTE"
  else
    run ssh "$host" "$REMOTE" &
    PIDS+=($!)
  fi
done
STATUS=0
for pid in "${PIDS[@]}"; do
  wait "$pid" || STATUS=1
done
exit "$STATUS"
