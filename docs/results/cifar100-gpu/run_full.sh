#!/bin/bash
# The full configs/cifar100-gpu.yaml run on one GPU (issue 29): the resident, compiled training
# loop for the configuration's 200 epochs, then every later stage, each timed; results into $OUT.
# DVC is not installed on the device, so the stages run as `python -m pipeline <stage>` in the
# order of pipeline.cli.STAGE_SECTIONS (dvc.yaml's), in a work folder outside the checkout.
#
# Here, on the CPU (once per session that has a GPU):
#   echo /.xfer/ >> .git/info/exclude                  # the pieces travel as a carried, ignored path
#   bash docs/results/cifar100-gpu/run_full.sh pack     # .xfer/cifar100-a.zip, -b.zip, ...: CIFAR-100 as
#                                                       # lossless WebP, each piece small enough that it
#                                                       # and the working tree fit one call's 64 MiB
#   bash docs/results/cifar100-gpu/run_full.sh dry      # everything below on a tiny subset and model, here
# On the device, one call per piece, the machine staying warm in between (run's `carry`: the piece):
#   call 1, carry .xfer/cifar100-a.zip:  bash docs/results/cifar100-gpu/run_full.sh bench
#   (more pieces: carry each with `... run_full.sh unpack`)
#   call 2, carry the last piece:        bash docs/results/cifar100-gpu/run_full.sh full
#   if `full` exits 5 (the training reached TRAIN_LIMIT_S), a later call:  ... run_full.sh resume
# Each call leaves what it measured under $OUT (at most 8 files come back): machine.txt, bench.txt,
# bench.json, times.json, times.md, results.tgz (metrics/, logs/, params.yaml, model hashes).
#
# Settings (environment): PY (python3), CONFIG (configs/cifar100-gpu.yaml), DATA (/tmp/cifar100),
# WORK (/tmp/cifar100-gpu-run: params.yaml, data/, models/, metrics/, logs/ of the run; kept
# between calls), EPOCHS (the configuration's; `auto`: as many as LEFT_S allows at the rate
# `bench` measured), LEFT_S (device seconds left for this and later calls, for EPOCHS=auto),
# CALL_S (570: one command's 600 s less a margin), REST_S (240: what the stages after finetune
# are expected to take), TRAIN_LIMIT_S (CALL_S - time used - REST_S: finetune is stopped there
# and continues, from its last epoch checkpoint, with `resume`), BENCH_ARGS (extra arguments of
# bench/bench_gpu_train.py), EXTRA (a YAML mapping merged into the params: the dry run's tiny
# configuration).
set -uo pipefail
PHASE=${1:?usage: run_full.sh pack|dry|bench|unpack|full|resume}
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../../.." && pwd)
PY=${PY:-python3}
CONFIG=${CONFIG:-$REPO/configs/cifar100-gpu.yaml}
XFER=${XFER:-$REPO/.xfer}
DATA=${DATA:-/tmp/cifar100}
WORK=${WORK:-/tmp/cifar100-gpu-run}
OUT=${OUT:-$WORK/out}
CALL_S=${CALL_S:-570}
REST_S=${REST_S:-240}
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 DVC_NO_ANALYTICS=1
mkdir -p "$OUT"

if [ "$PHASE" = pack ]; then
  # SRC: an image folder (train/, test/, one folder per class); TRAIN_PER_CLASS / TEST_PER_CLASS /
  # CLASSES limit it (the dry run); PIECE_BYTES: the largest piece (default: 64 MiB less the
  # working tree that travels with it, less 2 MiB).
  SRC=${SRC:-$REPO/../shared/data/cifar100}
  if [ -z "${PIECE_BYTES:-}" ]; then
    TREE=$(cd "$REPO" && git ls-files -co --exclude-standard -z | du --files0-from=- -cb 2>/dev/null | tail -1 | cut -f1)
    PIECE_BYTES=$(( 64 * 1024 * 1024 - TREE - 2 * 1024 * 1024 ))
    echo "working tree ${TREE} bytes: pieces of at most ${PIECE_BYTES} bytes"
  fi
  exec "$PY" - "$SRC" "$XFER" "$PIECE_BYTES" "${TRAIN_PER_CLASS:-0}" "${TEST_PER_CLASS:-0}" "${CLASSES:-0}" <<'EOF'
import io, json, multiprocessing, string, sys, zipfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from PIL import Image

src, xfer, limit = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
per_split = {"train": int(sys.argv[4]), "test": int(sys.argv[5])}
classes = sorted(p.name for p in (src / "train").iterdir() if p.is_dir())
classes = classes[: int(sys.argv[6])] if int(sys.argv[6]) else classes
files = []
for split in ("train", "test"):
    for c in classes:
        names = sorted(p for p in (src / split / c).iterdir() if p.suffix == ".png")
        files += names[: per_split[split]] if per_split[split] else names

def webp(path):
    """Lossless WebP of one image, checked pixel for pixel against the original."""
    image = Image.open(path).convert("RGB")
    buf = io.BytesIO()
    image.save(buf, "WEBP", lossless=True, quality=100)
    assert Image.open(io.BytesIO(buf.getvalue())).convert("RGB").tobytes() == image.tobytes(), path
    return path.relative_to(src).with_suffix(".webp").as_posix(), buf.getvalue()

with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("fork")) as pool:  # 2 cores here
    encoded = list(pool.map(webp, files, chunksize=256))
counts = {s: sum(1 for name, _ in encoded if name.startswith(s + "/")) for s in ("train", "test")}
manifest = json.dumps({"classes": len(classes), **counts}).encode()
xfer.mkdir(parents=True, exist_ok=True)
for old in xfer.glob("cifar100-*.zip"):
    old.unlink()
pieces, current, size = [], [], len(manifest) + 1024
for name, blob in encoded:
    cost = len(blob) + 100 + 2 * len(name)  # zip headers: local + central directory
    if current and size + cost > limit:
        pieces.append(current)
        current, size = [], len(manifest) + 1024
    current.append((name, blob))
    size += cost
pieces.append(current)
for letter, piece in zip(string.ascii_lowercase, pieces):
    path = xfer / f"cifar100-{letter}.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("manifest.json", manifest)
        for name, blob in piece:
            z.writestr(name, blob)
    assert path.stat().st_size <= limit, (path, path.stat().st_size, limit)
    print(f"{path}: {len(piece)} images, {path.stat().st_size / 2**20:.1f} MiB")
png = sum(p.stat().st_size for p in files)
print(f"{len(encoded)} images ({counts}), {sum(len(b) for _, b in encoded) / png:.3f} of the PNG bytes, in {len(pieces)} piece(s)")
EOF
fi

if [ "$PHASE" = dry ]; then
  # The whole flow on this CPU: 4 classes x 16 + 8 real images packed into pieces of 48 KB,
  # the bench's tiny mode, a tiny model through every stage (compiled, as on the GPU), then
  # `resume` over the finished run. Nothing is written in the checkout.
  D=$(mktemp -d /tmp/run_full_dry.XXXXXX)
  export PY=${PY_DRY:-$REPO/.venv/bin/python} XFER=$D/xfer DATA=$D/images WORK=$D/work OUT=$D/out
  TRAIN_PER_CLASS=16 TEST_PER_CLASS=8 CLASSES=4 PIECE_BYTES=48000 bash "$0" pack || exit 1
  BENCH_ARGS="--device cpu --tiny" bash "$0" bench || exit 1
  export EXTRA='{model: {patch_size: 8, embed_dim: 24, depth: 3, num_heads: 3},
    data: {val_per_class: 4},
    finetune: {epochs: 2, batch_size: 16, warmup_epochs: 0.0, num_workers: 2},
    extract: {batch_size: 32},
    sae: {expansion: 2, k: 4, epochs: 2, batch_size: 16, warmup_steps: 1},
    stats: {top_k: 4, related: 2},
    interpret: {top_n: 4, grid_latents: 3, grid_images: 3, card_latents: 2},
    steer: {alphas: [-1.0, 0.0, 1.0], null_draws: 3, bootstrap: 50, batch_size: 32, top_classes: 2},
    ceiling: {batch_size: 32}}'
  bash "$0" full || exit 1
  sed -i '/^finetune$/,$d' "$WORK/done"  # resume from finetune on: its checkpoint is restored (nothing left to train)
  bash "$0" resume || exit 1
  grep -q "resumed from" "$WORK/logs/finetune.log" || { echo "resume did not restore the checkpoint"; exit 1; }
  echo "dry run complete: $D"; ls -la "$OUT"
  exit 0
fi

# ------------------------------------------------------------------ on the device (or dry)
if [ -d "$REPO/.whl" ]; then  # packages missing on the device, carried as wheels
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$REPO"/.whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$REPO
else
  export PYTHONPATH=$REPO
fi
$PY - "$REPO" <<'EOF' || { echo "a stage's imports fail here: carry the missing packages as wheels in .whl (/work/.library/device/README.md)"; exit 3; }
import importlib, re, sys
from pathlib import Path
from pipeline.cli import STAGE_SECTIONS
for stage in STAGE_SECTIONS:
    importlib.import_module(f"pipeline.stages.{stage}")
# packages imported lazily inside functions (DVCLive by the training stages' epoch log)
lazy = set(re.findall(r"^\s+from (dvclive|dvc)\b", "".join(p.read_text() for p in Path(sys.argv[1], "pipeline").rglob("*.py")), re.M))
for name in sorted(lazy):
    importlib.import_module(name)
EOF
for z in "$XFER"/cifar100-*.zip; do
  [ -f "$z" ] && $PY -c "import zipfile,sys; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])" "$z" "$DATA" && rm "$z" && stamp "unpacked $(basename "$z")"
done
count() { find "$DATA/$1" -name '*.webp' 2>/dev/null | wc -l; }
stamp "data in $DATA: $(count train) train, $(count test) test images"

if [ "$PHASE" = unpack ]; then exit 0; fi

if [ "$PHASE" = bench ]; then
  {
    date -u +%FT%TZ
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
    echo "cpus $(nproc)"
    $PY -c "import sys,torch,torchvision,timm,pydantic,pyarrow;print('python',sys.version.split()[0],'torch',torch.__version__,'torchvision',torchvision.__version__,'timm',timm.__version__,'pydantic',pydantic.__version__,'pyarrow',pyarrow.__version__,'cuda',torch.cuda.get_device_name() if torch.cuda.is_available() else None)"
    (cd "$REPO" && git log -1 --format='commit %H %cI' 2>/dev/null; git status --short 2>/dev/null | head -20)
  } > "$OUT/machine.txt" 2>&1
  cat "$OUT/machine.txt"
  # its compiled rows at the configuration's batch fill inductor's cache for the run's own step
  $PY "$REPO/bench/bench_gpu_train.py" --config "$CONFIG" --steps "${BENCH_STEPS:-20}" --epochs "${BENCH_EPOCHS:-3}" \
    --json "$OUT/bench.json" ${BENCH_ARGS:-} 2>&1 | grep -v -E 'UserWarning|warnings.warn' | tee "$OUT/bench.txt"
  rc=${PIPESTATUS[0]}
  mkdir -p "$WORK" && cp "$OUT/bench.json" "$WORK/bench.json" 2>/dev/null
  stamp "bench rc=$rc"
  exit "$rc"
fi

[ "$PHASE" = full ] || [ "$PHASE" = resume ] || { echo "unknown phase $PHASE"; exit 2; }
if [ ! -f "$DATA/manifest.json" ]; then echo "no data in $DATA: carry the pieces (run_full.sh pack)"; exit 3; fi
read -r WANT_TRAIN WANT_TEST < <($PY -c "import json,sys; m=json.load(open(sys.argv[1])); print(m['train'], m['test'])" "$DATA/manifest.json")
if [ "$(count train)" != "$WANT_TRAIN" ] || [ "$(count test)" != "$WANT_TEST" ]; then
  echo "incomplete data: $(count train)/$WANT_TRAIN train, $(count test)/$WANT_TEST test images (a piece is missing)"; exit 3
fi

if [ "$PHASE" = full ]; then
  rm -rf "$WORK/data" "$WORK/models" "$WORK/metrics" "$WORK/logs" "$WORK/done" "$WORK/times.json"
  mkdir -p "$WORK/logs"
  $PY - "$CONFIG" "$WORK" "$DATA" "${EPOCHS:-}" "${LEFT_S:-}" "$REST_S" <<'EOF' || exit 2
import json, os, sys
from pathlib import Path
import yaml
config, work, data, epochs, left, rest = sys.argv[1], Path(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5], float(sys.argv[6])
p = yaml.safe_load(open(config))

def merge(base, extra):
    for k, v in extra.items():
        base[k] = merge(base.get(k, {}), v) if isinstance(v, dict) else v
    return base

merge(p, yaml.safe_load(os.environ.get("EXTRA") or "{}"))
f = p["finetune"]
p["data"]["path"] = data
f["resume"] = True  # a run stopped at TRAIN_LIMIT_S continues from its last epoch (`resume`)
if epochs == "auto":  # as many epochs as LEFT_S allows at the compiled rate `bench` measured
    bench = json.load(open(work / "bench.json"))
    rates = [r["images_per_s"] for r in bench["rows"] if r["loop"] == "resident" and r["step"] == "compiled"
             and r["batch"] == f["batch_size"] and "only" not in r["augmentation"]]
    manifest = json.load(open(Path(data) / "manifest.json"))
    train_images = manifest["train"] - p["data"]["val_per_class"] * manifest["classes"]
    epoch_s = train_images / rates[0] + 0.5  # + the per-epoch test evaluation
    n = max(1, min(f["epochs"], int((float(left) - rest - 90) / epoch_s)))  # 90 s: download, start-up, compilation
    print(f"EPOCHS=auto: {left} s left, {rest:.0f} s for the later stages, {epoch_s:.2f} s per epoch -> {n} of {f['epochs']} epochs", file=sys.stderr)
    epochs = str(n)
if epochs:
    n = int(epochs)
    if n != f["epochs"]:
        f["warmup_epochs"] = min(f["warmup_epochs"], max(1.0, n / 20))  # one twentieth, as the last run scaled it
        f["epochs"] = n
yaml.safe_dump(p, open(work / "params.yaml", "w"), sort_keys=False)
print({k: f[k] for k in ("epochs", "warmup_epochs", "batch_size", "lr", "loop", "compile", "precision")}, f["augment"]["policy"])
EOF
fi
[ -f "$WORK/params.yaml" ] || { echo "no $WORK/params.yaml: run the full phase first"; exit 3; }
cd "$WORK" || exit 3
touch done
STAGES=$($PY -c "from pipeline.cli import STAGE_SECTIONS; print(' '.join(s.replace('_', '-') for s in STAGE_SECTIONS))")
stamp "phase $PHASE, stages: $STAGES"
record() {  # stage milliseconds rc: accumulate into times.json (a stage split over calls adds up)
  $PY - "$1" "$2" "$3" <<'EOF'
import json, re, statistics, sys
from datetime import datetime
from pathlib import Path
stage, secs, rc = sys.argv[1], float(sys.argv[2]) / 1000, int(sys.argv[3])
path = Path("times.json")
t = json.loads(path.read_text()) if path.exists() else {"stages": {}}
row = t["stages"].setdefault(stage, {"seconds": 0.0, "calls": 0})
row["seconds"] += secs
row["calls"] += 1
row["rc"] = rc
if stage == "finetune":  # the steady rate, from the epoch lines' times (the first epoch of a call pays compilation)
    log = Path(f"logs/{stage}.call.log").read_text()
    images = re.search(r"on (\d+) images", log)
    stamps = [(int(e), datetime.strptime(ts, "%Y-%m-%d %H:%M:%S,%f")) for ts, e in
              re.findall(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+) .* epoch (\d+)/\d+:", log, re.M)]
    gaps = [(b - a).total_seconds() for (ea, a), (eb, b) in zip(stamps, stamps[1:]) if eb == ea + 1]
    row["epochs_trained"] = row.get("epochs_trained", 0) + len(stamps)
    if images and gaps:
        row["epoch_s"] = statistics.median(gaps)  # training + the per-epoch test evaluation
        row["images_per_s"] = int(int(images.group(1)) / row["epoch_s"])
path.write_text(json.dumps(t, indent=1))
EOF
}
for stage in $STAGES; do
  grep -qx "$stage" done && continue
  limit=$CALL_S
  if [ "$stage" = finetune ]; then
    limit=${TRAIN_LIMIT_S:-$(( CALL_S - ($(date +%s) - T0) - REST_S ))}
    [ "$limit" -lt 60 ] && { echo "only $limit s left for finetune in this call: call again with resume"; exit 5; }
    stamp "finetune limited to $limit s in this call"
  fi
  s=$(date +%s%N)
  timeout --signal=TERM "$limit" $PY -m pipeline "$stage" > "logs/$stage.call.log" 2>&1
  rc=$?
  secs=$(( ($(date +%s%N) - s) / 1000000 ))
  record "$stage" "$secs" "$rc"
  cat "logs/$stage.call.log" >> "logs/$stage.log" && rm "logs/$stage.call.log"
  grep -v -E 'it/s\]|s/it\]|UserWarning|warnings.warn' "logs/$stage.log" | tail -4
  stamp "$stage rc=$rc in $secs ms"
  if [ "$rc" = 124 ] && [ "$stage" = finetune ]; then
    cp times.json "$OUT/" && tar czf "$OUT/results.tgz" logs params.yaml metrics 2>/dev/null
    echo "finetune stopped at its limit after $(grep -c 'epoch [0-9]*/' logs/finetune.log) logged epochs: call again with resume"; exit 5
  fi
  [ "$rc" = 0 ] || { cp times.json "$OUT/"; tar czf "$OUT/failed.tgz" logs params.yaml metrics 2>/dev/null; exit 4; }
  echo "$stage" >> done
done

cp params.yaml metrics/params.yaml
sha256sum models/*/*.safetensors models/*/*.json > metrics/model_hashes.txt 2>/dev/null
$PY - <<'EOF'
import json
from pathlib import Path
t = json.loads(Path("times.json").read_text())
lines = ["| stage | seconds | calls | note |", "|---|---:|---:|---|"]
for stage, row in t["stages"].items():
    note = (f"{row['epochs_trained']} epochs, {row['epoch_s']:.2f} s per epoch with its test evaluation, "
            f"{row['images_per_s']:,} training images/s" if "images_per_s" in row else "")
    lines.append(f"| {stage} | {row['seconds']:.1f} | {row['calls']} | {note} |")
lines.append(f"| all | {sum(r['seconds'] for r in t['stages'].values()):.1f} | | |")
Path("times.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
cp times.json times.md "$OUT/"
tar czf "$OUT/results.tgz" metrics logs params.yaml
if [ "$(stat -c %s "$OUT/results.tgz")" -gt $(( 15 * 1024 * 1024 )) ]; then  # one returned file is at most 16 MiB
  find metrics -type f -size +1M > large_files.txt
  tar czf "$OUT/results.tgz" --exclude-from=large_files.txt metrics logs params.yaml large_files.txt
fi
stamp "done: $(ls "$OUT" | tr '\n' ' ')"
