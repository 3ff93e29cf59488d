#!/usr/bin/env bash
# Host address changes are picked up from netlink events and republished: a new
# address on node1 shows up in node2's WireGuard allowed IPs for node1 (and in
# its routed set), and a removed one disappears, without any restart.
source "$(dirname "$0")/lib.sh"
ks_scenario
for n in 1 2; do ks_node_net "$n"; ks_node_start "$n"; done
ks_wait 30 ks_handshakes_with 2 1 >/dev/null || check "node2 has a handshake with node1" false

key1=$(ks_node_exec 1 wg show kubespan public-key)
allowed_on_2() { ks_node_exec 2 wg show kubespan allowed-ips | awk -v k="$key1" '$1 == k'; }
has_extra() { allowed_on_2 | grep -q "10.99.1.1/32"; }
lacks_extra() { ! has_extra; }

ks_nsx "${KS_PREFIX}n1" ip addr add 10.99.1.1/24 dev eth0
t=$(ks_wait 10 has_extra) || check "node2 routes node1's new address 10.99.1.1 to node1" false
ks_log "info: node1's new address reached node2's WireGuard in ${t}s"
# The ruleset is applied right after the peers, in the same reconcile.
marks_extra() { ks_nft_routes "$(ks_node_exec 2 nft list table inet kubespan)" 10.99.1.1; }
check "node2 marks the new address into the tunnel" ks_wait 5 marks_extra

ks_nsx "${KS_PREFIX}n1" ip addr del 10.99.1.1/24 dev eth0
t=$(ks_wait 10 lacks_extra) || check "node2 drops node1's removed address" false
ks_log "info: node1's removed address left node2's WireGuard in ${t}s"
check "node2 still reaches node1" ks_node_exec 2 ping -c 2 -W 2 -i 0.2 "$(ks_node_ip 1)"
ks_log "PASS addresses"
