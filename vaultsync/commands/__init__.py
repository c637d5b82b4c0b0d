"""The command line: one module per command or group, assembled in cli.py.

Together with the mount daemon this is a composition root, the only layer that
imports from every other one (fuse/, replication/, api/ included).
"""
