#!/usr/bin/env bash
# Pull benchmark, three image shapes from a local docker-registry, each
# pulled in the same run by:
#   gantry (overlay2 and vfs), containerd (`ctr images pull`, overlayfs
#   snapshotter), podman (`--storage-driver overlay`), and, for the six-layer
#   image, skopeo into containers-storage with vfs.
# Shapes: `bench` (~500 MiB in six layers: thousands of small files and a
# few large ones), `rootfs` (one layer of a Debian system's own files, about
# 50 MB gzipped), `tiny` (60 layers of a few small files).
# Prints wall times (median of BENCH_RUNS, default 3, each from a cold page
# cache), peak memory and ratios, the cost of durable commits, and for the
# six-layer image the floor of `curl | sha256sum` + `igzip -dc | tar -x`, for
# the 60-layer image the time the registry alone takes to serve it (warm,
# with its CPU, and from a cold cache); and, without root, the six-layer
# image pulled by gantry and by rootless podman as a user with subuid ranges;
# and overlay2's two ways of passing layers to the kernel (by descriptor, by
# /proc/self/fd path for kernels before 6.13) in a pull and a `save`.
#
# BENCH_DIR=DIR keeps the generated images between runs.
# BENCH_FS=ext4 puts every tool's store (and the registry's) on a fresh
# ext4 file system with a journal, loop-mounted under BENCH_DIR, instead of
# on the file system BENCH_DIR is on. Where that one is ext4 without a
# journal (this project's build machines), creating an inode scans past
# every inode of its group freed in the last minute or more, so a run pays
# for what the runs before it deleted: the many-layer figures drift within
# a block of runs and depend on the order of the tools.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
require "apt-get install docker-registry skopeo curl isal containerd podman time uidmap" \
    docker-registry skopeo curl igzip containerd ctr podman /usr/bin/time python3 newuidmap
require_root "overlay mounts, containerd"
bench_work
stores=$work
at_exit 'rm -rf "$stores/g" "$stores/gw" "$stores/gs-bench" "$stores/gs-tiny" "$stores/save.tar" "$stores/cs" "$stores/pm" "$stores/floor" "$stores/registry" "$stores/ctd"'
case ${BENCH_FS:-} in
"") ;;
ext4)
    stores=$work/stores
    mkdir -p "$stores"
    rm -f "$work/stores.img"
    truncate -s 32G "$work/stores.img"
    mkfs.ext4 -q -F "$work/stores.img"
    mount -o loop "$work/stores.img" "$stores"
    at_exit 'umount "$stores" && rm -f "$work/stores.img"'
    ;;
*) echo "bench: BENCH_FS=$BENCH_FS: only ext4 is known" >&2; exit 1 ;;
esac
# What the stores are on, for the report (an ext4 journal shows in /proc/fs/jbd2).
stores_fs=$(findmnt -n -o FSTYPE -T "$stores")
if [ "$stores_fs" = ext4 ]; then
    dev=$(basename "$(findmnt -n -o SOURCE -T "$stores")")
    if ls /proc/fs/jbd2 2>/dev/null | grep -q "^$dev-"; then
        stores_fs="ext4 with a journal"
    else
        stores_fs="ext4 without a journal"
    fi
fi
bench_registry "$stores/registry" bench rootfs tiny

# containerd with its own root, state and socket, no CRI.
mkdir -p "$stores/ctd"
cat > "$stores/ctd/config.toml" <<TOML
version = 2
root = "$stores/ctd/root"
state = "$stores/ctd/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$stores/ctd/sock"
TOML
containerd --config "$stores/ctd/config.toml" > "$stores/ctd/log" 2>&1 &
containerd_pid=$!
at_exit 'stop "$containerd_pid"'
for _ in $(seq 100); do [ -S "$stores/ctd/sock" ] && break; sleep 0.1; done
ctr=(ctr -a "$stores/ctd/sock" -n bench)

# Plugins compile once per machine (as after an install), not once per fresh store.
config() { printf 'plugin_cache_dir = "%s"\n%s[transport]\ntype = "v2"\n[driver]\ntype = "%s"\n' "$work/plugin-cache" "${2:-}" "$1" > "$work/$1${2:+-fast}.toml"; }
config overlay2; config vfs; config overlay2 'durable = false
'
for shape in bench rootfs tiny; do
    ref="127.0.0.1:$port/$shape:latest"
    measure "$shape.gantry_overlay2" 'rm -rf "$stores/g"' \
        "$bin/gantry" --root "$stores/g" --config "$work/overlay2.toml" pull -q "$ref"
    measure "$shape.gantry_vfs" 'rm -rf "$stores/g"' \
        "$bin/gantry" --root "$stores/g" --config "$work/vfs.toml" pull -q "$ref"
    rm -rf "$stores/g"
    measure "$shape.containerd" '"${ctr[@]}" images rm --sync "$ref" >/dev/null 2>&1 || true' \
        "${ctr[@]}" images pull --plain-http --snapshotter overlayfs "$ref"
    "${ctr[@]}" images rm --sync "$ref" >/dev/null 2>&1 || true
    measure "$shape.podman" 'rm -rf "$stores/pm"' \
        podman --root "$stores/pm/root" --runroot "$stores/pm/run" --storage-driver overlay \
        --events-backend none pull -q --tls-verify=false "docker://$ref"
    rm -rf "$stores/pm"
done
ref="127.0.0.1:$port/bench:latest"
measure bench.gantry_overlay2_fast 'rm -rf "$stores/g"' \
    "$bin/gantry" --root "$stores/g" --config "$work/overlay2-fast.toml" pull -q "$ref"
rm -rf "$stores/g"
measure bench.skopeo_vfs 'rm -rf "$stores/cs"' skopeo copy --quiet --src-tls-verify=false "docker://$ref" \
    "containers-storage:[vfs@$stores/cs/root+$stores/cs/run]bench:latest"
rm -rf "$stores/cs"

# The two ways overlay2 hands the kernel its layers, side by side and
# interleaved run by run: by descriptor (fsconfig `lowerdir+`, Linux 6.13)
# and by /proc/self/fd/N paths in mount(2)'s options (older kernels;
# GANTRY_OVERLAY_LAYERS=proc-paths forces it here). A pull writes each
# layer's own directory and mounts nothing. `save` of a loaded image (no
# compressed blobs kept to copy) rebuilds each layer's tar from the layer
# mounted over its lowers: the six-layer image, and the 60-layer one for
# deep stacks.
passing() { with=(env GANTRY_OVERLAY_LAYERS="$1" "$bin/gantry" --root "$stores/$2" --config "$work/overlay2.toml"); }
: > "$work/bench.overlay2_pull_fds.runs"
: > "$work/bench.overlay2_pull_proc-paths.runs"
for _ in $(seq "$runs"); do
    for w in fds proc-paths; do
        passing "$w" gw
        measure_once "bench.overlay2_pull_$w" 'rm -rf "$stores/gw"' "${with[@]}" pull -q "$ref"
    done
done
for w in fds proc-paths; do record_median "bench.overlay2_pull_$w"; done
rm -rf "$stores/gw"
for shape in bench tiny; do
    [ -f "$work/$shape.tar" ] ||
        skopeo copy --quiet "oci:$work/$shape:$shape" "docker-archive:$work/$shape.tar:$shape:latest"
    passing fds "gs-$shape"
    "${with[@]}" load -q -i "$work/$shape.tar" >/dev/null
    for w in fds proc-paths; do : > "$work/$shape.overlay2_save_$w.runs"; done
    for _ in $(seq "$runs"); do
        for w in fds proc-paths; do
            passing "$w" "gs-$shape"
            measure_once "$shape.overlay2_save_$w" 'rm -f "$stores/save.tar"' \
                "${with[@]}" save -o "$stores/save.tar" "$shape:latest"
        done
    done
    for w in fds proc-paths; do record_median "$shape.overlay2_save_$w"; done
    rm -rf "$stores/gs-$shape" "$stores/save.tar"
done

# Without root, the six-layer image: gantry (owners recorded; overlay2 in its
# own user namespace, and vfs) against rootless podman (a user with
# subuid/subgid ranges, its user namespace made by newuidmap; overlay, vfs). Both run as that user on the same disk,
# from copies of gantry and its plugins that user may read.
rl_user=gantry-bench
id "$rl_user" >/dev/null 2>&1 ||
    useradd --system --create-home --home-dir "/var/lib/$rl_user" --shell /usr/sbin/nologin "$rl_user"
grep -q "^$rl_user:" /etc/subuid || echo "$rl_user:200000:65536" >> /etc/subuid
grep -q "^$rl_user:" /etc/subgid || echo "$rl_user:200000:65536" >> /etc/subgid
chmod 711 "$work" "$stores"
rl=$stores/rl
at_exit 'rm -rf "$rl"'
mkdir -p "$rl/bin" "$rl/xdg"
cp "$bin/gantry" "$rl/bin/"
cp "$bin/../wasm32-wasip2/release/"gantry_*.wasm "$rl/bin/"
for d in overlay2 vfs; do
    printf 'plugin_dir = "%s"\nplugin_cache_dir = "%s"\n[transport]\ntype = "v2"\n[driver]\ntype = "%s"\n' \
        "$rl/bin" "$rl/plugin-cache" "$d" > "$rl/$d.toml"
done
chown -R "$rl_user" "$rl"
chmod 700 "$rl/xdg"
as_user=(runuser -u "$rl_user" -- env HOME="$rl" XDG_RUNTIME_DIR="$rl/xdg")
"${as_user[@]}" "$rl/bin/gantry" --root "$rl/g" --config "$rl/vfs.toml" plugin ls >/dev/null
for d in overlay2 vfs; do
    measure "bench.gantry_rootless_$d" 'rm -rf "$rl/g"' \
        "${as_user[@]}" "$rl/bin/gantry" --root "$rl/g" --config "$rl/$d.toml" pull -q "$ref"
    rm -rf "$rl/g"
done
for d in overlay vfs; do
    measure "bench.podman_rootless_$d" 'rm -rf "$rl/pm"' \
        "${as_user[@]}" podman --root "$rl/pm/root" --runroot "$rl/pm/run" --storage-driver "$d" \
        --events-backend none --cgroup-manager cgroupfs pull -q --tls-verify=false "docker://$ref"
    rm -rf "$rl/pm"
done

# floor: the six-layer image's blobs through curl | sha256sum and igzip -dc | tar -x
base="http://127.0.0.1:$port/v2/bench"
layers=$(curl -s -H 'Accept: application/vnd.oci.image.manifest.v1+json' "$base/manifests/latest" |
    python3 -c 'import json,sys; print(" ".join(l["digest"] for l in json.load(sys.stdin)["layers"]))')
rm -rf "$stores/floor"; mkdir -p "$stores/floor/blobs" "$stores/floor/root"
cold_cache
t0=$(date +%s.%N)
for d in $layers; do curl -s "$base/blobs/$d" | tee "$stores/floor/blobs/${d#sha256:}" | sha256sum >/dev/null; done
t1=$(date +%s.%N)
for d in $layers; do igzip -dc "$stores/floor/blobs/${d#sha256:}" | tar -x -C "$stores/floor/root"; done
t2=$(date +%s.%N)
rm -rf "$stores/floor"

# floor for the 60-layer image: the registry alone serving its blobs to
# three keep-alive connections (the tools' own concurrency), digests
# checked; the best of three from a warm cache with the CPU the registry
# spends on it, and the median of three from a cold one (as every tool's
# run starts).
read -r tiny_wall tiny_cpu tiny_cold < <(python3 - "$port" "$registry_pid" <<'PY'
import hashlib, http.client, json, os, statistics, sys, threading, time
port, pid = int(sys.argv[1]), sys.argv[2]
def cpu():
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
c = http.client.HTTPConnection("127.0.0.1", port)
c.request("GET", "/v2/tiny/manifests/latest", headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
layers = [l["digest"] for l in json.loads(c.getresponse().read())["layers"]]
def fetch(ds):
    c = http.client.HTTPConnection("127.0.0.1", port)
    for d in ds:
        c.request("GET", f"/v2/tiny/blobs/{d}")
        assert "sha256:" + hashlib.sha256(c.getresponse().read()).hexdigest() == d
def timed():
    c0, t0 = cpu(), time.time()
    ts = [threading.Thread(target=fetch, args=(layers[i::3],)) for i in range(3)]
    [t.start() for t in ts]; [t.join() for t in ts]
    return time.time() - t0, cpu() - c0
fetch(layers)  # warm
best = min(timed() for _ in range(3))
cold = []
for _ in range(3):
    os.sync()
    try:
        open("/proc/sys/vm/drop_caches", "w").write("3")
    except OSError:
        pass
    cold.append(timed()[0])
print(f"{best[0]:.3f} {best[1]:.2f} {statistics.median(cold):.3f}")
PY
)

echo "== stores on $stores_fs"
python3 - "$work/results" "$t0" "$t1" "$t2" "$tiny_wall" "$tiny_cpu" "$tiny_cold" <<'PY'
import sys
r = {}
for line in open(sys.argv[1]):
    name, wall, rss = line.split()
    r[name] = (float(wall), float(rss) / 1024)
t0, t1, t2, tiny_wall, tiny_cpu, tiny_cold = map(float, sys.argv[2:])
targets = {"bench": 0.40, "rootfs": 0.35, "tiny": 0.35}
for shape in ["bench", "rootfs", "tiny"]:
    print(f"== {shape}")
    for tool in ["gantry_overlay2", "gantry_vfs", "containerd", "podman", "gantry_overlay2_fast", "skopeo_vfs",
                 "gantry_rootless_overlay2", "gantry_rootless_vfs", "podman_rootless_overlay",
                 "podman_rootless_vfs"]:
        if f"{shape}.{tool}" in r:
            w, m = r[f"{shape}.{tool}"]
            print(f"  {tool:22s} {w:7.2f} s   peak {m:7.1f} MiB")
    g, c, p = r[f"{shape}.gantry_overlay2"][0], r[f"{shape}.containerd"][0], r[f"{shape}.podman"][0]
    print(f"  gantry overlay2 / containerd {g / c:5.2f}   (target <= {targets[shape]:.2f})")
    print(f"  gantry overlay2 / podman     {g / p:5.2f}")
    print(f"  gantry vfs / containerd      {r[f'{shape}.gantry_vfs'][0] / c:5.2f}")
    print(f"  gantry overlay2 peak memory  {r[f'{shape}.gantry_overlay2'][1]:5.1f} MiB   (target < 64)")
g = r["bench.gantry_overlay2"][0]
fast = r["bench.gantry_overlay2_fast"][0]
dl, inflate = t1 - t0, t2 - t1
floor = dl + inflate
print(f"== bench: durable commits cost {g - fast:+.2f} s ({(g / fast - 1) * 100:+.1f} %) over durable = false")
print(f"== bench: floor curl|sha256sum {dl:.2f} s + igzip -dc|tar -x {inflate:.2f} s = {floor:.2f} s")
print(f"   gantry overlay2 / floor {g / floor:5.2f}   (target <= 1.30)")
print(f"   gantry vfs / skopeo vfs {r['bench.gantry_vfs'][0] / r['bench.skopeo_vfs'][0]:5.2f}")
rlo, rlv = r["bench.gantry_rootless_overlay2"][0], r["bench.gantry_rootless_vfs"][0]
print(f"== bench without root: gantry overlay2 {rlo:.2f} s ({rlo / g:4.2f}x as root), vfs {rlv:.2f} s ({rlv / r['bench.gantry_vfs'][0]:4.2f}x as root)")
print(f"   rootless gantry overlay2 / rootless podman overlay {rlo / r['bench.podman_rootless_overlay'][0]:5.2f}")
print(f"   rootless gantry vfs / rootless podman vfs          {rlv / r['bench.podman_rootless_vfs'][0]:5.2f}")
print("== overlay2's two ways of passing layers (interleaved runs): by descriptor, by /proc/self/fd path")
for name, label in [("bench.overlay2_pull", "six-layer pull"), ("bench.overlay2_save", "six-layer save"),
                    ("tiny.overlay2_save", "60-layer save")]:
    fd, pp = r[f"{name}_fds"][0], r[f"{name}_proc-paths"][0]
    print(f"   {label:15s} fds {fd:6.2f} s   proc-paths {pp:6.2f} s   proc-paths / fds {pp / fd:5.3f}   (target within 5 %)")
print(f"== tiny: the registry alone serves its 60 blobs in {tiny_wall:.2f} s warm, using {tiny_cpu:.2f} s of CPU,")
print(f"   and in {tiny_cold:.2f} s from a cold cache (as each tool's run starts)")
print(f"   gantry overlay2 / the cold floor {r['tiny.gantry_overlay2'][0] / tiny_cold:5.2f}")
PY
