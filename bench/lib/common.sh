# Shared by the bench/*.sh scripts (sourced, not run): timing, medians, page-cache settling
# and the half-data test image every table copies.

now_ns() { date +%s%N; }

# FERRY (default: the release build), RUNS (default: $1) and SIZE_MIB (default 1024; a
# multiple of 4, at least 8, as fill_half_data needs), checked.
bench_defaults() {
    FERRY=${FERRY:-$(swift build -c release --show-bin-path)/ferry}
    RUNS=${RUNS:-$1}
    SIZE_MIB=${SIZE_MIB:-1024}
    [ -x "$FERRY" ] || { echo "bench: no ferry binary at $FERRY (make release)" >&2; exit 1; }
    # Every timed run starts from a dropped page cache, so how the binary was linked shows:
    # with the Swift runtime as shared libraries a cold start took 0.1 s instead of 0.06 s.
    if ldd "$FERRY" 2>/dev/null | grep -q libswiftCore; then
        echo "bench: $FERRY loads the Swift runtime as shared libraries; make release builds it the way it is measured (--static-swift-stdlib)" >&2
    fi
    (( SIZE_MIB % 4 == 0 && SIZE_MIB >= 8 )) || { echo "bench: SIZE_MIB must be a multiple of 4, at least 8" >&2; exit 1; }
    program_files
}

PROGRAM_FILES=()

# PROGRAM_FILES (program_files sets it): the programs the tables time (ferry, qemu-img,
# nbdcopy), the libraries they link, the ones they load on demand (libnbd, libiscsi, librbd,
# libcrypto; qemu's block modules) and theirs. settle reads them back after dropping the page cache
# (BENCH_PROGRAMS=cold leaves them out): the images are what a run must read from disk, not
# the tools. A cold start costs each tool differently: `ferry --version` took 42-52 ms with
# nothing cached, 37 MiB of it the program itself (the Swift runtime is linked in); nbdcopy
# and qemu-img 39-45 ms, and libnbd with GnuTLS, libxml2 and ICU behind it, which ferry and
# nbdcopy both load, 43-53 ms.
program_files() {
    local lib=/usr/lib/x86_64-linux-gnu f
    PROGRAM_FILES=()
    [ "${BENCH_PROGRAMS:-warm}" != cold ] || return 0
    mapfile -t PROGRAM_FILES < <(
        for f in "$FERRY" "$(command -v qemu-img)" "$(command -v nbdcopy)" "$lib"/libnbd.so.0 "$lib"/libiscsi.so.7 \
                 "$lib"/librbd.so.1 "$lib"/librados.so.2 "$lib"/libcrypto.so.3 "$lib"/qemu/block-*.so; do
            [ -e "$f" ] || continue
            echo "$f"
            ldd "$f" 2>/dev/null | awk '$3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }'
        done | xargs -r readlink -f | sort -u)
}

# bench_workdir NAME: OUT, a fresh directory under BENCH_DIR (default /tmp) removed on exit,
# with SRC ($OUT/src.raw) for the source image and DST ($OUT/dst) for format_table's targets.
bench_workdir() {
    OUT=$(mktemp -d "${BENCH_DIR:-/tmp}/$1.XXXXXX")
    trap 'rm -rf "$OUT"' EXIT
    SRC=$OUT/src.raw
    DST=$OUT/dst
}

# row_figures MEDIAN_US [REFERENCE_MEDIAN_US]: "seconds MiB/s ratio" of one table row, the
# ratio (time over the reference's) only with a reference; MiB/s is SIZE_MIB over the time.
row_figures() {
    awk -v m="$1" -v r="${2:-}" -v s="$SIZE_MIB" \
        'BEGIN { printf "%.3f %.0f %s\n", m / 1e6, s / (m / 1e6), r == "" ? "" : sprintf("%.2f", m / r) }'
}

# shuffle RUN ROW...: the rows in an order of this run's own (shuffled with RUN as the seed,
# so a run can be repeated), so that no command always follows the same one. Starting one row
# later each run does not do that: it keeps every command right after the same neighbour.
# (raw -> qcow2 ran right after qemu-img's 4 s zstd run every time and measured 1.04-1.08
# times qemu-img's time; in shuffled runs, and alone with qemu-img, 0.9.)
shuffle() {
    local run=$1; shift
    printf '%s\n' "$@" | awk -v seed="$run" 'BEGIN { srand(seed) } { printf "%.9f\t%s\n", rand(), $0 }' | sort -n | cut -f2-
}

# The median of a space-separated list of microsecond timings.
median_us() { tr ' ' '\n' <<<"$1" | grep -v '^$' | sort -n | awk '{ a[NR] = $1 } END { if (NR % 2) print a[(NR + 1) / 2]; else print int((a[NR / 2] + a[NR / 2 + 1]) / 2) }'; }

# Writes dirty pages back and drops the page cache (when permitted) before a timed run, then
# reads the programs back in (see program_files).
settle() {
    sync
    { echo 3 > /proc/sys/vm/drop_caches; } 2>/dev/null || true
    (( ${#PROGRAM_FILES[@]} == 0 )) || cat "${PROGRAM_FILES[@]}" >/dev/null 2>&1 || true
}

# Says once, up front, when the page cache cannot be dropped.
check_drop_caches() {
    if ! { echo 3 > /proc/sys/vm/drop_caches; } 2>/dev/null; then
        echo "bench: cannot drop the page cache (not root?): reads may come from memory" >&2
    fi
}

# make_corpus FILE: real, partly compressible bytes (binaries and libraries, then text), about
# 96 MiB; sets corpus_mib to its size in MiB.
make_corpus() {
    local corpus=$1 mib=96
    echo "bench: gathering ${mib} MiB of binaries and text" >&2
    {
        find /usr/bin /usr/lib -type f -size +16k 2>/dev/null | sort | head -n 4000 | xargs cat 2>/dev/null | head -c $(( mib * 1024 * 1024 * 2 / 3 )) || true
        for (( pass = 0; pass < 16; pass++ )); do
            find /usr/share /usr/include -type f \( -name '*.h' -o -name '*.txt' -o -name '*.html' -o -name '*.py' -o -name '*.pl' -o -name '*.xml' \) 2>/dev/null | sort | xargs cat 2>/dev/null || true
        done | head -c $(( mib * 1024 * 1024 / 3 )) || true
    } > "$corpus"
    corpus_mib=$(( $(stat -c %s "$corpus") / 1048576 ))
    (( corpus_mib >= 8 )) || { echo "bench: could not gather enough data for the corpus" >&2; exit 1; }
}

# fill_half_data FILE SIZE_MIB [CORPUS]: a sparse image of SIZE_MIB, half data and half holes,
# interleaved: in each 4 MiB slot 2 MiB of data at 0, 1 or 2 MiB, and every eighth slot 32 runs
# of 64 KiB data each followed by 64 KiB of hole. The data comes from CORPUS (see make_corpus,
# which sets corpus_mib) or, without one, from /dev/urandom.
fill_half_data() {
    local file=$1 size_mib=$2 corpus=${3:-} k j base
    truncate -s "${size_mib}M" "$file"
    for (( k = 0; k < size_mib / 4; k++ )); do
        base=$(( k * 4096 ))   # KiB
        if (( k % 8 == 7 )); then
            for (( j = 0; j < 32; j++ )); do
                if [ -n "$corpus" ]; then
                    dd if="$corpus" of="$file" bs=64K count=1 skip=$(( (k * 32 + j) % (corpus_mib * 16) )) \
                       seek=$(( (base + j * 128) / 64 )) conv=notrunc status=none
                else
                    dd if=/dev/urandom of="$file" bs=64K count=1 seek=$(( (base + j * 128) / 64 )) conv=notrunc status=none
                fi
            done
        elif [ -n "$corpus" ]; then
            dd if="$corpus" of="$file" bs=1M count=2 skip=$(( (k * 2) % (corpus_mib - 2) )) \
               seek=$(( base / 1024 + k % 3 )) conv=notrunc status=none
        else
            dd if=/dev/urandom of="$file" bs=1M count=2 seek=$(( base / 1024 + k % 3 )) conv=notrunc status=none
        fi
    done
}

# guest_image: $SRC, a raw guest image of SIZE_MIB, half data from a corpus (make_corpus)
# and half holes (fill_half_data).
guest_image() {
    local corpus=$OUT/corpus
    make_corpus "$corpus"
    echo "bench: building a ${SIZE_MIB} MiB guest image in $OUT (half data, half holes)" >&2
    fill_half_data "$SRC" "$SIZE_MIB" "$corpus"
    rm -f "$corpus"
}

# conversion_rows TARGET... -- SOURCE...: ALL_ROWS of a format table. Each TARGET ("name|-O
# and -o|format") gets a write row from the raw image (SRC) and from its qcow2 copy ($QSRC);
# each SOURCE ("name|-f and path") read rows to raw and to qcow2. Every Ferry row is compared
# with the same conversion by qemu-img (flushing, like Ferry's default).
conversion_rows() {
    local t s tname topts tfmt sname sargs f targets=() sources=()
    while [ $# -gt 0 ] && [ "$1" != -- ]; do targets+=("$1"); shift; done
    [ $# -gt 0 ] && shift
    sources=("$@")
    ALL_ROWS=()
    for t in "${targets[@]}"; do
        IFS='|' read -r tname topts tfmt <<<"$t"
        for s in "raw|-f raw SRC" "qcow2|-f qcow2 $QSRC"; do
            IFS='|' read -r sname sargs <<<"$s"
            ALL_ROWS+=("write|ferry $sname -> $tname|$FERRY convert -q $sargs $topts DST|$tfmt|qemu-img $sname -> $tname"
                       "write|qemu-img $sname -> $tname|qemu-img convert $sargs $topts -t writeback DST|$tfmt|")
        done
    done
    for s in "${sources[@]}"; do
        IFS='|' read -r sname sargs <<<"$s"
        for f in raw qcow2; do
            ALL_ROWS+=("read|ferry $sname -> $f|$FERRY convert -q $sargs -O $f DST|$f|qemu-img $sname -> $f"
                       "read|qemu-img $sname -> $f|qemu-img convert $sargs -O $f -t writeback DST|$f|")
        done
    done
}

# select_rows: ROWS from ALL_ROWS ("kind|name|command|target format|reference row"), only
# those of KIND when it is set (write or read), without the kind.
select_rows() {
    KIND=${KIND:-}
    ROWS=()
    local row
    for row in "${ALL_ROWS[@]}"; do
        [ -z "$KIND" ] || [ "$KIND" = "${row%%|*}" ] || continue
        ROWS+=("${row#*|}")
    done
}

# The timed loop every table shares.
#
# TIMES[KEY] collects one run's time in microseconds per run of KEY (space-separated);
# SIZES[KEY] what a row's output takes on disk, in MiB.
declare -A TIMES SIZES

# run_rounds ROW_FUNCTION: RUNS rounds; in each, `ROW_FUNCTION RUN ROW` for every row of ROWS,
# in an order shuffled afresh each round (see shuffle) so drift hits every command alike.
run_rounds() {
    local fn=$1 run row
    for (( run = 1; run <= RUNS; run++ )); do
        mapfile -t ORDER < <(shuffle "$run" "${ROWS[@]}")
        for row in "${ORDER[@]}"; do "$fn" "$run" "$row"; done
        echo "bench: run $run of $RUNS done" >&2
    done
}

# timed KEY COMMAND: settles the page cache (BENCH_SETTLE: drop, the default, see settle; sync,
# dirty pages written back only; none), runs COMMAND with bash (prefixed by the words of
# BENCH_IN, e.g. `ip netns exec NS`, when set; its standard output dropped) and adds its time
# to TIMES[KEY]. A command that fails ends the bench.
timed() {
    local key=$1 cmd=$2 t0 t1
    case ${BENCH_SETTLE:-drop} in
        drop) settle ;;
        sync) sync ;;
    esac
    t0=$(now_ns)
    "${BENCH_IN[@]}" bash -c "$cmd" >/dev/null || { echo "bench: failed: $cmd" >&2; exit 1; }
    t1=$(now_ns)
    TIMES[$key]+="$(( (t1 - t0) / 1000 )) "
}

# limit_data COPIES: $OUT/data.raw, COPIES times as many random bytes as $SRC holds data, for
# fio to read as the limit rows' stand-in for the image (contents do not matter to the disk);
# sets data_mib to its size in MiB.
limit_data() {
    data_mib=$(( $1 * $(du -k "$SRC" | cut -f1) / 1024 ))
    head -c "${data_mib}M" /dev/urandom >"$OUT/data.raw"
}

# fio_limit KEY ARGS: settles, runs fio with ARGS (words) and adds the time it counts to
# TIMES[KEY]: its longest job's runtime, its own start left out (a cold fio takes 0.35-0.4 s to
# start). The machine's limit for a table's row.
fio_limit() {
    settle
    # shellcheck disable=SC2086 # the arguments are words
    fio --output-format=json --output="$OUT/fio.json" $2 >/dev/null || { echo "bench: fio failed: $2" >&2; exit 1; }
    TIMES[$1]+="$(python3 -c 'import json, sys; print(1000 * max(max(j["read"]["runtime"], j["write"]["runtime"]) for j in json.load(open(sys.argv[1]))["jobs"]))' "$OUT/fio.json") "
}

# figures KEY [REFERENCE_KEY]: "seconds MiB/s ratio" of KEY's median (see row_figures), the
# ratio against REFERENCE_KEY's median when one is given.
figures() {
    local r=""
    [ -n "${2:-}" ] && r=$(median_us "${TIMES[$2]}")
    row_figures "$(median_us "${TIMES[$1]}")" "$r"
}

# paired_ratio KEY REFERENCE_KEY: the median, over runs, of KEY's time over REFERENCE_KEY's in
# the same run (run_rounds times each row once per run, so the Nth times pair up). The machine
# drifts between runs (the same command's medians moved by 10-25% from one table to the next);
# a pair timed within one run shares that drift, and the ratio cancels it.
paired_ratio() {
    paste -d' ' <(tr ' ' '\n' <<<"${TIMES[$1]}" | grep -v '^$') <(tr ' ' '\n' <<<"${TIMES[$2]}" | grep -v '^$') |
        awk 'NF == 2 && $2 > 0 { print $1 / $2 }' | sort -g |
        awk '{ a[NR] = $1 } END { if (NR) printf "%.2f\n", NR % 2 ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }'
}

# format_table TITLE CHECKED: runs every row of ROWS ("name|command|target format|reference
# row"; SRC and DST in the command stand for the raw image $SRC and the target $DST.FORMAT)
# RUNS times (run_rounds, timed); checks each output on the first run (qemu-img check for the
# formats in CHECKED, qemu-img compare against $SRC for all); prints the table of medians and
# ratios under TITLE. DATA says what the image holds (default: half data: binaries and text).
format_table() {
    local title=$1 row name fmt ref secs rate ratio
    FORMAT_CHECKED=" $2 "
    run_rounds format_row

    echo
    echo "$title, ${SIZE_MIB} MiB guest image (${DATA:-half data: binaries and text}), median of $RUNS runs, $(uname -r), $(df -T "$OUT" | awk 'NR == 2 { print $2 }') on $(nproc) CPUs"
    echo
    printf '| %-40s | %8s | %7s | %8s | %6s | %-40s |\n' "command" "median s" "MiB/s" "out MiB" "ratio" "ratio is time against"
    printf '|%s|%s|%s|%s|%s|%s|\n' "------------------------------------------" "----------" "---------" "----------" "--------" "------------------------------------------"
    for row in "${ROWS[@]}"; do
        IFS='|' read -r name _ _ ref <<<"$row"
        read -r secs rate ratio <<<"$(figures "$name" "$ref")"
        printf '| %-40s | %8s | %7s | %8s | %6s | %-40s |\n' "$name" "$secs" "$rate" "${SIZES[$name]}" "$ratio" "$ref"
    done
    echo
    echo "MiB/s is the image's virtual size over the time; out MiB is what the target takes on disk; ratio < 1 means faster than the qemu-img command it is compared with."
}

# format_row RUN ROW: one timed run of a format_table row, checked on the first run.
format_row() {
    local run=$1 name cmd fmt dst
    IFS='|' read -r name cmd fmt _ <<<"$2"
    dst=$DST.$fmt
    cmd=${cmd//SRC/$SRC}
    cmd=${cmd//DST/$dst}
    rm -f "$dst"
    timed "$name" "$cmd"
    if (( run == 1 )); then
        if [[ $FORMAT_CHECKED == *" $fmt "* ]]; then
            qemu-img check -q "$dst" || { echo "bench: $name: qemu-img check failed" >&2; exit 1; }
        fi
        qemu-img compare -q -f raw -F "$fmt" "$SRC" "$dst" || { echo "bench: $name produced a different image" >&2; exit 1; }
        SIZES[$name]=$(( $(stat -c %b "$dst") * 512 / 1048576 ))
    fi
    rm -f "$dst"
}
