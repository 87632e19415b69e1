"""`pdserve` command line: each subcommand lives in its own module and is imported lazily."""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module with add_arguments(parser) and run(args) -> int, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("pdserve.demo", "start a local 1 prefill + 1 decode cluster, run a prompt mix, check it"),
    "generate": ("pdserve.generate_cli", "generate text locally (--local) or through a coordinator"),
    "up": ("pdserve.up", "start a coordinator and prefill/decode workers on this node"),
    "coordinator": ("pdserve.coordinator.cli", "run the gRPC coordinator"),
    "worker": ("pdserve.worker_cli", "run one worker: --role prefill|decode|both"),
    "bench": ("pdserve.benchmarks.cli", "benchmarks (`pdserve bench --help` lists every one)"),
    "plan": ("pdserve.benchmarks.plan", "predict goodput of every P:D split from calibrated profiles"),
}


def _top_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pdserve",
        description="Serve LLMs with prefill and decode disaggregated across GPU pools.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="commands:\n" + "\n".join(f"  {n:<12} {h}" for n, (_, h) in COMMANDS.items())
        + "\n\nRun `pdserve COMMAND --help` for a command's options.",
    )
    p.add_argument("--version", action="store_true", help="print the version and exit")
    p.add_argument("command", nargs="?", choices=list(COMMANDS), metavar="COMMAND")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = _top_parser()
    if not argv or argv[0] in ("-h", "--help"):
        top.print_help()
        return 0 if argv else 2
    if argv[0] == "--version":
        from pdserve import __version__
        print(__version__)
        return 0
    name = argv[0]
    if name not in COMMANDS:
        top.error(f"unknown command {name!r}; choose from {', '.join(COMMANDS)}")
    module_name, help_text = COMMANDS[name]
    try:
        module = importlib.import_module(module_name)
        parser = argparse.ArgumentParser(prog=f"pdserve {name}", description=help_text)
        module.add_arguments(parser)
        args = parser.parse_args(argv[1:])
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        from pdserve.errors import user_error
        line = user_error(exc)
        if line is None:
            raise
        print(f"pdserve {name}: {line}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
