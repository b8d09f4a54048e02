#!/usr/bin/env bash
# A throwaway Ceph object gateway on loopback, for trying `gantry serve`'s
# S3 storage (and the OCI conformance suite) against a second S3
# implementation by hand: one ceph-mon, one ceph-osd on memstore, one
# radosgw, cephx off, pools of size 1, a v1-only monitor map. Not in CI
# (Debian's radosgw, ceph-mon and ceph-osd are large; install them first).
#
#   scripts/radosgw.sh DIR      starts it under DIR, prints the endpoint and
#                               keys as a [serve.storage] table, and stays
#                               in the foreground until interrupted.
set -euo pipefail
dir=${1:?usage: radosgw.sh DIR}
for t in ceph-mon ceph-osd radosgw monmaptool ceph radosgw-admin curl; do
    command -v "$t" >/dev/null || { echo "radosgw.sh: $t is required (apt-get install radosgw ceph-mon ceph-osd)" >&2; exit 1; }
done
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
mon_port=$(free_port)
rgw_port=$(free_port)
fsid=$(cat /proc/sys/kernel/random/uuid)
mkdir -p "$dir"/{mon,osd,run,log}
conf=$dir/ceph.conf
cat > "$conf" <<EOF
[global]
fsid = $fsid
mon host = v1:127.0.0.1:$mon_port
public addr = 127.0.0.1
cluster addr = 127.0.0.1
ms bind msgr2 = false
auth cluster required = none
auth service required = none
auth client required = none
osd pool default size = 1
osd pool default min size = 1
mon allow pool size one = true
mon warn on pool no redundancy = false
osd objectstore = memstore
memstore device bytes = 4294967296
osd data = $dir/osd
mon data = $dir/mon
run dir = $dir/run
log file = $dir/log/\$name.log
admin socket = $dir/run/\$name.asok
paxos propose interval = 0.1
osd crush chooseleaf type = 0
rgw dns name = 127.0.0.1
[client.rgw]
rgw frontends = beast endpoint=127.0.0.1:$rgw_port
EOF
c=(--conf "$conf")
monmaptool --create --fsid "$fsid" --addv a "[v1:127.0.0.1:$mon_port]" "$dir/monmap" >/dev/null
ceph-mon "${c[@]}" --mkfs -i a --monmap "$dir/monmap"
ceph-mon "${c[@]}" -i a
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; pkill -f "$conf" 2>/dev/null || true' EXIT
osd_id=$(ceph "${c[@]}" osd create)
ceph-osd "${c[@]}" -i "$osd_id" --mkfs >/dev/null 2>&1
ceph-osd "${c[@]}" -i "$osd_id"
radosgw "${c[@]}" -n client.rgw
for _ in $(seq 200); do
    curl -s -o /dev/null "http://127.0.0.1:$rgw_port/" && break
    sleep 0.2
done
out=$(radosgw-admin "${c[@]}" user create --uid=gantry --display-name=gantry)
key=$(python3 -c 'import json,sys; k=json.load(sys.stdin)["keys"][0]; print(k["access_key"], k["secret_key"])' <<<"$out")
read -r access secret <<<"$key"
# curl signs the payload only when told its hash (radosgw checks it).
curl -s -o /dev/null --aws-sigv4 "aws:amz:us-east-1:s3" --user "$access:$secret" -X PUT \
    -H "x-amz-content-sha256: e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855" "http://127.0.0.1:$rgw_port/gantry"
cat <<EOF
[serve.storage]
type = "s3"
endpoint = "http://127.0.0.1:$rgw_port"
bucket = "gantry"
path_style = true
access_key = "$access"
secret_key = "$secret"
EOF
echo "radosgw.sh: running; interrupt to stop" >&2
while sleep 3600; do :; done
