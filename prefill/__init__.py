"""The prefill pool: its Role (role.py) and its phase-sized batching (batching.py).

Importing this package registers the "prefill" worker role."""

from pdserve.prefill import role  # noqa: F401  (registers the role)
