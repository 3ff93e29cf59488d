#!/usr/bin/env bash
# Discovery outage: with the service down, tunnels keep carrying traffic and a
# node restarted meanwhile restores its peers from its state directory. The
# service then comes back EMPTY (no snapshot): every node republishes on its
# own, with no restart, so a node joining afterwards meshes with all of them.
source "$(dirname "$0")/lib.sh"
ks_scenario
nodes=(1 2 3)
for n in "${nodes[@]}"; do
    ks_node_net "$n"
    ks_node_start "$n"
done
t=$(ks_wait 60 ks_full_mesh "${nodes[@]}") || check "full mesh before the outage" false
ks_log "info: full mesh ${t}s after start"

ks_discovery_stop
ks_log "info: discovery service stopped"
down=$SECONDS
for a in "${nodes[@]}"; do
    for b in "${nodes[@]}"; do
        [[ $a == "$b" ]] && continue
        check "service down: node$a pings node$b through the tunnel" \
            ks_node_exec "$a" ping -c 2 -W 2 -i 0.2 "$(ks_node_ip "$b")"
    done
done

# Restart node2 while the service is still down.
key2=$(ks_node_exec 2 wg show kubespan public-key)
check "node2 stops on SIGTERM" ks_node_stop 2
ks_node_start 2
t=$(ks_wait 60 ks_handshakes_with 2 1 3) || check "node2 restored its peers from its state directory" false
ks_log "info: node2 back with both peers ${t}s after its restart, service still down"
check "node2 kept its key" test "$(ks_node_exec 2 wg show kubespan public-key)" = "$key2"
for b in 1 3; do
    check "node2 pings node$b with the service down" ks_node_exec 2 ping -c 2 -W 2 -i 0.2 "$(ks_node_ip "$b")"
done
check "node2's status says discovery is not connected" \
    bash -c "nsenter --target ${KS_PID[node2]} --net --mount -- $KS_BIN status | grep -q 'NOT connected'"

# The service comes back with no state at all, after a long enough outage for
# the nodes' reconnect backoff to have grown.
while ((SECONDS - down < 12)); do sleep 1; done
rm -f "$KS_TMP/discovery.binpb"
ks_discovery_start
ks_log "info: discovery service back, empty, after $((SECONDS - down))s"
back=$SECONDS
ks_service_resynced "$back" 90 "${nodes[@]}"
for n in 1 2 3; do
    check "node4 pings node$n" ks_node_exec 4 ping -c 2 -W 2 -i 0.2 "$(ks_node_ip "$n")"
done
ks_log "PASS outage"
