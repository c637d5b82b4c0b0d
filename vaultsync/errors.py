"""Exceptions that reach users.

Every `VaultsyncError` carries a message written for the person at the
terminal: what is wrong and what to do. The CLI prints it on one line and exits
non-zero, without a traceback. Anything else escaping is a bug.
"""

from __future__ import annotations

import errno

# The errnos of a disk (or quota) that has no room left: reported as such, never as EIO.
OUT_OF_SPACE = (errno.ENOSPC, errno.EDQUOT)


class VaultsyncError(Exception):
    """A failure the user can act on; `str(err)` is the whole explanation."""


class ConfigError(VaultsyncError):
    pass


class FormatError(VaultsyncError):
    """Bytes that are not what the format says: foreign, newer, or damaged."""


class CorruptRecordError(FormatError):
    pass


class NewerFormatError(FormatError):
    pass


class CryptoError(VaultsyncError):
    """Wrong passphrase, or data that fails authentication."""


class VolumeError(VaultsyncError):
    """The local state or a bucket holds something the operation cannot accept."""


class ReadOnlyVolumeError(VolumeError):
    """The volume accepts no writes here (fenced by a newer writer)."""
