#!/usr/bin/env bash
# Runs the emulated kernel tests with the kernels instrumented by AddressSanitizer: a kernel
# that reads or writes outside its buffers (or into the guarded slack between arena regions,
# or past its dynamic shared memory) fails its launch with the block and thread, where a GPU
# would raise an illegal-address error and lose its context.
#
#   tools/emu-sanitize.sh [CARGO TEST ARGS...]
#
# Default: the kernel crate's tests and the engine's emulated-GPU tests. Builds into
# target/emu-asan (separate from the normal build: the emulation library differs).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

asan="$(${CXX:-c++} -print-file-name=libasan.so)"
if [ ! -e "$asan" ]; then
  echo "emu-sanitize: the C++ compiler has no AddressSanitizer runtime (libasan.so): install it (e.g. libasan8)" >&2
  exit 1
fi

export MMKD_EMU_SANITIZE=address
export CARGO_TARGET_DIR="${MMKD_ASAN_TARGET:-$root/target/emu-asan}"
# The runtime must be loaded first, and a report must fail the launch, not end the process;
# leaks are not what this run looks for (fibers' stacks are freed by their launch).
host="$(rustc -vV | sed -n 's/^host: //p' | tr 'a-z-' 'A-Z_')"
export "CARGO_TARGET_${host}_RUNNER=env LD_PRELOAD=$asan${LD_PRELOAD:+:$LD_PRELOAD}"
# The full reports go to files (the launch error carries the verdict, block and thread); the
# probe tests that must fail leave theirs there too.
reports="$CARGO_TARGET_DIR/asan-reports"
rm -rf "$reports"
mkdir -p "$reports"
export ASAN_OPTIONS="halt_on_error=0:detect_leaks=0:suppress_equal_pcs=0:log_path=$reports/report${ASAN_OPTIONS:+:$ASAN_OPTIONS}"

if [ "$#" -gt 0 ]; then
  cargo test "$@"
else
  cargo test -p mmkd-kernels --lib
  cargo test -p mmkd-engine --lib cuda::arena
  cargo test -p mmkd-engine --test cuda_block --test cuda_tower --test cuda_student \
    --test kernel_parity --test cuda_inputs
fi
# Every report either failed its launch (and the tests passed, so they expected it) or, from
# host code, ended the process.
echo "emu-sanitize: $(cat "$reports"/report* 2>/dev/null | grep -c 'ERROR: AddressSanitizer' || true) sanitizer report(s), all from launches the tests expected to fail; full text in $reports"
