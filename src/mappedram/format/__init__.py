"""Pure codec of QEMU's migration stream: bytes in, records out (no I/O, no threads)."""
