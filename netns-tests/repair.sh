#!/usr/bin/env bash
# Something else removes our plumbing (a firewall reload's `nft flush ruleset`,
# a deleted rule, a flushed table 180): the daemon puts it back on its own, and
# node-address traffic goes through the tunnel again.
source "$(dirname "$0")/lib.sh"
ks_scenario
for n in 1 2; do
    ks_node_net "$n"
    ks_node_start "$n"
done
t=$(ks_wait 60 ks_full_mesh 1 2) || check "the two nodes mesh" false
ks_log "info: meshed ${t}s after start"

rx_from2() {
    local key
    key=$(ks_node_exec 2 wg show kubespan public-key)
    ks_node_exec 1 wg show kubespan transfer | awk -v k="$key" '$1 == k {print $2}'
}
ip2=$(ks_node_ip 2)

ks_node_exec 1 nft flush ruleset
ks_node_exec 1 ip rule del priority 32500
ks_node_exec 1 ip -6 rule del priority 32500
ks_node_exec 1 ip route flush table 180
ks_node_exec 1 ip -6 route flush table 180
check "the plumbing is gone" ks_not ks_node_exec 1 nft list table inet kubespan
removed=$SECONDS

restored() {
    ks_node_exec 1 nft list table inet kubespan >/dev/null &&
        ks_node_exec 1 ip rule | grep -q "^32500:.*fwmark 0x40/0x60 lookup 180" &&
        ks_node_exec 1 ip -6 rule | grep -q "^32500:.*fwmark 0x40/0x60 lookup 180" &&
        ks_node_exec 1 ip route show table 180 | grep -q "^default dev kubespan" &&
        ks_node_exec 1 ip -6 route show table 180 | grep -q "^default dev kubespan"
}
t=$(ks_wait 60 restored) || check "the daemon restores its nftables table, rules and routes" false
ks_log "info: everything restored $((SECONDS - removed))s after it was removed"
nft=$(ks_node_exec 1 nft list table inet kubespan)
check "the restored table routes node2's address" ks_nft_routes "$nft" "$ip2"
before=$(rx_from2)
check "node1 pings node2's node address" ks_node_exec 1 ping -c 5 -W 2 -i 0.2 -s 1000 "$ip2"
after=$(rx_from2)
check "the traffic went through WireGuard again ($before -> $after bytes)" test $((after - before)) -ge 5000
r4=$(ks_node_exec 1 ip rule | grep -c "^32500:")
check "exactly one rule 32500 after the repair ($r4)" test "$r4" -eq 1
ks_log "PASS repair"
