#!/usr/bin/env bash
# One-command setup for the openvla-bridge-finetune tutorial. Idempotent: a second run with nothing changed only
# verifies (a few seconds).
#
#   bash setup.sh          system FFmpeg, .venv with the pinned set, Jupyter kernel, notebook.ipynb, data/ outputs/
#   bash setup.sh --run    ... then execute notebook.py headless with papermill on the embedded default
#   bash setup.sh --test   ... then run the test suite (pytest + the notebook headless with params/ci.json)
#
# Environment: PYTHON=/path/to/python3.x to choose the interpreter (3.10-3.12; 3.11 preferred).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"
VENV="$ROOT/.venv"
KERNEL_NAME="openvla-bridge"
DO_RUN=0
DO_TEST=0

usage() { sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; }
for arg in "$@"; do
  case "$arg" in
    --run) DO_RUN=1 ;;
    --test) DO_TEST=1 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "setup.sh: unknown flag '$arg'" >&2; usage >&2; exit 2 ;;
  esac
done

T_ALL=$(date +%s)
step_start() { STEP_NAME="$1"; STEP_T0=$(date +%s.%N); echo "[setup] $STEP_NAME ..."; }
step_done() { printf '[setup] %s: %s (%.1f s)\n' "$STEP_NAME" "$1" "$(echo "$(date +%s.%N) - $STEP_T0" | bc)"; }
die() { echo "[setup] ERROR: $*" >&2; exit 1; }
command -v bc >/dev/null 2>&1 || step_done() { echo "[setup] $STEP_NAME: $1"; }

# ------------------------------------------------------------------------------------------------ 1. Python
py_ok() { "$1" -c 'import sys; sys.exit(0 if (3, 10) <= sys.version_info[:2] <= (3, 12) else 1)' 2>/dev/null; }
py_minor() { "$1" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")'; }
find_python() {
  if [[ -n "${PYTHON:-}" ]]; then
    py_ok "$PYTHON" || die "PYTHON=$PYTHON is not Python 3.10-3.12"
    echo "$PYTHON"; return
  fi
  local cands=(python3.11 python3.10 python3.12)
  if command -v pyenv >/dev/null 2>&1; then
    local proot; proot="$(pyenv root)"
    for v in 3.11 3.10 3.12; do
      for d in "$proot"/versions/"$v".*; do [[ -x "$d/bin/python" ]] && cands+=("$d/bin/python"); done
    done
  fi
  cands+=(python3)
  for c in "${cands[@]}"; do
    local exe; exe="$(command -v "$c" 2>/dev/null || true)"
    [[ -n "$exe" ]] && py_ok "$exe" && { echo "$exe"; return; }
  done
  die "no Python 3.10-3.12 found. Install Python 3.11 (e.g. 'sudo apt-get install python3.11 python3.11-venv' or 'pyenv install 3.11') or set PYTHON=/path/to/python3.11"
}
step_start "Python"
if [[ -x "$VENV/bin/python" ]] && py_ok "$VENV/bin/python"; then
  PY="$VENV/bin/python"; step_done "reusing .venv ($(py_minor "$PY"))"
else
  PY="$(find_python)"; step_done "$PY ($(py_minor "$PY"))"
fi

# ------------------------------------------------------------------------------------------------ 2. FFmpeg
# torchcodec (lerobot's video decoder) loads FFmpeg's shared libraries at run time; without them a
# StreamingLeRobotDataset yields zero frames and no error.
have_ffmpeg_libs() {
  if [[ "$(uname -s)" == "Darwin" ]]; then command -v ffmpeg >/dev/null 2>&1; return; fi
  command -v ffmpeg >/dev/null 2>&1 && ldconfig -p 2>/dev/null | grep -q 'libavutil\.so\.'
}
ffmpeg_hint() {
  if [[ "$(uname -s)" == "Darwin" ]]; then echo "brew install ffmpeg"; return; fi
  if [[ -r /etc/os-release ]]; then
    . /etc/os-release
    case " ${ID:-} ${ID_LIKE:-} " in
      *" debian "*|*" ubuntu "*) echo "sudo apt-get update && sudo apt-get install -y ffmpeg"; return ;;
      *" fedora "*|*" rhel "*|*" centos "*) echo "sudo dnf install -y ffmpeg-free  (or ffmpeg from RPM Fusion)"; return ;;
      *" arch "*) echo "sudo pacman -S ffmpeg"; return ;;
    esac
  fi
  echo "install FFmpeg 4-7 with your package manager, or: conda install -c conda-forge 'ffmpeg<8'"
}
step_start "system FFmpeg"
if have_ffmpeg_libs; then
  step_done "present ($(ffmpeg -version 2>/dev/null | head -1 | cut -d' ' -f1-3))"
else
  SUDO=""
  [[ "$(id -u)" -ne 0 ]] && command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null && SUDO="sudo"
  if command -v apt-get >/dev/null 2>&1 && { [[ "$(id -u)" -eq 0 ]] || [[ -n "$SUDO" ]]; }; then
    echo "[setup]   installing ffmpeg with apt-get"
    $SUDO apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq ffmpeg >/dev/null
    have_ffmpeg_libs || die "apt-get installed ffmpeg but its shared libraries are not visible (ldconfig -p | grep libavutil)"
    step_done "installed"
  else
    die "FFmpeg is missing and cannot be installed automatically. Run: $(ffmpeg_hint)   then re-run: bash setup.sh"
  fi
fi

# ------------------------------------------------------------------------------------------------ 3. venv
step_start ".venv"
if [[ ! -x "$VENV/bin/python" ]] || ! py_ok "$VENV/bin/python"; then
  rm -rf "$VENV"
  "$PY" -m venv "$VENV" || die "could not create .venv with $PY (on Debian/Ubuntu: sudo apt-get install python3-venv)"
  step_done "created with $(py_minor "$VENV/bin/python")"
else
  step_done "exists ($(py_minor "$VENV/bin/python"))"
fi
VPY="$VENV/bin/python"

# ------------------------------------------------------------------------------------------------ 4. pins
step_start "pinned packages (requirements.txt)"
STAMP="$VENV/.vla_bridge_stamp"
WANT="$( { cat requirements.txt pyproject.toml; py_minor "$VPY"; } | sha256sum | cut -d' ' -f1)"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]]; then
  step_done "up to date"
else
  echo "[setup]   installing the pinned set (first time ~3-5 min and ~9 GB: torch 2.10 with its CUDA libraries)"
  PIPLOG="$(mktemp)"
  if ! "$VPY" -m pip install -q --disable-pip-version-check -r requirements.txt >"$PIPLOG" 2>&1 \
     || ! "$VPY" -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e . >>"$PIPLOG" 2>&1; then
    grep -v "^WARNING: Location" "$PIPLOG" | tail -40 >&2
    die "pip could not install requirements.txt (its last messages are above)"
  fi
  rm -f "$PIPLOG"
  (cd / && "$VPY" - <<'PY') || die "the pinned set did not install (see pip's messages above)"
import importlib.metadata as md
want = {"lerobot": "0.4.4", "transformers": "4.40.1", "tokenizers": "0.19.1", "timm": "0.9.10", "peft": "0.13.2"}
bad = {k: md.version(k) for k in want if md.version(k) != want[k]}
assert not bad, f"wrong versions: {bad}"
import vla_bridge  # noqa: F401  (editable install)
PY
  echo "$WANT" > "$STAMP"
  step_done "installed"
fi

# ------------------------------------------------------------------------------------------------ 5. kernel
step_start "Jupyter kernel '$KERNEL_NAME'"
KDIR="${JUPYTER_DATA_DIR:-$HOME/.local/share/jupyter}/kernels/$KERNEL_NAME"
if [[ -f "$KDIR/kernel.json" ]] && grep -q "\"$VPY\"" "$KDIR/kernel.json"; then
  step_done "registered"
else
  "$VPY" -m ipykernel install --user --name "$KERNEL_NAME" --display-name "Python (openvla-bridge)" >/dev/null
  step_done "registered for $VPY"
fi

# ------------------------------------------------------------------------------------------------ 6. notebook.ipynb
step_start "notebook.ipynb (paired with notebook.py by jupytext)"
"$VENV/bin/jupytext" --sync notebook.py >/dev/null
step_done "in sync"

# ------------------------------------------------------------------------------------------------ 7. folders
step_start "data/ and outputs/"
mkdir -p data outputs/notebooks
step_done "ready"

echo "[setup] ready in $(( $(date +%s) - T_ALL )) s. Activate with: source .venv/bin/activate"

# ------------------------------------------------------------------------------------------------ --test / --run
export PYTHONUNBUFFERED=1
if [[ "$DO_TEST" -eq 1 ]]; then
  step_start "tests: pytest"
  set +e
  "$VPY" -m pytest tests
  rc=$?
  set -e
  if [[ $rc -eq 5 ]]; then die "pytest collected no tests: the suite under tests/ is missing"; fi
  [[ $rc -eq 0 ]] || die "pytest failed (exit $rc)"
  step_done "passed"
  step_start "tests: notebook headless (params/ci.json)"
  "$VPY" -m vla_bridge run-notebook --params-file params/ci.json --out outputs/notebooks/notebook.ci.ipynb
  step_done "executed → outputs/notebooks/notebook.ci.ipynb"
fi
if [[ "$DO_RUN" -eq 1 ]]; then
  step_start "run: notebook headless on the embedded default"
  "$VPY" -m vla_bridge run-notebook --out outputs/notebooks/notebook.executed.ipynb
  step_done "executed → outputs/notebooks/notebook.executed.ipynb"
fi
echo "[setup] total $(( $(date +%s) - T_ALL )) s"
