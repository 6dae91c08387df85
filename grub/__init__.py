"""GRUB menus for seed disks."""
