#!/usr/bin/env bash
# What a disk quota (`max_store_gib`) costs a pull: the six-layer `bench`
# image (~500 MiB, thousands of files) from a local docker-registry, pulled
# by gantry without a quota, by gantry with one (the store walked, every
# layer byte charged as it is unpacked), and by podman (overlay) in the
# same run; then how long `gantry system df` takes to walk the store it
# left (the walk a charge makes when its standing measure is old).
# Prints median wall times (BENCH_RUNS, default 3, cold page cache) and
# ratios. BENCH_DIR=DIR keeps the generated image between runs.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
require "apt-get install docker-registry skopeo podman time" docker-registry skopeo podman /usr/bin/time python3
require_root "overlay mounts, podman"
bench_work
at_exit 'rm -rf "$work/g" "$work/pm" "$work/registry"'
bench_registry "$work/registry" bench
ref="127.0.0.1:$port/bench:latest"
config() { printf 'plugin_cache_dir = "%s"\n%s[driver]\ntype = "overlay2"\n' "$work/plugin-cache" "$2" > "$work/$1.toml"; }
config plain ""
config quota 'max_store_gib = 100
'
# The plugin compiles once, outside the measured runs.
"$bin/gantry" --root "$work/g" --config "$work/plain.toml" images >/dev/null
rm -rf "$work/g"
: > "$work/quota.runs"
: > "$work/plain.runs"
for _ in $(seq "$runs"); do
    for c in plain quota; do
        measure_once "$c" 'rm -rf "$work/g"' "$bin/gantry" --root "$work/g" --config "$work/$c.toml" pull -q "$ref"
    done
done
record_median plain
record_median quota
measure df true "$bin/gantry" --root "$work/g" --config "$work/quota.toml" system df
files=$(find "$work/g" | wc -l)
rm -rf "$work/g"
measure podman 'rm -rf "$work/pm"' podman --root "$work/pm/root" --runroot "$work/pm/run" --storage-driver overlay \
    --events-backend none pull -q --tls-verify=false "docker://$ref"

python3 - "$work/results" "$files" <<'PY'
import sys
r = {}
for line in open(sys.argv[1]):
    name, wall, rss = line.split()
    r[name] = float(wall)
print("pull of the six-layer bench image (~500 MiB), median wall s, cold cache")
print(f"  gantry, no quota        {r['plain']:7.2f}")
print(f"  gantry, max_store_gib   {r['quota']:7.2f}   {r['quota'] / r['plain']:5.2f}x of no quota")
print(f"  podman (overlay)        {r['podman']:7.2f}")
print(f"  gantry with a quota / podman   {r['quota'] / r['podman']:5.2f}")
print(f"gantry system df (a walk of {sys.argv[2]} entries): {r['df']:.2f} s")
PY
