"""Shipping segments to targets, health, fencing and migration."""
