#!/usr/bin/env bash
# One-command setup for the openvla-bridge-finetune tutorial. Idempotent: a second run with nothing changed only
# verifies (a few seconds).
#
#   bash setup.sh          system FFmpeg, .venv with the pinned set, Jupyter kernel, notebook.ipynb, data/ outputs/
#   bash setup.sh --run    ... then execute notebook.py headless with papermill on the embedded default
#   bash setup.sh --test   ... then run the test suite (pytest + the notebook headless with params/ci.json)
#   bash setup.sh --octo   ... and .venv-octo, Octo-Small's own JAX environment (POLICY=octo; GPUs < 12 GB)
#
# Environment: PYTHON=/path/to/python3.x to choose the interpreter (3.10-3.12; 3.11 preferred).
#   --octo: OCTO_SOURCE=/path/to/octo installs Octo from a local copy (offline) instead of GitHub at OCTO_COMMIT;
#   OCTO_PYTHON=/path/to/python3.11 chooses its interpreter (3.10 or 3.11).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"
VENV="$ROOT/.venv"
KERNEL_NAME="openvla-bridge"
DO_RUN=0
DO_TEST=0
DO_OCTO=0

usage() { sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; }
for arg in "$@"; do
  case "$arg" in
    --run) DO_RUN=1 ;;
    --test) DO_TEST=1 ;;
    --octo) DO_OCTO=1 ;;
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


# ------------------------------------------------------------------------------------------------ 8. .venv-octo (--octo)
# Octo-Small (JAX/Flax) needs numpy 1.24 / jax 0.4.20 / tensorflow 2.15 and Python <= 3.11: its own environment.
# The notebook starts vla_bridge/octo/worker.py with .venv-octo/bin/python; nothing here touches .venv.
OCTO_COMMIT="241fb3514b7c40957a86d869fecb7c7fc353f540"   # octo-models/octo main, 2024-07-30 (octo-small-1.5 era)
if [[ "$DO_OCTO" -eq 1 ]]; then
  OVENV="$ROOT/.venv-octo"
  octo_py_ok() { "$1" -c 'import sys; sys.exit(0 if (3, 10) <= sys.version_info[:2] <= (3, 11) else 1)' 2>/dev/null; }
  step_start ".venv-octo: Python 3.10/3.11"
  if [[ -n "${OCTO_PYTHON:-}" ]]; then
    octo_py_ok "$OCTO_PYTHON" || die "OCTO_PYTHON=$OCTO_PYTHON is not Python 3.10 or 3.11 (Octo's tensorflow 2.15 / numpy 1.24.3 have no 3.12 wheels)"
    OPY_BASE="$OCTO_PYTHON"
  else
    OPY_BASE=""
    ocands=(python3.11 python3.10)
    if command -v pyenv >/dev/null 2>&1; then
      for v in 3.11 3.10; do for d in "$(pyenv root)"/versions/"$v".*; do [[ -x "$d/bin/python" ]] && ocands+=("$d/bin/python"); done; done
    fi
    for c in "${ocands[@]}"; do
      exe="$(command -v "$c" 2>/dev/null || true)"
      if [[ -n "$exe" ]] && octo_py_ok "$exe"; then OPY_BASE="$exe"; break; fi
    done
    [[ -n "$OPY_BASE" ]] || die "--octo needs Python 3.10 or 3.11 (3.12 has no tensorflow 2.15 wheels): install one (pyenv install 3.11) or set OCTO_PYTHON=/path/to/python3.11"
  fi
  step_done "$OPY_BASE ($(py_minor "$OPY_BASE"))"

  if [[ -n "${OCTO_SOURCE:-}" ]]; then
    [[ -f "$OCTO_SOURCE/octo/model/octo_model.py" ]] || die "OCTO_SOURCE=$OCTO_SOURCE is not a copy of octo-models/octo (no octo/model/octo_model.py); e.g. git clone https://github.com/octo-models/octo && git -C octo checkout $OCTO_COMMIT"
    OCTO_SPEC="$(cd "$OCTO_SOURCE" && pwd)"
    OCTO_ID="local:$OCTO_SPEC:$(cd "$OCTO_SPEC" && find octo -name '*.py' -type f | LC_ALL=C sort | xargs cat | sha256sum | cut -c1-16)"
  else
    OCTO_SPEC="git+https://github.com/octo-models/octo@$OCTO_COMMIT"
    OCTO_ID="$OCTO_SPEC"
  fi

  step_start ".venv-octo: pinned JAX stack (requirements-octo.txt + constraints-octo.txt) and octo"
  OSTAMP="$OVENV/.vla_bridge_octo_stamp"
  OWANT="$( { cat requirements-octo.txt constraints-octo.txt; echo "$OCTO_ID"; py_minor "$OPY_BASE"; } | sha256sum | cut -d' ' -f1)"
  if [[ -x "$OVENV/bin/python" && -f "$OSTAMP" && "$(cat "$OSTAMP")" == "$OWANT" ]]; then
    step_done "up to date"
  else
    if [[ ! -x "$OVENV/bin/python" ]] || ! octo_py_ok "$OVENV/bin/python"; then
      rm -rf "$OVENV"
      "$OPY_BASE" -m venv "$OVENV" || die "could not create .venv-octo with $OPY_BASE"
    fi
    echo "[setup]   installing the JAX stack (first time ~1-2 min and ~2 GB: tensorflow-cpu, jaxlib, transformers)"
    PIPLOG="$(mktemp)"
    if ! "$OVENV/bin/python" -m pip install -q --disable-pip-version-check -r requirements-octo.txt -c constraints-octo.txt >"$PIPLOG" 2>&1; then
      grep -v "^WARNING: Location" "$PIPLOG" | tail -40 >&2
      die "pip could not install requirements-octo.txt with constraints-octo.txt (its last messages are above)"
    fi
    # --no-deps: octo's own requirements (unpinned transformers, tensorflow, dlimp from GitHub, ...) fight the pins.
    if ! "$OVENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps --force-reinstall "$OCTO_SPEC" >"$PIPLOG" 2>&1; then
      grep -v "^WARNING: Location" "$PIPLOG" | tail -20 >&2
      die "could not install octo from $OCTO_SPEC (offline? set OCTO_SOURCE=/path/to/a/copy/of/octo-models/octo)"
    fi
    rm -f "$PIPLOG"
    echo "$OWANT" > "$OSTAMP"
    step_done "installed ($(du -sh "$OVENV" 2>/dev/null | cut -f1))"
  fi

  step_start ".venv-octo: import check (octo.model, octo.utils.train_utils with our dlimp stand-in)"
  OCHECK="$(cd "$ROOT" && HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" PYTHONPATH="$ROOT" "$OVENV/bin/python" -m vla_bridge.octo.worker check 2>&1)" \
    || { echo "$OCHECK" | tail -20 >&2; die ".venv-octo does not import octo (messages above); rebuild with: rm -rf .venv-octo && bash setup.sh --octo"; }
  step_done "$(echo "$OCHECK" | tail -1)"
fi

echo "[setup] ready in $(( $(date +%s) - T_ALL )) s. Activate with: source .venv/bin/activate"

# ------------------------------------------------------------------------------------------------ --test / --run
export PYTHONUNBUFFERED=1
if [[ "$DO_TEST" -eq 1 ]]; then
  step_start "tests: the package's layers (lint-imports; contracts in pyproject.toml, docs/ARCHITECTURE.md)"
  "$VENV/bin/lint-imports" --no-cache >/dev/null || { "$VENV/bin/lint-imports" --no-cache | sed -n '/Broken contracts/,$p' >&2; die "an import breaks the package's layers (above)"; }
  step_done "kept"
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
  step_start "tests: the CI run's figures show content"
  "$VPY" -m vla_bridge check-figures outputs/figures/ci outputs/videos/ci || die "a figure of the CI run is empty (see above)"
  step_done "checked"
  # Plumbing only: every ratio must be printed; no time and no goal is asserted (the figures at this size mean
  # nothing). The list is vla_bridge/tools/bench_all.py's EXPECTED_RATIOS (tests/test_bench_ratios.py keeps them equal).
  step_start "tests: bench-all --size smallest prints every ratio"
  BLOG="$(mktemp)"
  "$VPY" -m vla_bridge bench-all --size smallest --out outputs/bench/bench_all.smallest.json >"$BLOG" 2>&1 \
    || { tail -40 "$BLOG" >&2; die "bench-all --size smallest failed (its last lines are above)"; }
  for r in bench-loader.overhead bench-loader.pipeline_vs_trainer bench-loader.workers_vs_bare bench-train.processes bench-eval.speedup; do
    grep -q "^RATIO $r = " "$BLOG" || { tail -40 "$BLOG" >&2; die "bench-all printed no $r ratio (its last lines are above)"; }
  done
  grep "^RATIO " "$BLOG"; rm -f "$BLOG"
  step_done "every ratio printed → outputs/bench/bench_all.smallest.json"
fi
if [[ "$DO_RUN" -eq 1 ]]; then
  step_start "run: notebook headless on the embedded default"
  "$VPY" -m vla_bridge run-notebook --out outputs/notebooks/notebook.executed.ipynb
  step_done "executed → outputs/notebooks/notebook.executed.ipynb"
fi
echo "[setup] total $(( $(date +%s) - T_ALL )) s"
