#!/usr/bin/env bash
# Build the virtual environment the LLaMA-Factory adapter is tested in:
#
#     .ci/venvs/llamafactory.sh DEST          # e.g. .ci/venvs/llamafactory.sh .venvs/llamafactory
#
# What it installs, on Python 3.11 and the CPU build of torch 2.13.0:
#   - llamafactory==0.9.5 with exactly the dependency ranges it declares (transformers<=5.6.0,
#     trl<=0.24.0, peft<=0.18.1, accelerate<=1.11.0, datasets<=4.0.0, ...), resolved by pip,
#   - bitsandbytes (QLoRA; not a dependency of LLaMA-Factory),
#   - nslora-plugin from this checkout (`pip install -e REPO --no-deps`) and the few dependencies of
#     ours that LLaMA-Factory does not bring (pluggy, textgrad, rich, pyyaml, openai; ranges from
#     pyproject.toml), installed with every direct dependency of LLaMA-Factory held at its installed
#     version, so they cannot move LLaMA-Factory's pins (checked afterwards, with `pip check`).
#
# torchvision / torchaudio. LLaMA-Factory declares both, but PyPI only has CUDA builds of them;
# next to the CPU torch, torchvision fails to register its operators and that breaks
# `import transformers` ("operator torchvision::nms does not exist"). Text fine-tuning needs neither:
#   - torchvision is NOT installed (transformers treats it as optional). `pip check` therefore
#     reports "llamafactory 0.9.5 requires torchvision, which is not installed" — expected.
#   - torchaudio IS needed, because llamafactory/data/mm_plugin.py imports it at module level. We
#     install torchaudio==2.11.0 with --no-deps (it declares no torch pin: stable ABI) and, only if
#     its native extension cannot load here (it is linked to libc10_cuda.so), remove the
#     extension libraries. torchaudio supports running without them (`_IS_TORCHAUDIO_EXT_AVAILABLE
#     = False`): the pure-PyTorch parts (e.g. torchaudio.functional.resample, used by LLaMA-Factory's
#     audio plugin) still work. On a CUDA machine with a CUDA torch nothing is removed.
#
# Repeatable: .ci/venvs/llamafactory.lock.txt (next to this script), when present, holds the exact
# versions of a build that passed these checks; every pip step uses it as a constraint, so a later
# build resolves to the same set. Refresh it from a fresh build (NSLORA_VENV_NO_LOCK=1) with
#   cp DEST/nslora-lock.txt .ci/venvs/llamafactory.lock.txt
#
# Idempotent: a completion marker (DEST/.nslora-venv-complete) records a stamp of this script,
# pyproject.toml, the lock file and the versions; a second run with the same stamp exits at once.
# An unfinished or outdated venv is deleted and rebuilt from scratch (only if DEST looks like a
# venv or is empty). Environment knobs:
#   PYTHON (default python3.11), NSLORA_VENV_REBUILD=1 (force a rebuild), NSLORA_VENV_NO_LOCK=1
#   (ignore the lock file: resolve afresh within LLaMA-Factory's ranges).
set -euo pipefail

if [[ $# -ne 1 || "$1" == -* ]]; then
  echo "usage: $0 DEST   (e.g. $0 .venvs/llamafactory)" >&2
  exit 2
fi

LF_VERSION=0.9.5
TORCH_VERSION=2.13.0
TORCHAUDIO_VERSION=2.11.0
OUR_DEPS=(pluggy textgrad rich pyyaml openai)

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PYTHON="${PYTHON:-python3.11}"
mkdir -p "$(dirname "$1")"
DEST="$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"
MARKER="$DEST/.nslora-venv-complete"
LOCK="$(dirname "${BASH_SOURCE[0]}")/llamafactory.lock.txt"
if [[ "${NSLORA_VENV_NO_LOCK:-0}" == 1 || ! -f "$LOCK" ]]; then LOCK=""; fi
LOCK_HASH="$([[ -n "$LOCK" ]] && sha256sum "$LOCK" | cut -c1-16 || echo none)"
STAMP="llamafactory=$LF_VERSION torch=$TORCH_VERSION torchaudio=$TORCHAUDIO_VERSION deps=${OUR_DEPS[*]} script=$(sha256sum "${BASH_SOURCE[0]}" | cut -c1-16) pyproject=$(sha256sum "$REPO/pyproject.toml" | cut -c1-16) lock=$LOCK_HASH repo=$REPO"

log() { printf '[llamafactory-venv %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

if [[ -f "$MARKER" && "${NSLORA_VENV_REBUILD:-0}" != 1 ]] && [[ "$(head -n1 "$MARKER")" == "$STAMP" ]]; then
  log "up to date: $DEST (delete $MARKER or set NSLORA_VENV_REBUILD=1 to rebuild)"
  exit 0
fi

if [[ -e "$DEST" ]]; then
  if [[ -f "$DEST/pyvenv.cfg" || -z "$(ls -A "$DEST")" ]]; then
    log "removing unfinished or outdated venv $DEST"
    rm -rf "$DEST"
  else
    echo "error: $DEST exists and is not a virtual environment; refusing to delete it" >&2
    exit 1
  fi
fi

START=$SECONDS
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

"$PYTHON" -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version' \
  || { echo "error: $PYTHON is not Python 3.11 (set PYTHON=...)" >&2; exit 1; }
log "creating venv with $("$PYTHON" --version) at $DEST"
"$PYTHON" -m venv "$DEST"
PY="$DEST/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check --no-input)
export PIP_PROGRESS_BAR=off
# pip without the "Location ... is ignored" noise some pip configurations print per package.
pipq() { "${PIP[@]}" "$@" 2> >(grep -v -e "is ignored: it is neither a file nor a directory" >&2); }

# torch first, from its CPU build (pip takes the local file for 2.13.0 on this machine; elsewhere
# point PIP_EXTRA_INDEX_URL at https://download.pytorch.org/whl/cpu). Pinned for every later step.
echo "torch==$TORCH_VERSION" >"$WORK/constraints.txt"
if [[ -n "$LOCK" ]]; then
  log "using the lock file $LOCK"
  grep -v -i -e '^torch==' -e '^#' "$LOCK" >>"$WORK/constraints.txt"   # the constraints of every pip step
fi
log "installing torch==$TORCH_VERSION"
pipq install -q -c "$WORK/constraints.txt" "torch==$TORCH_VERSION"

# LLaMA-Factory without its dependencies, then its declared requirements minus torchvision and
# torchaudio, read from the installed metadata (so this follows the release, not a copied list).
log "installing llamafactory==$LF_VERSION and its declared dependencies (minus torchvision/torchaudio)"
pipq install -q --no-deps "llamafactory==$LF_VERSION"
"$PY" - "$WORK/lf-requirements.txt" <<'EOF'
import re, sys
from importlib.metadata import requires
out = []
for req in requires("llamafactory") or []:
    spec, _, marker = req.partition(";")
    if "extra" in marker:
        continue  # optional extras (deepspeed, vllm, ...) are not part of a plain install
    name = re.match(r"[A-Za-z0-9_.\-]+", spec.strip()).group(0).lower().replace("_", "-")
    if name in ("torchvision", "torchaudio"):
        continue
    out.append(req.strip())
open(sys.argv[1], "w").write("\n".join(out) + "\n")
EOF
log "(pip will say llamafactory requires torchaudio/torchvision, which are not installed: expected here)"
pipq install -q -c "$WORK/constraints.txt" -r "$WORK/lf-requirements.txt" bitsandbytes

# torchaudio without its (CUDA) native extension; see the header.
log "installing torchaudio==$TORCHAUDIO_VERSION (--no-deps)"
pipq install -q --no-deps "torchaudio==$TORCHAUDIO_VERSION"
if ! "$PY" -c 'import torchaudio' 2>"$WORK/torchaudio.err"; then
  if grep -q "cuda" "$WORK/torchaudio.err"; then
    TA_LIB="$("$PY" -c 'import importlib.util, pathlib; print(pathlib.Path(importlib.util.find_spec("torchaudio").origin).parent / "lib")')"
    log "torchaudio's native extension needs CUDA libraries; removing $TA_LIB/*.so (pure-PyTorch mode)"
    rm -f "$TA_LIB"/*.so
  else
    cat "$WORK/torchaudio.err" >&2
    exit 1
  fi
fi
"$PY" -c 'import torch, torchaudio.functional as F; assert F.resample(torch.zeros(1, 160), 16000, 8000).shape[-1] == 80'

# Our own dependencies (ranges from pyproject.toml), with LLaMA-Factory's direct dependencies,
# torch, torchaudio and bitsandbytes held at the versions just installed: they cannot move. (A
# full freeze is too strict: e.g. LLaMA-Factory's tree brings python-dateutil 4, litellm's boto3
# needs <3; such transitive packages may move, and `pip check` below proves the result consistent.)
"$PY" - "$WORK/lf-direct.txt" <<'EOF2'
import re, sys
from importlib.metadata import PackageNotFoundError, requires, version
names = {"llamafactory", "torch", "torchaudio", "bitsandbytes"}
for req in requires("llamafactory") or []:
    spec, _, marker = req.partition(";")
    if "extra" not in marker:
        names.add(re.match(r"[A-Za-z0-9_.\-]+", spec.strip()).group(0).lower())
lines = []
for name in sorted(names):
    try:
        lines.append(f"{name}=={version(name)}")
    except PackageNotFoundError:
        pass  # torchvision
open(sys.argv[1], "w").write("\n".join(lines) + "\n")
EOF2
"$PY" - "$REPO/pyproject.toml" "$WORK/our-deps.txt" "${OUR_DEPS[@]}" <<'EOF2'
import re, sys, tomllib
deps = tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]
wanted = {n.lower() for n in sys.argv[3:]}
picked = [d for d in deps if re.match(r"[A-Za-z0-9_.\-]+", d).group(0).lower() in wanted]
open(sys.argv[2], "w").write("\n".join(picked) + "\n")
EOF2
log "installing $(tr '\n' ' ' <"$WORK/our-deps.txt")with $(wc -l <"$WORK/lf-direct.txt") packages held"
pipq install -q -c "$WORK/lf-direct.txt" -c "$WORK/constraints.txt" -r "$WORK/our-deps.txt"
log "installing nslora-plugin from $REPO (editable, --no-deps)"
pipq install -q --no-deps -e "$REPO"

# Checks: LLaMA-Factory's direct dependencies unchanged, nothing broken but the deliberate
# torchvision gap (pip check also checks nslora-plugin's own ranges), and the imports we need.
"$PY" - "$WORK/lf-direct.txt" <<'EOF2'
import sys
from importlib.metadata import version
moved = [f"{line} -> {version(line.split('==')[0])}" for line in open(sys.argv[1]).read().split()
         if version(line.split("==")[0]) != line.split("==")[1]]
if moved:
    sys.exit("error: installing our dependencies moved LLaMA-Factory's pins: " + ", ".join(moved))
EOF2
if ! "${PIP[@]}" check >"$WORK/check.txt" 2>&1; then
  if grep -v "requires torchvision, which is not installed" "$WORK/check.txt" | grep -q .; then
    echo "error: pip check:" >&2
    cat "$WORK/check.txt" >&2
    exit 1
  fi
fi
log "import check"
TEXTGRAD_LOG_DIR="$WORK/textgrad-logs" LITELLM_LOCAL_MODEL_COST_MAP=True HF_HUB_OFFLINE=1 CUDA_VISIBLE_DEVICES="" "$PY" - <<'EOF'
import importlib.util
import transformers, trl, peft, accelerate, datasets, bitsandbytes, textgrad, pluggy
import llamafactory.train.tuner  # noqa: F401  (imports mm_plugin -> torchaudio)
from nslora_plugin.trainer.callback import NSLoRACallback  # noqa: F401
from nslora_plugin.integrations.llamafactory import cli  # noqa: F401
assert importlib.util.find_spec("torchvision") is None, "torchvision must not be installed here"
print("  transformers", transformers.__version__, "| trl", trl.__version__, "| peft", peft.__version__,
      "| accelerate", accelerate.__version__, "| datasets", datasets.__version__,
      "| bitsandbytes", bitsandbytes.__version__, "| textgrad ok")
EOF

"${PIP[@]}" freeze >"$DEST/nslora-freeze.txt"
{ echo "# pip freeze of a build by .ci/venvs/llamafactory.sh that passed its checks (Python 3.11, linux x86_64)"
  "${PIP[@]}" freeze --exclude-editable | grep -v -i -e '^nslora-plugin' -e '^torch==' ; } >"$DEST/nslora-lock.txt"
{ echo "$STAMP"; echo "built $(date -u +%FT%TZ) in $((SECONDS - START)) s"; } >"$MARKER"
log "done in $((SECONDS - START)) s: $DEST (versions in $DEST/nslora-lock.txt)"
