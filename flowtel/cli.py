"""The ``flowtel`` command line: run, doctor, demo, observe, map, dnsproxy, policy suggest."""
from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from dataclasses import dataclass
from typing import Callable, Sequence

from flowtel.errors import StartError, UsageError


def node_name() -> str:
    """The node's name as Kubernetes knows it (Downward API ``NODE_NAME``), else the hostname."""
    return os.environ.get("NODE_NAME") or socket.gethostname()


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def cmd_run(args: argparse.Namespace) -> int:
    from flowtel.config import ConfigError, load_config
    from flowtel.registry import factories_by_kind
    from flowtel.pipeline import Service

    try:
        config = load_config(args.config, factories=factories_by_kind())
        service = Service(config, node_name=node_name())
        logging.getLogger("flowtel").info("starting with %s on node %s", config.source, service.node_name)
        from flowtel import gcpolicy

        service.run_until_signal(after_start=gcpolicy.settle)
    except ConfigError as exc:
        print(f"flowtel: {exc}", file=sys.stderr)
        return 2
    except StartError as exc:
        print(f"flowtel: cannot start: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from flowtel import doctor
    from flowtel.config import ConfigError, load_config
    from flowtel.registry import factories_by_kind

    if args.dnsproxy:
        if args.config:
            print("flowtel doctor: --config and --dnsproxy check different processes: give one", file=sys.stderr)
            return 2
        return doctor.main_dnsproxy(kube=args.kube, kubeconfig=args.kubeconfig, pin_dir=args.pin_dir)
    if args.kube or args.kubeconfig:
        print("flowtel doctor: --kube and --kubeconfig go with --dnsproxy (an agent config names its own "
              "Kubernetes access)", file=sys.stderr)
        return 2
    try:
        # What the components of this config (default: the one `flowtel run` uses) need.
        config = load_config(args.config, factories=factories_by_kind())
    except ConfigError as exc:
        print(f"flowtel: {exc}", file=sys.stderr)
        return 2
    return doctor.main(config)


def cmd_demo(args: argparse.Namespace) -> int:
    def demo(args: argparse.Namespace) -> int:
        from flowtel.demo import run_demo

        return run_demo(duration=args.duration, interval=args.interval)

    return _usage_errors("demo", demo, args)


def _usage_errors(command: str, run: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    try:
        return run(args)
    except UsageError as exc:
        print(f"flowtel {command}: {exc}", file=sys.stderr)
        return exc.code


def cmd_observe(args: argparse.Namespace) -> int:
    from flowtel.observe import observe

    return _usage_errors("observe", observe, args)


def cmd_map(args: argparse.Namespace) -> int:
    from flowtel.observe import print_map

    return _usage_errors("map", print_map, args)


def cmd_policy_suggest(args: argparse.Namespace) -> int:
    from flowtel.policysuggest.cli import run

    return _usage_errors("policy suggest", run, args)


def cmd_dnsproxy(args: argparse.Namespace) -> int:
    from dnsproxy.run import main as dnsproxy_main

    return dnsproxy_main(args)


def _run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="config file (default: $FLOWTEL_CONFIG, /etc/flowtel/config.yaml, or the bundled config/flowtel.yaml)")


def _doctor_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="check what this config's components need (default: the config `flowtel run` would use)")
    p.add_argument("--dnsproxy", action="store_true",
                   help="check what `flowtel dnsproxy` needs instead (with --kube, --kubeconfig and --pin-dir as it gets them)")
    p.add_argument("--kube", action="store_true", help="with --dnsproxy: the proxy watches the Kubernetes API")
    p.add_argument("--kubeconfig", help="with --dnsproxy: the proxy's --kubeconfig")
    p.add_argument("--pin-dir", default="/sys/fs/bpf/flowtel/dnsproxy", help="with --dnsproxy: the proxy's --pin-dir")


def _demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--duration", type=float, default=60.0, help="seconds to run before the summary (default 60)")
    p.add_argument("--interval", type=float, default=2.0, help="flow collection interval in seconds (default 2)")


def _observe_arguments(p: argparse.ArgumentParser) -> None:
    from flowtel.observe import add_observe_arguments

    add_observe_arguments(p)


def _map_arguments(p: argparse.ArgumentParser) -> None:
    from flowtel.observe import add_map_arguments

    add_map_arguments(p)


def _dnsproxy_arguments(p: argparse.ArgumentParser) -> None:
    from dnsproxy.run import add_arguments

    add_arguments(p)


def _policy_arguments(p: argparse.ArgumentParser) -> None:
    from flowtel.policysuggest.cli import add_arguments as add_suggest_arguments

    policy_sub = p.add_subparsers(dest="policy_command", required=True)
    suggest = policy_sub.add_parser(
        "suggest", help="write the least-privilege CiliumNetworkPolicy for what a workload was seen doing",
        description="Write the least-privilege cilium.io/v2 CiliumNetworkPolicy that allows the egress a "
                    "workload made (its DNS lookups, the names, pods and addresses it connected to), from a "
                    "running agent's flows or a flow-log file. See docs/policy-suggest.md.")
    add_suggest_arguments(suggest)
    suggest.set_defaults(func=cmd_policy_suggest)


@dataclass(frozen=True, slots=True)
class _Command:
    name: str
    help: str
    run: Callable[[argparse.Namespace], int]
    # Adds the command's arguments; it imports the command's modules, so it runs only for
    # the command invoked (the DNS proxy's kubernetes client and pyroute2 stay out of
    # `flowtel observe`).
    arguments: Callable[[argparse.ArgumentParser], None]


COMMANDS = (
    _Command("run", "run the agent until SIGINT/SIGTERM", cmd_run, _run_arguments),
    _Command("doctor", "check whether the agent can run on this node and how to fix what is missing", cmd_doctor,
             _doctor_arguments),
    _Command("demo", "run the agent against throwaway network-namespace pods with generated traffic", cmd_demo,
             _demo_arguments),
    _Command("observe", "print flows from a running agent, as `hubble observe` does", cmd_observe, _observe_arguments),
    _Command("map", "print the service dependency map of a running agent", cmd_map, _map_arguments),
    _Command("dnsproxy", "run the FQDN-filtering DNS proxy and its enforcement datapath", cmd_dnsproxy,
             _dnsproxy_arguments),
    _Command("policy", "work with CiliumNetworkPolicy egress policies", cmd_policy_suggest, _policy_arguments),
)
_GLOBAL_OPTIONS_WITH_VALUE = ("--log-level",)


def invoked_command(argv: Sequence[str]) -> str | None:
    """The subcommand ``argv`` names (the first word that is no global option or its value)."""
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg in _GLOBAL_OPTIONS_WITH_VALUE:
            skip = True
        elif arg == "--":
            continue
        elif not arg.startswith("-"):
            return arg
    return None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; with ``command``, only that subcommand gets its arguments (and imports
    its modules); "" (no subcommand named): none does, `flowtel --help` lists them all."""
    parser = argparse.ArgumentParser(prog="flowtel", description="Kubernetes network observability as an OpenTelemetry pipeline")
    parser.add_argument("--log-level", default=os.environ.get("FLOWTEL_LOG_LEVEL", "info"), help="debug, info, warning, error")
    sub = parser.add_subparsers(dest="command", required=True)
    for c in COMMANDS:
        p = sub.add_parser(c.name, help=c.help)
        p.set_defaults(func=c.run)
        if command is None or command == c.name:
            c.arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(invoked_command(argv) or "").parse_args(argv)
    _setup_logging(args.log_level)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
