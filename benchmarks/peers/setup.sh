#!/usr/bin/env bash
# Make a separate virtual environment for the peer library (lightly), never touching the
# project's own environment. Peer code is installed here, never copied into the project.
#   bash benchmarks/peers/setup.sh            # -> /work/peers-venv (or $PEERS_VENV)
set -euo pipefail
VENV="${PEERS_VENV:-/work/peers-venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/pip" install -q torch==2.14.1 torchvision==0.29.1
# lightly's own pins (pytorch_lightning, requests, ...) are not needed by the parts we use:
# lightly.loss, lightly.models.modules.heads, lightly.models.utils, lightly.transforms,
# lightly.utils.lars, lightly.utils.scheduler. These few pure-Python packages are what those
# imports need (found by trying them).
"$VENV/bin/pip" install -q --no-deps lightly==1.6.0
"$VENV/bin/pip" install -q --no-deps -r "$(dirname "$0")/requirements-peer.txt"
# timm, for the ViT exports' interop test (tests/test_vit.py loads them into timm's ViTs)
"$VENV/bin/pip" install -q timm==1.0.31
"$VENV/bin/python" - <<'PY'
import torch, torchvision, lightly, timm
import lightly.loss, lightly.models.modules.heads, lightly.models.utils, lightly.transforms
from lightly.utils.lars import LARS
from lightly.utils.scheduler import cosine_schedule
print("peer venv ok: torch", torch.__version__, "torchvision", torchvision.__version__,
      "lightly", lightly.__version__, "timm", timm.__version__)
PY
