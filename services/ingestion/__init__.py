"""Operator-facing service: the lot registry and the occupancy event intake."""
