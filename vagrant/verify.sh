#!/usr/bin/env bash
# Checks the Vagrant cluster from the host: on every VM the kubespan link is a
# kernel WireGuard link with a handshake to both other nodes, and pings reach
# both other nodes' private and KubeSpan addresses through the tunnel.
set -euo pipefail
cd "$(dirname "$0")"
nodes=(ks1 ks2 ks3)
declare -A ip=([ks1]=192.168.56.11 [ks2]=192.168.56.12 [ks3]=192.168.56.13)
declare -A ksaddr=()
fail=0 pass=0
ok() { echo "ok   $*"; pass=$((pass + 1)); }
bad() { echo "FAIL $*"; fail=$((fail + 1)); }
on() { local n=$1; shift; vagrant ssh "$n" -c "sudo $*" -- -q 2>/dev/null; }

for n in "${nodes[@]}"; do
    ksaddr[$n]=$(on "$n" ip -6 -o addr show dev kubespan | awk '/inet6 fd/ {split($4, a, "/"); print a[1]}')
done
for n in "${nodes[@]}"; do
    echo "---- $n: wg show kubespan"
    on "$n" wg show kubespan || true
    if on "$n" ip -d link show kubespan | grep -q wireguard; then
        ok "$n: kubespan is a kernel WireGuard link"
    else
        bad "$n: kubespan is not a kernel WireGuard link"
    fi
    hs=$(on "$n" wg show kubespan latest-handshakes | awk '$2 > 0' | wc -l)
    ((hs == 2)) && ok "$n: handshakes with 2 peers" || bad "$n: handshakes with $hs peers, want 2"
    for m in "${nodes[@]}"; do
        [[ $m == "$n" ]] && continue
        for a in "${ip[$m]}" "${ksaddr[$m]}"; do
            if [[ -n $a ]] && on "$n" ping -c 2 -W 2 -q "$a" >/dev/null; then
                ok "$n -> $m ($a)"
            else
                bad "$n -> $m (${a:-no KubeSpan address})"
            fi
        done
    done
done
echo
echo "$pass passed, $fail failed"
((fail == 0))
