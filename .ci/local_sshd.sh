#!/usr/bin/env bash
# Passwordless ssh to localhost, as a cluster node has it: DeepSpeed's multi-host runner checks
# `ssh HOST hostname` for every host in the hostfile, even a lone `localhost`. sshd listens on
# 127.0.0.1 only. Idempotent; any failure leaves ssh unconfigured and the hostfile test then
# launches with --no_ssh_check (it says which in its output).
set -u
[ "$(id -u)" = 0 ] || exit 0
if ! command -v sshd >/dev/null 2>&1 && [ ! -x /usr/sbin/sshd ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssh-server >/dev/null) || exit 0
fi
mkdir -p /run/sshd ~/.ssh && chmod 700 ~/.ssh
ssh-keygen -A >/dev/null 2>&1
[ -f ~/.ssh/id_ed25519 ] || ssh-keygen -q -t ed25519 -N "" -f ~/.ssh/id_ed25519
touch ~/.ssh/authorized_keys && chmod 600 ~/.ssh/authorized_keys
grep -qF "$(cat ~/.ssh/id_ed25519.pub)" ~/.ssh/authorized_keys || cat ~/.ssh/id_ed25519.pub >> ~/.ssh/authorized_keys
if ! ssh -o BatchMode=yes -o ConnectTimeout=3 -o StrictHostKeyChecking=accept-new localhost true 2>/dev/null; then
  /usr/sbin/sshd -o ListenAddress=127.0.0.1 -o PermitRootLogin=prohibit-password || exit 0
  sleep 1
  ssh -o BatchMode=yes -o ConnectTimeout=3 -o StrictHostKeyChecking=accept-new localhost true 2>/dev/null \
    && echo "ci: passwordless ssh to localhost ready" || echo "ci: ssh to localhost not available"
fi
exit 0
