#!/usr/bin/env bash
# Endpoint rotation on real boringtun: node2 advertises three endpoints, the
# first two black-holed; node1 must walk the list and reach node2 through the
# third. node1 advertises only a dead endpoint, so node2 cannot reach it first
# (which would bring the pair up by WireGuard roaming, without any rotation).
source "$(dirname "$0")/lib.sh"
ks_scenario
ks_node_net 1
ks_node_net 2
# Unassigned addresses on the bridge's subnet: ARP fails, packets vanish.
ks_node_config 1 '  filters:
    endpoints: ["!0.0.0.0/0"]
  extraAnnouncedEndpoints: ["10.99.0.249:51820"]'
ks_node_config 2 '  filters:
    endpoints: ["!0.0.0.0/0"]
  extraAnnouncedEndpoints: ["10.99.0.250:51820", "10.99.0.251:51820", "10.99.0.12:51820"]'
ks_node_start 1
ks_node_start 2
started=$SECONDS
t=$(ks_wait 90 ks_handshakes_with 1 2) || check "node1 reaches node2 through its third endpoint" false
ks_log "info: node1 reached node2 ${t}s after start, through its third endpoint"
ep=$(ks_node_exec 1 wg show kubespan endpoints | awk '{print $2}')
check "node1 uses node2's working endpoint ($ep)" test "$ep" = "10.99.0.12:51820"
check "node1 pings node2 through the tunnel" ks_node_exec 1 ping -c 2 -W 2 -i 0.2 10.99.0.12
check "node1's daemon is still running" kill -0 "${KS_PID[node1]}"
check "node1 still answers wg show" ks_node_exec 1 wg show kubespan
ks_log "PASS rotation ($((SECONDS - started))s)"
