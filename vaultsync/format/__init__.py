"""The bytes: what a volume looks like in a journal, in a bucket and under the state directory.

Pure encoding and decoding, no I/O: segments and records, transactions, chunk
encoding (hash, compress, encrypt, patch), the volume header, and the names of
objects in a bucket and of files in a state directory. docs/format.md is the
contract these modules keep.
"""
