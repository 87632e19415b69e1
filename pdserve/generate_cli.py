"""`pdserve generate`: generate text locally (--local) or through a coordinator.

    pdserve generate --coordinator 127.0.0.1:50051 --prompt "Hello" --max-tokens 32 --stream
    pdserve generate --local --model tiny --prompt-ids 1,2,3 --temperature 0 --json
    pdserve generate --local --model smollm2-135m --chat --prompt "What is the capital of France?"

--chat sends --prompt as a user message (after --system, if given), rendered with the
model's chat template: by this process with --local, by the coordinator otherwise.

--json prints one JSON object {"token_ids": [generated ids], "text": "..."} (the same from
both paths); --stream prints text as it arrives; otherwise the text is printed at the end.
Errors print `error: <STATUS>: <message>` to stderr and exit with status 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def parse_prompt_ids(value: str) -> list[int]:
    try:
        ids = [int(t) for t in value.replace(" ", "").split(",") if t]
    except ValueError:
        raise ValueError(f"--prompt-ids must be comma-separated integers, got {value!r}") from None
    if not ids:
        raise ValueError("--prompt-ids needs at least one id")
    return ids


def _checked_prompt_ids(value: str) -> str:
    """argparse type: validate the list but keep the string (args.prompt_ids is "1,2,3")."""
    try:
        parse_prompt_ids(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--local", action="store_true",
                       help="run the model in this process (no coordinator)")
    where.add_argument("--coordinator", metavar="HOST:PORT[,HOST:PORT]",
                       help="coordinator address; several (comma-separated): fail over between them")
    parser.add_argument("--model", default="tiny",
                        help="--local: preset name, built-in model (smollm2-135m) or HF directory")
    parser.add_argument("--model-cache-dir", default=None,
                        help="--local: where built-in models are converted on first use "
                             "(default $XDG_CACHE_HOME/pdserve/models or ~/.cache/pdserve/models)")
    parser.add_argument("--device", default="cpu", help="--local: cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                        help="--local: weights and activations dtype")
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text")
    prompt.add_argument("--prompt-ids", type=_checked_prompt_ids, metavar="1,2,3",
                        help="prompt as comma-separated token ids")
    parser.add_argument("--chat", action="store_true",
                        help="send --prompt as a user message through the model's chat template")
    parser.add_argument("--system", default=None, help="--chat: a system message first")
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens to generate (default 16)")
    parser.add_argument("--temperature", type=float, default=None,
                        help="0 = greedy (default 1.0)")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling (default 1.0)")
    parser.add_argument("--top-k", type=int, default=None, help="top-k sampling (default 0 = off)")
    parser.add_argument("--seed", type=int, default=None, help="per-request sampling seed")
    parser.add_argument("--ignore-eos", action="store_true", help="do not stop at EOS")
    parser.add_argument("--stream", action="store_true", help="print text as it arrives")
    parser.add_argument("--json", action="store_true",
                        help='print {"token_ids": [...], "text": "..."} as one JSON object')
    parser.add_argument("--timeout", type=float, default=None,
                        help="--coordinator: deadline of the request, seconds")
    parser.add_argument("--auth-token", default=None,
                        help="--coordinator: bearer token (default: $PDSERVE_AUTH_TOKEN)")
    from pdserve.proto import tls

    tls.add_arguments(parser, server=False)


def sampling_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The sampling flags that were given, as SamplingParams keyword arguments."""
    kw: dict[str, Any] = {"max_tokens": args.max_tokens, "ignore_eos": bool(args.ignore_eos)}
    for name in ("temperature", "top_p", "top_k", "seed"):
        if getattr(args, name) is not None:
            kw[name] = getattr(args, name)
    return kw


def chat_messages(args: argparse.Namespace) -> list[dict[str, str]]:
    """--system and --prompt as chat messages (--chat)."""
    if args.prompt_ids:
        raise ValueError("--chat takes --prompt (text), not --prompt-ids")
    system = [{"role": "system", "content": args.system}] if args.system else []
    return [*system, {"role": "user", "content": args.prompt}]


def _print_result(args: argparse.Namespace, result: dict[str, Any], streamed: bool) -> None:
    if args.json:
        print(json.dumps({"token_ids": list(result["token_ids"]), "text": result["text"]}))
    elif streamed:
        print(flush=True)
    else:
        print(result["text"])


def _run_coordinator(args: argparse.Namespace) -> int:
    import os

    from pdserve.coordinator.client import Client, ClientError
    from pdserve.proto import tls

    token = args.auth_token or os.environ.get("PDSERVE_AUTH_TOKEN")
    stream_text = args.stream and not args.json
    tls_config = tls.from_args(args, server=False)
    try:
        with Client(args.coordinator, timeout_s=args.timeout, auth_token=token,
                    tls=tls_config) as client:
            ids: list[int] = []
            texts: list[str] = []
            if args.chat:
                chunks = client.stream(messages=chat_messages(args), sampling=sampling_kwargs(args))
            else:
                ids_in = parse_prompt_ids(args.prompt_ids) if args.prompt_ids else None
                chunks = client.stream(args.prompt, ids_in, sampling_kwargs(args))
            for chunk in chunks:
                ids += chunk.token_ids
                texts.append(chunk.text)
                if stream_text and chunk.text:
                    sys.stdout.write(chunk.text)
                    sys.stdout.flush()
    except ValueError as e:
        print(f"error: INVALID_ARGUMENT: {e}", file=sys.stderr)
        return 1
    except ClientError as e:
        if stream_text:
            print(flush=True)
        print(f"error: {e.code.name}: {e.details}", file=sys.stderr)
        return 1
    _print_result(args, {"token_ids": ids, "text": "".join(texts)}, stream_text)
    return 0


def _run_local(args: argparse.Namespace) -> int:
    from pdserve.local_generate import run_local

    try:
        result = run_local(args)
    except ValueError as e:
        print(f"error: INVALID_ARGUMENT: {e}", file=sys.stderr)
        return 1
    except FileNotFoundError as e:  # before OSError: a missing model directory or file
        print(f"error: NOT_FOUND: {e}", file=sys.stderr)
        return 1
    except (OSError, RuntimeError) as e:  # unreadable checkpoint, bad device, ...
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    _print_result(args, result, streamed=False)
    return 0


def run(args: argparse.Namespace) -> int:
    if args.local and (args.tls_ca or args.tls_cert or args.tls_key):
        raise SystemExit("error: --tls-ca/--tls-cert/--tls-key are for --coordinator; "
                         "--local talks to no server")
    return _run_local(args) if args.local else _run_coordinator(args)
