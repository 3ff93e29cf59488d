#!/usr/bin/env bash
# Foreign WireGuard: node3's WireGuard is Debian's wireguard-go, started before
# the daemon, which drives it over its UAPI socket (`kubespan.backend:
# external`). It meshes with two nodes on the embedded backend; on SIGTERM the
# daemon removes its peers and plumbing but leaves wireguard-go's link alone.
source "$(dirname "$0")/lib.sh"
ks_require_root
command -v wireguard-go >/dev/null || ks_die "missing tool: wireguard-go (scripts/test installs it)"
ks_scenario
for n in 1 2 3; do ks_node_net "$n"; done
ks_node_start 1
ks_node_start 2
KS_BACKEND=external ks_node_config 3
export KS_NODE_PRE='WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD=1 wireguard-go kubespan >/dev/null 2>&1 &&
    for i in $(seq 50); do [ -S /run/wireguard/kubespan.sock ] && break; sleep 0.1; done'
ks_node_start 3
unset KS_NODE_PRE

t=$(ks_wait 60 ks_full_mesh 1 2 3) || check "node3 (wireguard-go) meshes with the embedded nodes" false
ks_log "info: full mesh ${t}s after start"
check "node3 runs wireguard-go" bash -c "ip netns pids ${KS_PREFIX}n3 | xargs -r ps -o comm= -p | grep -q wireguard-go"
check "node3's status says backend external" \
    bash -c "nsenter --target ${KS_PID[node3]} --net --mount -- $KS_BIN status | grep -qE '^backend: +external'"
check "node3: wg show lists 2 peers" test "$(ks_node_exec 3 wg show kubespan peers | wc -l)" -eq 2
for pair in "1 3" "3 1" "2 3" "3 2"; do
    read -r a b <<<"$pair"
    check "node$a pings node$b's node address" ks_node_exec "$a" ping -c 2 -W 2 -i 0.2 "$(ks_node_ip "$b")"
done

# SIGTERM: our peers and plumbing go, wireguard-go's device stays.
wgpid=$(ip netns pids "${KS_PREFIX}n3" | xargs -r ps -o pid=,comm= -p | awk '$2 == "wireguard-go" {print $1; exit}')
check "node3's daemon exits 0 on SIGTERM" ks_node_stop 3
in3() { nsenter --target "$wgpid" --net --mount -- "$@"; }
check "wireguard-go is still running" kill -0 "$wgpid"
check "its link kubespan is still there" in3 ip link show kubespan
check "its device has no peers left" test -z "$(in3 wg show kubespan peers)"
check "no rule 32500 left" ks_not bash -c "ip netns exec ${KS_PREFIX}n3 ip rule | grep -q 32500"
check "no nftables table left" ks_not ip netns exec "${KS_PREFIX}n3" nft list table inet kubespan
ks_log "PASS foreign"
