"""The I/O engine: the only package that touches file descriptors, O_DIRECT and threads."""
