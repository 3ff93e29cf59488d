#!/usr/bin/env bash
# Join, leave and restart on a 5-node mesh: a 6th node joins and is reached by
# all; one node runs `kubespan leave` and is gone from every other node's
# WireGuard at once; another is stopped with SIGTERM and started again: the
# others keep it as a peer throughout and traffic to it resumes within seconds.
source "$(dirname "$0")/lib.sh"
ks_scenario
for n in 1 2 3 4 5; do
    ks_node_net "$n"
    ks_node_start "$n"
done
t=$(ks_wait 90 ks_full_mesh 1 2 3 4 5) || check "5-node full mesh" false
ks_log "info: 5-node full mesh ${t}s after start"

ks_node_net 6
ks_node_start 6
t=$(ks_wait 60 ks_full_mesh 1 2 3 4 5 6) || check "node6 joins the mesh" false
ks_log "info: node6 meshed with all 5 within ${t}s of its start"
for n in 1 2 3 4 5; do
    check "node$n pings node6" ks_node_exec "$n" ping -c 2 -W 2 -i 0.2 "$(ks_node_ip 6)"
done

# node5 leaves: every other node drops it at once (not after the 30-min TTL).
key5=$(ks_node_exec 5 wg show kubespan public-key)
left=$SECONDS
check "node5: kubespan leave succeeds" \
    ip netns exec "${KS_PREFIX}n5" "$KS_BIN" leave --config "$KS_TMP/node5/config.yaml"
unset 'KS_PID[node5]'
gone() { ! ks_node_exec "$1" wg show kubespan peers | grep -qF "$key5"; }
for n in 1 2 3 4 6; do
    t=$(ks_wait 10 gone "$n") || check "node$n drops node5 after it left" false
done
ks_log "info: node5 gone from every other node's wg show $((SECONDS - left))s after kubespan leave"

# node3 restarts (SIGTERM, then start): the others keep it as a peer
# throughout, and traffic to it resumes within seconds of its start.
key3=$(ks_node_exec 3 wg show kubespan public-key)
samplers=()
for n in 1 2 4 6; do samplers+=("$(ks_sample_peers "$n")"); done
sleep 1
check "node3 exits 0 on SIGTERM" ks_node_stop 3
sleep 3
kept() { ks_node_exec "$1" wg show kubespan peers | grep -qF "$key3"; }
for n in 1 2 4 6; do
    check "node$n keeps node3 as a peer while it is down" kept "$n"
done
restarted=${EPOCHREALTIME/./}
ks_node_start 3
reach() { ks_node_exec "$1" ping -c 1 -W 1 "$(ks_node_ip 3)"; }
for n in 1 2 4 6; do
    ks_wait 30 reach "$n" >/dev/null || check "node$n reaches node3 after its restart" false
done
ms=$(((${EPOCHREALTIME/./} - restarted) / 1000))
ks_log "info: traffic to node3 resumed from all 4 nodes ${ms} ms after its start"
kill "${samplers[@]}" 2>/dev/null
wait "${samplers[@]}" 2>/dev/null || true
for n in 1 2 4 6; do
    min=$(awk '{print $2}' "$KS_TMP/peers-$n.txt" | sort -n | head -1)
    check "node$n never dropped below its 4 peers while node3 restarted (minimum $min)" test "$min" -ge 4
done
ks_log "PASS churn"
