#!/bin/busybox sh
# seedboot /init: give the frozen agent a runtime that survives switch_root, then exec it.
#
# The runtime is not copied (51 MB took 0.3-2 s under emulation): /run/seedboot is a bind mount
# of /opt/seedboot, and an empty tmpfs then covers /opt, so cleaning the initramfs at switch_root
# (which does not cross mounts) cannot reach the files. The switch moves /run, and
# /run/seedboot with it, into the booted system (initramfs/README.md).
export PATH=/sbin:/bin
mount -t proc -o nosuid,nodev,noexec proc /proc
# Python reads /dev/urandom at start when the kernel's getrandom() is not ready yet (early boot).
mount -t devtmpfs -o nosuid,mode=0755 dev /dev
mount -t tmpfs -o mode=0755,nosuid,nodev run /run
mkdir -p /run/seedboot
if mount --bind /opt/seedboot /run/seedboot; then
    mount -t tmpfs -o ro,mode=0755,size=4k,nosuid,nodev,noexec hidden /opt
elif ! cp -a /opt/seedboot/. /run/seedboot/; then
    echo "seedboot /init: cannot give the agent runtime a home in /run/seedboot"
    exec sh
fi
grep -qw seedinit.debug /proc/cmdline && echo "seedboot /init: runtime in /run/seedboot at $(cut -d' ' -f1 /proc/uptime)s"
exec /run/seedboot/seedboot-agent init "$@"
echo "seedboot /init: cannot start /run/seedboot/seedboot-agent"
exec sh
