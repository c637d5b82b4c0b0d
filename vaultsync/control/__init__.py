"""Who writes: the writer lease and fencing, promotion, salvage, and the volume's status."""
