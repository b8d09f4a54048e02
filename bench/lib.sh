# What the benchmarks share; each bench/*.sh sources it after `set -euo
# pipefail`. It sets $here (bench/) and $bin (the release build), and gives:
#   require HINT TOOL...      every TOOL on PATH, else say HINT and stop
#   require_root WHY          root, else say WHY and stop
#   bench_work                $work: BENCH_DIR, or a fresh temporary
#                             directory; an empty $work/results
#   at_exit CMD               run CMD (eval'd) when the script ends, last first
#   stop PID                  kill PID if set, and reap it
#   cold_cache                write back and drop the page cache (as root)
#   bench_image SHAPE         the OCI layout $work/SHAPE of `gen-image SHAPE`
#   bench_archive             $work/bench.tar: the `bench` image as `docker save` writes it
#   bench_registry DIR SHAPE...  a docker-registry on a free loopback port
#                             (storage in DIR) holding each SHAPE as
#                             SHAPE:latest; sets $port
#   measure NAME PREP CMD...  BENCH_RUNS runs of CMD, each after PREP
#                             (eval'd) and with a cold cache; the median's
#                             wall seconds and peak RSS (KiB) appended to
#                             $work/results as `NAME WALL RSS`, its stderr
#                             kept in $work/NAME.err
#   measure_once NAME PREP CMD..., record_median NAME
#                             the same in two steps, for runs interleaved
#                             across cases
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
bin=$(dirname "$here")/target/release
runs=${BENCH_RUNS:-3}
# shellcheck source=../scripts/local-registry.sh
. "$(dirname "$here")/scripts/local-registry.sh"

require() {
    local hint=$1 t
    shift
    for t in "$@"; do
        command -v "$t" >/dev/null || { echo "bench: $t is required ($hint)" >&2; exit 1; }
    done
}

require_root() {
    [ "$(id -u)" -eq 0 ] || { echo "bench: run as root ($1)" >&2; exit 1; }
}

bench_work() {
    work=${BENCH_DIR:-$(mktemp -d "${TMPDIR:-/var/tmp}/gantry-bench.XXXXXX")}
    mkdir -p "$work"
    : > "$work/results"
}

bench_exit=()
at_exit() { bench_exit+=("$1"); }
run_at_exit() {
    local i
    for ((i = ${#bench_exit[@]} - 1; i >= 0; i--)); do
        eval "${bench_exit[i]}" || true
    done
}
trap run_at_exit EXIT

stop() {
    [ -n "${1:-}" ] && kill "$1" 2>/dev/null && { wait "$1" 2>/dev/null || true; }
    return 0
}

cold_cache() {
    sync
    echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
}

bench_image() {
    [ -f "$work/$1/index.json" ] || "$bin/gen-image" "$1" "$work/$1"
}

bench_archive() {
    bench_image bench
    [ -f "$work/bench.tar" ] || skopeo copy --quiet "oci:$work/bench:bench" "docker-archive:$work/bench.tar:bench:latest"
}

bench_registry() {
    local dir=$1 shape
    shift
    start_registry "$dir"
    at_exit "stop $registry_pid"
    port=$registry_port
    for shape in "$@"; do
        bench_image "$shape"
        skopeo copy --quiet --dest-tls-verify=false "oci:$work/$shape:$shape" "docker://127.0.0.1:$port/$shape:latest"
    done
}

measure_once() {
    local name=$1 prep=$2 i
    shift 2
    touch "$work/$name.runs"
    i=$(($(wc -l < "$work/$name.runs") + 1))
    eval "$prep"
    cold_cache
    if ! /usr/bin/time -f "%e %M $i" -o "$work/$name.time" "$@" >/dev/null 2> "$work/$name.err.$i"; then
        echo "bench: $name failed: $*" >&2
        cat "$work/$name.err.$i" >&2
        exit 1
    fi
    cat "$work/$name.time" >> "$work/$name.runs"
}

record_median() {
    local name=$1 n wall rss i
    n=$(wc -l < "$work/$name.runs")
    read -r wall rss i < <(sort -n "$work/$name.runs" | sed -n "$(((n + 1) / 2))p")
    cp "$work/$name.err.$i" "$work/$name.err"
    echo "$name $wall $rss" >> "$work/results"
}

measure() {
    local name=$1 prep=$2 _
    shift 2
    : > "$work/$name.runs"
    for _ in $(seq "$runs"); do
        measure_once "$name" "$prep" "$@"
    done
    record_median "$name"
}
