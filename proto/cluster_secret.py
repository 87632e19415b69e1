"""The cluster secret on the command line: `--cluster-secret-file PATH` or $PDSERVE_CLUSTER_SECRET.

The secret authenticates the cluster plane: Register, Heartbeat, every Worker
RPC, and the KV transfer handshake (docs/architecture.md, "Security"). `pdserve up`
generates one and hands it to its children in the environment; the CLI reads it here and
passes it down in the config dataclasses (nothing below the CLI reads the environment).
"""

from __future__ import annotations

import argparse
import os
import secrets
from pathlib import Path

ENV = "PDSERVE_CLUSTER_SECRET"


def new_secret() -> str:
    return secrets.token_urlsafe(32)


def add_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cluster-secret-file", default=None, metavar="PATH",
        help="file holding the cluster secret that workers and the coordinator share (default: "
             f"${ENV}; neither: the cluster plane is not authenticated)")


def from_args(args: argparse.Namespace) -> str | None:
    """The secret from --cluster-secret-file (surrounding whitespace dropped), else $ENV."""
    path = getattr(args, "cluster_secret_file", None)
    if path:
        try:
            secret = Path(path).read_text().strip()
        except OSError as e:
            raise SystemExit(f"error: cannot read --cluster-secret-file {path}: {e}") from e
        if not secret:
            raise SystemExit(f"error: --cluster-secret-file {path} is empty")
        return secret
    return os.environ.get(ENV) or None
