#!/usr/bin/env bash
# The one prepared script for a GPU machine (NVIDIA driver, CUDA 13.0 toolkit, PyTorch; no Rust,
# no network).
#
#   tools/gpu-check.sh build            here: builds the release `mmkd` and gathers everything
#                                       the GPU machine needs into target/gpu-check/ (ignored)
#   tools/gpu-check.sh run OUTDIR       there (from the repository root or the bundle; MMKD_BIN
#                                       overrides which binary): runs
#                                       `mmkd kernels check`, `mmkd selftest --device cuda`,
#                                       the benchmark binaries present and the PyTorch loss
#                                       timing, writing JSON and logs into OUTDIR
#
# `run` keeps going when a step fails: each step's exit status, time and log land in
# OUTDIR/steps.json, and the script exits non-zero at the end if any step failed. The whole
# run finishes in under 6 minutes: each step has its own timeout and none runs past 345 s.
# MMKD_GPU_CHECK_BUDGET_S sets another budget (seconds, 60 to 3600) where the device time
# allows: the steps run in order of importance, so a short budget skips the last ones (stage 2
# under torch.compile, stage 1, the GEMM-path variants of the step).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

usage() {
  echo "usage: $0 build | run OUTDIR" >&2
  exit 2
}

build() {
  local root target bundle
  root="$(cd "$here/.." && pwd)"
  target="${CARGO_TARGET_DIR:-$root/target}"
  bundle="$root/target/gpu-check"
  (cd "$root" && cargo build --release -p mmkd)
  # The benchmark executables too; a bench that does not build is reported, not fatal.
  (cd "$root" && cargo bench --no-run -p mmkd-benches) || echo "warning: benches did not build"
  rm -rf "$bundle"
  mkdir -p "$bundle/tools"
  cp "$target/release/mmkd" "$bundle/mmkd"
  # Debug info would make the bundle too large to carry (the release profile keeps it).
  strip --strip-debug "$bundle/mmkd" 2>/dev/null || echo "warning: strip failed; the binary keeps its debug info"
  cp "$here/gpu-check.sh" "$here/torch_loss_bench.py" "$here/gpu_timing.py" "$bundle/tools/"
  if [ -f "$here/torch_gemm_attn_bench.py" ]; then cp "$here/torch_gemm_attn_bench.py" "$bundle/tools/"; fi
  cp "$here/gemm_attn_ratio.py" "$bundle/tools/"
  cp "$here/torch_reference.py" "$bundle/tools/"
  cp -r "$root/configs" "$bundle/"
  # Criterion benchmark executables, when they were built (`cargo bench --no-run`).
  mkdir -p "$bundle/benches"
  local b f
  for b in $(sed -n 's/^name = "\(.*\)"/\1/p' "$root/benches/Cargo.toml" | grep -v '^mmkd'); do
    for f in "$target"/release/deps/"$b"-*; do
      if [ -f "$f" ] && [ -x "$f" ]; then
        cp "$f" "$bundle/benches/$b"
        strip --strip-debug "$bundle/benches/$b" 2>/dev/null || true
      fi
    done
  done
  echo "bundle ready: $bundle ($(du -sh "$bundle" | cut -f1))"
  echo "on the GPU machine: $bundle/tools/gpu-check.sh run OUTDIR"
}

# Finds NVRTC 13 (toolkit or PyTorch's bundled NVIDIA wheels) when MMKD_NVRTC_PATH is unset;
# mmkd searches the same places, this only makes the choice visible in the log.
find_nvrtc() {
  if [ -n "${MMKD_NVRTC_PATH:-}" ]; then return; fi
  local c
  for c in /usr/local/cuda/lib64/libnvrtc.so.13 /usr/local/cuda-13*/lib64/libnvrtc.so.13; do
    if [ -e "$c" ]; then export MMKD_NVRTC_PATH="$c"; return; fi
  done
  c="$(python3 - <<'PY' 2>/dev/null || true
import glob, site, sys
for d in site.getsitepackages() + [site.getusersitepackages()]:
    for p in glob.glob(d + "/nvidia/*/lib/libnvrtc.so.13*") + glob.glob(d + "/nvidia/cu13/lib/libnvrtc.so.13*"):
        print(p); sys.exit(0)
PY
)"
  if [ -n "$c" ]; then export MMKD_NVRTC_PATH="$c"; fi
}

run() {
  local out="$1" bin root
  mkdir -p "$out"
  out="$(cd "$out" && pwd)"
  # The binary: beside tools/ in a bundle, or in a release build of the checkout.
  root="$(cd "$here/.." && pwd)"
  if [ -n "${MMKD_BIN:-}" ]; then bin="$MMKD_BIN"
  elif [ -x "$root/mmkd" ]; then bin="$root/mmkd"
  elif [ -x "$root/target/gpu-check/mmkd" ]; then bin="$root/target/gpu-check/mmkd"
  elif [ -x "$root/target/release/mmkd" ]; then bin="$root/target/release/mmkd"
  else echo "no mmkd binary next to $here (run '$0 build' first)" >&2; exit 1
  fi
  find_nvrtc
  export PATH="/usr/local/cuda/bin:$PATH"
  local steps="$out/steps.jsonl" failed=0
  : > "$steps"
  # The whole run stays under 6 minutes: each step gets at most what is left of 345 s (or
  # MMKD_GPU_CHECK_BUDGET_S), less the 10 s grace `timeout` gives a step to exit. The last 20 s
  # are kept for the steps that only read results (MMKD_FINAL_STEP=1: the ratios and the
  # summary), so that what did run is always summarised.
  local budget="${MMKD_GPU_CHECK_BUDGET_S:-345}"
  if ! [[ "$budget" =~ ^[0-9]+$ ]] || [ "$budget" -lt 60 ] || [ "$budget" -gt 3600 ]; then
    echo "MMKD_GPU_CHECK_BUDGET_S must be a whole number of seconds from 60 to 3600, got '$budget'" >&2
    exit 2
  fi
  echo "budget: $budget s"
  local deadline=$(( $(date +%s) + budget )) reserve=20

  # step NAME TIMEOUT_S CMD...: runs CMD with a timeout, log in OUTDIR/NAME.log, status recorded.
  step() {
    local name="$1" limit="$2" rc t0 t1 left
    shift 2
    left=$(( deadline - $(date +%s) - 10 ))
    if [ -z "${MMKD_FINAL_STEP:-}" ]; then left=$(( left - reserve )); fi
    if [ "$left" -lt 5 ]; then
      echo "=== $name skipped: the budget of $budget s is spent"
      printf '{"step": "%s", "rc": -1, "seconds": 0, "log": "skipped: out of time"}\n' "$name" >> "$steps"
      failed=1
      return 0
    fi
    if [ "$limit" -gt "$left" ]; then limit="$left"; fi
    echo "=== $name ($limit s max)"
    t0=$(date +%s.%N)
    set +e
    timeout --kill-after=10 "$limit" "$@" > "$out/$name.log" 2>&1
    rc=$?
    set -e
    t1=$(date +%s.%N)
    tail -n 40 "$out/$name.log"
    printf '{"step": "%s", "rc": %d, "seconds": %.1f, "log": "%s.log"}\n' \
      "$name" "$rc" "$(awk "BEGIN { print $t1 - $t0 }")" "$name" >> "$steps"
    if [ "$rc" -ne 0 ]; then
      echo "--- $name failed (rc $rc)"
      failed=1
    fi
  }

  step device 10 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv
  echo "MMKD_NVRTC_PATH=${MMKD_NVRTC_PATH:-<search>}" >> "$out/device.log"
  # The machine's runtime (gVisor reports kernel 4.4.0): what profilers and checkers work there
  # differs (the device library's KINDS.md).
  echo "kernel: $(uname -r)" >> "$out/device.log"
  step kernels_check 90 sh -c "'$bin' kernels check --json > '$out/kernels_check.json'"
  step selftest 120 "$bin" selftest --device cuda --json "$out/selftest.json"
  step torch_loss_bench 45 python3 "$here/torch_loss_bench.py" --json "$out/torch_loss_bench.json"
  # 50 steps of the tiny config on the CPU and on the GPU from the same weights and batches:
  # the loss curves must agree within 2e-2 relative per step (issue 7).
  step parity 60 "$bin" bench parity --config "$root/configs/tiny.toml" --device cuda \
    --batch 16 --steps 50 --json "$out/parity.json"
  # The same on the mma.sync path (the blocks take wgmma on sm_90 by default): a failure of the
  # run above alone points at the Hopper path.
  MMKD_GEMM_PATH=mma step parity_mma 40 "$bin" bench parity --config "$root/configs/tiny.toml" \
    --device cuda --batch 16 --steps 50 --json "$out/parity_mma.json"
  # A real `mmkd train` on the GPU: synthetic data packed into shards, stage 2 from all
  # teachers on the tiny config for 8 steps with a checkpoint, then resumed for 4 more.
  local tdir="$out/train_cuda"
  step train_cuda 60 sh -c "'$bin' synth --out '$tdir/raw' --train 96 --eval 8 --image-size 64 && \
    '$bin' pack --format mmkd-clip --input '$tdir/raw/train' --out '$tdir/data' --image-size 32 \
      --context-length 32 --vocab-size 1024 --no-progress && \
    '$bin' train --quiet --device cuda --stage kd --config '$root/configs/tiny.toml' \
      --data '$tdir/data' --out '$tdir/run' --set embed_dim=512 --set teacher_mode=all \
      --set train.batch_size=16 --set train.epochs=2 --set stop_after=8 --set save_every=4 && \
    '$bin' train --quiet --device cuda --stage kd --config '$root/configs/tiny.toml' \
      --data '$tdir/data' --out '$tdir/run' --set embed_dim=512 --set teacher_mode=all \
      --set train.batch_size=16 --set train.epochs=2 --set stop_after=4 --set save_every=4 \
      --resume && cat '$tdir/run/metrics.jsonl'"
  # The device arena of the paper's student at batch 256 (computed from its table).
  step bench_memory 20 sh -c "'$bin' bench memory --config '$root/configs/vit-b16-biomedbert.toml' \
    --batch 256 --json '$out/bench_memory.json' && \
    '$bin' bench memory --config '$root/configs/vit-b16-biomedbert.toml' --batch 256 \
    --checkpointing --json '$out/bench_memory_ckpt.json'"
  # The training-step benchmark (issue 7): mmkd and PyTorch eager on the paper's student, batch
  # 256, same synthetic shapes and caption lengths: stage 2 (the bar), then, after the
  # GEMM/attention benchmark, stage 2 under torch.compile and stage 1 (mmkd and eager only:
  # compiling again would not fit the budget).
  local cfg="$root/configs/vit-b16-biomedbert.toml" tref="$here/torch_reference.py"
  local have_torch=1
  if [ ! -f "$tref" ] || [ ! -f "$cfg" ]; then
    echo "=== torch bench_train skipped: it needs $tref and $cfg"; have_torch=0
  elif ! python3 -c 'import torch' 2>/dev/null; then
    echo "=== torch bench_train skipped: PyTorch is not installed"; have_torch=0
  fi
  # One stage of the training-step benchmark: mmkd and PyTorch eager (torch.compile runs
  # after the kernel benchmarks below: its compile time is the least predictable step).
  bench_stage() {
    local stage="$1" sfx=""
    local bargs=(--config "$cfg" --stage "$stage" --batch 256 --steps 10 --warmup 3 --device cuda)
    if [ ! -f "$cfg" ]; then
      echo "=== bench_train skipped: $cfg not found"
      return 0
    fi
    if [ "$stage" = clip ]; then sfx="_clip"; fi
    step "bench_train_mmkd$sfx" 60 "$bin" bench train "${bargs[@]}" --json "$out/bench_train_mmkd$sfx.json"
    if [ "$have_torch" = 1 ]; then
      step "bench_train_torch_eager$sfx" 60 python3 "$tref" "${bargs[@]}" --json "$out/bench_train_torch_eager$sfx.json"
    fi
  }
  bench_stage kd
  # The GEMM and attention kernels beside cuBLAS and SDPA at the same shapes (issue 6), before
  # the remaining variants of the step: the bars of both issues come first.
  local b
  b="$root/benches/gemm_attn"
  if [ -x "$b" ]; then
    MMKD_BENCH_JSON="$out/bench_gemm_attn.json" step bench_gemm_attn 60 "$b" --bench \
      --warm-up-time 0.5 --measurement-time 1 --sample-size 10
    # The TMA-fed GEMM in its own process: a fault there cannot cost the results above.
    MMKD_BENCH_GEMM_PATH=tma MMKD_BENCH_JSON="$out/bench_gemm_tma.json" step bench_gemm_tma 40 \
      "$b" --bench
    # The persistent warp-specialised GEMM (128 x 256 tiles), likewise alone.
    MMKD_BENCH_GEMM_PATH=ws MMKD_BENCH_JSON="$out/bench_gemm_ws.json" step bench_gemm_ws 40 \
      "$b" --bench
  fi
  if [ -f "$here/torch_gemm_attn_bench.py" ]; then
    step torch_gemm_attn_bench 45 python3 "$here/torch_gemm_attn_bench.py" \
      --json "$out/torch_gemm_attn_bench.json"
  fi
  # The bars of issue 6, case by case: GEMM at >= 80% of cuBLAS (mmkd's fastest path per
  # layout), attention forward + backward at least as fast as SDPA.
  MMKD_FINAL_STEP=1 step gemm_attn_ratio 10 python3 "$here/gemm_attn_ratio.py" --mmkd "$out/bench_gemm_attn.json" \
    "$out/bench_gemm_tma.json" "$out/bench_gemm_ws.json" --torch "$out/torch_gemm_attn_bench.json" \
    --json "$out/gemm_attn_ratio.json"
  # Stage 2 in PyTorch eager with the captions packed as mmkd packs them (variable-length flash
  # attention): the padded reference above is the bar; this says how much of the ratio is the
  # packing (before torch.compile, whose compile time may use up the budget).
  if [ "$have_torch" = 1 ] && [ -f "$cfg" ]; then
    step bench_train_torch_eager_packed 60 python3 "$tref" --config "$cfg" --stage kd --batch 256 \
      --steps 10 --warmup 3 --device cuda --text-layout packed \
      --json "$out/bench_train_torch_eager_packed.json"
  fi
  # Stage 2 under torch.compile (the second PyTorch bar).
  if [ "$have_torch" = 1 ] && [ -f "$cfg" ]; then
    step bench_train_torch_compile 150 python3 "$tref" --config "$cfg" --stage kd --batch 256 \
      --steps 10 --warmup 3 --device cuda --compile --json "$out/bench_train_torch_compile.json"
  fi
  bench_stage clip
  # Stage 2 with every product on the persistent warp-specialised kernels: which wgmma kernel
  # is the default on sm_90 waits on this run beside the first.
  if [ -f "$cfg" ]; then
    MMKD_GEMM_PATH=ws step bench_train_mmkd_ws 40 "$bin" bench train --config "$cfg" --stage kd \
      --batch 256 --steps 5 --warmup 2 --device cuda --json "$out/bench_train_mmkd_ws.json"
  fi
  # Stage 2 with every product on mma.sync, beside the default (wgmma) run above.
  if [ -f "$cfg" ]; then
    MMKD_GEMM_PATH=mma step bench_train_mmkd_mma 40 "$bin" bench train --config "$cfg" --stage kd \
      --batch 256 --steps 5 --warmup 2 --device cuda --json "$out/bench_train_mmkd_mma.json"
  fi
  # Stage 2 with activation checkpointing (one more forward per block, less memory).
  if [ -f "$cfg" ]; then
    step bench_train_mmkd_ckpt 40 "$bin" bench train --config "$cfg" --stage kd --batch 256 \
      --steps 5 --warmup 2 --device cuda --checkpointing --json "$out/bench_train_mmkd_ckpt.json"
  fi
  # Stage 2 with the operand tiles copied by the tensor copy engine (TMA), last: which of the
  # two wgmma feeds is the default waits on this comparison.
  if [ -f "$cfg" ]; then
    MMKD_GEMM_PATH=tma step bench_train_mmkd_tma 40 "$bin" bench train --config "$cfg" --stage kd \
      --batch 256 --steps 5 --warmup 2 --device cuda --json "$out/bench_train_mmkd_tma.json"
  fi
  MMKD_FINAL_STEP=1 step bench_train_ratio 10 python3 - "$out" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
runs = {}
for name in ("mmkd", "torch_eager", "torch_compile", "torch_eager_packed", "mmkd_clip", "torch_eager_clip", "mmkd_ws", "mmkd_mma", "mmkd_ckpt", "mmkd_tma"):
    try:
        runs[name] = json.loads((out / f"bench_train_{name}.json").read_text())
    except Exception as e:
        print(f"{name}: no result ({e!r})")
for name, r in runs.items():
    print(f"{name}: {r['samples_per_s']:.1f} samples/s, {r['ms_per_step']['total']:.1f} ms/step, "
          f"mfu {r['mfu']}, text rows/sample {r.get('text_rows_per_sample')}")
for mine in ("mmkd", "mmkd_ws"):
    m = runs.get(mine)
    for base in ("torch_eager", "torch_compile", "torch_eager_packed"):
        if m and base in runs:
            print(f"kd: {mine} / {base} samples/s: {m['samples_per_s'] / runs[base]['samples_per_s']:.3f}")
mc, tc = runs.get("mmkd_clip"), runs.get("torch_eager_clip")
if mc and tc:
    print(f"clip: mmkd / torch_eager samples/s: {mc['samples_per_s'] / tc['samples_per_s']:.3f}")
PY
  # The other benchmark executables of the bundle (or of a release build); each may write JSON
  # through MMKD_BENCH_JSON. Short criterion settings: a smoke run, not a careful measurement.
  local name
  for name in engine loader; do
    b="$root/benches/$name"
    if [ ! -x "$b" ]; then continue; fi
    MMKD_BENCH_JSON="$out/bench_$name.json" step "bench_$name" 60 "$b" --bench \
      --warm-up-time 0.5 --measurement-time 1 --sample-size 10
  done
  MMKD_FINAL_STEP=1 step summary 10 python3 - "$out" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
summary = {}
try:
    st = json.loads((out / "selftest.json").read_text())
    fused = {c["name"]: c for c in st["cases"]}
    name = "mt_loss bf16 All N=1024 T=8 D=512"
    summary["fused_loss_median_ms"] = fused.get(name, {}).get("median_ms")
    summary["selftest_passed"] = all(c["passed"] for c in st["cases"])
    # The GEMM paths' checks (the Hopper layouts on sm_90): name -> passed.
    summary["gemm_paths"] = {c["name"]: c["passed"] for c in st["cases"]
                             if c["name"].startswith("gemm path")}
except Exception as e:  # a failed earlier step leaves no file: record why
    summary["selftest_error"] = repr(e)
try:
    tb = json.loads((out / "torch_loss_bench.json").read_text())
    summary["torch_loss_median_ms"] = tb.get("fp32", {}).get("median_ms")
    summary["torch_loss_autocast_median_ms"] = tb.get("bf16_autocast", {}).get("median_ms")
except Exception as e:
    summary["torch_error"] = repr(e)
f, t = summary.get("fused_loss_median_ms"), summary.get("torch_loss_median_ms")
ta = summary.get("torch_loss_autocast_median_ms")
if f and t:
    summary["speedup_vs_torch_fp32"] = t / f
    summary["meets_5x_bar"] = t / f >= 5.0
if f and ta:
    summary["speedup_vs_torch_bf16_autocast"] = ta / f
(out / "summary.json").write_text(json.dumps(summary, indent=2))
print(json.dumps(summary, indent=2))
PY
  python3 -c 'import json,sys; print(json.dumps([json.loads(l) for l in open(sys.argv[1])], indent=2))' \
    "$steps" > "$out/steps.json" || true
  echo "results in $out"
  return "$failed"
}

case "${1:-}" in
  build) build ;;
  run) [ $# -eq 2 ] || usage; run "$2" ;;
  *) usage ;;
esac
