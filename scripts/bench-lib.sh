# shellcheck shell=bash
# Shared set-up for the namespace benchmarks (bench-convergence, bench-failover,
# bench-footprint, bench-throughput): root check, Debian packages, the release
# build, then the namespace helpers of netns-tests/lib.sh with a cleanup trap.
#
#   source "$(dirname "$0")/bench-lib.sh"
#   bench_init <extra Debian packages...>

BENCH_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

bench_init() {
    if [[ $(id -u) -ne 0 ]]; then
        echo "$(basename "$0") creates network namespaces: run it as root" >&2
        exit 1
    fi
    local packages=(iproute2 nftables wireguard-tools iputils-ping util-linux procps "$@")
    local missing=() p
    for p in "${packages[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
    if ((${#missing[@]})); then
        echo "==> installing ${missing[*]}" >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
    cd "$BENCH_ROOT"
    if command -v cargo >/dev/null; then
        echo "==> building the release binary" >&2
        cargo build --release --locked --bin kubespan ${BENCH_EXAMPLES:+--example "$BENCH_EXAMPLES"} >&2
    elif [[ ! -x target/release/kubespan ]]; then
        echo "no target/release/kubespan and no cargo: install a Rust toolchain >= 1.88" >&2
        exit 1
    fi
    export KS_BIN=$BENCH_ROOT/target/release/kubespan
    # A prefix of our own, so nothing collides with other runs or the netns tests.
    export KS_PREFIX=${KS_PREFIX:-kb$$}
    # Daemon logs at info only: debug logging would be part of what we measure.
    export RUST_LOG=${RUST_LOG:-info}
    # shellcheck source=../netns-tests/lib.sh
    source "$BENCH_ROOT/netns-tests/lib.sh"
    trap bench_cleanup EXIT
    trap 'ks_log "$(basename "$0"): failed at line $LINENO: $BASH_COMMAND"' ERR
    trap 'exit 130' INT TERM
}

# Extra cleanup hooks (commands) run before the namespaces go.
BENCH_CLEANUP=()
bench_cleanup() {
    local rc=$?
    set +e
    local c
    for c in "${BENCH_CLEANUP[@]}"; do eval "$c"; done
    (exit $rc)
    ks_cleanup
}

# Milliseconds since the epoch.
now_ms() { local t; t=$(date +%s%N); echo $((t / 1000000)); }

# CPU time (user + system, all threads) of a process, in clock ticks.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
CLK_TCK=$(getconf CLK_TCK)

# Resident set size of a process, in KiB (VmRSS; VmHWM with "hwm").
rss_kib() {
    local field=VmRSS
    [[ ${2:-} == hwm ]] && field=VmHWM
    awk -v f="$field:" '$1 == f {print $2}' "/proc/$1/status"
}

# Median and max of numbers given as arguments: prints "median max".
median_max() {
    printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {
        if (NR == 0) { print "- -"; exit }
        m = (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2
        print m, a[NR] }'
}

load_avg() { cut -d' ' -f1-3 /proc/loadavg; }

machine() {
    echo "$(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), $(free -g | awk '/Mem:/{print $2}') GiB, Linux $(uname -r)"
}

# A node's KubeSpan public key and address, once its WireGuard link exists.
node_pubkey() { ks_node_exec "$1" wg show kubespan public-key; }
node_ksaddr() {
    local a
    a=$(ks_node_exec "$1" ip -6 -o addr show dev kubespan scope global | awk '{print $4}' | cut -d/ -f1)
    [[ -n $a ]] && echo "$a"
}

# ks_discovery_start with the Prometheus metrics on $KS_DISCOVERY_IP:2122 (in
# the hub namespace), to count the calls the daemons make.
bench_discovery_start() {
    KS_DISCOVERY_METRICS=$KS_DISCOVERY_IP:2122 ks_discovery_start
}

# AffiliateUpdate calls the discovery service has handled so far.
affiliate_updates() {
    ks_nsx "$KS_HUB" curl -sf "http://$KS_DISCOVERY_IP:2122/metrics" |
        awk '/^grpc_server_handled_total/ && /AffiliateUpdate/ {s += $NF} END {print s + 0}'
}
