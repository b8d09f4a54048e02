#!/usr/bin/env bash
# The main job on a machine with no internet: start a registry on 127.0.0.1,
# push the example image from examples/demo-rootfs with skopeo, pull it with
# gantry, then list it and show its flattened root filesystem.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
bin=$(dirname "$here")/target/release
work=$(mktemp -d "${TMPDIR:-/tmp}/gantry-demo.XXXXXX")
reg=""
cleanup() { [ -n "$reg" ] && kill "$reg" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
cat > "$work/registry.yml" <<YML
version: 0.1
log: {level: error, accesslog: {disabled: true}}
storage: {filesystem: {rootdirectory: $work/registry}}
http: {addr: 127.0.0.1:$port}
YML
docker-registry serve "$work/registry.yml" >/dev/null 2>&1 &
reg=$!
for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done

"$bin/gen-image" demo "$work/layout" "$here/demo-rootfs"
skopeo copy --quiet --dest-tls-verify=false "oci:$work/layout:latest" "docker://127.0.0.1:$port/demo:latest"

root=${GANTRY_ROOT:-$work/root}
set -x
"$bin/gantry" --root "$root" pull "127.0.0.1:$port/demo:latest"
"$bin/gantry" --root "$root" images
"$bin/gantry" --root "$root" export "127.0.0.1:$port/demo:latest" | tar -tvf -
"$bin/gantry" --root "$root" fsck
