"""The role-agnostic worker: gRPC server (server.py), what every role shares (core.py:
admission, streaming, abort, load), per-request state (state.py), the Role protocol and
its registry (role.py), and the link to the coordinator (coordinator_link.py)."""
