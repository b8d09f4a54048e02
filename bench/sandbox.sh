#!/usr/bin/env bash
# Sandbox cost benchmark: apply-diff throughput of the ~500 MiB six-layer
# benchmark image loaded from a `docker save` archive (uncompressed layers,
# so applying is the work) by gantry with the overlay2 and vfs drivers as
# sandboxed components, by overlay2's native build (the same source, no
# sandbox), and by the host alone (`unpack-bench`: the host's own unpack and
# hashing of each layer, no plugin at all). Prints medians, throughput and
# the sandbox's cost: component against native overlay2 (target <= 5 %).
#
# BENCH_DIR=DIR keeps the generated image between runs; BENCH_RUNS=N runs
# each case N times (default 5) and reports the median.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
bin=$(dirname "$here")/target/release
for t in skopeo /usr/bin/time python3; do
    command -v "$t" >/dev/null || { echo "bench: $t is required (apt-get install skopeo time)" >&2; exit 1; }
done
[ "$(id -u)" -eq 0 ] || { echo "bench: run as root (overlay2)" >&2; exit 1; }
[ -f "$bin/libgantry_driver_overlay2.so" ] || { echo "bench: build first (make build)" >&2; exit 1; }
work=${BENCH_DIR:-$(mktemp -d "${TMPDIR:-/var/tmp}/gantry-bench.XXXXXX")}
mkdir -p "$work"
cleanup() { rm -rf "$work/g" "$work/h"; }
trap cleanup EXIT
[ -f "$work/bench/index.json" ] || "$bin/gen-image" bench "$work/bench"
[ -f "$work/bench.tar" ] || skopeo copy --quiet "oci:$work/bench:bench" "docker-archive:$work/bench.tar:bench:latest"
mib=$(du -m "$work/bench.tar" | cut -f1)
echo "archive: $mib MiB"

cfg() { printf 'plugin_cache_dir = "%s"\ndurable = false\nallow_native_plugins = true\n[transport]\ntype = "v2"\n[driver]\ntype = "%s"\n%s' "$work/plugin-cache" "$1" "${2:-}" > "$work/$3.toml"; }
cfg overlay2 "" overlay2-wasm
cfg overlay2 "runtime = \"native\"
path = \"$bin/libgantry_driver_overlay2.so\"
" overlay2-native
cfg vfs "" vfs-wasm

runs=${BENCH_RUNS:-5}
cases="overlay2_component overlay2_native vfs_component host_alone"
for c in $cases; do : > "$work/$c.runs"; done
# one NAME CMD...: one cold-cache run of CMD, its wall seconds and peak RSS appended.
one() {
    local name=$1; shift
    rm -rf "$work/g" "$work/h"
    sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
    /usr/bin/time -f "%e %M" -o "$work/$name.time" "$@" >/dev/null 2>&1
    cat "$work/$name.time" >> "$work/$name.runs"
}
# Interleaved, so drift in the machine touches every case alike.
for _ in $(seq "$runs"); do
    one overlay2_component "$bin/gantry" --root "$work/g" --config "$work/overlay2-wasm.toml" load -q -i "$work/bench.tar"
    one overlay2_native "$bin/gantry" --root "$work/g" --config "$work/overlay2-native.toml" load -q -i "$work/bench.tar"
    one vfs_component "$bin/gantry" --root "$work/g" --config "$work/vfs-wasm.toml" load -q -i "$work/bench.tar"
    one host_alone "$bin/unpack-bench" "$work/bench.tar" "$work/h"
done
: > "$work/results"
for c in $cases; do
    echo "$c $(sort -n "$work/$c.runs" | sed -n "$(( (runs + 1) / 2 ))p")" >> "$work/results"
done

python3 - "$work/results" "$mib" <<'PY'
import sys
r = {}
for line in open(sys.argv[1]):
    name, wall, rss = line.split()
    r[name] = (float(wall), float(rss) / 1024)
mib = float(sys.argv[2])
for name, (w, m) in r.items():
    print(f"{name:20s} {w:7.2f} s   {mib / w:7.1f} MiB/s   peak {m:6.1f} MiB   (median)")
c, n, h = r["overlay2_component"][0], r["overlay2_native"][0], r["host_alone"][0]
print(f"sandbox cost: overlay2 component / native = {c / n:.3f} ({(c / n - 1) * 100:+.1f} %, target <= +5 %)")
print(f"whole load against the host's unpack alone: overlay2 component {c / h:.2f}x, native {n / h:.2f}x, vfs component {r['vfs_component'][0] / h:.2f}x")
PY
