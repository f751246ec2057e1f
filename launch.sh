#!/usr/bin/env bash
# megaqkv launcher.
#   launch.sh analyze [ARGS]   parameters, FLOPs and KV-cache bytes per variant (tools/analyze.py)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cmd="${1:-}"
case "$cmd" in
  analyze) shift; exec python3 "$here/tools/analyze.py" "$@" ;;
  *) echo "usage: $0 analyze [ARGS]" >&2; exit 2 ;;
esac
