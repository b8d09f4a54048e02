# Sourced by the demo and the benchmarks: start_registry DIR [PORT [CERT KEY]]
# starts Debian's docker-registry on 127.0.0.1 (on PORT, else a free port;
# HTTPS with CERT and KEY when given) with its storage in DIR, sets
# $registry_port and $registry_pid, and waits until it accepts connections.
start_registry() {
    local dir=$1 tls="" config
    registry_port=${2:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
    [ -n "${3:-}" ] && tls=", tls: {certificate: $3, key: $4}"
    mkdir -p "$dir"
    config=$dir/registry-$registry_port.yml
    cat > "$config" <<YML
version: 0.1
log: {level: error, accesslog: {disabled: true}}
storage: {filesystem: {rootdirectory: $dir/data}}
http: {addr: "127.0.0.1:$registry_port"$tls}
YML
    docker-registry serve "$config" >/dev/null 2>&1 &
    registry_pid=$!
    for _ in $(seq 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$registry_port") 2>/dev/null && return 0
        sleep 0.1
    done
    echo "docker-registry did not start" >&2
    return 1
}
