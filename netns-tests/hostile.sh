#!/usr/bin/env bash
# Hostile data: a client that knows the cluster ID but not the secret
# publishes junk into the cluster (random blobs, endpoints that decrypt to a
# bogus length byte or have the wrong size, and junk under a real node's ID).
# No daemon crashes, the real nodes keep their tunnels, the junk is counted,
# and the node whose ID was hijacked publishes its record again at once.
source "$(dirname "$0")/lib.sh"
ks_require_root
command -v jq >/dev/null || ks_die "missing tool: jq (scripts/test installs it)"
junk=$(dirname "$KS_BIN")/examples/junk_publisher
[[ -x $junk ]] || ks_die "no $junk (cargo build --all-targets)"

ks_scenario
for n in 1 2 3; do
    ks_node_net "$n"
    ks_node_start "$n"
done
t=$(ks_wait 60 ks_full_mesh 1 2 3) || check "full mesh before the junk" false
ks_log "info: full mesh ${t}s after start"

victim=$(ks_node_exec 2 "$KS_BIN" get identities -o json | jq -r .spec.nodeId)
ks_log "info: publishing junk for 4 s, also under node2's ID $victim"
ks_nsx "$KS_HUB" "$junk" "http://$KS_DISCOVERY_IP:$KS_DISCOVERY_PORT" "$KS_CLUSTER_ID" "$victim" 20 >"$KS_TMP/junk.log" 2>&1 &
junk_pid=$!
for n in 1 3; do
    check "while the junk flows: node$n pings node2" ks_node_exec "$n" ping -c 5 -W 2 -i 0.3 "$(ks_node_ip 2)"
done
wait "$junk_pid" || check "the junk publisher ran ($(cat "$KS_TMP/junk.log"))" false
ks_log "info: $(cat "$KS_TMP/junk.log")"

for n in 1 2 3; do
    check "node$n's daemon is still running" kill -0 "${KS_PID[node$n]}"
    check "node$n still has exactly 2 peers" test "$(ks_node_exec "$n" wg show kubespan peers | wc -l)" -eq 2
done
check "the mesh is still whole" ks_full_mesh 1 2 3
for a in 1 2 3; do
    for b in 1 2 3; do
        [[ $a == "$b" ]] && continue
        check "node$a pings node$b" ks_node_exec "$a" ping -c 2 -W 2 -i 0.2 "$(ks_node_ip "$b")"
    done
done

skipped=$(ks_node_exec 1 "$KS_BIN" status -o json | jq .affiliatesSkipped)
check "node1 counted the junk ($skipped affiliates skipped)" test "$skipped" -gt 0
metrics=$(ks_node_exec 1 bash -c 'exec 3<>/dev/tcp/127.0.0.1/2123 &&
    printf "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" >&3 && cat <&3')
check "node1's metrics count undecryptable affiliates" \
    grep -qE '^kubespan_affiliates_skipped_total\{reason="decrypt"\} [1-9]' <<<"$metrics"
check "node1's log names the junk" grep -q "decryption failure" "$KS_TMP/node1/daemon.log"
check "node2 noticed its record was overwritten and published it again" \
    grep -q "overwrote or deleted this node's record" "$KS_TMP/node2/daemon.log"

# A node with no state learns everyone from the service: node2's record there
# must be node2's own again.
ks_node_net 4
ks_node_start 4
t=$(ks_wait 60 ks_full_mesh 1 2 3 4) || check "a new node meshes with all three, node2 included" false
ks_log "info: node4 meshed with all ${t}s after its start"
ks_log "PASS hostile"
