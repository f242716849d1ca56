"""Where things are: the project root, the Octo environment, and the one-line hints that point at ``setup.sh``.

The bottom layer of the package (standard library only), so every module can ask "where is the checkout?" without
importing configuration or hardware checks. See docs/ARCHITECTURE.md for the layers.
"""

from __future__ import annotations

import os
from pathlib import Path

# The checkout that holds notebook.py, data/ and outputs/ (VLA_BRIDGE_ROOT overrides it, e.g. for an installed copy).
PROJECT_ROOT = Path(os.environ.get("VLA_BRIDGE_ROOT", Path(__file__).resolve().parent.parent))

# The statistics file beside every dataset build, checkpoint and adapter (OpenVLA's name; data/stats.py reads and
# writes it, the Octo worker in its own environment reads it by this name too).
STATS_FILENAME = "dataset_statistics.json"

# Octo-Small's own JAX environment, built by `bash setup.sh --octo` next to the main .venv.
OCTO_VENV = ".venv-octo"
OCTO_SETUP_HINT = ("run `bash setup.sh --octo` (offline: OCTO_SOURCE=/path/to/a/copy/of/octo-models/octo "
                   "bash setup.sh --octo)")


def octo_python(root: str | os.PathLike | None = None) -> Path:
    """``.venv-octo/bin/python`` of the project (``VLA_BRIDGE_OCTO_PYTHON`` overrides it)."""
    override = os.environ.get("VLA_BRIDGE_OCTO_PYTHON")
    if override:
        return Path(override)
    return Path(root or PROJECT_ROOT) / OCTO_VENV / "bin" / "python"
