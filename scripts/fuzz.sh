#!/usr/bin/env bash
# Fuzzes every format reader with libFuzzer for FUZZ_SECONDS each (default 60), then prints a
# table: executions, executions per second, corpus size, crashes.
#
# The corpus is Fuzz/corpus/FORMAT (seeded with small images qemu-img makes, when empty);
# libFuzzer adds what reaches new code, and a minimising merge keeps it small. A crash is
# saved as Fuzz/crashes/FORMAT/crash-*: commit it once fixed; the tests replay both folders
# (FuzzCorpusTests), so a fixed crash stays fixed.
#
#   FUZZ_SECONDS=300 FORMATS="qcow2 vmdk" make fuzz
set -euo pipefail
cd "$(dirname "$0")/.."
FUZZ_SECONDS=${FUZZ_SECONDS:-60}
SCRATCH=${FUZZ_SCRATCH:-.build-fuzz}
echo "fuzz: building the libFuzzer target (address sanitizer) in $SCRATCH" >&2
swift build --scratch-path "$SCRATCH" --sanitize=fuzzer -Xswiftc -sanitize=fuzzer,address -Xswiftc -DFUZZING \
    --product ferry-fuzz >&2
BIN=$SCRATCH/debug/ferry-fuzz
# The list of formats comes from a normal build of the same target (the replayer).
swift build --product ferry-fuzz >&2
FORMATS=${FORMATS:-$("$(swift build --show-bin-path)/ferry-fuzz" --formats)}
export SWIFT_BACKTRACE=enable=no

# seed FORMAT DIR: small images of FORMAT made by qemu-img (nothing for formats it cannot write).
seed() {
    local f=$1 d=$2 t
    t=$(mktemp -d)
    qemu-img create -q -f raw "$t/src.raw" 256k
    qemu-io -f raw -c "write -P 0x11 0 4k" -c "write -P 0x22 100k 2k" -c "write -P 0x33 200k 8k" "$t/src.raw" >/dev/null
    case $f in
        qcow2)
            qemu-img convert -f raw -O qcow2 -o cluster_size=512 "$t/src.raw" "$d/seed-plain.qcow2"
            qemu-img convert -c -f raw -O qcow2 -o cluster_size=512 "$t/src.raw" "$d/seed-zlib.qcow2"
            qemu-img convert -c -f raw -O qcow2 -o cluster_size=512,compression_type=zstd "$t/src.raw" "$d/seed-zstd.qcow2"
            qemu-img create -q -f qcow2 -u -o cluster_size=512 -b src.raw -F raw "$d/seed-overlay.qcow2" 256k ;;
        vmdk)
            qemu-img convert -f raw -O vmdk -o subformat=monolithicSparse "$t/src.raw" "$d/seed-sparse.vmdk"
            qemu-img convert -f raw -O vmdk -o subformat=streamOptimized "$t/src.raw" "$d/seed-stream.vmdk" ;;
        vpc)
            qemu-img convert -f raw -O vpc -o subformat=fixed "$t/src.raw" "$d/seed-fixed.vhd"
            qemu-img create -q -f vpc "$d/seed-dynamic.vhd" 64M ;;
        *)
            qemu-img convert -f raw -O "$f" "$t/src.raw" "$d/seed.$f" 2>/dev/null || true ;;
    esac
    # Seeds larger than an input may be are kept out: libFuzzer would cut them anyway.
    find "$d" -name 'seed*' -size +1024k -delete
    rm -rf "$t"
}

declare -A EXECS RATE CORPUS CRASHES
for f in $FORMATS; do
    corpus=Fuzz/corpus/$f
    crashes=Fuzz/crashes/$f
    mkdir -p "$corpus" "$crashes"
    [ -n "$(ls -A "$corpus")" ] || seed "$f" "$corpus"
    log=$(mktemp)
    echo "fuzz: $f for ${FUZZ_SECONDS}s" >&2
    FERRY_FUZZ_FORMAT=$f "$BIN" -max_total_time="$FUZZ_SECONDS" -max_len=1048576 -timeout=10 -rss_limit_mb=4096 \
        -artifact_prefix="$crashes/" "$corpus" >"$log" 2>&1 || true
    EXECS[$f]=$(grep -oE 'Done [0-9]+ runs' "$log" | awk '{ print $2 }' | tail -1)
    EXECS[$f]=${EXECS[$f]:-0}
    RATE[$f]=$(awk -v n="${EXECS[$f]}" -v s="$FUZZ_SECONDS" 'BEGIN { printf "%.0f", n / s }')
    # Keep the corpus minimal: only inputs that reach code the others do not.
    merged=$(mktemp -d)
    FERRY_FUZZ_FORMAT=$f "$BIN" -merge=1 -max_len=1048576 "$merged" "$corpus" >/dev/null 2>&1 || true
    if [ -n "$(ls -A "$merged")" ]; then
        find "$corpus" -type f ! -name 'seed*' -delete
        cp -n "$merged"/* "$corpus"/ 2>/dev/null || true
    fi
    rm -rf "$merged"
    CORPUS[$f]=$(ls "$corpus" | wc -l)
    CRASHES[$f]=$(ls "$crashes" | grep -c . || true)
    grep -E 'ERROR: (AddressSanitizer|libFuzzer)|SUMMARY' "$log" >&2 || true
    rm -f "$log"
done

echo
echo "libFuzzer, ${FUZZ_SECONDS} s per format, $(nproc) CPUs, address sanitizer"
echo
printf '| %-10s | %12s | %8s | %8s | %8s |\n' format executions "exec/s" corpus crashes
printf '|%s|%s|%s|%s|%s|\n' ------------ -------------- ---------- ---------- ----------
for f in $FORMATS; do
    printf '| %-10s | %12s | %8s | %8s | %8s |\n' "$f" "${EXECS[$f]}" "${RATE[$f]}" "${CORPUS[$f]}" "${CRASHES[$f]}"
done
