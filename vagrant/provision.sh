#!/usr/bin/env bash
# Runs as root in each VM (see Vagrantfile): installs the kubespan package,
# writes its config and starts the services. Re-running it is harmless.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

apt-get update -qq
# The package's Depends (nftables) come with it; wg(8) is only for looking.
apt-get install -y -qq wireguard-tools iputils-ping
deb=$(ls -t /kubespan-deb/kubespan_*_amd64.deb | head -1)
apt-get install -y -qq --reinstall "$deb"

# Reverse-path filtering would drop IPv4 packets arriving on the kubespan
# link (docs/operations.md): make sure `all` is 0, the daemon sets the link.
echo 'net.ipv4.conf.all.rp_filter = 0' >/etc/sysctl.d/60-kubespan.conf
sysctl -q -p /etc/sysctl.d/60-kubespan.conf

if [[ $KS_RUN_DISCOVERY == yes ]]; then
    systemctl enable --now kubespan-discovery
fi

# The first NIC is the provider's NAT/management network (VirtualBox gives every
# VM the same 10.0.2.15): advertise only the private network as endpoint, and
# ask peers not to route the NAT network through the tunnel.
umask 077
mkdir -p /etc/kubespan
cat >/etc/kubespan/config.yaml <<CONFIG
cluster:
  id: ${KS_CLUSTER_ID}
  secret: ${KS_CLUSTER_SECRET}
  discovery:
    registries:
      service:
        endpoint: ${KS_DISCOVERY}
kubespan:
  backend: kernel
  filters:
    endpoints: ["192.168.56.0/24"]
    excludeAdvertisedNetworks: ["10.0.2.0/24"]
node:
  nodename: ${KS_NODENAME}
CONFIG
systemctl enable kubespan
systemctl restart kubespan
