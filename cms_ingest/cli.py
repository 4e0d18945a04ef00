"""`cms-ingest`: the command line of the operator contract (section 1)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NoReturn

from cms_ingest import eventloop
from cms_ingest.config import AppConfig, ConfigError, load_checked, load_config, vendor_problems
from cms_ingest.logs import configure_logging

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2

FINAL_ACTION_STATES = frozenset({"succeeded", "failed", "expired"})


def load_or_exit(path: str) -> AppConfig:
    """The config, or every problem printed to stderr and exit code 2."""
    try:
        return load_checked(path)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None


# Allocations before a young collection (Python's default: 700).
GC_YOUNG_THRESHOLD = 50_000


# ---------------------------------------------------------------------- commands


def cmd_run(args: argparse.Namespace) -> int:
    # Loading a config makes objects that nearly all live on: collections meanwhile find
    # nothing and walk the growing heap again and again (10,000 sites: 1.75-2.3 s with
    # them, 1.3 s without). `tune_garbage_collector` turns the collector back on.
    gc.disable()
    from cms_ingest.runtime.daemon import run_daemon

    config = load_or_exit(args.config)
    configure_logging(config.log_level, config.log_format)
    tune_garbage_collector()
    eventloop.run(run_daemon(config, building_sites=sites_frozen_once_built), config.event_loop)
    leave_at_once(EXIT_OK)


def leave_at_once(code: int) -> NoReturn:
    """Exit without the interpreter's teardown. The daemon has committed, released its
    leases and closed its connections by now; what is left is freeing the objects of every
    site one by one, which took over a second at 10,000 sites while systemd waited."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def tune_garbage_collector() -> None:
    """What is loaded by now (modules, the config) lives as long as the process: out of the
    collector's sight (`gc.freeze`). And a full collection far less often: in a storm of
    full pages the young generation filled thousands of times a second, and every full
    collection walked every alarm in flight, blocking the event loop for seconds (lease
    renewals then waited long enough to be cut off by the server's idle timeout)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, 20, 50)
    gc.enable()


@contextlib.contextmanager
def sites_frozen_once_built() -> Iterator[None]:
    """Around the build of every configured site's client (all of them, whichever daemon
    polls them), which then lives as long as its config: no collections meanwhile (they
    find nothing; in a daemon joining a hand-off they took 65-90 ms each), and out of the
    collector's sight afterwards, like what was loaded before (`tune_garbage_collector`):
    at 10,000 sites ~156,000 objects every later middle-generation collection would walk
    again. A site's objects form no reference cycle, built or after polls
    (`tests/test_site_registry.py`): when a reload replaces a site, its reference counts
    free it, frozen or not."""
    gc.disable()
    try:
        yield
        gc.freeze()
    finally:
        gc.enable()


def cmd_migrate(args: argparse.Namespace) -> int:
    from cms_ingest.db.engine import MigrationNeeded, create_engine, current_revision, migrate
    from cms_ingest.runtime.daemon import database_url

    config = load_or_exit(args.config)
    configure_logging(config.log_level, config.log_format)

    async def go() -> str | None:
        async with database_url(config) as url:
            engine = create_engine(url, pool_size=1)
            try:
                await migrate(engine)
                return await current_revision(engine)
            finally:
                await engine.dispose()

    try:
        revision = asyncio.run(go())
    except MigrationNeeded as exc:  # run with the daemon's URL instead of the migrator's
        print(f"cms-ingest migrate: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(f"database at revision {revision}")
    return EXIT_OK


def cmd_check_config(args: argparse.Namespace) -> int:
    config: AppConfig | None = None
    try:
        config = load_config(args.path)
        problems = vendor_problems(config)
    except ConfigError as exc:
        problems = exc.problems
    if problems or config is None:
        for problem in problems:
            print(f"{args.path}: {problem}")
        print(f"{len(problems)} problem(s) found", file=sys.stderr)
        return EXIT_CONFIG
    print(f"{args.path}: valid ({len(config.sites)} site(s))")
    return EXIT_OK


def _parse_param(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--param wants key=value, not {text!r}")
    try:
        return key, json.loads(value)  # numbers, true/false, JSON; else the plain text
    except ValueError:
        return key, value


def cmd_action(args: argparse.Namespace) -> int:
    from cms_ingest.db.engine import create_engine
    from cms_ingest.db.store import Store
    from cms_ingest.runtime.daemon import database_url

    config = load_or_exit(args.config)
    configure_logging("warning", config.log_format)
    try:
        config.site(args.site_id)
    except KeyError as exc:
        print(str(exc.args[0]), file=sys.stderr)
        return EXIT_CONFIG
    params = dict(args.param or [])
    not_after = datetime.now(UTC) + timedelta(seconds=args.not_after) if args.not_after else None

    async def go() -> dict[str, Any] | None:
        async with database_url(config) as url:
            store = Store(create_engine(url, pool_size=1))
            try:
                action_id = await store.enqueue_action(
                    site_id=args.site_id,
                    kind=args.kind,
                    target=args.target,
                    params=params,
                    requested_by=args.requested_by,
                    not_after=not_after,
                )
                print(f"action {action_id} queued; waiting up to {args.wait:g} s for its outcome")
                loop = asyncio.get_running_loop()
                deadline = loop.time() + args.wait
                row = await store.action_row(action_id)
                while row is not None and row["state"] not in FINAL_ACTION_STATES:
                    if loop.time() >= deadline:
                        break
                    await asyncio.sleep(0.2)
                    row = await store.action_row(action_id)
                return row
            finally:
                await store.engine.dispose()

    row = asyncio.run(go())
    if row is None:
        return EXIT_FAILED
    print(
        json.dumps(
            {k: row[k] for k in ("id", "state", "attempts", "result", "error", "finished_at")},
            default=str,
            indent=2,
        )
    )
    return EXIT_OK if row["state"] == "succeeded" else EXIT_FAILED


def cmd_status(args: argparse.Namespace) -> int:
    from cms_ingest.status import run_status

    config = load_or_exit(args.config)
    configure_logging("warning", "console")
    return asyncio.run(run_status(config, out=sys.stdout))


def cmd_probe(args: argparse.Namespace) -> int:
    from cms_ingest.probe import run_probe

    config = load_or_exit(args.config)
    configure_logging("warning", "console")
    try:
        site = config.site(args.site_id)
    except KeyError as exc:
        print(str(exc.args[0]), file=sys.stderr)
        return EXIT_CONFIG
    return asyncio.run(run_probe(site, out=sys.stdout))


def cmd_forward_test(args: argparse.Namespace) -> int:
    """Commissioning: one test report (SIA RX / Contact ID 601) to a forwarder's receiver;
    prints the receiver's answer. Touches no database."""
    from cms_ingest.runtime.forwarder import LinkFailure, send_test

    config = load_or_exit(args.config)
    configure_logging("warning", "console")
    try:
        forwarder = config.forwarder(args.receiver)
    except KeyError as exc:
        print(str(exc.args[0]), file=sys.stderr)
        return EXIT_CONFIG
    path = "backup" if args.backup else "primary"
    if args.backup and forwarder.backup is None:
        print(f"forwarder {forwarder.name!r} has no backup", file=sys.stderr)
        return EXIT_CONFIG
    encrypted = "AES" if forwarder.aes_key is not None else "plain"
    print(
        f"{forwarder.name}: test report ({forwarder.format.value}, {encrypted}, account "
        f"{forwarder.account}) to the {path} receiver"
    )
    try:
        address, answer = asyncio.run(send_test(forwarder, backup=args.backup))
    except LinkFailure as exc:
        print(f"no answer: {exc}")
        return EXIT_FAILED
    print(f"{address} answered {answer.kind.value}: {answer.text}")
    if answer.kind.value == "NAK":
        print("NAK: the receiver refused our timestamp or the message (check clocks, account, key)")
    elif answer.kind.value == "DUH":
        print("DUH: the receiver does not understand the message (check format and account)")
    return EXIT_OK if answer.kind.value in ("ACK", "RSP") else EXIT_FAILED


def cmd_demo(args: argparse.Namespace) -> int:
    from cms_ingest.demo import run_demo

    data_dir = Path(args.data_dir).resolve()
    demo = run_demo(data_dir=data_dir, duration=args.duration, listen=args.listen)
    return eventloop.run(demo, eventloop.DEFAULT_EVENT_LOOP)


# ---------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cms-ingest",
        description="Alarm ingest for a central monitoring station.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run the daemon")
    run.add_argument("--config", required=True, help="path to the YAML config")
    run.set_defaults(func=cmd_run)

    demo = commands.add_parser("demo", help="embedded database, simulated sites, live view")
    demo.add_argument("--data-dir", default="cms-ingest-demo", help="where the demo keeps its data")
    demo.add_argument("--duration", type=float, default=None, help="stop after N seconds")
    demo.add_argument("--listen", default="127.0.0.1:9108", help="metrics address")
    demo.set_defaults(func=cmd_demo)

    migrate = commands.add_parser("migrate", help="apply database migrations and exit")
    migrate.add_argument("--config", required=True)
    migrate.set_defaults(func=cmd_migrate)

    check = commands.add_parser("check-config", help="validate a config file")
    check.add_argument("path")
    check.set_defaults(func=cmd_check_config)

    probe = commands.add_parser("probe", help="commissioning check of one site")
    probe.add_argument("--config", required=True)
    probe.add_argument("site_id")
    probe.set_defaults(func=cmd_probe)

    status = commands.add_parser("status", help="one line per site: health, alarms, backlogs")
    status.add_argument("--config", required=True)
    status.set_defaults(func=cmd_status)

    forward = commands.add_parser(
        "forward-test", help="send one test report to a forwarder's receiver (commissioning)"
    )
    forward.add_argument("--config", required=True)
    forward.add_argument("receiver", help="the forwarder's name")
    forward.add_argument("--backup", action="store_true", help="use the backup address")
    forward.set_defaults(func=cmd_forward_test)

    action = commands.add_parser("action", help="enqueue an action and wait for its outcome")
    action.add_argument("--config", required=True)
    action.add_argument("site_id")
    action.add_argument("kind")
    action.add_argument("target")
    action.add_argument("--param", action="append", type=_parse_param, metavar="KEY=VALUE")
    action.add_argument("--wait", type=float, default=30.0, help="seconds to wait (default 30)")
    action.add_argument("--not-after", type=float, default=None, help="expire after N seconds")
    action.add_argument("--requested-by", default="cli")
    action.set_defaults(func=cmd_action)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result: int = args.func(args)
    except KeyboardInterrupt:
        return 130
    return result


if __name__ == "__main__":
    raise SystemExit(main())
