#!/usr/bin/env bash
# The H200 check in one command, for a session lent a GPU (bench/gpu/README.md has the exact device call):
#
#   bash bench/gpu/check.sh [--dry-run] [OUT_DIR]        (OUT_DIR default: $OUT, else runs/gpu-check)
#
# On the GPU machine it first installs trtfalcon without a network: the wheels the image lacks, carried in .whl/
# (bench/gpu/fetch_wheels.sh downloads them here), into /tmp/site on PYTHONPATH, and trtfalcon itself editable
# with no dependency resolution and no build isolation (setuptools and wheel are in the image). Then
# bench/gpu/check.py runs the parts, each time-boxed, and writes OUT_DIR/summary.{json,md}: under 8 minutes.
# --dry-run: the same parts on the tiny preset on this CPU (no install: run it from the project's venv).
set -uo pipefail
cd "$(dirname "$0")/../.."
py=${PYTHON:-python3}
dry=""
out=""
for arg in "$@"; do
  case "$arg" in
    --dry-run) dry="--dry-run" ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    -*) echo "check.sh: unknown option $arg" >&2; exit 2 ;;
    *) out="$arg" ;;
  esac
done
out=${out:-${OUT:-runs/gpu-check}}
mkdir -p "$out"
if [ -z "$dry" ]; then
  if compgen -G ".whl/*.whl" >/dev/null; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      || { echo "check.sh: installing the carried wheels (.whl/) failed" >&2; exit 1; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  else
    echo "check.sh: no .whl/ here (bench/gpu/fetch_wheels.sh): trtfalcon's build/plan commands will lack pydantic" >&2
  fi
  if ! "$py" -m pip install -q --no-index --no-deps --no-build-isolation -e .; then
    # no install after all: the package layout by links (plugins/ installs as trtfalcon.plugins)
    echo "check.sh: pip install --no-deps -e . failed; importing trtfalcon through links in /tmp/pkgs" >&2
    rm -rf /tmp/pkgs && mkdir -p /tmp/pkgs/trtfalcon
    for f in "$PWD"/trtfalcon/*; do ln -s "$f" /tmp/pkgs/trtfalcon/; done
    ln -s "$PWD/plugins" /tmp/pkgs/trtfalcon/plugins
    export PYTHONPATH=/tmp/pkgs:${PYTHONPATH:-}
  fi
fi
exec "$py" bench/gpu/check.py $dry --out "$out"
