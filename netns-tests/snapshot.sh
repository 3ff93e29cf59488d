#!/usr/bin/env bash
# Discovery restart with a snapshot: the service saves its state on SIGTERM and
# loads it at start. No node may lose a peer at any point, and the nodes
# reconnect and stay in sync with the restarted service.
source "$(dirname "$0")/lib.sh"
KS_SNAPSHOTS=true ks_scenario
nodes=(1 2 3)
for n in "${nodes[@]}"; do
    ks_node_net "$n"
    ks_node_start "$n"
done
t=$(ks_wait 60 ks_full_mesh "${nodes[@]}") || check "full mesh before the restart" false
ks_log "info: full mesh ${t}s after start"

samplers=()
for n in "${nodes[@]}"; do samplers+=("$(ks_sample_peers "$n")"); done
sleep 1

ks_discovery_stop
check "the discovery service saved a snapshot" test -s "$KS_TMP/discovery.binpb"
sleep 2
restarted=$SECONDS
KS_SNAPSHOTS=true ks_discovery_start
check "the restarted service loaded the snapshot" grep -q "snapshot loaded" "$KS_TMP/discovery.log"

ks_service_resynced "$restarted" 60 "${nodes[@]}"
sleep 1
kill "${samplers[@]}" 2>/dev/null
wait "${samplers[@]}" 2>/dev/null || true

for n in "${nodes[@]}"; do
    f=$KS_TMP/peers-$n.txt
    samples=$(wc -l <"$f")
    min=$(awk '{print $2}' "$f" | sort -n | head -1)
    check "node$n never had fewer than 2 peers ($samples samples, minimum $min)" \
        test "$samples" -gt 20 -a "$min" -ge 2
done
for n in 2 3 4; do
    check "node1 pings node$n" ks_node_exec 1 ping -c 2 -W 2 -i 0.2 "$(ks_node_ip "$n")"
done
ks_log "PASS snapshot"
