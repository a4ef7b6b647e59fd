#!/usr/bin/env bash
# GPU check (issue 18): one script, under 8 minutes on one H200, that prints figures for
#   1. faiss k-means (GPU: 1M x 768, k = 4,096) and nearest-centroid assignment, faiss-gpu vs
#      faiss-cpu on the same data and centroids: identical assignments except float ties
#      (the count of differing rows, and how many of them are ties, is printed);
#   2. a `curate train` run of a few hundred steps with amp (samples/s);
#   3. `curate eval` amp vs fp32 on a small set (metric deltas);
#   4. `curate byod score` images/s.
# Without a GPU (or with --cpu-only) it runs the same four parts at CPU sizes (faiss-cpu vs a
# numpy brute force, the tiny scale, fp32 vs bf16 autocast) and says which GPU parts were
# skipped and why. tests/train/test_gpu_check.py runs the CPU mode (about a minute on 2 cores).
#
#   bench/gpu_check.sh [--cpu-only] [--work DIR] [--python PY]
#
# GPU install: pip install -e '.[gpu,torch,demo,plot]' (the `gpu` extra brings faiss-gpu; never
# together with `embed`, which brings faiss-cpu: both install the module `faiss`).
set -euo pipefail

CPU_ONLY=0
WORK=""
PY="${PYTHON:-python}"
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu-only) CPU_ONLY=1 ;;
    --work) WORK="$2"; shift ;;
    --python) PY="$2"; shift ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "error: unknown option $1 (see --help)" >&2; exit 1 ;;
  esac
  shift
done
REPO="$(cd "$(dirname "$0")/.." && pwd)"
cd "$REPO"
if [ -z "$WORK" ]; then WORK="$(mktemp -d)"; trap 'rm -rf "$WORK"' EXIT; fi
mkdir -p "$WORK"
CURATE=("$PY" -m curate)

# ----------------------------------------------------------------------------- what is here
GPU_WHY=""
if [ "$CPU_ONLY" = 1 ]; then
  GPU_WHY="--cpu-only given"
else
  GPU_WHY="$("$PY" - <<'EOF'
try:
    import torch
    ok = torch.cuda.is_available()
except Exception as e:  # noqa: BLE001
    ok, why = False, f"torch unusable ({e})"
else:
    why = "" if ok else "torch sees no CUDA device"
print(why)
EOF
)"
fi
MODE=gpu
[ -n "$GPU_WHY" ] && MODE=cpu
# one torch thread per process on the CPU: torch's default threads next to data workers run
# ~10x slower on a small shared machine (docs/training.md)
[ "$MODE" = cpu ] && export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
echo "gpu_check: mode $MODE${GPU_WHY:+ (GPU parts skipped: $GPU_WHY)}; work dir $WORK"
t_all=$(date +%s)

# ----------------------------------------------------------------------------- 1. faiss
echo "== 1. k-means and nearest-centroid assignment"
MODE="$MODE" "$PY" - <<'EOF'
import os, time
import numpy as np
import faiss

mode = os.environ["MODE"]
gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
if mode == "gpu" and gpus == 0:
    print("  faiss has no GPU support here (faiss-cpu installed? use the `gpu` extra): GPU k-means skipped")
    mode = "cpu"
n, d, k, niter = (1_000_000, 768, 4096, 10) if mode == "gpu" else (20_000, 64, 64, 10)
rng = np.random.default_rng(0)
x = rng.standard_normal((n, d), dtype=np.float32)
x /= np.linalg.norm(x, axis=1, keepdims=True)
print(f"  data {n:,} x {d}, k = {k:,}, {niter} iterations ({mode})")
t = time.perf_counter()
km = faiss.Kmeans(d, k, niter=niter, seed=0, gpu=(mode == "gpu"), verbose=False)
km.train(x)
print(f"  k-means ({'faiss-gpu' if mode == 'gpu' else 'faiss-cpu'}): {time.perf_counter() - t:.1f}s")
c = km.centroids


def assign_cpu(x, c):
    idx = faiss.IndexFlatL2(c.shape[1])
    idx.add(c)
    return idx.search(x, 1)


t = time.perf_counter()
d_ref, a_ref = assign_cpu(x, c)
t_cpu = time.perf_counter() - t
if mode == "gpu":
    res = faiss.StandardGpuResources()
    gidx = faiss.GpuIndexFlatL2(res, c.shape[1])
    gidx.add(c)
    t = time.perf_counter()
    d_other, a_other = gidx.search(x, 1)
    t_other, other = time.perf_counter() - t, "faiss-gpu"
else:
    # an independent brute force: squared L2 = |x|^2 - 2 x.c + |c|^2 in float64
    t = time.perf_counter()
    a_other = np.empty((n, 1), np.int64)
    d_other = np.empty((n, 1), np.float32)
    c64 = c.astype(np.float64)
    cn = (c64 ** 2).sum(1)
    for i in range(0, n, 4096):
        xb = x[i:i + 4096].astype(np.float64)
        dist = (xb ** 2).sum(1)[:, None] - 2 * xb @ c64.T + cn[None, :]
        a_other[i:i + 4096, 0] = dist.argmin(1)
        d_other[i:i + 4096, 0] = dist.min(1)
    t_other, other = time.perf_counter() - t, "numpy float64"
diff = np.flatnonzero(a_ref[:, 0] != a_other[:, 0])
# a differing row is a float tie when both centroids are equally near within float32 rounding
xd = x[diff].astype(np.float64)
da = ((xd - c[a_ref[diff, 0]]) ** 2).sum(1)
db = ((xd - c[a_other[diff, 0]]) ** 2).sum(1)
ties = int(np.sum(np.abs(da - db) <= 1e-5 * np.maximum(da, 1e-12)))
print(f"  assignment faiss-cpu: {n / t_cpu:,.0f} rows/s; {other}: {n / t_other:,.0f} rows/s")
print(f"  assignments differing: {len(diff):,} of {n:,}; of them float ties: {ties:,}; other: {len(diff) - ties:,}")
if len(diff) != ties:
    raise SystemExit("  FAIL: assignments differ beyond float ties")
EOF

# ----------------------------------------------------------------------------- data for 2-4
echo "== data: the bundled sample pool, resharded"
"${CURATE[@]}" catalog init "$WORK/pool.duckdb" --pool data/sample_pool >/dev/null
"${CURATE[@]}" run filters/no_filter.sql -c "$WORK/pool.duckdb" -o "$WORK/all.npy" >/dev/null
"${CURATE[@]}" reshard -i data/sample_pool/shards -o "$WORK/resharded" -s "$WORK/all.npy" \
  --catalog "$WORK/pool.duckdb" -j 2 >/dev/null 2>&1
echo "  resharded $(ls "$WORK/resharded"/*.tar | wc -l) shards"

# ----------------------------------------------------------------------------- 2. train
echo "== 2. training"
if [ "$MODE" = gpu ]; then
  # the debug scale (ViT-B-32, global batch 1024, amp): 300 steps
  TRAIN=(--scale debug --train-num-samples $((300 * 1024)) --precision amp --workers 8)
else
  TRAIN=(--scale tiny --train-num-samples 256 --precision fp32 --workers 1 --threads 1)
fi
"${CURATE[@]}" train "${TRAIN[@]}" --data "$WORK/resharded" --output-dir "$WORK/runs" --exp-name check \
  --num-checkpoints 1 --log-every-n-steps 50 -q >/dev/null
"$PY" - "$WORK/runs/check" <<'EOF'
import json, re, sys
rec = json.load(open(f"{sys.argv[1]}/info.json"))
log = open(f"{sys.argv[1]}/out.log").read().splitlines()
# open_clip's step log: "... Batch (t): 1.024, 110.486/s, 110.486/s/gpu LR: ..."
rates = [float(m.group(1)) for ln in log if (m := re.search(r"([\d.]+)/s/gpu", ln))]
n = rec["train_num_samples"]
print(f"  {rec['scale']} ({rec['model']}, {rec['precision']}): {n:,} samples in {rec['elapsed_seconds']:.1f}s "
      f"(with start-up) = {n / rec['elapsed_seconds']:,.0f} samples/s"
      + (f"; open_clip's last logged rate (without start-up) {rates[-1]:,.0f} samples/s per GPU" if rates else ""))
EOF

# ----------------------------------------------------------------------------- 3. eval
echo "== 3. evaluation precision"
NEVAL=1024; [ "$MODE" = cpu ] && NEVAL=128
"$PY" - "$WORK/evaldata" "$WORK/tasks.yml" "$NEVAL" <<'EOF'
import io, sys, tarfile
from pathlib import Path
from PIL import Image
root, tasks = Path(sys.argv[1]), Path(sys.argv[2])
cols = [("red", (220, 30, 30)), ("green", (30, 200, 30)), ("blue", (30, 30, 220)), ("yellow", (230, 220, 40)),
        ("purple", (140, 40, 160)), ("white", (245, 245, 245)), ("black", (10, 10, 10)), ("orange", (240, 140, 20))]
d = root / "wds_colours_test"
(d / "test").mkdir(parents=True, exist_ok=True)
with tarfile.open(d / "test" / "0.tar", "w") as tf:
    for i in range(int(sys.argv[3])):
        name, (r, g, b) = cols[i % 8]
        s = (i // 8) % 32 - 16
        buf = io.BytesIO()
        Image.new("RGB", (64, 64), (min(max(r + s, 0), 255), min(max(g + s, 0), 255), min(max(b + s, 0), 255))).save(buf, "JPEG")
        for ext, data in (("jpg", buf.getvalue()), ("cls", str(i % 8).encode())):
            ti = tarfile.TarInfo(f"{i:05d}.{ext}"); ti.size = len(data); tf.addfile(ti, io.BytesIO(data))
(d / "test" / "nshards.txt").write_text("1\n")
(d / "classnames.txt").write_text("".join(f"{n}\n" for n, _ in cols))
(d / "zeroshot_classification_templates.txt").write_text("a {c} square.\na photo of something {c}.\n{c}\n")
tasks.write_text("colours:\n  name: Colours\n  main_metric: acc1\n")
EOF
LOW=amp; [ "$MODE" = cpu ] && LOW=bf16
for p in fp32 "$LOW"; do
  "${CURATE[@]}" eval --train-output-dir "$WORK/runs/check" --tasks "$WORK/tasks.yml" --data-dir "$WORK/evaldata" \
    --output-dir "$WORK/eval_$p" --precision "$p" >/dev/null 2>&1
done
"$PY" - "$WORK/eval_fp32" "$WORK/eval_$LOW" <<'EOF'
import json, sys
a, b = (json.loads(open(f"{d}/eval_results.jsonl").readline()) for d in sys.argv[1:3])
for k in ("acc1", "acc5", "mean_per_class_recall"):
    print(f"  {k}: {a['precision']} {a['metrics'][k]:.4f}, {b['precision']} {b['metrics'][k]:.4f}, "
          f"delta {b['metrics'][k] - a['metrics'][k]:+.4f}")
print(f"  images/s: {a['precision']} {a['images_per_second']:,.0f}, {b['precision']} {b['images_per_second']:,.0f} "
      f"({a['device']}, {a['n']} images)")
EOF

# ----------------------------------------------------------------------------- 4. byod score
echo "== 4. byod score"
DEV=cpu; [ "$MODE" = gpu ] && DEV=cuda
MODEL=$("$PY" -c "import json; print(json.load(open('$WORK/runs/check/info.json'))['model'])")
t=$(date +%s.%N)
"${CURATE[@]}" byod score --data-dir data/sample_pool --model "$MODEL" --checkpoint "$WORK/runs/check/checkpoints/epoch_latest.pt" \
  --out "$WORK/scored" --device "$DEV" --batch-size 256 >/dev/null 2>&1
"$PY" - "$WORK/scored" "$t" <<'EOF'
import sys, time
from pathlib import Path
import pyarrow.parquet as pq
n = sum(pq.read_metadata(p).num_rows for p in Path(sys.argv[1]).glob("*.parquet"))
secs = time.time() - float(sys.argv[2])
print(f"  {n:,} pool rows scored in {secs:.1f}s (with model load) = {n / secs:,.0f} rows/s")
EOF
echo "gpu_check: done in $(( $(date +%s) - t_all ))s (mode $MODE${GPU_WHY:+; GPU parts skipped: $GPU_WHY})"
