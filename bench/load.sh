#!/usr/bin/env bash
# Load and save benchmark: the ~500 MiB benchmark image as a `docker save`
# archive, loaded by gantry from a file and from a pipe, and, in the same
# run, by `podman load` and `skopeo copy docker-archive:… containers-storage:`
# on the same graph driver (vfs, then overlay2/overlay as root); then
# `gantry save` against `podman save`.
# Prints wall times, peak memory and ratios.
#
# BENCH_DIR=DIR keeps the generated image between runs; BENCH_RUNS=N runs
# each case N times (default 3) and reports the median. BENCH_BIG=1 runs
# only the big-file row: a one-layer image holding one 8 GiB + 1 MiB file
# (zstd, its size in a PAX record), gantry vs podman load on vfs.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
require "apt-get install skopeo podman time" skopeo podman /usr/bin/time python3
bench_work
at_exit 'rm -rf "$work/g" "$work/p" "$work/s" "$work/saved-g.tar" "$work/saved-p.tar"'
if [ "${BENCH_BIG:-}" = 1 ]; then
    [ -f "$work/big.tar" ] || "$bin/gen-image" big "$work/big.tar"
    echo "archive: $(du -m "$work/big.tar" | cut -f1) MiB (one 8 GiB + 1 MiB file, zstd)"
    printf 'plugin_cache_dir = "%s"\n[transport]\ntype = "v2"\n[driver]\ntype = "vfs"\n' "$work/plugin-cache" > "$work/big-vfs.toml"
    for who in gantry podman; do
        rm -rf "$work/g" "$work/p"
        cold_cache
        if [ "$who" = gantry ]; then
            /usr/bin/time -f "%e %M" -o "$work/big.time" "$bin/gantry" --root "$work/g" --config "$work/big-vfs.toml" load -q -i "$work/big.tar" >/dev/null
        else
            /usr/bin/time -f "%e %M" -o "$work/big.time" podman --root "$work/p/root" --runroot "$work/p/run" --storage-driver vfs load -q -i "$work/big.tar" >/dev/null
        fi
        read -r wall rss < "$work/big.time"
        printf '%-14s %7.2f s   peak %7.1f MiB   disk %s\n' "big_$who" "$wall" "$(echo "$rss / 1024" | bc -l)" \
            "$(du -sh "$work/${who:0:1}" | cut -f1)"
    done
    rm -rf "$work/g" "$work/p"
    exit 0
fi
bench_archive
echo "archive: $(du -m "$work/bench.tar" | cut -f1) MiB"

podman_vfs=(podman --root "$work/p/root" --runroot "$work/p/run" --storage-driver vfs)
# Plugins compile once per machine (as after an install), not once per fresh store.
printf 'plugin_cache_dir = "%s"\n[transport]\ntype = "v2"\n[driver]\ntype = "vfs"\n' "$work/plugin-cache" > "$work/vfs.toml"
printf 'plugin_cache_dir = "%s"\n[transport]\ntype = "v2"\n[driver]\ntype = "overlay2"\n' "$work/plugin-cache" > "$work/overlay2.toml"

# Each case starts without what it writes: a store, or the saved archive.
if [ "$(id -u)" -eq 0 ]; then
    measure gantry_file_overlay2 'rm -rf "$work/g"' "$bin/gantry" --root "$work/g" --config "$work/overlay2.toml" load -q -i "$work/bench.tar"
    measure gantry_save_overlay2 'rm -rf "$work/saved-g.tar"' "$bin/gantry" --root "$work/g" --config "$work/overlay2.toml" save -o "$work/saved-g.tar" bench:latest
    rm -rf "$work/g"
    measure podman_file_overlay 'rm -rf "$work/p"' podman --root "$work/p/root" --runroot "$work/p/run" --storage-driver overlay load -q -i "$work/bench.tar"
    rm -rf "$work/p"
fi
measure gantry_file 'rm -rf "$work/g"' "$bin/gantry" --root "$work/g" --config "$work/vfs.toml" load -q -i "$work/bench.tar"
measure gantry_pipe 'rm -rf "$work/g"' sh -c "exec \"$bin/gantry\" --root \"$work/g\" --config \"$work/vfs.toml\" load -q < \"$work/bench.tar\""
measure gantry_save 'rm -rf "$work/saved-g.tar"' "$bin/gantry" --root "$work/g" --config "$work/vfs.toml" save -o "$work/saved-g.tar" bench:latest
measure podman_file 'rm -rf "$work/p"' "${podman_vfs[@]}" load -q -i "$work/bench.tar"
measure podman_pipe 'rm -rf "$work/p"' sh -c "exec ${podman_vfs[*]} load -q < \"$work/bench.tar\""
measure podman_save 'rm -rf "$work/saved-p.tar"' "${podman_vfs[@]}" save -q -o "$work/saved-p.tar" bench:latest
rm -rf "$work/p"
measure skopeo_file 'rm -rf "$work/s"' skopeo copy --quiet "docker-archive:$work/bench.tar" "containers-storage:[vfs@$work/s/root+$work/s/run]bench:latest"
measure skopeo_pipe 'rm -rf "$work/s"' sh -c "exec skopeo copy --quiet docker-archive:/dev/stdin \"containers-storage:[vfs@$work/s/root+$work/s/run]bench:latest\" < \"$work/bench.tar\""
rm -rf "$work/s"

python3 - "$work/results" <<'PY'
import sys
r = {}
for line in open(sys.argv[1]):
    name, wall, rss = line.split()
    r[name] = (float(wall), float(rss) / 1024)
for name, (w, m) in r.items():
    print(f"{name:14s} {w:7.2f} s   peak {m:7.1f} MiB   (median)")
faster_file = min(r["podman_file"][0], r["skopeo_file"][0])
faster_pipe = min(r["podman_pipe"][0], r["skopeo_pipe"][0])
print(f"load from a file: gantry/faster peer = {r['gantry_file'][0] / faster_file:.2f}  (target <= 0.50)")
print(f"load from a pipe: gantry/faster peer = {r['gantry_pipe'][0] / faster_pipe:.2f}  (target <= 0.50)")
print(f"save: gantry/podman = {r['gantry_save'][0] / r['podman_save'][0]:.2f}  (target <= 1.00)")
if "gantry_file_overlay2" in r:
    print(f"load from a file, overlay2: gantry/podman overlay = {r['gantry_file_overlay2'][0] / r['podman_file_overlay'][0]:.2f}  (target <= 0.50)")
    print(f"save from overlay2: gantry/podman (vfs) = {r['gantry_save_overlay2'][0] / r['podman_save'][0]:.2f}")
PY
