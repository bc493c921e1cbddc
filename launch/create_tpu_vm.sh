#!/usr/bin/env bash
# Creates a Cloud TPU VM (single host or pod slice) for HM3.
#
#   launch/create_tpu_vm.sh --name=hm3 --zone=us-central2-b --accelerator_type=v4-32 [--project=P] \
#       [--version=tpu-ubuntu2204-base] [--spot] [--dry_run]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"
}

NAME="" ZONE="" ACCEL="" PROJECT="" VERSION="tpu-ubuntu2204-base" SPOT=0
for arg in "$@"; do
  case "$arg" in
    --name=*) NAME="${arg#*=}" ;;
    --zone=*) ZONE="${arg#*=}" ;;
    --accelerator_type=*) ACCEL="${arg#*=}" ;;
    --project=*) PROJECT="${arg#*=}" ;;
    --version=*) VERSION="${arg#*=}" ;;
    --spot) SPOT=1 ;;
    --dry_run) DRY_RUN=1 ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown argument '$arg'" ;;
  esac
done
need_value --name "$NAME"
need_value --zone "$ZONE"
need_value --accelerator_type "$ACCEL"
[[ "$ACCEL" =~ ^v[0-9]+[a-z]*(-[a-z]+)?-[0-9]+$ ]] || die "--accelerator_type '$ACCEL' is not like v4-32 / v5litepod-16"
require_tool gcloud

mapfile -t SCOPE < <(gcloud_scope)
CMD=(gcloud compute tpus tpu-vm create "$NAME" "${SCOPE[@]}" "--accelerator-type=$ACCEL" "--version=$VERSION")
if [[ "$SPOT" == "1" ]]; then CMD+=(--spot); fi
run "${CMD[@]}"
