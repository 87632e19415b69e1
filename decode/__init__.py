"""The decode pool: its Role (role.py), its phase-sized batching (batching.py), and the
both role (both.py), a decode worker that prefills its own prompts.

Importing this package registers the "decode" and "both" worker roles."""

from pdserve.decode import both, role  # noqa: F401  (registers the roles)
