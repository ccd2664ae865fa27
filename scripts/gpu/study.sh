#!/usr/bin/env bash
# The GPU-sized end-to-end pair of the collapse study (docs/results.md, docs/gpu.md), in one call
# on a one-GPU machine: DINO on all of Fashion-MNIST with the study's recipe
# (configs/cpu-demo.toml + configs/study/base.toml + configs/study/gpu.toml), K = 1024, without
# and then with KoLeo-proto (λ = 0, λ = 0.1). Each run writes its JSON lines (steps, collapse
# analyses of both heads, the final report with k-NN) to $OUT/lambda<λ>.jsonl; summary.json
# holds, per run, the unique prototypes of both heads at every ε, the teacher's entropy against
# ln K, the displacement, the clusters used, k-NN top-1, Σ(1 − m), Σ lr and the wall time.
#
#   scripts/gpu/study.sh --prepare   on the CPU machine: .gpu/study-data.tar.gz (the provisioned
#                                    Fashion-MNIST shards, train + test, from `cargo xtask data`)
#   scripts/gpu/study.sh             on the GPU machine (carry .gpu: bin/protodino from
#                                    scripts/gpu/build.sh, and study-data.tar.gz)
#   scripts/gpu/study.sh --dry-run   on a CPU machine: the same flow on the CPU, 40 steps a run,
#                                    with target/release/protodino and the provisioned data
# Knobs: RUN_S (270: each run's timeout in seconds; a run cut short still reports its last
# analysis), LAMBDAS ("0 0.1").
set -u
cd "$(dirname "$0")/../.."
ROOT=$PWD
MODE=gpu
case "${1:-}" in
    --prepare) MODE=prepare ;;
    --dry-run) MODE=dry ;;
    "") ;;
    *) echo "usage: $0 [--prepare|--dry-run]" >&2; exit 2 ;;
esac
CACHE=${PROTODINO_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/protodino}

if [ "$MODE" = prepare ]; then
    set -e
    for d in train test; do
        [ -f "$CACHE/data/fashion-mnist/$d/meta.json" ] || {
            echo "no provisioned fashion-mnist/$d: run cargo xtask data" >&2; exit 1; }
    done
    mkdir -p .gpu
    tar -C "$CACHE/data" -czf .gpu/study-data.tar.gz fashion-mnist/train fashion-mnist/test
    ls -l .gpu/study-data.tar.gz
    exit 0
fi

OUT=${OUT:-${TMPDIR:-/tmp}/protodino-gpu-study}
mkdir -p "$OUT"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/protodino-study.XXXXXX")
LOG=$OUT/study.log
: > "$LOG"
RUN_S=${RUN_S:-270}
LAMBDAS=${LAMBDAS:-"0 0.1"}
EXTRA=()
if [ "$MODE" = dry ]; then
    BIN=$ROOT/target/release/protodino
    export PROTODINO_CACHE=$CACHE
    # The CPU, a few steps, small evaluation: the flow, not the figures.
    printf '[train]\ndevice = "cpu"\nprecision = "fp32"\nmax_steps = 40\nthreads = 2\n[data]\nlimit = 2000\nnum_threads = 2\n[eval]\nanalysis_every_steps = 20\nusage_images = 200\nknn_train_images = 1000\nknn_test_images = 500\n' > "$WORK/dry.toml"
    EXTRA=(--config "$WORK/dry.toml")
else
    BIN=$ROOT/.gpu/bin/protodino
    [ -f "$ROOT/.gpu/study-data.tar.gz" ] || { echo "no .gpu/study-data.tar.gz (--prepare)" >&2; exit 1; }
    export PROTODINO_CACHE=$WORK/cache
    mkdir -p "$PROTODINO_CACHE/data"
    tar -C "$PROTODINO_CACHE/data" -xzf "$ROOT/.gpu/study-data.tar.gz"
    # The CUDA build links the wheel's libtorch: the machine's torch provides it (as in check.sh),
    # and the build machine's libstdc++ copy stands in for an older system one.
    TORCH_LIB=$(python3 -c 'import torch,os;print(os.path.join(os.path.dirname(torch.__file__),"lib"))' 2>>"$LOG")
    export LD_LIBRARY_PATH=$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    if [ -e "$ROOT/.gpu/lib/libstdc++.so.6" ] && ldd "$BIN" 2>&1 | grep -q "GLIBCXX.* not found"; then
        export LD_LIBRARY_PATH=$ROOT/.gpu/lib:$LD_LIBRARY_PATH
    fi
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$OUT/gpu.txt" 2>&1 || true
fi
[ -x "$BIN" ] || { echo "no $BIN" >&2; exit 1; }
echo "study: $MODE, $BIN, runs of at most ${RUN_S}s, λ in {$LAMBDAS}" | tee -a "$LOG"

for lambda in $LAMBDAS; do
    printf '[koleo]\nweight = %s\n' "$lambda" > "$WORK/lambda.toml"
    start=$(date +%s)
    timeout -k 10 "$RUN_S" "$BIN" train --json \
        --config configs/cpu-demo.toml --config configs/study/base.toml \
        --config configs/study/gpu.toml "${EXTRA[@]}" --config "$WORK/lambda.toml" \
        --output-dir "$WORK/run-$lambda" > "$OUT/lambda$lambda.jsonl" 2>> "$LOG"
    rc=$?
    echo "λ = $lambda: exit $rc after $(( $(date +%s) - start )) s" | tee -a "$LOG"
done

python3 - "$OUT" $LAMBDAS <<'EOF' 2>> "$LOG"
import json, math, sys
out, lambdas = sys.argv[1], sys.argv[2:]
summary = {"runs": []}
for lam in lambdas:
    steps, analyses, final = [], [], None
    try:
        for line in open(f"{out}/lambda{lam}.jsonl"):
            if not line.startswith("{"):
                continue
            r = json.loads(line)
            if r.get("kind") == "step":
                steps.append(r)
            elif r.get("kind") == "collapse":
                analyses.append(r)
            elif r.get("kind") == "final":
                final = r
    except FileNotFoundError:
        pass
    last = final["collapse"] if final else (analyses[-1] if analyses else None)
    run = {"lambda": float(lam), "steps": steps[-1]["step"] if steps else 0,
           "finished": final is not None}
    prev, s_m, s_lr = 0, 0.0, 0.0
    for r in steps:
        n = r["step"] - prev
        prev = r["step"]
        s_m += n * (1 - r["momentum"])
        if not r.get("last_layer_frozen"):
            s_lr += n * r["lr"]
    run["sum_one_minus_momentum"], run["sum_lr"] = s_m, s_lr
    if last:
        for head, rep in (("teacher", last["report"]), ("student", last["student"]["report"])):
            run[head] = {"unique_greedy": {str(c["eps"]): c["greedy"] for c in rep["counts"]},
                         "nn_mean": rep["nn"]["mean"]}
        run["displacement_teacher"] = last["displacement"]["mean"]
        sh = last.get("sharpness")
        if sh:
            run["teacher_entropy"], run["ln_k"] = sh["mean_sample_entropy"], sh.get("ln_k", last.get("ln_k"))
        if last.get("usage"):
            run["clusters_used"] = last["usage"]["used_clusters"]
    if final:
        k20 = [x for x in final["knn"]["results"] if x["k"] == 20]
        run["knn_top1"] = k20[0]["top1"] if k20 else None
        run["images_per_second"] = final.get("images_per_second")
    summary["runs"].append(run)
json.dump(summary, open(f"{out}/summary.json", "w"), indent=1)
for r in summary["runs"]:
    t = r.get("teacher", {}).get("unique_greedy", {})
    s = r.get("student", {}).get("unique_greedy", {})
    print(f"λ={r['lambda']}: steps {r['steps']} finished {r['finished']} "
          f"T unique ε.025/.1 {t.get('0.025')}/{t.get('0.1')} S {s.get('0.025')}/{s.get('0.1')} "
          f"entropy {r.get('teacher_entropy')} k-NN {r.get('knn_top1')} Σ(1-m) {r['sum_one_minus_momentum']:.2f}")
EOF
cat "$OUT/summary.json" > /dev/null 2>&1 && echo "summary: $OUT/summary.json" | tee -a "$LOG"
rm -rf "$WORK"
exit 0
