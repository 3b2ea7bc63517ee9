"""Reliability campaigns of imagefs (kill points, full datastores, hostile layers); see docs/reliability.md."""
