#!/usr/bin/env bash
# Three nodes and a discovery service on real kernel networking: each node in
# its own network and mount namespace, the real binary with the userspace
# WireGuard backend. Checks what a user would check: wg show, pings through the
# tunnel (and the transfer counters that prove it), ip rule, table 180, the
# nftables table; a node with the wrong secret never becomes a peer; SIGTERM
# leaves nothing behind.
source "$(dirname "$0")/lib.sh"

ks_scenario
for n in 1 2 3; do
    ks_node_net "$n"
    ks_node_start "$n"
done
started=$SECONDS

all_handshaked() {
    ks_handshakes_with 1 2 3 && ks_handshakes_with 2 1 3 && ks_handshakes_with 3 1 2
}
t=$(ks_wait 60 all_handshaked) || check "every node has a handshake with the other two" false
ks_log "info: full mesh handshaked ${t}s after start"

for n in 1 2 3; do
    peers=$(ks_node_exec "$n" wg show kubespan peers | wc -l)
    check "node$n: wg show lists 2 peers" test "$peers" -eq 2
done

# The KubeSpan address of node N, from its own interface.
ks_addr() {
    ks_node_exec "$1" ip -6 -o addr show dev kubespan scope global | awk '{print $4}' | cut -d/ -f1
}

# Bytes received from node $2's peer on node $1.
rx_from() {
    local key
    key=$(ks_node_exec "$2" wg show kubespan public-key)
    ks_node_exec "$1" wg show kubespan transfer | awk -v k="$key" '$1 == k {print $2}'
}

for a in 1 2 3; do
    for b in 1 2 3; do
        [[ $a == "$b" ]] && continue
        addr=$(ks_addr "$b")
        check "node$a pings node$b's KubeSpan address $addr" \
            ks_node_exec "$a" ping -6 -c 2 -W 2 -i 0.2 "$addr"
        before=$(rx_from "$b" "$a")
        ip=$(ks_node_ip "$b")
        check "node$a pings node$b's node address $ip" \
            ks_node_exec "$a" ping -c 5 -W 2 -i 0.2 -s 1000 "$ip"
        after=$(rx_from "$b" "$a")
        # 5 pings of 1000 bytes: node b received > 5000 bytes through the tunnel.
        check "node$a -> node$b node-address traffic went through WireGuard ($before -> $after bytes)" \
            test $((after - before)) -ge 5000
    done
done

for n in 1 2 3; do
    rules=$(ks_node_exec "$n" ip rule)
    check "node$n: ip rule has 32500 fwmark 0x40/0x60 lookup 180" \
        grep -q "^32500:.*fwmark 0x40/0x60 lookup 180" <<<"$rules"
    rules6=$(ks_node_exec "$n" ip -6 rule)
    check "node$n: ip -6 rule has 32500 fwmark 0x40/0x60 lookup 180" \
        grep -q "^32500:.*fwmark 0x40/0x60 lookup 180" <<<"$rules6"
    r4=$(ks_node_exec "$n" ip route show table 180)
    check "node$n: table 180 IPv4 default via kubespan" grep -q "^default dev kubespan" <<<"$r4"
    r6=$(ks_node_exec "$n" ip -6 route show table 180)
    check "node$n: table 180 IPv6 default via kubespan" grep -q "^default dev kubespan" <<<"$r6"
    nft=$(ks_node_exec "$n" nft list table inet kubespan)
    check "node$n: nft table has the prerouting chain" grep -q "hook prerouting" <<<"$nft"
    check "node$n: nft table has the output route chain" grep -q "type route hook output" <<<"$nft"
    others=$(for m in 1 2 3; do [[ $m == "$n" ]] || ks_node_ip "$m"; done)
    for ip in $others; do
        check "node$n: nft routed set has $ip" ks_nft_routes "$nft" "$ip"
    done
    check "node$n: nft routed set does not have its own address" ks_not ks_nft_routes "$nft" "$(ks_node_ip "$n")"
    check "node$n: MSS clamp present" grep -q "maxseg size set" <<<"$nft"
    kind=$(ks_node_exec "$n" ip -d link show kubespan)
    if [[ ${KS_BACKEND:-userspace} == kernel ]]; then
        check "node$n: kernel WireGuard (ip -d link: type wireguard)" grep -q "wireguard" <<<"$kind"
        check "node$n: no userspace WireGuard socket" ks_not ks_node_exec "$n" test -e /var/run/wireguard/kubespan.sock
    else
        check "node$n: userspace WireGuard on a TUN device (ip -d link: tun)" grep -q "tun " <<<"$kind"
    fi
    mtu=$(ks_node_exec "$n" cat /sys/class/net/kubespan/mtu)
    check "node$n: link MTU 1420" test "$mtu" -eq 1420
    rp=$(ks_node_exec "$n" cat /proc/sys/net/ipv4/conf/kubespan/rp_filter)
    check "node$n: rp_filter off on kubespan" test "$rp" -eq 0
done

# A node with the wrong cluster secret never becomes a peer.
ks_node_net 4
good_secret=$KS_CLUSTER_SECRET
KS_CLUSTER_SECRET=$(head -c 32 /dev/urandom | base64)
ks_node_config 4
KS_CLUSTER_SECRET=$good_secret
ks_node_start 4
sleep 5
for n in 1 2 3; do
    peers=$(ks_node_exec "$n" wg show kubespan peers | wc -l)
    check "node$n: still exactly 2 peers with an intruder around" test "$peers" -eq 2
done
check "node4 (wrong secret) has no peers" test "$(ks_node_exec 4 wg show kubespan peers | wc -l)" -eq 0
check "the mesh still works" ks_node_exec 1 ping -c 2 -W 2 -i 0.2 "$(ks_node_ip 2)"
ks_node_stop 4

# SIGKILL and restart: same identity, no duplicate rules or routes, converges.
key2=$(ks_node_exec 2 wg show kubespan public-key)
kill -KILL "${KS_PID[node2]}"
wait "${KS_PID[node2]}" 2>/dev/null || true
unset 'KS_PID[node2]'
ks_node_start 2
t=$(ks_wait 30 ks_handshakes_with 2 1 3) || check "node2 converges after SIGKILL and restart" false
ks_log "info: node2 back ${t}s after a SIGKILL restart"
check "node2 kept its WireGuard key" test "$(ks_node_exec 2 wg show kubespan public-key)" = "$key2"
n4=$(ks_node_exec 2 ip rule | grep -c "^32500:")
n6=$(ks_node_exec 2 ip -6 rule | grep -c "^32500:")
check "node2: exactly one rule 32500 per family after the crash ($n4, $n6)" test "$n4$n6" = 11
r=$(ks_node_exec 2 ip route show table 180 | wc -l)
check "node2: exactly one IPv4 route in table 180 ($r)" test "$r" -eq 1
check "node1 reaches node2 again" ks_node_exec 1 ping -c 2 -W 2 -i 0.2 "$(ks_node_ip 2)"

# kubespan leave: the node's affiliate is deleted and the others drop it at once.
key3=$(ks_node_exec 3 wg show kubespan public-key)
check "node3: kubespan leave succeeds" ip netns exec "${KS_PREFIX}n3" "$KS_BIN" leave --config "$KS_TMP/node3/config.yaml"
unset 'KS_PID[node3]'
gone() { ! ks_node_exec "$1" wg show kubespan peers | grep -qF "$key3"; }
t=$(ks_wait 10 gone 1) || check "node1 drops node3 after it left" false
check "node2 drops node3 after it left" ks_wait 10 gone 2
ks_log "info: node3 left; dropped by the others within ${t}s"

# SIGTERM: nothing of ours left in the namespace.
ns1=${KS_PREFIX}n1
pid1=${KS_PID[node1]}
check "node1 exits 0 on SIGTERM" ks_node_stop 1
check "node1: no kubespan link" bash -c "! ip netns exec $ns1 ip link show kubespan 2>/dev/null"
check "node1: no rule 32500" bash -c "! ip netns exec $ns1 ip rule | grep -q 32500"
check "node1: no rule 32500 (v6)" bash -c "! ip netns exec $ns1 ip -6 rule | grep -q 32500"
check "node1: table 180 empty" bash -c "[ -z \"\$(ip netns exec $ns1 ip route show table 180 2>/dev/null)\" ]"
check "node1: no nft table" bash -c "! ip netns exec $ns1 nft list table inet kubespan 2>/dev/null"
check "node1: daemon process gone" ks_not kill -0 "$pid1"
ks_log "PASS mesh (${t}s to a full mesh, $((SECONDS - started))s total)"
