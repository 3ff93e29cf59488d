# shellcheck shell=bash
# Shared helpers for the netns tests and the demo: a hub namespace with a bridge
# and the discovery service, and nodes each in their own network namespace and
# mount namespace (userspace WireGuard puts its socket in /var/run/wireguard,
# which is shared by every network namespace otherwise).
#
# Everything a run creates carries the run's prefix, and `ks_cleanup` removes
# all of it; scripts install it as an EXIT trap so a failure leaves nothing.

set -euo pipefail

KS_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
KS_BIN=${KS_BIN:-$KS_ROOT/target/debug/kubespan}
# Short: interface names are limited to 15 characters.
KS_PREFIX=${KS_PREFIX:-ks$$}
KS_TMP=${KS_TMP:-$(mktemp -d "/tmp/kubespan-netns.XXXXXX")}
KS_HUB=${KS_PREFIX}hub
KS_BRIDGE=br0
KS_SUBNET=10.99.0
KS_DISCOVERY_IP=$KS_SUBNET.1
KS_DISCOVERY_PORT=3000
declare -gA KS_PID=()

ks_log() { printf '[%s] %s\n' "$(date +%T)" "$*" >&2; }
ks_die() { ks_log "FAIL: $*"; exit 1; }

# The start of every scenario: root and tools checked, everything removed on
# exit, a fresh cluster, the hub and its discovery service (arguments go to
# ks_discovery_start).
ks_scenario() {
    ks_require_root
    trap ks_cleanup EXIT
    ks_new_cluster
    ks_hub_up
    ks_discovery_start "$@"
}

# Scenarios say `check "what" command...`.
check() { ks_check "$@"; }

# True when node N's daemon reports its discovery session up.
ks_discovery_connected() {
    ks_node_exec "$1" "$KS_BIN" status -o json | jq -e .discovery.connected >/dev/null
}

# Runs a check: logs "ok: <what>", or prints the end of every node's log and
# fails the scenario.
ks_check() {
    local what=$1; shift
    if "$@"; then
        ks_log "ok: $what"
        return 0
    fi
    local log
    for log in "$KS_TMP"/node*/daemon.log; do
        [[ -f $log ]] && { echo "--- ${log#"$KS_TMP"/}:"; tail -20 "$log"; } >&2
    done
    ks_die "$what"
}

ks_require_root() {
    if [[ $(id -u) -ne 0 ]]; then
        echo "SKIP: netns tests need root (network namespaces, veth, nftables); run as root" >&2
        exit 0
    fi
    local missing=()
    for t in ip nsenter unshare wg nft ping; do
        command -v "$t" >/dev/null || missing+=("$t")
    done
    ((${#missing[@]} == 0)) || ks_die "missing tools: ${missing[*]} (scripts/test installs them)"
    [[ -x $KS_BIN ]] || ks_die "no binary at $KS_BIN (cargo build first)"
}

# Removes every process, namespace and file of this run. Safe to call twice.
ks_cleanup() {
    local rc=$?
    set +e
    for name in "${!KS_PID[@]}"; do
        kill -TERM "${KS_PID[$name]}" 2>/dev/null
    done
    for name in "${!KS_PID[@]}"; do
        for _ in $(seq 50); do kill -0 "${KS_PID[$name]}" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "${KS_PID[$name]}" 2>/dev/null
    done
    for ns in $(ip netns list | awk '{print $1}' | grep "^${KS_PREFIX}" || true); do
        ip netns pids "$ns" 2>/dev/null | xargs -r kill -KILL 2>/dev/null
        ip netns del "$ns" 2>/dev/null
    done
    if [[ -n ${KS_KEEP_TMP:-} ]]; then
        ks_log "logs kept in $KS_TMP"
    else
        rm -rf "$KS_TMP"
    fi
    KS_PID=()
    return $rc
}

# Runs a command in a network namespace.
ks_nsx() { local ns=$1; shift; ip netns exec "$ns" "$@"; }

# Runs a command in a node's network AND mount namespaces (where its WireGuard
# socket lives), by entering the namespaces of the node's daemon process.
ks_node_exec() {
    local node=$1; shift
    local pid=${KS_PID[node$node]:-}
    [[ -n $pid ]] || ks_die "node $node is not running"
    nsenter --target "$pid" --net --mount -- "$@"
}

ks_hub_up() {
    ip netns add "$KS_HUB"
    ks_nsx "$KS_HUB" ip link set lo up
    ks_nsx "$KS_HUB" ip link add "$KS_BRIDGE" type bridge
    ks_nsx "$KS_HUB" ip addr add "$KS_DISCOVERY_IP/24" dev "$KS_BRIDGE"
    ks_nsx "$KS_HUB" ip link set "$KS_BRIDGE" up
}

# Starts the discovery service in the hub namespace.
ks_discovery_start() {
    local log=$KS_TMP/discovery.log
    ip netns exec "$KS_HUB" "$KS_BIN" discovery-service \
        --addr "$KS_DISCOVERY_IP:$KS_DISCOVERY_PORT" --landing-addr= --metrics-addr="${KS_DISCOVERY_METRICS:-}" \
        --snapshot-path "$KS_TMP/discovery.binpb" --snapshots-enabled="${KS_SNAPSHOTS:-false}" \
        --rate-limit 0 "$@" >"$log" 2>&1 &
    KS_PID[discovery]=$!
    for _ in $(seq 100); do
        grep -q "discovery service listening" "$log" 2>/dev/null && return 0
        kill -0 "${KS_PID[discovery]}" 2>/dev/null || ks_die "discovery service exited: $(tail -5 "$log")"
        sleep 0.05
    done
    ks_die "discovery service did not start"
}

ks_discovery_stop() {
    local pid=${KS_PID[discovery]:-}
    [[ -n $pid ]] || return 0
    kill -TERM "$pid"
    wait "$pid" 2>/dev/null || true
    unset 'KS_PID[discovery]'
}

# Creates node N's namespace, joined to the hub bridge as $KS_SUBNET.(10+N).
ks_node_net() {
    local n=$1 ns=${KS_PREFIX}n$1
    ip netns add "$ns"
    ks_nsx "$ns" ip link set lo up
    ip link add "${KS_PREFIX}v$n" type veth peer name eth0 netns "$ns"
    ip link set "${KS_PREFIX}v$n" netns "$KS_HUB"
    ks_nsx "$KS_HUB" ip link set "${KS_PREFIX}v$n" master "$KS_BRIDGE" up
    ks_nsx "$ns" ip addr add "$KS_SUBNET.$((10 + n))/24" dev eth0
    ks_nsx "$ns" ip link set eth0 up
}

ks_node_ip() { echo "$KS_SUBNET.$((10 + $1))"; }

# Writes node N's config. Extra YAML for the kubespan section can be passed in
# $2 (indented two spaces).
ks_node_config() {
    local n=$1 extra=${2:-} dir=$KS_TMP/node$1
    mkdir -p "$dir"
    cat >"$dir/config.yaml" <<EOF
cluster:
  id: ${KS_CLUSTER_ID}
  secret: ${KS_CLUSTER_SECRET}
  discovery:
    registries:
      service:
        endpoint: http://$KS_DISCOVERY_IP:$KS_DISCOVERY_PORT
kubespan:
  backend: ${KS_BACKEND:-userspace}
$extra
node:
  stateDir: $dir/state
  nodename: node$n
  hostname: node$n
EOF
}

# Starts node N's daemon in its network namespace and a private mount namespace.
ks_node_start() {
    local n=$1 ns=${KS_PREFIX}n$1 dir=$KS_TMP/node$1
    [[ -f $dir/config.yaml ]] || ks_node_config "$n"
    # A private /run: the node's WireGuard socket (and anything else it keeps
    # there) lives in its own tmpfs and nothing is created on the host's /run.
    # $KS_NODE_PRE, if set, runs there first (a foreign WireGuard, say).
    ip netns exec "$ns" unshare --mount --propagation private -- sh -c '
        mount -n -t tmpfs kubespan-run /run && mkdir -p /run/wireguard &&
        eval "${KS_NODE_PRE:-}" &&
        exec "$0" run --config "$1"' "$KS_BIN" "$dir/config.yaml" >>"$dir/daemon.log" 2>&1 &
    KS_PID[node$n]=$!
}

# Stops node N with SIGTERM and waits for it.
ks_node_stop() {
    local n=$1 pid=${KS_PID[node$1]:-}
    [[ -n $pid ]] || return 0
    kill -TERM "$pid"
    local rc=0
    wait "$pid" || rc=$?
    unset "KS_PID[node$n]"
    ((rc == 0)) || ks_log "node$n exited with status $rc"
    return $rc
}

# Waits until `cmd` succeeds, up to $1 seconds; prints how long it took.
ks_wait() {
    local timeout=$1; shift
    local start=$SECONDS
    while ! "$@" >/dev/null 2>&1; do
        ((SECONDS - start < timeout)) || return 1
        sleep 0.2
    done
    echo $((SECONDS - start))
}

# True when node N's WireGuard has a recent handshake with every other of the
# nodes listed after it.
ks_handshakes_with() {
    local n=$1; shift
    local dump
    dump=$(ks_node_exec "$n" wg show kubespan latest-handshakes) || return 1
    local peers_with_hs
    peers_with_hs=$(awk '$2 > 0' <<<"$dump" | wc -l)
    ((peers_with_hs >= $#))
}

ks_not() { ! "$@"; }

ks_ip2int() { local IFS=.; read -r a b c d <<<"$1"; echo $(((a << 24) + (b << 16) + (c << 8) + d)); }

# True when IPv4 address $2 is in the routed set of the nft table text $1 (the
# `ip daddr ...` of the rule that sets the mark): elements may be addresses,
# prefixes or ranges.
ks_nft_routes() {
    local text=$1 ip
    ip=$(ks_ip2int "$2")
    local line
    line=$(grep -m1 -E "ip daddr .* meta mark set" <<<"$text") || return 1
    line=${line#*ip daddr }
    line=${line%% meta mark set*}
    line=${line//[\{\},]/ }
    for el in $line; do
        local lo hi
        if [[ $el == */* ]]; then
            lo=$(ks_ip2int "${el%/*}")
            hi=$((lo + (1 << (32 - ${el#*/})) - 1))
        elif [[ $el == *-* ]]; then
            lo=$(ks_ip2int "${el%-*}")
            hi=$(ks_ip2int "${el#*-}")
        else
            lo=$(ks_ip2int "$el")
            hi=$lo
        fi
        ((ip >= lo && ip <= hi)) && return 0
    done
    return 1
}

ks_new_cluster() {
    KS_CLUSTER_ID=$(head -c 32 /dev/urandom | base64)
    KS_CLUSTER_SECRET=$(head -c 32 /dev/urandom | base64)
}

# After the discovery service came back (at $SECONDS = $1): every listed node
# reconnects within $2 seconds, and node 4, which has no state and can only learn the others
# from the service, meshes with all of them, which proves they republished.
ks_service_resynced() {
    local since=$1 within=$2; shift 2
    local n t
    for n in "$@"; do
        ks_wait "$within" ks_discovery_connected "$n" >/dev/null || check "node$n reconnects to the discovery service" false
        ks_log "info: node$n reconnected $((SECONDS - since))s after the service came back"
    done
    ks_node_net 4
    ks_node_start 4
    t=$(ks_wait 60 ks_full_mesh "$@" 4) || check "a new node meshes with all, through the service" false
    ks_log "info: node4 joined ${t}s after its start"
}

# True when every listed node has a handshake with every other listed node.
ks_full_mesh() {
    local n
    for n in "$@"; do
        ks_handshakes_with "$n" $(for m in "$@"; do [[ $m == "$n" ]] || echo "$m"; done) || return 1
    done
}

# Records, every 0.2 s until killed, how many peers node N's WireGuard has:
# one line "<epoch ms> <count>" per sample in $KS_TMP/peers-N.txt. Prints the
# sampler's pid.
ks_sample_peers() {
    local n=$1 out=$KS_TMP/peers-$1.txt
    (
        while :; do
            c=$(ks_node_exec "$n" wg show kubespan peers 2>/dev/null | wc -l) || c=err
            echo "${EPOCHREALTIME/./} $c" >>"$out"
            sleep 0.2
        done
    ) >/dev/null 2>&1 &
    echo $!
}
