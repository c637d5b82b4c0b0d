"""The mount daemon: the other composition root beside the command line.

It wires the appliance together: the volume, its replicator, the FileSystem,
the FUSE operations and the embedded REST API, for the writer's mount
(writer.py) and for a read-only mount of a past point (point.py); process.py
is the other side, what the command line does to a daemon from outside (start
one in the background, unmount and wait for it, ask it to reload). Like
vaultsync.commands it may import from every layer; nothing below imports it.
"""
