#!/usr/bin/env bash
# Copies this repository to every worker of a TPU VM and installs it in a venv with jax[tpu].
#
#   launch/setup_tpu_vm.sh --name=hm3 --zone=us-central2-b [--project=P] [--remote_dir=hm3_jax] [--dry_run]
#
# On every worker: python3 -m venv ~/REMOTE_DIR/.venv; pip install -e . "jax[tpu]>=0.10,<0.11".
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"
}

NAME="" ZONE="" PROJECT="" REMOTE_DIR="hm3_jax"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
for arg in "$@"; do
  case "$arg" in
    --name=*) NAME="${arg#*=}" ;;
    --zone=*) ZONE="${arg#*=}" ;;
    --project=*) PROJECT="${arg#*=}" ;;
    --remote_dir=*) REMOTE_DIR="${arg#*=}" ;;
    --dry_run) DRY_RUN=1 ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown argument '$arg'" ;;
  esac
done
need_value --name "$NAME"
need_value --zone "$ZONE"
need_value --remote_dir "$REMOTE_DIR"
require_tool gcloud
require_tool tar

mapfile -t SCOPE < <(gcloud_scope)
ARCHIVE="/tmp/hm3_jax_src.tar.gz"
# Source only: no venv, runs, caches or git objects.
run tar -czf "$ARCHIVE" -C "$REPO" --exclude=.venv --exclude=runs --exclude=.git --exclude=__pycache__ \
  --exclude=.pytest_cache .
run gcloud compute tpus tpu-vm scp "$ARCHIVE" "$NAME:/tmp/hm3_jax_src.tar.gz" "${SCOPE[@]}" --worker=all
REMOTE="set -euo pipefail; mkdir -p ~/$REMOTE_DIR && tar -xzf /tmp/hm3_jax_src.tar.gz -C ~/$REMOTE_DIR"
REMOTE+=" && cd ~/$REMOTE_DIR && python3 -m venv .venv && .venv/bin/pip install -q --upgrade pip"
REMOTE+=" && .venv/bin/pip install -q -e . 'jax[tpu]>=0.10,<0.11'"
REMOTE+=" && .venv/bin/python -c 'import jax; print(jax.process_index(), jax.local_device_count(), jax.device_count())'"
run gcloud compute tpus tpu-vm ssh "$NAME" "${SCOPE[@]}" --worker=all "--command=$REMOTE"
