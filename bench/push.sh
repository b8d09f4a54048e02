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
. "$(dirname "$0")/lib.sh"
require "apt-get install docker-registry skopeo podman time" docker-registry skopeo podman /usr/bin/time python3
require_root "podman's store"
bench_work
at_exit 'rm -rf "$work/registry" "$work/target" "$work/pg" "$work/pl" "$work/pm" "$work/raw"'
bench_registry "$work/registry" bench
src=$port

# The target: a fresh docker-registry on one port, restarted empty before each run.
target_pid="" tport=""
at_exit 'stop "$target_pid"'
fresh_target() {
    stop "$target_pid"
    rm -rf "$work/target"
    start_registry "$work/target" ${tport:+"$tport"}
    target_pid=$registry_pid tport=$registry_port
}
fresh_target

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

measure skopeo_raw fresh_target skopeo copy --quiet --dest-tls-verify=false "dir:$work/raw" "docker://$to"
measure gantry_pulled fresh_target "$bin/gantry" --root "$work/pg" --config "$work/push.toml" push -q "$to"
measure gantry_loaded fresh_target "$bin/gantry" --root "$work/pl" --config "$work/push.toml" push -q "$to"
measure podman fresh_target "${pm[@]}" push -q --tls-verify=false "$ref" "docker://$to"

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
