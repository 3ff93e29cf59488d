#!/usr/bin/env bash
# NAT: two nodes, each behind its own NAT router (a namespace masquerading
# with nftables), the discovery service on the "public" side. Neither can
# reach the other's private address; each learns its public address from
# Hello, and the two punch through with simultaneous handshakes to a direct
# tunnel.
#
#   node1 192.168.1.2 -- 192.168.1.1 [nat1] 10.99.0.21 --+
#                                                        bridge -- discovery 10.99.0.1
#   node2 192.168.2.2 -- 192.168.2.1 [nat2] 10.99.0.22 --+
source "$(dirname "$0")/lib.sh"
ks_scenario

nat_site() { # site number: router namespace natN, node namespace nN
    local i=$1 router=${KS_PREFIX}nat$1 node=${KS_PREFIX}n$1
    ip netns add "$router"
    ip netns add "$node"
    ks_nsx "$router" ip link set lo up
    ks_nsx "$node" ip link set lo up
    # Public side, on the hub bridge.
    ip link add "${KS_PREFIX}p$i" type veth peer name pub netns "$router"
    ip link set "${KS_PREFIX}p$i" netns "$KS_HUB"
    ks_nsx "$KS_HUB" ip link set "${KS_PREFIX}p$i" master "$KS_BRIDGE" up
    ks_nsx "$router" ip addr add "$KS_SUBNET.$((20 + i))/24" dev pub
    ks_nsx "$router" ip link set pub up
    # Private side.
    ip link add "${KS_PREFIX}l$i" type veth peer name eth0 netns "$node"
    ip link set "${KS_PREFIX}l$i" netns "$router"
    ks_nsx "$router" ip link set "${KS_PREFIX}l$i" name lan
    ks_nsx "$router" ip addr add "192.168.$i.1/24" dev lan
    ks_nsx "$router" ip link set lan up
    ks_nsx "$node" ip addr add "192.168.$i.2/24" dev eth0
    ks_nsx "$node" ip link set eth0 up
    ks_nsx "$node" ip route add default via "192.168.$i.1"
    ks_nsx "$router" sysctl -qw net.ipv4.ip_forward=1
    ks_nsx "$router" nft -f - <<'NFT'
table ip nat {
    chain masq { type nat hook postrouting priority srcnat; oifname "pub" masquerade; }
}
table ip filter {
    # As on any home router: unsolicited packets to the router itself are
    # dropped (so they leave no conntrack entry that would make the NAT pick
    # another source port for the node's own packets to the same peer).
    chain input {
        type filter hook input priority 0; policy drop;
        iifname { "lo", "lan" } accept
        ct state established,related accept
    }
    chain forwarding {
        type filter hook forward priority 0; policy drop;
        iifname "lan" oifname "pub" accept
        ct state established,related accept
    }
}
NFT
}
nat_site 1
nat_site 2
check "node1 cannot reach node2's private address" ks_not ks_nsx "${KS_PREFIX}n1" ping -c 1 -W 1 192.168.2.2
check "node1 reaches the discovery service through its NAT" ks_nsx "${KS_PREFIX}n1" ping -c 1 -W 2 "$KS_DISCOVERY_IP"

for n in 1 2; do
    ks_node_config "$n" "  endpointConnectTimeout: 2s
  harvestExtraEndpoints: true"
    ks_node_start "$n"
done
started=$SECONDS
t=$(ks_wait 120 ks_full_mesh 1 2) || check "the two NATed nodes establish a tunnel" false
ks_log "info: tunnel through both NATs ${t}s after start"

key2=$(ks_node_exec 2 wg show kubespan public-key)
ep=$(ks_node_exec 1 wg show kubespan endpoints | awk -v k="$key2" '$1 == k {print $2}')
check "node1 reaches node2 at node2's public (NAT) address ($ep)" grep -q "^$KS_SUBNET.22:" <<<"$ep"
public=$(ks_node_exec 1 "$KS_BIN" status -o json | jq -r .discovery.publicIp)
check "node1 learned its public address from Hello ($public)" test "$public" = "$KS_SUBNET.21"
for pair in "1 2" "2 1"; do
    read -r a b <<<"$pair"
    check "node$a pings node$b's private node address through the tunnel" \
        ks_node_exec "$a" ping -c 3 -W 2 -i 0.2 "192.168.$b.2"
done
ks_log "PASS nat ($((SECONDS - started))s)"
