#!/bin/busybox sh
# seedboot /init: give the frozen agent a runtime that survives switch_root, then exec it.
# switch_root frees the initramfs; the block daemon keeps running from /run/seedboot, and /run is
# moved into the booted system (initramfs/README.md).
export PATH=/sbin:/bin
mount -t proc -o nosuid,nodev,noexec proc /proc
mount -t tmpfs -o mode=0755,nosuid,nodev run /run
mkdir -p /run/seedboot
if ! cp -a /opt/seedboot/. /run/seedboot/; then
    echo "seedboot /init: cannot copy the agent runtime to /run/seedboot (out of memory?)"
    exec sh
fi
grep -qw seed.initdebug /proc/cmdline && echo "seedboot /init: runtime in /run/seedboot at $(cut -d' ' -f1 /proc/uptime)s"
exec /run/seedboot/seedboot-agent init "$@"
echo "seedboot /init: cannot start /run/seedboot/seedboot-agent"
exec sh
