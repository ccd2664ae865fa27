#!/usr/bin/env bash
# The GPU check of protodino, in one call on a one-GPU machine (docs/gpu.md):
#   0. the carried binaries load against the machine's torch + NCCL (ldd, `protodino version`);
#   1. NCCL through cudarc, world of one (nccl_check: init, all-reduce f32/bf16, broadcast,
#      all-gather, barrier, refused call, abort, re-init from a new id, dead peer + re-init);
#   2. one DINO + KoLeo-proto step on a fixed batch, CPU against CUDA (fp32 without cuDNN,
#      fp32, bf16 autocast), from fixtures made on a CPU machine (replay_check), and the same
#      state through `protodino replay` on CUDA;
#   3. ViT-S/16 step throughput at 2x224 + 10x96, K = 65536, bf16: Rust (step_time) against
#      PyTorch eager (step_torch.py) on the same GPU, as a ratio; fp32 and SDPA extras if time
#      allows.
# Every part has its own timeout and failures do not stop the rest. Logs and summary.json go to
# $OUT (at most 8 flat files; default /tmp/protodino-gpu-out); the script exits 0 whenever it
# could write the summary.
#
# Needs .gpu/bin (scripts/gpu/build.sh) and .gpu/fixtures (replay_check prepare), both carried.
#   scripts/gpu/check.sh             on the GPU machine (OUT set by the device tool)
#   scripts/gpu/check.sh --dry-run   on a CPU machine: same flow on the CPU with tiny sizes
#                                    (PYTHON=<python with torch> if python3 has none)
# Knobs: BATCH (64), STEPS (15), WARMUP (5), KPROTO (65536), MAXS (60: stepping seconds per
# throughput run), BUDGET_S (200: optional parts start only before it), HARD_S (390: every part's
# timeout is cut so that the script ends by then).
set -u
cd "$(dirname "$0")/../.."
ROOT=$PWD
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
OUT=${OUT:-${TMPDIR:-/tmp}/protodino-gpu-out}
mkdir -p "$OUT"
BIN=$ROOT/.gpu/bin
FIX=$ROOT/.gpu/fixtures
PY=${PYTHON:-python3}
LOG=$OUT/check.log
ENVF=$OUT/env.txt
NCCL=$OUT/nccl.json
REPLAY=$OUT/replay.jsonl
STEPS_F=$OUT/throughput.jsonl
SUMMARY=$OUT/summary.json
T0=$(date +%s)
BUDGET_S=${BUDGET_S:-200}
HARD_S=${HARD_S:-390}
BATCH=${BATCH:-64}
STEPS=${STEPS:-15}
WARMUP=${WARMUP:-5}
KPROTO=${KPROTO:-65536}
DEVICE=cuda
if [ $DRY = 1 ]; then
    DEVICE=cpu BATCH=${DRY_BATCH:-2} STEPS=1 WARMUP=1 KPROTO=${DRY_K:-1024}
fi
: >"$LOG"; : >"$REPLAY"; : >"$STEPS_F"; : >"$NCCL"
STATUS=$OUT/.status   # section results, key=value lines (folded into summary.json; removed)
: >"$STATUS"

elapsed() { echo $(( $(date +%s) - T0 )); }
log() { echo "[$(elapsed)s] $*" | tee -a "$LOG"; }
record() { echo "$1=$2" >>"$STATUS"; }
# run NAME TIMEOUT DEST CMD...: stdout to DEST (append), stderr to the log; records rc. The
# timeout is cut to what is left before HARD_S; with under 15 s left the part is skipped (rc 125).
run() {
    local name=$1 limit=$2 dest=$3; shift 3
    local rest=$(( HARD_S - $(elapsed) - 10 ))
    if [ "$rest" -lt 15 ]; then
        log "== $name: skipped, ${rest}s left before HARD_S"
        record "$name.rc" 125
        return 125
    fi
    [ "$limit" -gt "$rest" ] && limit=$rest
    log "== $name (timeout ${limit}s): $*"
    local s=$(date +%s)
    timeout -k 10 "$limit" "$@" >>"$dest" 2>>"$LOG"
    local rc=$?
    record "$name.rc" "$rc"
    record "$name.seconds" "$(( $(date +%s) - s ))"
    log "== $name: rc=$rc ($(( $(date +%s) - s )) s)"
    return $rc
}
left() { [ $(( $(date +%s) - T0 )) -lt "$BUDGET_S" ]; }

summarize() {
    "$PY" - "$OUT" "$DRY" "$(elapsed)" <<'PYEOF' 2>>"$LOG" || echo '{"summary_error":"python failed; see check.log"}' >"$OUT/summary.json"
import json, sys, os
out, dry, elapsed = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3])
status = {}
for line in open(os.path.join(out, ".status")):
    if "=" in line:
        k, v = line.rstrip("\n").split("=", 1)
        status[k] = v
def last_json(path, pred=lambda d: True):
    found = None
    try:
        for line in open(path):
            line = line.strip()
            if line.startswith("{"):
                try:
                    d = json.loads(line)
                except ValueError:
                    continue
                if pred(d):
                    found = d
    except OSError:
        pass
    return found
s = {"dry_run": dry, "elapsed_s": elapsed, "sections": status}
v = last_json(os.path.join(out, "env.txt"), lambda d: "protodino" in d)
if v:
    s["protodino_version"] = v
n = last_json(os.path.join(out, "nccl.json"))
if n:
    s["nccl"] = {k: n.get(k) for k in ("status", "nccl_version", "device", "passed", "failed")}
r = last_json(os.path.join(out, "replay.jsonl"), lambda d: d.get("check") == "replay_cpu_vs_device")
if r:
    s["replay"] = {"ok": r.get("ok"), "cuda_available": r.get("cuda_available"),
                   "cpu_vs_reference_max_rel_err": r.get("cpu_vs_reference_max_rel_err"),
                   "error": r.get("error"),
                   "variants": {v: {k: rec.get(k) for k in ("ok", "rel_err", "grad_rel_err_all",
                                                              "center_rel_err", "seconds", "error")}
                                for v, rec in r.get("variants", {}).items()}}
cli = [d for d in [last_json(os.path.join(out, "replay.jsonl"),
                             lambda d, p=p: d.get("check") == "protodino_replay_cli" and d.get("precision") == p)
                   for p in ("fp32", "bf16")] if d]
if cli:
    s["protodino_replay_cli"] = cli
tp = {}
for impl, tag in (("rust-tch", "rust"), ("pytorch-eager", "torch")):
    for prec in ("bf16", "fp32"):
        for attn in ("official", "sdpa"):
            if impl == "rust-tch" and attn == "sdpa":
                continue
            d = last_json(os.path.join(out, "throughput.jsonl"),
                          lambda d: d.get("impl") == impl and d.get("bf16") == (prec == "bf16")
                          and d.get("attention", "official") == attn)
            if d:
                key = f"{tag}_{prec}" + ("_sdpa" if attn == "sdpa" else "")
                tp[key] = {"images_per_s": d.get("images_per_s"), "mean_step_s": d.get("mean_step_s"),
                           "batch": d.get("batch"), "steps_timed": d.get("steps_timed"),
                           "peak_mem_gib": d.get("peak_mem_gib")}
                if d.get("device_name"):
                    s["device_name"] = d["device_name"]
for prec in ("bf16", "fp32"):
    a, b = tp.get(f"rust_{prec}"), tp.get(f"torch_{prec}")
    if a and b and a["images_per_s"] and b["images_per_s"]:
        tp[f"ratio_rust_over_torch_{prec}"] = a["images_per_s"] / b["images_per_s"]
if tp:
    s["throughput"] = tp
ok = {
    "loader": status.get("loader.ok") == "1",
    "nccl": status.get("nccl.rc") == "0",
    "replay": status.get("replay_check.rc") == "0",
    "throughput": "ratio_rust_over_torch_bf16" in tp or (dry and bool(tp)),
}
s["ok"] = ok
s["all_ok"] = all(ok.values())
with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump(s, f, indent=1)
print(json.dumps(s))
PYEOF
}
trap 'summarize >/dev/null; rm -f "$STATUS"' EXIT

# ---- 0. environment and loader ---------------------------------------------------------------
{
    echo "date: $(date -u +%FT%TZ)  dry_run=$DRY"
    uname -a
    grep -E '^(PRETTY_NAME|VERSION_ID)=' /etc/os-release 2>/dev/null
    ldd --version 2>&1 | head -1
    for l in /usr/lib/x86_64-linux-gnu/libstdc++.so.6 /lib64/libstdc++.so.6; do
        [ -e "$l" ] && echo "libstdc++ $l: $(strings "$l" 2>/dev/null | grep -o '^GLIBCXX_3\.4\.[0-9]*' | sort -uV | tail -1)"
    done
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv
    "$PY" -c 'import torch,sys;print("python",sys.version.split()[0],"torch",torch.__version__,"cuda",torch.version.cuda,"available",torch.cuda.is_available())'
} >"$ENVF" 2>&1

TORCH_LIB=$("$PY" -c 'import torch,os;print(os.path.join(os.path.dirname(torch.__file__),"lib"))' 2>>"$LOG")
NCCL_LIB=$("$PY" -c 'import nvidia.nccl,os;print(os.path.join(list(nvidia.nccl.__path__)[0],"lib"))' 2>>"$LOG")
# nvidia.nccl is a namespace package (no __file__): __path__ above, else beside torch.
if [ -z "$NCCL_LIB" ] || [ ! -e "$NCCL_LIB/libnccl.so.2" ]; then
    NCCL_LIB=$(cd "$TORCH_LIB/../../nvidia/nccl/lib" 2>/dev/null && pwd)
fi
# cudarc dlopens "libnccl.so" (not the wheel's libnccl.so.2): a link in a private directory.
NCCL_LINK=/tmp/protodino-nccl
mkdir -p "$NCCL_LINK"
if [ -n "$NCCL_LIB" ] && [ -e "$NCCL_LIB/libnccl.so.2" ]; then
    ln -sf "$NCCL_LIB/libnccl.so.2" "$NCCL_LINK/libnccl.so"
fi
export LD_LIBRARY_PATH=$TORCH_LIB:$NCCL_LIB:$NCCL_LINK${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-lo} NCCL_IB_DISABLE=${NCCL_IB_DISABLE:-1}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH" >>"$ENVF"

# Fallback for an older libstdc++ than the build machine's: the copy build.sh put in .gpu/lib.
if [ -e "$ROOT/.gpu/lib/libstdc++.so.6" ] && [ -x "$BIN/step_time" ] \
    && ldd "$BIN/step_time" 2>&1 | grep -q "GLIBCXX.* not found"; then
    log "loader: the system libstdc++ is too old; using .gpu/lib"
    export LD_LIBRARY_PATH=$ROOT/.gpu/lib:$LD_LIBRARY_PATH
    record loader.libstdcxx_fallback 1
fi
loader_ok=1
for b in "$BIN"/*; do
    [ -f "$b" ] || continue
    echo "--- ldd $(basename "$b")" >>"$ENVF"
    ldd "$b" >>"$ENVF" 2>&1
    if ldd "$b" 2>&1 | grep -q 'not found'; then loader_ok=0; log "loader: $(basename "$b") has missing libraries"; fi
    if ldd "$b" 2>&1 | grep -qi 'version .* not found'; then loader_ok=0; fi
done
for b in step_time replay_check; do
    [ -x "$BIN/$b" ] || { loader_ok=0; log "loader: $b missing"; }
done
if [ -x "$BIN/protodino" ]; then
    run protodino_version 60 "$ENVF" "$BIN/protodino" version --json || loader_ok=0
    if [ $DRY = 0 ] && ! grep -q '"cuda_available":true' "$ENVF"; then
        log "loader: protodino does not see CUDA"; loader_ok=0
    fi
fi
record loader.ok $loader_ok
log "loader ok=$loader_ok"
summarize >/dev/null

# ---- 1. NCCL ---------------------------------------------------------------------------------
REQ=--require
[ $DRY = 1 ] && REQ=
run nccl 100 "$NCCL" "$BIN/nccl_check" $REQ --timeout-s 15
summarize >/dev/null

# ---- 2. CPU vs CUDA step on the fixture ------------------------------------------------------
run replay_check 150 "$REPLAY" "$BIN/replay_check" check --fixtures "$FIX" --device "$DEVICE" \
    --variants fp32-nocudnn,fp32,bf16
if [ -x "$BIN/protodino" ]; then
    for prec in fp32 bf16; do
        left || break
        tmp=$OUT/.cli.$prec
        PROTODINO__TRAIN__DEVICE=$DEVICE PROTODINO__TRAIN__PRECISION=$prec \
            run "protodino_replay_$prec" 60 "$tmp" "$BIN/protodino" replay \
            --checkpoint "$FIX/state.safetensors" --batch "$FIX/batch.safetensors" \
            --config "$FIX/config.toml" --json
        "$PY" - "$tmp" "$FIX/reference.json" "$prec" >>"$REPLAY" 2>>"$LOG" <<'PYEOF'
import json, sys
tmp, ref, prec = sys.argv[1:4]
r = json.load(open(ref))["metrics"]
d = None
for line in open(tmp):
    if line.strip().startswith("{"):
        d = json.loads(line)
out = {"check": "protodino_replay_cli", "precision": prec, "report": d}
if d:
    tol = 2e-2 if prec == "bf16" else 2e-3
    errs = {k: abs(d[k] - r[k]) / max(abs(r[k]), 1e-12) for k in ("dino_loss", "koleo_proto", "total")}
    out.update(rel_err_vs_cpu_reference=errs, tolerance=tol, ok=max(errs.values()) <= tol)
else:
    out["ok"] = False
print(json.dumps(out))
PYEOF
        rm -f "$tmp"
    done
fi
summarize >/dev/null

# ---- 3. throughput: Rust vs PyTorch eager ----------------------------------------------------
THREADS=$(nproc 2>/dev/null || echo 2)
MAXS=${MAXS:-60}   # stepping time per throughput run (steps stop early past it)
[ $DRY = 1 ] && MAXS=600
run step_rust_bf16 150 "$STEPS_F" "$BIN/step_time" "$BATCH" "$THREADS" $((STEPS + WARMUP)) "$KPROTO" 0.1 \
    --device "$DEVICE" --bf16 --warmup "$WARMUP" --max-seconds "$MAXS" --json
summarize >/dev/null
run step_torch_bf16 150 "$STEPS_F" "$PY" "$ROOT/scripts/gpu/step_torch.py" --device "$DEVICE" \
    --batch "$BATCH" --K "$KPROTO" --steps "$STEPS" --warmup "$WARMUP" --max-seconds "$MAXS" --bf16
summarize >/dev/null
# Extras, each only while the budget lasts.
if left; then
    run step_torch_bf16_sdpa 100 "$STEPS_F" "$PY" "$ROOT/scripts/gpu/step_torch.py" --device "$DEVICE" \
        --batch "$BATCH" --K "$KPROTO" --steps "$STEPS" --warmup "$WARMUP" --max-seconds "$MAXS" --bf16 --sdpa
    summarize >/dev/null
fi
if left; then
    run step_rust_fp32 100 "$STEPS_F" "$BIN/step_time" "$BATCH" "$THREADS" $((STEPS + WARMUP)) "$KPROTO" 0.1 \
        --device "$DEVICE" --warmup "$WARMUP" --max-seconds "$MAXS" --json
    summarize >/dev/null
fi
if left; then
    run step_torch_fp32 100 "$STEPS_F" "$PY" "$ROOT/scripts/gpu/step_torch.py" --device "$DEVICE" \
        --batch "$BATCH" --K "$KPROTO" --steps "$STEPS" --warmup "$WARMUP" --max-seconds "$MAXS"
fi
log "done after $(elapsed) s"
summarize
exit 0
