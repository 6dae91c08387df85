"""The miniroot: what goes into the initramfs beside the frozen agent."""
