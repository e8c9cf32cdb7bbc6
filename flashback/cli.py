"""The ``flashback`` command."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from flashback import malloc


class _KeyValueFormatter(logging.Formatter):
    """``ts=... level=... msg=... key=value`` lines, with the structured ``extra`` keys."""

    _STD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        parts = [f"ts={self.formatTime(record, '%Y-%m-%dT%H:%M:%S')}", f"level={record.levelname.lower()}",
                 f"component={record.name}", f"msg={record.getMessage()!r}"]
        parts += [f"{k}={v}" for k, v in vars(record).items() if k not in self._STD]
        if record.exc_info:
            parts.append("exc=" + repr(self.formatException(record.exc_info)))
        return " ".join(parts)


def _setup_logging(level: str) -> None:
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(_KeyValueFormatter())
    logging.basicConfig(level=level.upper(), handlers=[h])


def cmd_up(args: argparse.Namespace) -> int:
    from flashback.app import App
    from flashback.config import ConfigError, load

    try:
        options = load(args.config, listen=args.listen, data_dir=args.data_dir)
    except ConfigError as e:
        print(f"flashback: {e}", file=sys.stderr)
        return 2
    app = App(options)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    app.start()
    host, port = app.address
    print(f"flashback: listening on http://{host}:{port} (data in {options.data_dir})", file=sys.stderr, flush=True)
    stop.wait()
    app.close()
    return 0


def cmd_promqltest(args: argparse.Namespace) -> int:
    from querier.engine import Engine
    from querier.promqltest import engine_evaluator, main as run

    # The upstream runner's settings: lookback 5m, subqueries without a step use 1m, delayed
    # __name__ removal on.
    engine = Engine(lookback_delta_ms=300_000, subquery_step_ms=60_000, timeout_s=args.timeout,
                    delayed_name_removal=True)
    failed = run(args.files, engine_evaluator(engine), verbose=args.verbose)
    return 1 if failed else 0


def cmd_bucket(args: argparse.Namespace) -> int:
    from compactor import bucketcli

    rc = bucketcli.run(args)
    # A one-shot command: its work is done and reported. Interpreter teardown with native thread
    # pools still alive (pyarrow, boto3's transfer threads) was seen to abort now and then
    # ("terminate called without an active exception", exit -6) after a successful run, which a
    # CronJob would count as a failure; leave without running native destructors.
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(rc)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="flashback", description="Prometheus-compatible remote storage.")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    sub = p.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="run every component in one process (embedded defaults)")
    up.add_argument("--config", help="YAML configuration file")
    up.add_argument("--data-dir", help="data directory (default ./data)")
    up.add_argument("--listen", help="HOST:PORT to serve on (default 127.0.0.1:9201)")
    up.set_defaults(func=cmd_up)
    pt = sub.add_parser("promqltest", help="run Prometheus PromQL test scripts (promqltest format)")
    pt.add_argument("files", nargs="+", metavar="FILE")
    pt.add_argument("-v", "--verbose", action="store_true", help="also list passed evals")
    pt.add_argument("--timeout", type=float, default=60.0, help="per-eval timeout in seconds")
    pt.set_defaults(func=cmd_promqltest)
    bk = sub.add_parser("bucket", help="inspect, verify and apply retention to the blocks in a bucket")
    from compactor import bucketcli

    bucketcli.configure_parser(bk)
    bk.set_defaults(func=cmd_bucket)
    from flashback import roles

    roles.configure(sub)
    args = p.parse_args(argv)
    _setup_logging(args.log_level)
    malloc.tune()
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
