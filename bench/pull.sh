#!/usr/bin/env bash
# Pull benchmark: a generated ~500 MiB image (six layers, thousands of small
# files and a few large ones) from a local docker-registry, pulled by gantry
# and, in the same run, by `skopeo copy … containers-storage:[vfs@…]`, both on
# the vfs driver. Prints wall times, peak memory and ratios, and the floor of
# `curl | sha256sum` + `igzip -dc | tar -x` on the same blobs.
#
# BENCH_DIR=DIR keeps the generated image between runs; BENCH_RUNS=N runs
# each case N times (default 3) and reports the median.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
bin=$(dirname "$here")/target/release
for t in docker-registry skopeo curl igzip /usr/bin/time python3; do
    command -v "$t" >/dev/null || { echo "bench: $t is required (apt-get install docker-registry skopeo curl isal time)" >&2; exit 1; }
done
work=${BENCH_DIR:-$(mktemp -d "${TMPDIR:-/var/tmp}/gantry-bench.XXXXXX")}
mkdir -p "$work"
registry_pid=""
cleanup() { [ -n "$registry_pid" ] && kill "$registry_pid" 2>/dev/null; rm -rf "$work/g" "$work/cs" "$work/floor" "$work/registry"; }
trap cleanup EXIT
. "$(dirname "$here")/scripts/local-registry.sh"
start_registry "$work/registry"
port=$registry_port

[ -f "$work/layout/index.json" ] || "$bin/gen-image" bench "$work/layout"
skopeo copy --quiet --dest-tls-verify=false "oci:$work/layout:bench" "docker://127.0.0.1:$port/bench:latest"
ref="127.0.0.1:$port/bench:latest"
base="http://127.0.0.1:$port/v2/bench"

# measure NAME CLEAN CMD...: the median wall seconds and peak RSS (KiB) of
# BENCH_RUNS runs of CMD, each after removing CLEAN and with a cold cache;
# the median run's stderr is kept in $work/NAME.err.
runs=${BENCH_RUNS:-3}
measure() {
    local name=$1 clean=$2; shift 2
    : > "$work/$name.runs"
    for i in $(seq "$runs"); do
        rm -rf "$clean"
        sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
        /usr/bin/time -f "%e %M $i" -o "$work/$name.time" "$@" >/dev/null 2> "$work/$name.err.$i"
        cat "$work/$name.time" >> "$work/$name.runs"
    done
    read -r wall rss i < <(sort -n "$work/$name.runs" | sed -n "$(( (runs + 1) / 2 ))p")
    cp "$work/$name.err.$i" "$work/$name.err"
    printf -v "${name}_wall" '%s' "$wall"
    printf -v "${name}_rss" '%s' "$rss"
}

# gantry (durable commits, the default)
GANTRY_TIMINGS=1 measure gantry "$work/g" "$bin/gantry" --root "$work/g" pull -q "$ref"
timings=$(grep '^timings:' "$work/gantry.err" || true)
create=$(sed -n 's/.* create \([0-9.]*\)s.*/\1/p' <<< "$timings")

# gantry with `durable = false`: what the syncs of a durable commit cost
printf 'durable = false\n[transport]\ntype = "v2"\n[driver]\ntype = "vfs"\n' > "$work/fast.toml"
measure fast "$work/g" "$bin/gantry" --root "$work/g" --config "$work/fast.toml" pull -q "$ref"
rm -rf "$work/g"

# skopeo into containers-storage with the vfs driver
measure skopeo "$work/cs" skopeo copy --quiet --src-tls-verify=false "docker://$ref" \
    "containers-storage:[vfs@$work/cs/root+$work/cs/run]bench:latest"
rm -rf "$work/cs"

# floor: the same blobs through curl | sha256sum and igzip -dc | tar -x
layers=$(curl -s -H 'Accept: application/vnd.oci.image.manifest.v1+json' "$base/manifests/latest" |
    python3 -c 'import json,sys; print(" ".join(l["digest"] for l in json.load(sys.stdin)["layers"]))')
rm -rf "$work/floor"; mkdir -p "$work/floor/blobs" "$work/floor/root"
sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
t0=$(date +%s.%N)
for d in $layers; do curl -s "$base/blobs/$d" | tee "$work/floor/blobs/${d#sha256:}" | sha256sum >/dev/null; done
t1=$(date +%s.%N)
for d in $layers; do igzip -dc "$work/floor/blobs/${d#sha256:}" | tar -x -C "$work/floor/root"; done
t2=$(date +%s.%N)
rm -rf "$work/floor"

python3 - "$gantry_wall" "$gantry_rss" "$skopeo_wall" "$skopeo_rss" "$t0" "$t1" "$t2" "${create:-0}" "$fast_wall" <<'PY'
import sys
gw, gr, sw, sr, t0, t1, t2, create, fw = map(float, sys.argv[1:])
dl, inflate = t1 - t0, t2 - t1
floor = dl + inflate
stages = gw - create
print(f"gantry pull         {gw:7.2f} s   peak {gr/1024:7.1f} MiB   (median)")
print(f"skopeo copy (vfs)   {sw:7.2f} s   peak {sr/1024:7.1f} MiB   (median)")
print(f"ratio gantry/skopeo {gw/sw:7.2f}      (target <= 0.50)")
print(f"gantry, durable = false {fw:7.2f} s: durable commits cost {gw - fw:+.2f} s ({(gw / fw - 1) * 100:+.1f} %)")
print(f"floor: curl|sha256sum {dl:.2f} s + igzip -dc|tar -x {inflate:.2f} s = {floor:.2f} s")
print(f"gantry download+verify+inflate (pull minus vfs parent copies {create:.2f} s) {stages:.2f} s")
print(f"ratio stages/floor  {stages/floor:7.2f}      (target <= 1.30)")
PY
echo "$timings"
