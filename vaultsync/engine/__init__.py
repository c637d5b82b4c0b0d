"""The local volume: the journal, the catalog, the commit protocol and POSIX semantics.

Imports only the format below it; the object stores, replication and the
adapters sit above and reach the engine through its public methods.
"""
