#!/bin/bash
# Device run of configs/cifar100-gpu.yaml (issue 18), stage by stage (DVC is not installed there).
#   bash .xfer/gpu.sh smoke   # half of CIFAR-100 (chunk a), 2 epochs, SAE 10 epochs: timings
#   bash .xfer/gpu.sh full    # both chunks, epochs sized from the smoke timings to BUDGET_S
# DATA=/tmp/cifar100 on the device; OUT is the device tool's result folder.
set -uo pipefail
PHASE=$1
BUDGET_S=${BUDGET_S:-540}
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
if [ -d .whl ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD
if [ "$PHASE" = smoke ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  nproc; $PY -c "import torch,torchvision,timm,pydantic,pyarrow;print('torch',torch.__version__,'tv',torchvision.__version__,'timm',timm.__version__,'pydantic',pydantic.__version__,'pyarrow',pyarrow.__version__,torch.cuda.get_device_name())"
fi
for z in .xfer/cifar100-*.zip; do
  [ -f "$z" ] && $PY -c "import zipfile,sys; zipfile.ZipFile(sys.argv[1]).extractall('/tmp/cifar100')" "$z" && rm "$z"
done
stamp "data: $(find /tmp/cifar100/train -name '*.webp' | wc -l) train, $(find /tmp/cifar100/test -name '*.webp' | wc -l) test files"
if [ "$PHASE" = full ] && [ ! -f /tmp/smoke_times ]; then echo "no smoke timings: the machine is a fresh one"; exit 3; fi
if [ "$PHASE" = full ] && [ "$(find /tmp/cifar100/train -name '*.webp' | wc -l)" != 50000 ]; then echo "incomplete data"; exit 3; fi

rm -rf data models metrics
if [ "$PHASE" = smoke ]; then EPOCHS=2; SAE_EPOCHS=100; else
  # /tmp/smoke_times: seconds of each stage at half data (2 epochs, SAE 10 epochs)
  read EPOCHS < <($PY - "$BUDGET_S" "$T0" <<'EOF'
import json, sys, time
t = json.load(open("/tmp/smoke_times")); budget, t0 = float(sys.argv[1]), float(sys.argv[2])
left = budget - (time.time() - t0)
per_epoch = 2.2 * t["epoch"]             # 45,000 + 10,000 evaluated images, not 20,000 + 5,000
others = 2.2 * (t["download"] + t["extract"] + t["latent-stats"] + t["steer"] + t["sae"]) + t["finetune_fixed"] + 25
epochs = int((left - others) / per_epoch)
print(max(1, min(200, epochs)), file=sys.stdout)
print(f"left {left:.0f} s, others ~{others:.0f} s, epoch ~{per_epoch:.1f} s -> {epochs} epochs", file=sys.stderr)
EOF
)
  SAE_EPOCHS=100
fi
stamp "phase $PHASE: finetune epochs $EPOCHS, SAE epochs $SAE_EPOCHS"
$PY - "$EPOCHS" "$SAE_EPOCHS" <<'EOF'
import sys, yaml
import os
p = yaml.safe_load(open(os.environ.get("CONFIG", "configs/cifar100-gpu.yaml")))
epochs, sae_epochs = int(sys.argv[1]), int(sys.argv[2])
p["data"]["path"] = "/tmp/cifar100"
p["finetune"]["epochs"] = epochs
p["finetune"]["warmup_epochs"] = min(p["finetune"]["warmup_epochs"], max(1.0, epochs / 20))
p["sae"]["epochs"] = sae_epochs
for key, value in yaml.safe_load(os.environ.get("EXTRA", "{}")).items():   # local dry runs only
    section, name = key.split(".")
    p[section][name] = value
yaml.safe_dump(p, open("params.yaml", "w"), sort_keys=False)
print({k: p["finetune"][k] for k in ("epochs", "warmup_epochs", "lr", "batch_size")}, p["finetune"]["augment"])
EOF
declare -A SECS
for stage in download finetune extract train-sae latent-stats steer; do
  s=$(date +%s%N)
  $PY -m pipeline $stage > /tmp/log_$stage 2>&1
  rc=$?
  grep -v -E 'it/s\]|s/it\]' /tmp/log_$stage | tail -6
  SECS[$stage]=$(( ($(date +%s%N) - s) / 1000000 ))
  stamp "$stage rc=$rc in ${SECS[$stage]} ms"
  [ "$rc" = 0 ] || { tar czf $OUT/failed-$PHASE.tgz /tmp/log_* metrics; exit 4; }
done
TRAINED=$(grep -h '"epochs"' metrics/details/finetune.json | head -1)
if [ "$PHASE" = smoke ]; then
  $PY - <<EOF
import json
import re
t = {k.replace("train-sae", "sae"): float(v) / 1000 for k, v in zip("${!SECS[@]}".split(), "${SECS[@]}".split())}
trained = float(re.search(r"trained in ([0-9.]+) s", open("/tmp/log_finetune").read()).group(1))
t["epoch"] = trained / 2                        # training + per-epoch evaluation
t["finetune_fixed"] = t["finetune"] - trained   # start-up, loading, final evaluation
json.dump(t, open("/tmp/smoke_times", "w")); print(t)
EOF
  $PY - <<'EOF'
import time, torch
from pipeline.params import AugmentParams
from pipeline.training import apply_policy
p = AugmentParams(policy="trivialaugment")
for dev in ("cuda", "cpu"):
    x = torch.randint(0, 256, (256, 3, 32, 32), dtype=torch.uint8, device=dev)
    g = torch.Generator().manual_seed(0)
    apply_policy(x, p, g); torch.cuda.synchronize()
    s = time.perf_counter()
    for _ in range(5): apply_policy(x, p, g)
    torch.cuda.synchronize()
    print(f"TrivialAugment, 256 images of 32 px on {dev}: {(time.perf_counter() - s) / 5 * 1000:.1f} ms per batch")
EOF
  stamp "bench_flops"
  $PY bench/bench_flops.py --device cuda --dtype bfloat16 --rounds 5 --repeat 10 2>&1 | tail -15
  $PY bench/bench_flops.py --device cuda --dtype float32 --rounds 5 --repeat 10 2>&1 | tail -15
fi
cp params.yaml metrics/params.yaml
sha256sum models/*/*.safetensors models/*/*.json > metrics/model_hashes.txt 2>/dev/null
tar czf $OUT/results-$PHASE.tgz metrics /tmp/log_*
stamp "done"
