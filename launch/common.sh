# Shared helpers for the launch scripts (sourced, not run). Bash, set -euo pipefail in the callers.
# run CMD...: prints "+ CMD" (shell-quoted) and runs it, or only prints it when DRY_RUN=1.

DRY_RUN="${DRY_RUN:-0}"

die() {
  echo "error: $*" >&2
  echo "run with --help for usage" >&2
  exit 2
}

quote() {
  # Shell-quotes every argument into one line (safe to paste into a shell).
  local out="" arg
  for arg in "$@"; do
    out+="$(printf '%q' "$arg") "
  done
  printf '%s' "${out% }"
}

run() {
  echo "+ $(quote "$@")"
  if [[ "$DRY_RUN" != "1" ]]; then
    "$@"
  fi
}

need_value() {
  # need_value FLAG VALUE: the flag's value must be non-empty.
  [[ -n "${2:-}" ]] || die "$1 needs a value"
}

require_tool() {
  [[ "$DRY_RUN" == "1" ]] || command -v "$1" >/dev/null 2>&1 || die "'$1' not found on PATH"
}

gcloud_scope() {
  # Prints the common gcloud flags (--zone, optional --project) one per line.
  echo "--zone=$ZONE"
  if [[ -n "${PROJECT:-}" ]]; then echo "--project=$PROJECT"; fi
}
