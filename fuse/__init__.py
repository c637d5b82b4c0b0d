"""The FUSE adapter (pyfuse3): maps POSIX calls onto the volume's journal and catalog."""
