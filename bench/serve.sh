#!/usr/bin/env bash
# Registry serving benchmark: `gantry serve --from-store` against Debian's
# docker-registry (CNCF distribution), the same image in both, in the same
# run, with wrk as the load generator:
#   - big-blob GET throughput, 4 connections (the largest layer of the
#     six-layer `bench` image, ~74 MB), BENCH_SECONDS each (default 10);
#   - manifest GET by tag, 32 connections;
# and both rows again over TLS (each server with the same self-signed
# P-256 certificate): HTTP/1.1 with wrk, HTTP/2 with h2load (nghttp2; the
# big blob on 4 connections of one stream each, manifests on 32 connections
# of 8 streams each).
# gantry writes its access log (to a file); docker-registry's is disabled,
# as the shared registry script configures it.
#
# BENCH_DIR=DIR keeps the generated image between runs.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
require "apt-get install docker-registry skopeo curl wrk nghttp2-client openssl" docker-registry skopeo curl wrk h2load openssl python3
bench_work
at_exit 'rm -rf "$work/registry" "$work/serve-root"'
bench_registry "$work/registry" bench

# The same image pulled into a store, served from it.
printf 'plugin_cache_dir = "%s"\n[transport]\ntype = "v2"\n[driver]\ntype = "vfs"\n' "$work/plugin-cache" > "$work/serve.toml"
"$bin/gantry" --root "$work/serve-root" --config "$work/serve.toml" pull -q "127.0.0.1:$port/bench:latest" >/dev/null
# start_serve LOG SCHEME ARGS...: `gantry ARGS --listen 127.0.0.1:0` (ARGS
# end with `serve …`), its stderr in LOG; sets $served_pid and $served_addr.
start_serve() {
    local log=$1 scheme=$2
    shift 2
    "$bin/gantry" "$@" --listen 127.0.0.1:0 2> "$log" &
    served_pid=$!
    at_exit "stop $served_pid"
    for _ in $(seq 200); do grep -q "listening on" "$log" && break; sleep 0.05; done
    served_addr=$(sed -n "s|^gantry serve: listening on $scheme://||p" "$log")
    [ -n "$served_addr" ] || { echo "bench: gantry serve did not start" >&2; cat "$log" >&2; exit 1; }
}
start_serve "$work/serve.log" http --root "$work/serve-root" --config "$work/serve.toml" serve --from-store
gantry_addr=$served_addr

# The same two over TLS: docker-registry on the same storage, gantry serve
# on the same store, one certificate for both.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=127.0.0.1 \
    -addext subjectAltName=IP:127.0.0.1 -keyout "$work/tls.key" -out "$work/tls.crt" 2>/dev/null
plain_port=$port
plain_pid=$registry_pid
start_registry "$work/registry" "" "$work/tls.crt" "$work/tls.key"
at_exit "stop $registry_pid"
tls_port=$registry_port
registry_pid=$plain_pid
start_serve "$work/serve-tls.log" https --root "$work/serve-root" --config "$work/serve.toml" serve --from-store \
    --tls-cert "$work/tls.crt" --tls-key "$work/tls.key"
gantry_tls_addr=$served_addr
port=$plain_port

accept='Accept: application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json'
read -r blob size < <(curl -s -H "$accept" "http://127.0.0.1:$port/v2/bench/manifests/latest" |
    python3 -c 'import json,sys; l=max(json.load(sys.stdin)["layers"], key=lambda l: l["size"]); print(l["digest"], l["size"])')
secs=${BENCH_SECONDS:-10}

# wrk_rate CONNECTIONS URL: wrk's summary, requests/s and bytes/s.
wrk_rate() {
    local out
    out=$(wrk -t2 -c"$1" -d"${secs}s" -H "$accept" "$2")
    python3 - "$out" <<'PY'
import re, sys
out = sys.argv[1]
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
m = re.search(r"Transfer/sec:\s+([\d.]+)([KMG]?B)", out)
bps = float(m.group(1)) * {"B": 1, "KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30}[m.group(2)]
errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
if errors:
    sys.exit(f"bench: {errors.group(1)} failed responses")
print(rps, bps)
PY
}

# h2_rate CONNECTIONS STREAMS URL: h2load's requests/s and bytes/s over HTTP/2.
h2_rate() {
    local out
    out=$(h2load -D "$secs" -c"$1" -m"$2" -H "$accept" "$3")
    python3 - "$out" <<'PY'
import re, sys
out = sys.argv[1]
if re.search(r"ALPN.*not.*negotiated|No protocol negotiated", out, re.I) or "h2" not in out:
    sys.exit(f"bench: h2load did not speak HTTP/2:\n{out}")
m = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s, ([\d.]+)([KMG]?B)/s", out)
st = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
if not m or not st or int(st.group(3)) + int(st.group(4)):
    sys.exit(f"bench: h2load failed:\n{out}")
print(float(m.group(1)), float(m.group(2)) * {"B": 1, "KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30}[m.group(3)])
PY
}

echo "big blob: $blob ($size bytes); $secs s per measurement"
declare -A rps bps
for who in registry gantry; do
    addr="127.0.0.1:$port"
    [ "$who" = gantry ] && addr=$gantry_addr
    # Warm the page cache for both alike.
    curl -s -o /dev/null "http://$addr/v2/bench/blobs/$blob"
    read -r _ b < <(wrk_rate 4 "http://$addr/v2/bench/blobs/$blob")
    bps[$who]=$b
    read -r r _ < <(wrk_rate 32 "http://$addr/v2/bench/manifests/latest")
    rps[$who]=$r
done

for who in registry gantry; do
    addr="127.0.0.1:$tls_port"
    [ "$who" = gantry ] && addr=$gantry_tls_addr
    curl -sk -o /dev/null "https://$addr/v2/bench/blobs/$blob"
    read -r _ b < <(wrk_rate 4 "https://$addr/v2/bench/blobs/$blob")
    bps[tls1-$who]=$b
    read -r r _ < <(wrk_rate 32 "https://$addr/v2/bench/manifests/latest")
    rps[tls1-$who]=$r
    read -r _ b < <(h2_rate 4 1 "https://$addr/v2/bench/blobs/$blob")
    bps[tls2-$who]=$b
    read -r r _ < <(h2_rate 32 8 "https://$addr/v2/bench/manifests/latest")
    rps[tls2-$who]=$r
done

python3 - "${bps[registry]}" "${bps[gantry]}" "${rps[registry]}" "${rps[gantry]}" \
    "${bps[tls1-registry]}" "${bps[tls1-gantry]}" "${rps[tls1-registry]}" "${rps[tls1-gantry]}" \
    "${bps[tls2-registry]}" "${bps[tls2-gantry]}" "${rps[tls2-registry]}" "${rps[tls2-gantry]}" <<'PY'
import sys
v = list(map(float, sys.argv[1:]))
for (label, (breg, bgan, rreg, rgan)) in [("plain HTTP/1.1", v[0:4]), ("TLS HTTP/1.1  ", v[4:8]), ("TLS HTTP/2    ", v[8:12])]:
    print(f"{label} big blob GET, 4 connections:   docker-registry {breg / 1e9:6.2f} GB/s   gantry {bgan / 1e9:6.2f} GB/s   gantry/registry {bgan / breg:5.2f}   (target >= 1.0)")
    print(f"{label} manifest GET, 32 connections:  docker-registry {rreg:8.0f} /s    gantry {rgan:8.0f} /s    gantry/registry {rgan / rreg:5.1f}   (target >= 10)")
PY

# --- On an object store: gantry serve with `[serve.storage] type = "s3"`
# against docker-registry with its s3 driver (`redirect: disable`, both
# streaming), each on its own bucket of one SeaweedFS (`make deps` puts it
# in target/oras-venv), in this same run:
#   - a push of a 500 MiB single-layer image (incompressible) with skopeo;
#   - big-blob GET throughput (that layer), 4 connections;
#   - manifest GET by tag, 32 connections;
#   - gantry serve's peak RSS while 64 connections pull that blob.
weed=$(dirname "$here")/target/oras-venv/bin/weed
[ -x "$weed" ] || { echo "bench: $weed is required (make deps)" >&2; exit 1; }
s3port=$(python3 -c 'import socket
for _ in range(200):
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close()
    ok = True
    for q in range(p, p + 8):
        t = socket.socket()
        try: t.bind(("127.0.0.1", q))
        except OSError: ok = False
        t.close()
    if ok and p + 8 < 65536: print(p); break')
mkdir -p "$work/weed"
rm -rf "$work/weed/data"; mkdir -p "$work/weed/data"
printf '{"identities":[{"name":"bench","credentials":[{"accessKey":"benchkey","secretKey":"benchsecret"}],"actions":["Admin","Read","Write","List","Tagging"]}]}\n' > "$work/weed/s3.json"
"$weed" server -ip=127.0.0.1 -ip.bind=127.0.0.1 -master.telemetry=false -dir="$work/weed/data" \
    -master.port=$s3port -master.port.grpc=$((s3port + 1)) -volume.port=$((s3port + 2)) \
    -volume.port.grpc=$((s3port + 3)) -filer.port=$((s3port + 4)) -filer.port.grpc=$((s3port + 5)) \
    -s3 -s3.port=$((s3port + 6)) -s3.port.grpc=$((s3port + 7)) -s3.config="$work/weed/s3.json" \
    -s3.port.iceberg=0 -s3.port.lance=0 -volume.max=32 -master.volumeSizeLimitMB=1024 > "$work/weed/weed.log" 2>&1 &
weed_pid=$!
at_exit 'stop "$weed_pid"'
s3=http://127.0.0.1:$((s3port + 6))
for b in gantry distribution; do
    for _ in $(seq 200); do
        code=$(curl -s -o /dev/null -w '%{http_code}' --aws-sigv4 "aws:amz:us-east-1:s3" --user benchkey:benchsecret -X PUT "$s3/$b" || true)
        [ "$code" = 200 ] || [ "$code" = 409 ] && break
        sleep 0.2
    done
done

printf 'plugin_cache_dir = "%s"\n[serve.storage]\ntype = "s3"\nendpoint = "%s"\nbucket = "gantry"\npath_style = true\naccess_key = "benchkey"\nsecret_key = "benchsecret"\n' \
    "$work/plugin-cache" "$s3" > "$work/serve-s3.toml"
start_serve "$work/serve-s3.log" http --root "$work/serve-s3-root" --config "$work/serve-s3.toml" serve
gantry_s3_addr=$served_addr
serve_s3_pid=$served_pid
# A second replica on the same bucket, answering manifests from memory for
# a second (`manifest_cache_ms = 1000`: another replica's tag shows within it).
sed 's/^secret_key = .*/&\nmanifest_cache_ms = 1000/' "$work/serve-s3.toml" > "$work/serve-s3-cached.toml"
start_serve "$work/serve-s3-cached.log" http --root "$work/serve-s3-cached-root" --config "$work/serve-s3-cached.toml" serve
gantry_s3_cached_addr=$served_addr

reg_s3_port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
cat > "$work/registry-s3.yml" <<YML
version: 0.1
log: {level: error, accesslog: {disabled: true}}
storage:
  s3: {accesskey: benchkey, secretkey: benchsecret, region: us-east-1, regionendpoint: "$s3", bucket: distribution, secure: false, v4auth: true}
  redirect: {disable: true}
http: {addr: "127.0.0.1:$reg_s3_port"}
YML
# distribution 2.8's S3 driver refuses to start with AWS_CA_BUNDLE set.
env -u AWS_CA_BUNDLE docker-registry serve "$work/registry-s3.yml" > "$work/registry-s3.log" 2>&1 &
reg_s3_pid=$!
at_exit 'stop "$reg_s3_pid"'
for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$reg_s3_port") 2>/dev/null && break; sleep 0.1; done

# Single-layer images of 500 MiB of random bytes (gzip'd: ~500 MiB still),
# one per run (a blob a registry holds already is mounted, not pushed).
for i in $(seq "$runs"); do
    [ -f "$work/big500-$i/index.json" ] && continue
    python3 - "$work/big500-$i" <<'PY'
import gzip, hashlib, json, os, sys
d = sys.argv[1]
os.makedirs(f"{d}/blobs/sha256", exist_ok=True)
def put(data):
    h = hashlib.sha256(data).hexdigest()
    open(f"{d}/blobs/sha256/{h}", "wb").write(data)
    return {"digest": f"sha256:{h}", "size": len(data)}
raw = os.urandom(500 << 20)
# Compressed already, so skopeo sends it as it is (it compresses a plain tar).
l = put(gzip.compress(raw, compresslevel=1)) | {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip"}
diff_id = "sha256:" + hashlib.sha256(raw).hexdigest()
c = put(json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": [diff_id]}}).encode()) | {"mediaType": "application/vnd.oci.image.config.v1+json"}
m = put(json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json", "config": c, "layers": [l]}).encode()) | {"mediaType": "application/vnd.oci.image.manifest.v1+json"}
m["annotations"] = {"org.opencontainers.image.ref.name": "big"}
json.dump({"schemaVersion": 2, "manifests": [m]}, open(f"{d}/index.json", "w"))
open(f"{d}/oci-layout", "w").write('{"imageLayoutVersion":"1.0.0"}')
PY
done
big_blob=$(python3 -c 'import json,sys; d=sys.argv[1]; m=json.load(open(d+"/index.json"))["manifests"][0]["digest"].split(":")[1]; print(json.load(open(d+"/blobs/sha256/"+m))["layers"][0]["digest"])' "$work/big500-1")

# The 500 MiB push, runs interleaved, each to a repository of its own.
: > "$work/push-s3-registry.runs"; : > "$work/push-s3-gantry.runs"
for i in $(seq "$runs"); do
    for who in registry gantry; do
        addr=127.0.0.1:$reg_s3_port
        [ "$who" = gantry ] && addr=$gantry_s3_addr
        measure_once "push-s3-$who" "" skopeo copy --quiet --dest-tls-verify=false \
            "oci:$work/big500-$i:big" "docker://$addr/big$i:latest"
    done
done
push_median() { sort -n "$work/$1.runs" | sed -n "$((($(wc -l < "$work/$1.runs") + 1) / 2))p" | cut -d' ' -f1; }
push_reg=$(push_median push-s3-registry)
push_gan=$(push_median push-s3-gantry)

for who in registry gantry; do
    addr=127.0.0.1:$reg_s3_port
    [ "$who" = gantry ] && addr=$gantry_s3_addr
    curl -s -o /dev/null "http://$addr/v2/big1/blobs/$big_blob"
    read -r _ b < <(wrk_rate 4 "http://$addr/v2/big1/blobs/$big_blob")
    bps[s3-$who]=$b
    read -r r _ < <(wrk_rate 32 "http://$addr/v2/big1/manifests/latest")
    rps[s3-$who]=$r
done

read -r r _ < <(wrk_rate 32 "http://$gantry_s3_cached_addr/v2/big1/manifests/latest")
rps[s3-gantry-cached]=$r

# gantry serve's peak RSS while 64 clients pull the 500 MiB blob.
wrk -t2 -c64 -d"${secs}s" "http://$gantry_s3_addr/v2/big1/blobs/$big_blob" > "$work/wrk64.out"
hwm=$(awk '/VmHWM/ {print $2}' "/proc/$serve_s3_pid/status")

python3 - "${bps[s3-registry]}" "${bps[s3-gantry]}" "${rps[s3-registry]}" "${rps[s3-gantry]}" "$push_reg" "$push_gan" "$hwm" "${rps[s3-gantry-cached]}" <<'PY'
import sys
breg, bgan, rreg, rgan, preg, pgan, hwm, rcached = map(float, sys.argv[1:])
print(f"S3 (SeaweedFS) big blob GET, 4 connections:  docker-registry {breg / 1e9:6.2f} GB/s   gantry {bgan / 1e9:6.2f} GB/s   gantry/registry {bgan / breg:5.2f}   (target >= 1.0)")
print(f"S3 (SeaweedFS) manifest GET, 32 connections: docker-registry {rreg:8.0f} /s    gantry {rgan:8.0f} /s    gantry/registry {rgan / rreg:5.1f}   (target >= 10)")
print(f"S3 (SeaweedFS) manifest GET, 32 connections, gantry with manifest_cache_ms = 1000: {rcached:8.0f} /s    gantry/registry {rcached / rreg:5.1f}   (target >= 10)")
print(f"S3 (SeaweedFS) 500 MiB push (skopeo), median: docker-registry {preg:6.2f} s     gantry {pgan:6.2f} s     gantry/registry {pgan / preg:5.2f}   (target <= 1.0)")
print(f"S3 (SeaweedFS) gantry serve peak RSS, 64 clients pulling the 500 MiB blob: {hwm / 1024:.0f} MiB (target < 128)")
PY
