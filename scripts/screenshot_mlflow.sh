#!/usr/bin/env bash
# The MLflow screenshot of docs/tracking.md (docs/mlflow_sweep.png): a sweep's runs in MLflow's UI, from a real store.
#
#   python train.py -m hydra/launcher=joblib logger=[tensorboard,mlflow] model=mlp trainer.max_epochs=4 \
#       optimizer.lr=0.0003,0.001,0.003
#   PYTHON=.venv/bin/python scripts/screenshot_mlflow.sh outputs docs
#
# OUTPUT_ROOT holds mlflow.db (logger=mlflow's default store); the view compares the jobs of the newest sweep in the
# `train` experiment (EXPERIMENT=... for another).
# Needs headless Chromium (Debian: `apt-get install chromium`) and .venv's mlflow and Pillow.
# A one-off for the docs: not a dependency of the project, not part of CI or the tests.
# Starts `mlflow server` on a free loopback port (with tests/sqlalchemy2_names on its PYTHONPATH: .[dev] pins
# SQLAlchemy below 2, which mlflow's server needs), waits until it answers, screenshots, stops it, crops and quantizes
# the PNG.
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
PYTHONPATH="$repo/tests/sqlalchemy2_names" "$python" -m mlflow server \
    --backend-store-uri "sqlite:///$root_dir/mlflow.db" \
    --host 127.0.0.1 --port "$port" --workers 1 >"$tmp/server.log" 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null; wait "$server" 2>/dev/null; rm -rf "$tmp"' EXIT
url="http://127.0.0.1:$port"
for _ in $(seq 240); do   # up to two minutes: it takes about 20 s
    curl -fs "$url/health" >/dev/null 2>&1 && break
    sleep 0.5
done
curl -fs "$url/health" >/dev/null || { cat "$tmp/server.log" >&2; echo "mlflow server did not start" >&2; exit 1; }
# The compare view of the newest sweep's jobs (the children of the newest parent run): a parallel-coordinates plot
# of the hyperparameters that differ against a metric, then each run's parameters and metrics side by side.
view=$("$python" - "$url" "${EXPERIMENT:-train}" <<'PY'
import json, sys, urllib.parse, urllib.request
url, name = sys.argv[1], sys.argv[2]
def api(path, body=None):
    request = urllib.request.Request(f"{url}/api/2.0/mlflow/{path}", data=body and json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    return json.load(urllib.request.urlopen(request, timeout=30))
experiment = api(f"experiments/get-by-name?experiment_name={urllib.parse.quote(name)}")["experiment"]["experiment_id"]
runs = api("runs/search", {"experiment_ids": [experiment], "order_by": ["attributes.start_time DESC"]}).get("runs", [])
parents = [r for r in runs if "trainer.sweep" in {t["key"] for t in r["data"].get("tags", [])}]
if not parents:
    sys.exit(f"no sweep in experiment {name}: run train.py -m ... logger=mlflow first")
parent = parents[0]["info"]["run_id"]
children = [r["info"]["run_id"] for r in runs
            if {"key": "mlflow.parentRunId", "value": parent} in r["data"].get("tags", [])]
print(f"#/compare-runs?runs={urllib.parse.quote(json.dumps(children))}&experiments="
      f"{urllib.parse.quote(json.dumps([experiment]))}")
PY
)

"$chromium" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
    --disable-component-update --disable-sync --hide-scrollbars --user-data-dir="$tmp/profile" \
    --window-size=1600,1000 --virtual-time-budget=20000 --run-all-compositor-stages-before-draw \
    --screenshot="$tmp/shot.png" "$url/$view" >/dev/null 2>&1
[[ -s $tmp/shot.png ]] || { echo "no screenshot" >&2; exit 1; }

"$python" - "$tmp/shot.png" "$dest/mlflow_sweep.png" <<'PY'
import sys
from pathlib import Path
from PIL import Image
image = Image.open(sys.argv[1]).convert("RGB").crop((0, 0, 1190, 1000))  # without the Assistant panel at the right
if len(image.getcolors(1 << 24)) < 200:
    sys.exit("the page did not render (a blank page or a spinner): try a larger --virtual-time-budget")
out = Path(sys.argv[2])
image.quantize(256, method=Image.Quantize.MEDIANCUT).save(out, optimize=True)
print(f"{out}  {image.width}x{image.height}  {out.stat().st_size // 1024} KB")
PY
