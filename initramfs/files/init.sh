#!/bin/busybox sh
# seedboot /init: give the frozen agent a runtime that survives switch_root, then exec it.
# switch_root frees the initramfs; the block daemon keeps running from /run/seedboot, and /run is
# moved into the booted system (initramfs/README.md).
export PATH=/sbin:/bin
mount -t proc -o nosuid,nodev,noexec proc /proc
# Python reads /dev/urandom at start when the kernel's getrandom() is not ready yet (early boot).
mount -t devtmpfs -o nosuid,mode=0755 dev /dev
mount -t tmpfs -o mode=0755,nosuid,nodev run /run
debug=false
grep -qw seedinit.debug /proc/cmdline && debug=true
$debug && echo "seedboot /init: copying the agent runtime at $(cut -d' ' -f1 /proc/uptime)s"
mkdir -p /run/seedboot
if ! cp -a /opt/seedboot/. /run/seedboot/; then
    echo "seedboot /init: cannot copy the agent runtime to /run/seedboot (out of memory?)"
    exec sh
fi
$debug && echo "seedboot /init: runtime in /run/seedboot at $(cut -d' ' -f1 /proc/uptime)s"
exec /run/seedboot/seedboot-agent init "$@"
echo "seedboot /init: cannot start /run/seedboot/seedboot-agent"
exec sh
