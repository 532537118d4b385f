#!/usr/bin/env bash
# The MLflow screenshot of docs/tracking.md (docs/mlflow_sweep.png): a sweep's runs in MLflow's UI, from a real store.
#
#   python train.py -m hydra/launcher=joblib logger=[tensorboard,mlflow] model=mlp optimizer.lr=0.0003,0.001,0.003
#   PYTHON=.venv/bin/python scripts/screenshot_mlflow.sh outputs docs
#
# OUTPUT_ROOT holds mlflow.db (logger=mlflow's default store); the view is the `train` experiment's runs table, the
# sweep's parent run expanded to its jobs, with test/acc and the learning rate as columns.
# Needs headless Chromium (Debian: `apt-get install chromium`) and .venv's mlflow and Pillow.
# A one-off for the docs: not a dependency of the project, not part of CI or the tests.
# Starts `mlflow server` on a free loopback port (with tests/sqlalchemy2_names on its PYTHONPATH: .[dev] pins
# SQLAlchemy below 2, which mlflow's server needs), waits until it answers, screenshots, stops it, and quantizes the PNG.
set -euo pipefail
[[ $# -eq 2 ]] || { echo "usage: $0 OUTPUT_ROOT DEST_DIR" >&2; exit 2; }
root_dir=$(cd "$1" && pwd) dest=$2
repo="$(cd "$(dirname "$0")/.." && pwd)"
python=${PYTHON:-$repo/.venv/bin/python}
chromium=${CHROMIUM:-chromium}
[[ -f $root_dir/mlflow.db ]] || { echo "no mlflow.db in $root_dir (train with logger=mlflow first)" >&2; exit 1; }
mkdir -p "$dest"
tmp=$(mktemp -d)

port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
PYTHONPATH="$repo/tests/sqlalchemy2_names" "$python" -m mlflow server --backend-store-uri "sqlite:///$root_dir/mlflow.db" \
    --host 127.0.0.1 --port "$port" --workers 1 >"$tmp/server.log" 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null; wait "$server" 2>/dev/null; rm -rf "$tmp"' EXIT
url="http://127.0.0.1:$port"
for _ in $(seq 240); do   # up to two minutes: it takes about 20 s
    curl -fs "$url/health" >/dev/null 2>&1 && break
    sleep 0.5
done
curl -fs "$url/health" >/dev/null || { cat "$tmp/server.log" >&2; echo "mlflow server did not start" >&2; exit 1; }
experiment=$(curl -fs "$url/api/2.0/mlflow/experiments/get-by-name?experiment_name=${EXPERIMENT:-train}" |
             "$python" -c 'import json, sys; print(json.load(sys.stdin)["experiment"]["experiment_id"])')

"$chromium" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
    --disable-component-update --disable-sync --hide-scrollbars --user-data-dir="$tmp/profile" \
    --window-size="${WINDOW:-1600,800}" --virtual-time-budget=20000 --run-all-compositor-stages-before-draw \
    --screenshot="$tmp/shot.png" "$url/#/experiments/$experiment/runs${VIEW:-}" >/dev/null 2>&1
[[ -s $tmp/shot.png ]] || { echo "no screenshot" >&2; exit 1; }

"$python" - "$tmp/shot.png" "$dest/mlflow_sweep.png" <<'PY'
import sys
from pathlib import Path
from PIL import Image
image = Image.open(sys.argv[1]).convert("RGB")
if len(image.getcolors(1 << 24) or []) < 50 and image.getcolors(1 << 24) is not None:
    sys.exit("the page did not render (a blank page or a spinner): try a larger --virtual-time-budget")
out = Path(sys.argv[2])
image.quantize(256, method=Image.Quantize.MEDIANCUT).save(out, optimize=True)
print(f"{out}  {image.width}x{image.height}  {out.stat().st_size // 1024} KB")
PY
