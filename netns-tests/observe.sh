#!/usr/bin/env bash
# What a user sees of a running mesh: `kubespan get` (members, peer statuses as
# JSON, identities, --watch), `kubespan status` and a metrics scrape, on three
# real nodes. Asserts their content: every peer up, endpoints set, counters > 0.
source "$(dirname "$0")/lib.sh"
ks_require_root
command -v jq >/dev/null || ks_die "missing tool: jq (scripts/test installs it)"

ks_scenario
for n in 1 2 3; do
    ks_node_net "$n"
    ks_node_start "$n"
done

ks() { local n=$1; shift; ks_node_exec "$n" "$KS_BIN" "$@"; }

all_handshaked() {
    ks_handshakes_with 1 2 3 && ks_handshakes_with 2 1 3 && ks_handshakes_with 3 1 2
}
t=$(ks_wait 60 all_handshaked) || check "every node has a handshake with the other two" false
ks_log "info: full mesh handshaked ${t}s after start"
for n in 2 3; do
    check "node1 pings node$n through the tunnel" ks_node_exec 1 ping -c 3 -W 2 -i 0.2 "$(ks_node_ip "$n")"
done

# The daemon reads WireGuard on its own schedule: wait until it reports both
# peers up with traffic counted.
statuses() { ks 1 get kubespanpeerstatuses -o json | jq -s .; }
peers_counted() {
    [[ $(statuses | jq '[.[] | select(.spec.state == "up" and .spec.receiveBytes > 0 and .spec.transmitBytes > 0)] | length') == 2 ]]
}
t=$(ks_wait 30 peers_counted) || check "node1 reports 2 peers up with rx/tx > 0: $(statuses)" false
ks_log "info: node1's API showed both peers up with traffic ${t}s after the pings"

json=$(statuses)
check "kubespanpeerstatuses -o json: 2 statuses" test "$(jq length <<<"$json")" -eq 2
for n in 2 3; do
    ip=$(ks_node_ip "$n")
    check "kubespanpeerstatuses: node$n up at endpoint $ip:51820" \
        test "$(jq -r --arg l "node$n" '.[] | select(.spec.label == $l) | "\(.spec.state) \(.spec.endpoint)"' <<<"$json")" = "up $ip:51820"
done
check "kubespanpeerstatuses: IDs are the peers' public keys" \
    test "$(jq -r '.[].metadata.id' <<<"$json" | sort)" = "$(for n in 2 3; do ks_node_exec "$n" wg show kubespan public-key; done | sort)"
check "kubespanpeerstatuses: versions count changes (>= 1)" \
    test "$(jq '[.[] | select(.metadata.version >= 1)] | length' <<<"$json")" -eq 2

members=$(ks 1 get members)
ks_log "info: kubespan get members:"$'\n'"$members"
check "get members: a header with talosctl's columns" \
    grep -qE "^NAMESPACE +TYPE +ID +VERSION +HOSTNAME +MACHINE TYPE +OS +ADDRESSES" <<<"$members"
for n in 1 2 3; do
    check "get members: node$n is a worker with its address" \
        grep -qE "^cluster +Member +node$n +[0-9]+ +node$n +worker +.*\[\"$(ks_node_ip "$n")\"[],]" <<<"$members"
done

ksi=$(ks 1 get ksi -o yaml)
check "get ksi: no private key unless asked" ks_not grep -q privateKey <<<"$ksi"
check "get ksi: the public key wg shows" grep -qF "$(ks_node_exec 1 wg show kubespan public-key)" <<<"$ksi"
secret=$(ks 1 get ksi --show-secrets -o json | jq -r .spec.privateKey)
check "get ksi --show-secrets: the private key wg uses" \
    test "$secret" = "$(ks_node_exec 1 wg show kubespan private-key)"
raw=$(ks 1 get affiliates -n cluster-raw)
check "get affiliates -n cluster-raw: service/<id> of both peers" test "$(grep -c ' service/' <<<"$raw")" -eq 2

status=$(ks 1 status)
ks_log "info: kubespan status:"$'\n'"$status"
check "status: healthy, 2 of 2 peers up" grep -q "healthy: 2 of 2 peers up" <<<"$status"
check "status: discovery connected" grep -q "discovery: *http://$KS_DISCOVERY_IP:$KS_DISCOVERY_PORT: connected" <<<"$status"
check "status: backend userspace" grep -qE "^backend: +userspace" <<<"$status"
for n in 2 3; do
    check "status: node$n up at its endpoint" grep -qE "^node$n +up +$(ks_node_ip "$n"):51820 " <<<"$status"
done

# Metrics: Prometheus text on the node's loopback.
scrape() {
    ks_node_exec 1 bash -c 'exec 3<>/dev/tcp/127.0.0.1/2123 &&
        printf "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" >&3 && cat <&3'
}
metrics=$(scrape)
check "metrics: 2 peers up" grep -q '^kubespan_peers{state="up"} 2$' <<<"$metrics"
check "metrics: none down" grep -q '^kubespan_peers{state="down"} 0$' <<<"$metrics"
check "metrics: every peer_up is 1" test "$(grep -c '^kubespan_peer_up{.*} 1$' <<<"$metrics")" -eq 2
check "metrics: discovery connected" grep -q '^kubespan_discovery_connected 1$' <<<"$metrics"
check "metrics: bytes received from node2" \
    grep -qE '^kubespan_peer_receive_bytes_total\{.*label="node2"\} [1-9]' <<<"$metrics"

# --watch: the current statuses, then updates as counters move.
ks_node_exec 1 timeout 14 "$KS_BIN" get kubespanpeerstatuses --watch >"$KS_TMP/watch.txt" 2>&1 &
watcher=$!
sleep 1
ks_node_exec 1 ping -c 20 -i 0.2 -W 2 "$(ks_node_ip 2)" >/dev/null
wait "$watcher" || true
watched=$(cat "$KS_TMP/watch.txt")
check "get --watch: starts with the 2 current statuses" test "$(grep -c '^created ' <<<"$watched")" -eq 2
check "get --watch: shows an update when counters move" grep -q '^updated .* node2 ' <<<"$watched"

# Errors a user can act on.
err=$(ks 1 get pods 2>&1) && check "get pods fails" false
check "get pods: names the known resources" grep -q "unknown resource.*kubespanpeerstatuses" <<<"$err"
err=$(ks 1 status --socket /run/nothing.sock 2>&1) && check "status on a missing socket fails" false
check "status on a missing socket: says the daemon is not running" grep -q "daemon is not running" <<<"$err"
# As nobody (from a copy of the binary nobody may run, wherever the repo is).
unpriv=$(mktemp -d /tmp/kubespan-unpriv.XXXXXX)
chmod 755 "$unpriv" && install -m 755 "$KS_BIN" "$unpriv/kubespan"
rc=0
err=$(ks_node_exec 1 setpriv --reuid=65534 --regid=65534 --clear-groups "$unpriv/kubespan" status 2>&1) || rc=$?
rm -rf "$unpriv"
((rc != 0)) || check "status as an unprivileged user fails" false
check "status as an unprivileged user: permission denied, run as root" grep -q "permission denied.*root" <<<"$err"

# Logs never carry a secret: not the cluster secret, not the private key.
for n in 1 2 3; do
    key=$(ks_node_exec "$n" wg show kubespan private-key)
    check "node$n: the log has neither the cluster secret nor the private key" \
        ks_not grep -qF -e "$KS_CLUSTER_SECRET" -e "$key" "$KS_TMP/node$n/daemon.log"
done

ks_log "PASS observe"
