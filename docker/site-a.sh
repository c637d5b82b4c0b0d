#!/bin/sh
# Site A of the compose demonstration: create the volume, mount it, write to it.
# SIGTERM (docker compose stop) unmounts, which flushes and ships everything.
set -eu
cfg=/etc/vaultsync/demo.toml
mnt=/srv/vaultsync/demo
mkdir -p "$mnt"
vaultsync init "$cfg"
vaultsync mount --daemon "$cfg" "$mnt"
trap 'vaultsync umount "$mnt"; exit 0' TERM INT
n=0
while :; do
    n=$((n + 1))
    date -u +"%Y-%m-%dT%H:%M:%SZ write $n at site A" >> "$mnt/heartbeat.log"
    sleep 5 &
    wait $!
done
