"""Fuzzing the readers of untrusted input: VMDK chains, the ext4 inside, layer tars.

``python -m fuzz.run`` runs the campaign (docs/reliability.md has its figures); the
test suite runs a short, seeded one (tests/test_fuzz.py).
"""
