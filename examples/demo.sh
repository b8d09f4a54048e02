#!/usr/bin/env bash
# The main job on a machine with no internet: start a registry on 127.0.0.1,
# push the example image from examples/demo-rootfs with skopeo, pull it with
# gantry, then list it and show its flattened root filesystem.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
bin=$(dirname "$here")/target/release
work=$(mktemp -d "${TMPDIR:-/tmp}/gantry-demo.XXXXXX")
registry_pid=""
cleanup() { [ -n "$registry_pid" ] && kill "$registry_pid" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
. "$(dirname "$here")/scripts/local-registry.sh"
start_registry "$work/registry"
port=$registry_port

"$bin/gen-image" demo "$work/layout" "$here/demo-rootfs"
skopeo copy --quiet --dest-tls-verify=false "oci:$work/layout:latest" "docker://127.0.0.1:$port/demo:latest"

root=${GANTRY_ROOT:-$work/root}
set -x
"$bin/gantry" --root "$root" pull "127.0.0.1:$port/demo:latest"
"$bin/gantry" --root "$root" images
"$bin/gantry" --root "$root" export "127.0.0.1:$port/demo:latest" | tar -tvf -
"$bin/gantry" --root "$root" fsck
