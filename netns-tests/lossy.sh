#!/usr/bin/env bash
# Lossy underlay: 20 % loss (and 50 ms delay where the kernel has netem) on
# every node's link, both ways. The mesh still converges and carries traffic.
source "$(dirname "$0")/lib.sh"
ks_scenario
nodes=(1 2 3)
for n in "${nodes[@]}"; do ks_node_net "$n"; done

# netem where the kernel has it; otherwise (this machine's kernel has no
# sch_netem) the same loss from nftables, in a table of the test's own.
if ks_nsx "${KS_PREFIX}n1" tc qdisc add dev eth0 root netem loss 20% delay 50ms 2>/dev/null; then
    how="tc netem: 20% loss, 50 ms delay"
    for n in 2 3; do ks_nsx "${KS_PREFIX}n$n" tc qdisc add dev eth0 root netem loss 20% delay 50ms; done
else
    how="nftables numgen: 20% loss each way (no sch_netem in this kernel, so no added delay)"
    for n in "${nodes[@]}"; do
        ks_nsx "${KS_PREFIX}n$n" nft -f - <<'NFT'
table inet lossy {
    chain in { type filter hook input priority -300; iifname "eth0" numgen random mod 100 < 20 drop; }
    chain out { type filter hook output priority -300; oifname "eth0" numgen random mod 100 < 20 drop; }
}
NFT
    done
fi
ks_log "info: underlay: $how"
# The loss is real: 200 pings over the bare link lose some.
lost=$(ks_nsx "${KS_PREFIX}n1" ping -c 200 -i 0.01 -W 1 -q "$(ks_node_ip 2)" | grep -oE '[0-9.]+% packet loss' | cut -d% -f1)
check "the underlay loses packets ($lost% of pings over the bare link)" \
    awk -v l="$lost" 'BEGIN { exit !(l >= 15 && l <= 80) }'

started=$SECONDS
for n in "${nodes[@]}"; do ks_node_start "$n"; done
t=$(ks_wait 120 ks_full_mesh "${nodes[@]}") || check "the mesh converges over the lossy underlay" false
ks_log "info: full mesh ${t}s after start over the lossy underlay"
for a in "${nodes[@]}"; do
    for b in "${nodes[@]}"; do
        [[ $a == "$b" ]] && continue
        # At least some of 20 pings get through the tunnel.
        check "node$a reaches node$b through the tunnel" \
            ks_node_exec "$a" ping -c 20 -i 0.1 -W 2 -q "$(ks_node_ip "$b")"
    done
done
up() { [[ $(ks_node_exec "$1" "$KS_BIN" get kubespanpeerstatuses -o json | jq -s '[.[] | select(.spec.state == "up")] | length') == 2 ]]; }
for n in "${nodes[@]}"; do
    check "node$n reports both peers up" ks_wait 30 up "$n"
done
ks_log "PASS lossy ($((SECONDS - started))s)"
