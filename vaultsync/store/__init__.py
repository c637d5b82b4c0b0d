"""The object stores: the S3 client, small signed PUTs, bandwidth caps, a volume's targets."""
