#!/usr/bin/env bash
# The TensorBoard screenshots of README.md and docs/tensorboard.md (docs/tensorboard_*.png), taken from a real run directory.
#
#   PYTHON=.venv/bin/python scripts/screenshot_tensorboard.sh outputs/multirun/2026-11-23/18-41-31-368350 docs
#
# Give it one sweep's directory (run names then read `0_model=logistic,...`), with a `cnn` run for the Images view.
# Needs headless Chromium (Debian: `apt-get install chromium`) and .venv's tensorboard and Pillow.
# A one-off for the docs: not a dependency of the project, not part of CI or the tests.
# Starts tensorboard on a free loopback port, waits until it lists the runs, screenshots the Time Series
# (scalars), Images and HParams views, stops the server, and crops and quantizes each PNG (<= 1400 px wide).
# The views keep TensorBoard's defaults that the URL cannot set: outliers ignored in chart scaling, and the
# HParams table's first five hyperparameters (alphabetical) before the metrics.
set -euo pipefail
[[ $# -eq 2 ]] || { echo "usage: $0 LOGDIR DEST_DIR" >&2; exit 2; }
logdir=$1 dest=$2
root="$(cd "$(dirname "$0")/.." && pwd)"
python=${PYTHON:-$root/.venv/bin/python}
tensorboard=${TENSORBOARD:-$(dirname "$python")/tensorboard}
chromium=${CHROMIUM:-chromium}
mkdir -p "$dest"
tmp=$(mktemp -d)

port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$tensorboard" --logdir "$logdir" --host 127.0.0.1 --port "$port" >"$tmp/tensorboard.log" 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null; wait "$server" 2>/dev/null; rm -rf "$tmp"' EXIT
url="http://127.0.0.1:$port"
for _ in $(seq 120); do   # up to a minute: serving, with every run loaded
    runs=$(curl -fs "$url/data/runs" 2>/dev/null || true)
    [[ $runs == '['*'"'* ]] && break
    sleep 0.5
done
[[ $runs == '['*'"'* ]] || { cat "$tmp/tensorboard.log" >&2; echo "tensorboard did not serve $logdir" >&2; exit 1; }
sleep 5   # let the loader read the event files to their ends

shot() {  # NAME WIDTH,HEIGHT PATH [CHROMIUM FLAGS]
    "$chromium" --headless=new --no-sandbox --disable-gpu --hide-scrollbars --user-data-dir="$tmp/profile" \
        --window-size="$2" --virtual-time-budget=20000 --run-all-compositor-stages-before-draw \
        --screenshot="$tmp/$1.png" "${@:4}" "$url/$3" >/dev/null 2>&1
    [[ -s $tmp/$1.png ]] || { echo "no screenshot of $3" >&2; exit 1; }
}
# Time Series, filtered to train|val/acc|loss, unsmoothed; forceSVG: headless Chromium draws no WebGL lines.
shot scalars 1400,1060 '?tagFilter=%5E(train%7Cval)%2F(acc%7Closs)%24&smoothing=0&forceSVG=true#timeseries'
# At 100% zoom, as a user sees it: the misclassified grid is drawn to fit its card unshrunk (trainer/figures.py).
shot images 1400,1500 '#images&regexInput=cnn&tagFilter=%5Eval%2F(confusion_matrix%7Cmisclassified)%24'
shot hparams 2250,330 '#hparams'   # wide enough for every metric column after the first five hyperparameters

# Crop (pixels, for the window sizes above: left, top, right, bottom), fit into 1400 px, 256 colours.
"$python" - "$tmp" "$dest" <<'EOF'
import sys
from pathlib import Path
from PIL import Image
src, dest = Path(sys.argv[1]), Path(sys.argv[2])
for name, box in {"scalars": (0, 0, 1146, 1044),     # the runs and the four cards, not the settings pane
                  "images": (358, 0, 1100, 1500),  # the two cards at 100% zoom, the tab bar above them
                  "hparams": (456, 0, 2250, 330)}.items():  # right of the 20 % filter sidebar
    image = Image.open(src / f"{name}.png").convert("RGB")
    image = image.crop(box)
    if len(image.getcolors(1 << 24)) < 200:  # a blank page or a spinner: nothing rendered
        sys.exit(f"{name}: the page did not render (try a larger --virtual-time-budget)")
    if image.width > 1400:
        image = image.resize((1400, round(image.height * 1400 / image.width)), Image.LANCZOS)
    out = dest / f"tensorboard_{name}.png"
    image.quantize(256, method=Image.Quantize.MEDIANCUT).save(out, optimize=True)
    print(f"{out}  {image.width}x{image.height}  {out.stat().st_size // 1024} KB")
EOF
