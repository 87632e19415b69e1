"""Run inside a lab namespace (tests/netns.py): wait for the cluster, generate, print JSON.

    python tests/netns_client.py COORDINATOR N_PREFILL N_DECODE '{"prompts": [[1, 2]], ...}'

Prints one JSON line: {"workers": [...], "outputs": [[ids], ...], "kv_bytes": [...]}.
"""

from __future__ import annotations

import json
import sys

from pdserve.coordinator.client import Client


def main(address: str, n_prefill: int, n_decode: int, spec: dict) -> None:
    with Client(address, timeout_s=60) as client:
        workers = client.wait_ready(n_prefill, n_decode, timeout_s=spec.get("ready_s", 120))
        results = [client.generate(p, **spec["sampling"]) for p in spec["prompts"]]
    print(json.dumps({
        "workers": [w["info"]["address"] for w in workers],
        "outputs": [r.token_ids for r in results],
        "kv_bytes": [r.metrics.get("kv_bytes", 0) for r in results],
    }), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4]))
