"""Points in time: rebuilding a volume as of a point from one target, restoring from it,
snapshots, and the retention rules that decide which points are kept."""
