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
. "$(dirname "$0")/lib.sh"
require "apt-get install skopeo time" skopeo /usr/bin/time python3
require_root overlay2
[ -f "$bin/libgantry_driver_overlay2.so" ] || { echo "bench: build first (make build)" >&2; exit 1; }
bench_work
at_exit 'rm -rf "$work/g" "$work/h"'
bench_archive
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
fresh='rm -rf "$work/g" "$work/h"'
# Interleaved, so drift in the machine touches every case alike.
for _ in $(seq "$runs"); do
    measure_once overlay2_component "$fresh" "$bin/gantry" --root "$work/g" --config "$work/overlay2-wasm.toml" load -q -i "$work/bench.tar"
    measure_once overlay2_native "$fresh" "$bin/gantry" --root "$work/g" --config "$work/overlay2-native.toml" load -q -i "$work/bench.tar"
    measure_once vfs_component "$fresh" "$bin/gantry" --root "$work/g" --config "$work/vfs-wasm.toml" load -q -i "$work/bench.tar"
    measure_once host_alone "$fresh" "$bin/unpack-bench" "$work/bench.tar" "$work/h"
done
for c in $cases; do record_median "$c"; done

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
