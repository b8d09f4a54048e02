#!/usr/bin/env bash
# Push benchmark: the ~500 MiB six-layer `bench` image pushed to a fresh
# docker-registry (CNCF distribution) on 127.0.0.1, in the same run:
#   - skopeo copy dir: → docker:// of the same compressed blobs (the raw
#     copy floor: no store, no compression);
#   - gantry push of the image as pulled (its original blobs are kept);
#   - gantry push of the same image loaded from an archive (no originals:
#     each layer rebuilt from the driver and compressed while it goes);
#   - podman push of the image podman pulled.
# Each run starts a fresh target registry (nothing to skip or mount) with a
# cold page cache; prints the median of BENCH_RUNS (default 3) and ratios.
#
# BENCH_DIR=DIR keeps the generated image between runs.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
bin=$(dirname "$here")/target/release
for t in docker-registry skopeo podman /usr/bin/time python3; do
    command -v "$t" >/dev/null || {
        echo "bench: $t is required (apt-get install docker-registry skopeo podman time)" >&2
        exit 1
    }
done
[ "$(id -u)" -eq 0 ] || { echo "bench: run as root (podman's store)" >&2; exit 1; }
work=${BENCH_DIR:-$(mktemp -d "${TMPDIR:-/var/tmp}/gantry-bench.XXXXXX")}
mkdir -p "$work"
registry_pid="" target_pid=""
cleanup() {
    [ -n "$registry_pid" ] && kill "$registry_pid" 2>/dev/null
    [ -n "$target_pid" ] && kill "$target_pid" 2>/dev/null
    rm -rf "$work/registry" "$work/target" "$work/pg" "$work/pl" "$work/pm" "$work/raw"
}
trap cleanup EXIT
. "$(dirname "$here")/scripts/local-registry.sh"
start_registry "$work/registry"
src=$registry_port
[ -f "$work/bench/index.json" ] || "$bin/gen-image" bench "$work/bench"
skopeo copy --quiet --dest-tls-verify=false "oci:$work/bench:bench" "docker://127.0.0.1:$src/bench:latest"

# The target: a fresh docker-registry on one port, restarted empty before each run.
tport=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fresh_target() {
    [ -n "$target_pid" ] && kill "$target_pid" 2>/dev/null && wait "$target_pid" 2>/dev/null || true
    rm -rf "$work/target"
    mkdir -p "$work/target"
    cat > "$work/target/registry.yml" <<YML
version: 0.1
log: {level: error, accesslog: {disabled: true}}
storage: {filesystem: {rootdirectory: $work/target/data}}
http: {addr: 127.0.0.1:$tport}
YML
    docker-registry serve "$work/target/registry.yml" >/dev/null 2>&1 &
    target_pid=$!
    for _ in $(seq 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$tport") 2>/dev/null && return 0
        sleep 0.1
    done
    echo "bench: the target docker-registry did not start" >&2
    exit 1
}

# The sources, prepared once: skopeo's dir: copy of the blobs, gantry's
# pulled store, gantry's loaded store, podman's pulled store.
ref="127.0.0.1:$src/bench:latest"
to="127.0.0.1:$tport/bench:latest"
printf 'plugin_cache_dir = "%s"\n[transport]\ntype = "v2"\n[driver]\ntype = "overlay2"\n' "$work/plugin-cache" > "$work/push.toml"
skopeo copy --quiet --src-tls-verify=false "docker://$ref" "dir:$work/raw"
"$bin/gantry" --root "$work/pg" --config "$work/push.toml" pull -q "$ref" >/dev/null
"$bin/gantry" --root "$work/pg" --config "$work/push.toml" tag "$ref" "$to"
"$bin/gantry" --root "$work/pg" --config "$work/push.toml" save -o "$work/bench.tar" "$ref"
"$bin/gantry" --root "$work/pl" --config "$work/push.toml" load -q -i "$work/bench.tar" >/dev/null
"$bin/gantry" --root "$work/pl" --config "$work/push.toml" tag "$ref" "$to"
rm -f "$work/bench.tar"
pm=(podman --root "$work/pm/root" --runroot "$work/pm/run" --storage-driver overlay --events-backend none)
"${pm[@]}" pull -q --tls-verify=false "docker://$ref" >/dev/null

runs=${BENCH_RUNS:-3}
: > "$work/results"
# measure NAME CMD...: the median wall seconds and peak RSS (KiB) of
# BENCH_RUNS runs, each into a fresh target with a cold page cache.
measure() {
    local name=$1; shift
    : > "$work/$name.runs"
    for i in $(seq "$runs"); do
        fresh_target
        sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
        /usr/bin/time -f "%e %M $i" -o "$work/$name.time" "$@" >/dev/null 2> "$work/$name.err.$i"
        cat "$work/$name.time" >> "$work/$name.runs"
    done
    read -r wall rss i < <(sort -n "$work/$name.runs" | sed -n "$(( (runs + 1) / 2 ))p")
    cp "$work/$name.err.$i" "$work/$name.err"
    echo "$name $wall $rss" >> "$work/results"
}
measure skopeo_raw skopeo copy --quiet --dest-tls-verify=false "dir:$work/raw" "docker://$to"
measure gantry_pulled "$bin/gantry" --root "$work/pg" --config "$work/push.toml" push -q "$to"
measure gantry_loaded "$bin/gantry" --root "$work/pl" --config "$work/push.toml" push -q "$to"
measure podman "${pm[@]}" push -q --tls-verify=false "$ref" "docker://$to"

python3 - "$work/results" <<'PY'
import sys
r = {}
for line in open(sys.argv[1]):
    name, wall, rss = line.split()
    r[name] = (float(wall), int(rss))
print("push of the six-layer bench image (~500 MiB) to a fresh docker-registry, median wall s / peak RSS MiB")
for name in ["skopeo_raw", "gantry_pulled", "gantry_loaded", "podman"]:
    w, m = r[name]
    print(f"  {name:15s} {w:7.2f} s {m / 1024:7.1f} MiB")
print(f"  gantry (pulled) / skopeo raw copy   {r['gantry_pulled'][0] / r['skopeo_raw'][0]:5.2f}  (target <= 1.10)")
print(f"  gantry (loaded) / podman push       {r['gantry_loaded'][0] / r['podman'][0]:5.2f}  (target < 1.00)")
PY
