"""The ``flowtel`` command line: run, doctor, demo, observe, map, dnsproxy, policy suggest."""
from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from typing import Callable

from flowtel.config import ConfigError, load_config
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
    from flowtel.pipeline import Service

    try:
        config = load_config(args.config)
        service = Service(config, node_name=node_name())
        logging.getLogger("flowtel").info("starting with %s on node %s", config.source, service.node_name)
        service.run_until_signal()
    except ConfigError as exc:
        print(f"flowtel: {exc}", file=sys.stderr)
        return 2
    except StartError as exc:
        print(f"flowtel: cannot start: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from flowtel import doctor

    kube = None
    if args.config:
        try:
            config = load_config(args.config)
        except ConfigError as exc:
            print(f"flowtel: {exc}", file=sys.stderr)
            return 2
        kube = doctor.kube_settings_from_config(config)
    return doctor.main(kube)


def cmd_demo(args: argparse.Namespace) -> int:
    from flowtel.demo import run_demo

    return run_demo(duration=args.duration, interval=args.interval)


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


def _command(argv: list[str] | None) -> str | None:
    """The subcommand ``argv`` invokes, if it names one (None: no argv, or help for all)."""
    if argv is None:
        return None
    args = argv
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--log-level":
            i += 2
            continue
        if a.startswith("-"):
            if a in ("-h", "--help"):
                return None
            i += 1
            continue
        return a
    return None


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The CLI's parser: every command's arguments, or with ``argv`` naming a command only that
    command's, so that the others' (dnsproxy's pull the Kubernetes client, pyroute2 and
    dnspython) are not imported into a process that does not run them, e.g. the agent
    (``flowtel run``)."""
    wanted = _command(argv)

    def full(name: str) -> bool:
        return wanted is None or wanted == name

    parser = argparse.ArgumentParser(prog="flowtel", description="Kubernetes network observability as an OpenTelemetry pipeline")
    parser.add_argument("--log-level", default=os.environ.get("FLOWTEL_LOG_LEVEL", "info"), help="debug, info, warning, error")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the agent until SIGINT/SIGTERM")
    run.add_argument("--config", help="config file (default: $FLOWTEL_CONFIG, /etc/flowtel/config.yaml, or the bundled config/flowtel.yaml)")
    run.set_defaults(func=cmd_run)

    doc = sub.add_parser("doctor", help="check whether the agent can run on this node and how to fix what is missing")
    doc.add_argument("--config", help="also check what this config needs (e.g. Kubernetes access)")
    doc.set_defaults(func=cmd_doctor)

    demo = sub.add_parser("demo", help="run the agent against throwaway network-namespace pods with generated traffic")
    demo.add_argument("--duration", type=float, default=60.0, help="seconds to run before the summary (default 60)")
    demo.add_argument("--interval", type=float, default=2.0, help="flow collection interval in seconds (default 2)")
    demo.set_defaults(func=cmd_demo)

    observe = sub.add_parser("observe", help="print flows from a running agent, as `hubble observe` does")
    service_map = sub.add_parser("map", help="print the service dependency map of a running agent")
    if full("observe") or full("map"):
        from flowtel.observe import add_map_arguments, add_observe_arguments

        add_observe_arguments(observe)
        add_map_arguments(service_map)
    observe.set_defaults(func=cmd_observe)
    service_map.set_defaults(func=cmd_map)

    proxy = sub.add_parser("dnsproxy", help="run the FQDN-filtering DNS proxy and its enforcement datapath")
    if full("dnsproxy"):
        from dnsproxy.run import add_arguments as add_dnsproxy_arguments

        add_dnsproxy_arguments(proxy)
    proxy.set_defaults(func=cmd_dnsproxy)

    policy = sub.add_parser("policy", help="work with CiliumNetworkPolicy egress policies")
    policy_sub = policy.add_subparsers(dest="policy_command", required=True)
    suggest = policy_sub.add_parser(
        "suggest", help="write the least-privilege CiliumNetworkPolicy for what a workload was seen doing",
        description="Write the least-privilege cilium.io/v2 CiliumNetworkPolicy that allows the egress a "
                    "workload made (its DNS lookups, the names, pods and addresses it connected to), from a "
                    "running agent's flows or a flow-log file. See docs/policy-suggest.md.")
    if full("policy"):
        from flowtel.policysuggest.cli import add_arguments as add_suggest_arguments

        add_suggest_arguments(suggest)
    suggest.set_defaults(func=cmd_policy_suggest)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    _setup_logging(args.log_level)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
