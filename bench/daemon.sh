#!/usr/bin/env bash
# Engine API benchmark: `docker pull` of the ~500 MiB six-layer `bench`
# image through gantry's daemon socket, against the same pull with the
# gantry CLI and a bare `curl` of the same API call (the API's overhead,
# with and without the docker client), and against `docker pull` through
# dockerd (Debian's docker.io, `--iptables=false --bridge=none`) when it is
# installed — all in one run, each from an empty store with a cold page
# cache; medians of BENCH_RUNS (default 3).
#
# BENCH_DIR=DIR keeps the generated image between runs.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
require "apt-get install docker-registry skopeo docker.io time" docker-registry skopeo docker curl /usr/bin/time python3
require_root "overlay mounts, dockerd"
bench_work
at_exit 'rm -rf "$work/registry" "$work/gd" "$work/gc" "$work/dd"'
bench_registry "$work/registry" bench
daemon_pid="" dockerd_pid=""
at_exit 'stop "$daemon_pid"; stop "$dockerd_pid"'
ref="127.0.0.1:$port/bench:latest"
printf 'plugin_cache_dir = "%s"\n[transport]\ntype = "v2"\n[driver]\ntype = "overlay2"\n' "$work/plugin-cache" > "$work/daemon.toml"

# The daemon is restarted on an empty store before each run.
gsock="$work/gd.sock"
fresh_daemon() {
    stop "$daemon_pid"; daemon_pid=""
    rm -rf "$work/gd" "$gsock"
    "$bin/gantry" --root "$work/gd" --config "$work/daemon.toml" daemon --host "unix://$gsock" 2> "$work/gd.log" &
    daemon_pid=$!
    for _ in $(seq 200); do [ -S "$gsock" ] && return 0; sleep 0.05; done
    echo "bench: gantry daemon did not start" >&2; cat "$work/gd.log" >&2; exit 1
}
dsock="$work/dd.sock"
fresh_dockerd() {
    stop "$dockerd_pid"; dockerd_pid=""
    rm -rf "$work/dd" "$dsock"
    mkdir -p "$work/dd"
    dockerd --iptables=false --bridge=none --data-root "$work/dd/root" --exec-root "$work/dd/exec" \
        --pidfile "$work/dd/pid" --host "unix://$dsock" --insecure-registry "127.0.0.1:$port" \
        > "$work/dd/log" 2>&1 &
    dockerd_pid=$!
    for _ in $(seq 300); do DOCKER_HOST="unix://$dsock" docker version >/dev/null 2>&1 && return 0; sleep 0.1; done
    echo "bench: dockerd did not start" >&2; tail -5 "$work/dd/log" >&2; exit 1
}

export DOCKER_CONFIG="$work/docker-config"
fresh_cli() { rm -rf "$work/gc"; }
measure gantry_cli fresh_cli "$bin/gantry" --root "$work/gc" --config "$work/daemon.toml" pull -q "$ref"
measure api_via_gantry fresh_daemon curl -sSf --unix-socket "$gsock" -X POST -o /dev/null \
    "http://gantry/v1.47/images/create?fromImage=127.0.0.1:$port/bench&tag=latest"
measure docker_via_gantry fresh_daemon env DOCKER_HOST="unix://$gsock" docker pull -q "$ref"
if command -v dockerd >/dev/null; then
    measure docker_via_dockerd fresh_dockerd env DOCKER_HOST="unix://$dsock" docker pull -q "$ref"
fi

python3 - "$work/results" <<'PY'
import sys
r = {}
for line in open(sys.argv[1]):
    name, wall, rss = line.split()
    r[name] = float(wall)
print("pull of the six-layer bench image (~500 MiB), median wall s")
for name, t in r.items():
    print(f"  {name:20s} {t:7.2f} s")
print(f"  the API alone (curl) / gantry CLI         {r['api_via_gantry'] / r['gantry_cli']:5.2f}  (the Engine API's own overhead)")
print(f"  docker via gantry's socket / gantry CLI   {r['docker_via_gantry'] / r['gantry_cli']:5.2f}  (with the docker client)")
if "docker_via_dockerd" in r:
    print(f"  docker via gantry / docker via dockerd    {r['docker_via_gantry'] / r['docker_via_dockerd']:5.2f}")
else:
    print("  dockerd is not installed (apt-get install docker.io): no dockerd row")
PY
