#!/usr/bin/env bash
# Build the virtual environment the Axolotl adapter is tested in.
#
#   .ci/venvs/axolotl.sh DEST        e.g.  .ci/venvs/axolotl.sh .venvs/axolotl
#
# Axolotl pins its own transformers / trl / peft / accelerate / datasets, which differ from the
# main dev environment, so the adapter gets a venv of its own:
#   1. a venv at DEST on the Python the Axolotl release needs: 3.12 for the default axolotl 0.21.0
#      (0.20 and later require Python >= 3.12), 3.11 for axolotl 0.19.0 (the newest for 3.11);
#   2. `pip install torch==2.13.0` first, then axolotl constrained to that torch. The CI machine
#      has a local CPU wheel of torch for Python 3.11 only; on 3.12 pip takes PyPI's build, which
#      brings CUDA libraries (7 GB venv instead of 4.4; it runs on CPU all the same). For the CPU
#      build, set PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu (or NSLORA_TORCH_SPEC);
#   3. this repository, editable and without dependencies, plus the few dependencies of ours that
#      Axolotl does not bring (pluggy, textgrad, rich, pyyaml, openai, bitsandbytes), constrained by
#      a freeze of the venv so they cannot move any of Axolotl's pins.
#
# Repeatable and fast: a lock file next to this script holds the exact versions of a build that
# passed these checks, one per tested release:
#   axolotl==0.21.0 (default)  .ci/venvs/axolotl.lock.txt        (Python 3.12)
#   axolotl==0.19.0            .ci/venvs/axolotl-0.19.lock.txt   (Python 3.11)
# Every pip step uses it as a constraint, so pip's resolver has nothing to search (an unlocked
# build once took 862 s, 7 minutes of it backtracking). Any other NSLORA_AXOLOTL_SPEC: no lock.
# Refresh a lock from a fresh build with NSLORA_VENV_NO_LOCK=1 (LOCK = the file above):
#   { head -1 LOCK; DEST/bin/python -m pip freeze --exclude-editable \
#     | grep -v -i -e '^nslora-plugin' -e '^torch=='; } > new.lock && mv new.lock LOCK
#
# Idempotent: a finished venv carries a marker holding a fingerprint of this script, of
# pyproject.toml, of the lock file and of the specs; when it matches, the script only re-checks
# imports (about a second) and exits. A half-built DEST (no marker) is resumed: pip skips what is
# already installed. A DEST on the wrong Python is refused (remove it and rerun).
#
# Environment knobs:
#   NSLORA_AXOLOTL_SPEC  axolotl requirement (default axolotl==0.21.0; axolotl==0.19.0 builds the
#                        previous tested release on Python 3.11, with its own lock file)
#   NSLORA_PYTHON        interpreter to build from (default: python3.12 -- or python3.11 for
#                        0.19.0 -- on PATH if it runs, else that version from `pyenv root`)
#   NSLORA_TORCH_SPEC    torch requirement (default torch==2.13.0; CUDA users: their own build)
#   NSLORA_VENV_FORCE=1  rebuild the Python side even if the marker matches
#   NSLORA_VENV_NO_LOCK=1 ignore the lock file (resolve afresh within Axolotl's pins)
set -euo pipefail

if [[ $# -ne 1 ]]; then
  echo "usage: $0 DEST   (e.g. $0 .venvs/axolotl)" >&2
  exit 2
fi

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
mkdir -p "$1"
DEST="$(cd "$1" && pwd)"
MARKER="$DEST/.nslora-venv-complete"
TORCH_SPEC="${NSLORA_TORCH_SPEC:-torch==2.13.0}"
AXOLOTL_SPEC="${NSLORA_AXOLOTL_SPEC:-axolotl==0.21.0}"
EXTRAS=(pluggy textgrad rich pyyaml openai bitsandbytes)
# The Python each tested release needs and its lock file; any other spec: Python 3.12, no lock.
case "$AXOLOTL_SPEC" in
  axolotl==0.19.0) PY_WANT=3.11; LOCK="$REPO/.ci/venvs/axolotl-0.19.lock.txt" ;;
  axolotl==0.21.0) PY_WANT=3.12; LOCK="$REPO/.ci/venvs/axolotl.lock.txt" ;;
  *)               PY_WANT=3.12; LOCK="" ;;
esac
if [[ "${NSLORA_VENV_NO_LOCK:-0}" == 1 || ( -n "$LOCK" && ! -f "$LOCK" ) ]]; then LOCK=""; fi

fingerprint() {
  {
    cat "${BASH_SOURCE[0]}" "$REPO/pyproject.toml"
    [[ -n "$LOCK" ]] && cat "$LOCK"
    echo "$TORCH_SPEC $AXOLOTL_SPEC $PY_WANT"
  } | sha256sum | cut -d' ' -f1
}
FP="$(fingerprint)"

imports_ok() {
  # Cheap check (no heavy imports): the packages resolve and the editable install points here.
  "$DEST/bin/python" - "$REPO" <<'EOF' >/dev/null 2>&1
import importlib.util, pathlib, sys
for name in ("torch", "axolotl", "transformers", "peft", "trl", "bitsandbytes", "textgrad", "pluggy"):
    assert importlib.util.find_spec(name) is not None, name
spec = importlib.util.find_spec("nslora_plugin")
assert spec is not None and pathlib.Path(spec.origin).resolve().is_relative_to(pathlib.Path(sys.argv[1]).resolve())
assert importlib.util.find_spec("nslora_plugin.integrations.axolotl") is not None
EOF
}

if [[ "${NSLORA_VENV_FORCE:-0}" != 1 && -f "$MARKER" && "$(cat "$MARKER")" == "$FP" ]] && imports_ok; then
  echo "[axolotl venv] $DEST is complete (marker matches); nothing to do."
  exit 0
fi

find_python() {
  if [[ -n "${NSLORA_PYTHON:-}" ]]; then echo "$NSLORA_PYTHON"; return; fi
  # A pyenv shim is on PATH even when its version is not selected, and then fails: try running it.
  if command -v "python$PY_WANT" >/dev/null 2>&1 && "python$PY_WANT" -c '' >/dev/null 2>&1; then
    command -v "python$PY_WANT"; return
  fi
  local root
  root="$( (pyenv root 2>/dev/null) || echo "$HOME/.pyenv")"
  for candidate in "$root"/versions/"$PY_WANT".*/bin/python"$PY_WANT"; do
    if [[ -x "$candidate" ]]; then echo "$candidate"; return; fi
  done
  echo "[axolotl venv] no Python $PY_WANT found: set NSLORA_PYTHON=/path/to/python$PY_WANT" >&2
  exit 1
}

START=$SECONDS
rm -f "$MARKER"
if [[ ! -x "$DEST/bin/python" ]]; then
  PYTHON="$(find_python)"
  echo "[axolotl venv] creating $DEST with $PYTHON"
  "$PYTHON" -m venv "$DEST"
fi
VERSION="$("$DEST/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
if [[ "$VERSION" != "$PY_WANT" ]]; then
  echo "[axolotl venv] $DEST has Python $VERSION; $AXOLOTL_SPEC needs $PY_WANT. Remove it and rerun." >&2
  exit 1
fi
PIP=("$DEST/bin/python" -m pip --disable-pip-version-check --no-input)
pip_install() {
  # pip repeats one warning per package for index locations that are not there; drop only those.
  "${PIP[@]}" install --quiet "$@" 2> >(grep -v "^WARNING: Location '.*' is ignored" >&2)
}
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

echo "[axolotl venv] 1/3 $TORCH_SPEC"
pip_install "$TORCH_SPEC"

echo "[axolotl venv] 2/3 $AXOLOTL_SPEC (constrained to the torch just installed${LOCK:+ and the lock file})"
"${PIP[@]}" freeze | grep -iE '^torch==' >"$WORK/cons.txt"
if [[ -n "$LOCK" ]]; then
  grep -v -i -e '^torch==' -e '^#' "$LOCK" >>"$WORK/cons.txt"
fi
pip_install -c "$WORK/cons.txt" "$AXOLOTL_SPEC"

echo "[axolotl venv] 3/3 nslora-plugin (editable, --no-deps) + ${EXTRAS[*]}"
# Everything now in the venv is pinned, so our extras may only add packages, never move one.
"${PIP[@]}" freeze --exclude-editable | grep -vE '^(-e |#)| @ ' >"$WORK/frozen.txt"
pip_install -c "$WORK/frozen.txt" -c "$WORK/cons.txt" "${EXTRAS[@]}"
pip_install --no-deps -e "$REPO"
"${PIP[@]}" check || echo "[axolotl venv] note: pip check reports the issues above (pre-existing in axolotl's own pins)"

imports_ok || { echo "[axolotl venv] import check failed in $DEST" >&2; exit 1; }
echo "$FP" >"$MARKER"
echo "[axolotl venv] done in $((SECONDS - START)) s: $DEST"
