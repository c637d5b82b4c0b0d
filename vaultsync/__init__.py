"""vaultsync: a replicated storage appliance over S3-compatible object stores."""

__version__ = "0.1.0"
