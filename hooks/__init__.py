"""Hook points of the boot agent: executables in <point>.d/ run in name order (see README.md)."""
