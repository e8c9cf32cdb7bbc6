"""``flashback bucket ls|inspect|verify|retention``: tools for the blocks in a bucket.

The bucket is given in Thanos' objstore YAML (``--objstore.config-file FILE``
or inline ``--objstore.config YAML``), so an existing Thanos configuration
works; without either it is the embedded mode's filesystem bucket,
``<data-dir>/bucket``. ``flashback/cli.py`` adds the ``bucket`` command with
``configure_parser`` and calls ``run``.

Output goes to stdout, logs (key=value) to stderr. Exit codes: 0 success,
1 a problem found or an operation that did not succeed (``verify`` found a bad
block, ``retention`` could not handle a block, the bucket is unreachable),
2 invalid arguments or configuration.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import time
from collections import Counter as Tally
from typing import TYPE_CHECKING, Callable, TextIO

from store import ulid as ulids
from store.bucket import DIR_DELIM, Bucket, FilesystemBucket, RetryingBucket, bucket_from_config
from store.errors import BlockError, BucketConfigError, BucketError, CorruptBlock, ObjectNotFound

if TYPE_CHECKING:
    from compactor.retention import RetentionOptions, RetentionReport
    from store.block import BlockMeta
    from store.catalog import CatalogBlock
    from store.labels import Labels

# The block modules load pyarrow and numba (about half a second): the commands import them when
# they run, so that building the ``flashback`` argument parser stays cheap for other commands.

EXIT_OK, EXIT_PROBLEM, EXIT_USAGE = 0, 1, 2

_RESOLUTION_NAMES = {0: "raw", 300_000: "5m", 3_600_000: "1h"}
_DURATION_RE = re.compile(r"(\d+)(ms|s|m|h|d|w|y)")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 7 * 86_400_000,
            "y": 365 * 86_400_000}


class UsageError(Exception):
    """Invalid arguments or configuration: exit code 2."""


# ---------------------------------------------------------------------------------------------
# Arguments


def parse_duration(value: str) -> int:
    """A Prometheus duration (``30d``, ``1y``, ``1h30m``, ``0``, ``0d``) in ms.

    Raises:
        ValueError: not a duration.
    """
    s = value.strip()
    if s == "0":
        return 0
    pos, total = 0, 0
    for m in _DURATION_RE.finditer(s):
        if m.start() != pos:
            break
        total += int(m.group(1)) * _UNIT_MS[m.group(2)]
        pos = m.end()
    if not s or pos != len(s):
        raise ValueError(f"{value!r} is not a duration (e.g. 48h, 30d, 1y, 1h30m)")
    return total


def _duration_arg(value: str) -> int:
    try:
        return parse_duration(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Adds the ``ls``, ``inspect``, ``verify`` and ``retention`` subcommands to ``parser``."""
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("bucket")
    g.add_argument("--objstore.config-file", dest="objstore_config_file", metavar="FILE",
                   help="Thanos objstore YAML file (type: S3 | FILESYSTEM, config: {...})")
    g.add_argument("--objstore.config", dest="objstore_config", metavar="YAML",
                   help="the same YAML inline (alternative to --objstore.config-file)")
    g.add_argument("--data-dir", default="./data",
                   help="without an objstore config: use the filesystem bucket DATA_DIR/bucket (default ./data)")

    sub = parser.add_subparsers(dest="bucket_command", required=True, metavar="{ls,inspect,verify,retention}")
    ls = sub.add_parser("ls", parents=[common], help="list the blocks, one line each")
    ls.add_argument("-o", "--output", choices=["table", "json"], default="table",
                    help="table (default) or one JSON object per line")
    ls.set_defaults(bucket_func=cmd_ls)

    ins = sub.add_parser("inspect", parents=[common], help="show a block's meta.json and label cardinality")
    ins.add_argument("ulid", metavar="ULID")
    ins.add_argument("--top", type=int, default=10, help="entries in each cardinality list (default 10)")
    ins.set_defaults(bucket_func=cmd_inspect)

    ver = sub.add_parser("verify", parents=[common],
                         help="check every complete block entirely; exit 1 if any is bad")
    ver.add_argument("--id", action="append", dest="ids", metavar="ULID",
                     help="verify only this block (repeatable)")
    ver.add_argument("--tmp-dir", help="directory for downloaded data files (default: the system's)")
    ver.set_defaults(bucket_func=cmd_verify)

    ret = sub.add_parser("retention", parents=[common],
                         help="mark blocks past retention, delete marked blocks after the delay (one-shot)")
    ret.add_argument("--retention.resolution-raw", dest="retention_raw", type=_duration_arg, default=0,
                     metavar="DURATION", help="keep raw blocks this long after their end (0: forever, the default)")
    ret.add_argument("--retention.resolution-5m", dest="retention_5m", type=_duration_arg, default=0,
                     metavar="DURATION", help="the same for 5m-downsampled blocks")
    ret.add_argument("--retention.resolution-1h", dest="retention_1h", type=_duration_arg, default=0,
                     metavar="DURATION", help="the same for 1h-downsampled blocks")
    ret.add_argument("--delete-delay", type=_duration_arg, default="48h",
                     metavar="DURATION", help="delete a marked block this long after marking (default 48h)")
    ret.add_argument("--partial-age", type=_duration_arg, default="48h",
                     metavar="DURATION",
                     help="delete block directories without meta.json inactive this long (default 48h; 0: never)")
    ret.add_argument("--dry-run", action="store_true", help="change nothing; show what would be marked and deleted")
    ret.add_argument("--metrics-file", metavar="FILE",
                     help="write the run's metrics here in the text format (node_exporter textfile collector)")
    ret.set_defaults(bucket_func=cmd_retention)


def open_bucket(args: argparse.Namespace) -> Bucket:
    """The bucket the arguments name, wrapped in a RetryingBucket.

    Raises:
        UsageError: both or an unreadable configuration.
    """
    if args.objstore_config_file and args.objstore_config:
        raise UsageError("give --objstore.config-file or --objstore.config, not both")
    try:
        if args.objstore_config_file:
            try:
                with open(args.objstore_config_file, encoding="utf-8") as f:
                    text = f.read()
            except OSError as err:
                raise UsageError(f"read objstore config {args.objstore_config_file}: {err.strerror}") from None
            bucket = bucket_from_config(text)
        elif args.objstore_config:
            bucket = bucket_from_config(args.objstore_config)
        else:
            directory = os.path.join(args.data_dir, "bucket")
            if not os.path.isdir(directory):
                print(f"flashback bucket: note: {directory} does not exist (no blocks yet, or another "
                      "--data-dir / --objstore.config-file?)", file=sys.stderr)
            bucket = FilesystemBucket(directory)
    except BucketConfigError as err:
        raise UsageError(str(err)) from None
    return RetryingBucket(bucket, attempts=3, backoff=0.5)


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Runs the bucket subcommand ``args`` selects; returns the exit code."""
    out = out or sys.stdout
    try:
        bucket = open_bucket(args)
    except UsageError as err:
        print(f"flashback bucket: {err}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return args.bucket_func(bucket, args, out)
    except UsageError as err:
        print(f"flashback bucket {args.bucket_command}: {err}", file=sys.stderr)
        return EXIT_USAGE
    except BucketError as err:
        print(f"flashback bucket {args.bucket_command}: bucket: {err}", file=sys.stderr)
        return EXIT_PROBLEM
    finally:
        bucket.close()


# ---------------------------------------------------------------------------------------------
# Formatting


def rfc3339(ms: int) -> str:
    """``ms`` since the Unix epoch as RFC 3339 UTC (``compactor.retention.rfc3339``)."""
    from compactor.retention import rfc3339 as fmt

    return fmt(ms)


def format_duration(ms: int) -> str:
    """A duration in ms as Prometheus writes one (``compactor.retention.format_duration``)."""
    from compactor.retention import format_duration as fmt

    return fmt(ms)


def format_bytes(n: int) -> str:
    """``n`` bytes in binary units (``512B``, ``1.5KiB``, ``120.3MiB``)."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{n}B" if unit == "B" else f"{size:.1f}{unit}"
        size /= 1024
    raise AssertionError("unreachable")


def format_resolution(ms: int) -> str:
    return _RESOLUTION_NAMES.get(ms) or format_duration(ms)


def _objects(n: int) -> str:
    return f"{n} object" if n == 1 else f"{n} objects"


def _size(meta: BlockMeta) -> int:
    return sum(f.size_bytes for f in meta.files)


def _status(b: CatalogBlock) -> str:
    notes = []
    if b.deletion_mark is not None:
        notes.append(f"marked {rfc3339(b.deletion_mark.deletion_time * 1000)}")
    if b.mark_error is not None:
        notes.append("deletion mark unreadable")
    if b.hidden_by is not None:
        notes.append(f"hidden by {b.hidden_by}")
    return ", ".join(notes) or "-"


def _table(rows: list[list[str]], right: set[int], out: TextIO) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))]
        print("  ".join(cells).rstrip(), file=out)


# ---------------------------------------------------------------------------------------------
# ls


def cmd_ls(bucket: Bucket, args: argparse.Namespace, out: TextIO) -> int:
    """One line per complete block; then unreadable blocks and directories without meta.json."""
    from store.catalog import BlockCatalog

    catalog = BlockCatalog(bucket)
    catalog.refresh()
    blocks = catalog.all_blocks()
    errors = catalog.errors
    partial = catalog.partial_blocks(0)
    if args.output == "json":
        for b in blocks:
            m = b.meta
            print(json.dumps({
                "ulid": m.ulid, "minTime": m.min_time, "maxTime": m.max_time, "level": m.level,
                "resolution": m.resolution, "numSeries": m.num_series, "numSamples": m.num_samples,
                "sizeBytes": _size(m), "labels": dict(m.labels),
                "deletionTime": b.deletion_mark.deletion_time if b.deletion_mark else None,
                "hiddenBy": b.hidden_by}), file=out)
        for u, err in sorted(errors.items()):
            print(json.dumps({"ulid": u, "error": str(err)}), file=out)
        for p in partial:
            print(json.dumps({"ulid": p.ulid, "partial": True, "objects": len(p.objects)}), file=out)
        return EXIT_OK
    rows = [["ULID", "MIN TIME", "MAX TIME", "DURATION", "LEVEL", "RES", "SERIES", "SAMPLES", "SIZE", "STATUS"]]
    for b in blocks:
        m = b.meta
        rows.append([m.ulid, rfc3339(m.min_time), rfc3339(m.max_time), format_duration(m.max_time - m.min_time),
                     str(m.level), format_resolution(m.resolution), str(m.num_series), str(m.num_samples),
                     format_bytes(_size(m)), _status(b)])
    if len(rows) > 1:
        _table(rows, {3, 4, 6, 7, 8}, out)
    for u, err in sorted(errors.items()):
        print(f"{u}  unreadable: {err}", file=out)
    for p in partial:
        print(f"{p.ulid}  partial: no meta.json, {_objects(len(p.objects))}, last written "
              f"{rfc3339(p.last_activity_ms)}", file=out)
    print(f"{len(blocks)} blocks, {format_bytes(sum(_size(b.meta) for b in blocks))}"
          f"{f', {len(errors)} unreadable' if errors else ''}"
          f"{f', {len(partial)} partial' if partial else ''}", file=out)
    return EXIT_OK


# ---------------------------------------------------------------------------------------------
# inspect


def cmd_inspect(bucket: Bucket, args: argparse.Namespace, out: TextIO) -> int:
    """meta.json in words, the deletion mark, visibility, and label cardinality from the index."""
    from store.catalog import BlockCatalog

    u = args.ulid
    if not ulids.is_valid(u):
        raise UsageError(f"{u!r} is not a block ULID (26 upper-case characters)")
    if args.top < 1:
        raise UsageError("--top must be at least 1")
    catalog = BlockCatalog(bucket)
    catalog.refresh()
    b = catalog.get(u)
    if b is None:
        if u in catalog.errors:
            print(f"block {u}: meta.json unreadable: {catalog.errors[u]}", file=out)
        elif any(True for _ in bucket.iter(u)):
            print(f"block {u}: incomplete (no meta.json): an upload in progress or aborted, or a deletion "
                  "under way", file=out)
        else:
            print(f"block {u}: not found", file=out)
        return EXIT_PROBLEM
    m = b.meta
    rows = [
        ("block", m.ulid),
        ("time range", f"{rfc3339(m.min_time)} .. {rfc3339(m.max_time)} ({format_duration(m.max_time - m.min_time)}, "
                       "end exclusive)"),
        ("minTime", str(m.min_time)),
        ("maxTime", str(m.max_time)),
        ("series", str(m.num_series)),
        ("samples", str(m.num_samples)) if not m.resolution else
        ("aggregates", f"{m.num_samples} rows: count, sum, min, max, counter per series and "
                       f"{format_resolution(m.resolution)} interval"),
        ("resolution", f"{format_resolution(m.resolution)} ({m.resolution} ms)"),
        ("level", str(m.level)),
        ("sources", ", ".join("itself" if s == m.ulid else s for s in m.sources) or "-"),
        ("labels", str(m.labels) if len(m.labels) else "-"),
        ("format", f"flashback-block version {m.version}"),
        ("size", f"{format_bytes(_size(m))} ({_size(m)} bytes)"),
    ]
    for f in m.files:
        rows.append((f"  {f.rel_path}", f"{format_bytes(f.size_bytes)} ({f.size_bytes} bytes), sha256 {f.sha256}"))
    if b.deletion_mark is not None:
        d = b.deletion_mark
        rows.append(("deletion mark", f"marked {rfc3339(d.deletion_time * 1000)}: {d.details or 'no reason given'}"))
    elif b.mark_error is not None:
        rows.append(("deletion mark", f"unreadable: {b.mark_error}"))
    else:
        rows.append(("deletion mark", "none"))
    rows.append(("queried", f"no: its data is in block {b.hidden_by}" if b.hidden_by else "yes"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k.ljust(width)}  {v}", file=out)

    try:
        labels = _read_index_labels(bucket, m)
    except BlockError as err:
        print(f"\nlabel cardinality: unavailable: {err}", file=out)
        return EXIT_PROBLEM
    _print_cardinality(labels, args.top, out)
    return EXIT_OK


def _read_index_labels(bucket: Bucket, meta: BlockMeta) -> list[Labels]:
    """The series' labels from the block's index, checked against meta.json."""
    from store.block import INDEX_FILE, decode_index

    f = meta.file(INDEX_FILE)
    ctx = f"block {meta.ulid}: {INDEX_FILE}"
    try:
        data = bucket.get(meta.ulid + DIR_DELIM + INDEX_FILE)
    except ObjectNotFound:
        raise CorruptBlock(f"{ctx}: listed in meta.json but missing") from None
    if len(data) != f.size_bytes or hashlib.sha256(data).hexdigest() != f.sha256:
        raise CorruptBlock(f"{ctx}: {len(data)} bytes not matching meta.json's size {f.size_bytes} and SHA-256")
    return decode_index(data, ctx).labels


def _print_cardinality(labels: list[Labels], top: int, out: TextIO) -> None:
    values: dict[str, set[str]] = {}
    series_with: Tally[str] = Tally()
    by_metric: Tally[str] = Tally()
    for ls in labels:
        for name, value in ls:
            values.setdefault(name, set()).add(value)
            series_with[name] += 1
        by_metric[ls.get("__name__")] += 1
    pairs = sum(len(v) for v in values.values())
    print(f"\nlabel cardinality: {len(labels)} series, {len(values)} label names, {pairs} name=value pairs", file=out)
    if not labels:
        return
    names = sorted(values, key=lambda n: (-len(values[n]), n))
    rows = [["LABEL", "VALUES", "SERIES"]] + [[n, str(len(values[n])), str(series_with[n])] for n in names[:top]]
    _table(rows, {1, 2}, out)
    if len(names) > top:
        print(f"... {len(names) - top} more label names", file=out)
    print("", file=out)
    metrics = sorted(by_metric.items(), key=lambda kv: (-kv[1], kv[0]))
    rows = [["METRIC", "SERIES"]] + [[k or "(no __name__)", str(v)] for k, v in metrics[:top]]
    _table(rows, {1}, out)
    if len(metrics) > top:
        print(f"... {len(metrics) - top} more metric names", file=out)


# ---------------------------------------------------------------------------------------------
# verify


def cmd_verify(bucket: Bucket, args: argparse.Namespace, out: TextIO) -> int:
    """verify_block on every complete block; unreadable metadata counts as a failure too."""
    from store.block import verify_block
    from store.catalog import BlockCatalog

    catalog = BlockCatalog(bucket)
    catalog.refresh()
    wanted = set(args.ids or ())
    for u in wanted:
        if not ulids.is_valid(u):
            raise UsageError(f"--id {u!r} is not a block ULID")
    ok = failed = 0
    for b in catalog.all_blocks():
        if wanted and b.ulid not in wanted:
            continue
        try:
            meta = verify_block(bucket, b.ulid, tmp_dir=args.tmp_dir)
        except BlockError as err:
            failed += 1
            print(f"FAIL     {b.ulid}  {err}", file=out)
            continue
        if b.mark_error is not None:
            failed += 1
            print(f"FAIL     {b.ulid}  data ok, but {b.mark_error}", file=out)
            continue
        ok += 1
        what = (f"{meta.num_samples} samples" if not meta.resolution else
                f"{meta.num_samples} {format_resolution(meta.resolution)} aggregate rows")
        print(f"ok       {b.ulid}  {meta.num_series} series, {what}, {format_bytes(_size(meta))}", file=out)
    for u, err in sorted(catalog.errors.items()):
        if wanted and u not in wanted:
            continue
        failed += 1
        print(f"FAIL     {u}  {err}", file=out)
    missing = wanted - {b.ulid for b in catalog.all_blocks()} - set(catalog.errors)
    for u in sorted(missing):
        failed += 1
        print(f"FAIL     {u}  no complete block with this ULID", file=out)
    partial = [p for p in catalog.partial_blocks(0) if not wanted or p.ulid in wanted]
    for p in partial:
        mark = ", deletion mark present (deletion interrupted?)" if p.deletion_mark else ""
        print(f"partial  {p.ulid}  no meta.json: {_objects(len(p.objects))}, last written "
              f"{rfc3339(p.last_activity_ms)}{mark}", file=out)
    if not wanted:
        for res in sorted({b.meta.resolution for b in catalog.all_blocks()}):
            for a, c in catalog.overlaps(res):
                print(f"overlap  {a.ulid} {c.ulid}  {format_resolution(res)}: "
                      f"{rfc3339(max(a.min_time, c.min_time))} .. {rfc3339(min(a.max_time, c.max_time))} "
                      "(read both, deduplicated by timestamp; the compactor merges them)", file=out)
    print(f"{ok + failed} blocks verified: {ok} ok, {failed} failed; {len(partial)} partial", file=out)
    return EXIT_PROBLEM if failed else EXIT_OK


# ---------------------------------------------------------------------------------------------
# retention


def cmd_retention(bucket: Bucket, args: argparse.Namespace, out: TextIO,
                  now_ms: Callable[[], int] = lambda: int(time.time() * 1000)) -> int:
    """One retention run; exit 1 if a block could not be handled (the others still were)."""
    from compactor.retention import (
        RESOLUTION_1H, RESOLUTION_5M, RESOLUTION_RAW, RetentionKeeper, RetentionMetrics, RetentionOptions,
    )
    from prometheus_client import CollectorRegistry, write_to_textfile

    by_res = {res: ms for res, ms in ((RESOLUTION_RAW, args.retention_raw), (RESOLUTION_5M, args.retention_5m),
                                      (RESOLUTION_1H, args.retention_1h)) if ms > 0}
    try:
        options = RetentionOptions(by_res, delete_delay_s=args.delete_delay / 1000,
                                   partial_age_s=args.partial_age / 1000 if args.partial_age > 0 else None)
    except ValueError as err:
        raise UsageError(str(err)) from None
    registry = CollectorRegistry()
    keeper = RetentionKeeper(bucket, options, metrics=RetentionMetrics(registry))
    try:
        report = keeper.run(now_ms(), dry_run=args.dry_run)
    finally:
        if args.metrics_file:
            write_to_textfile(args.metrics_file, registry)
    _print_report(report, options, out)
    return EXIT_OK if report.ok else EXIT_PROBLEM


def _print_report(r: RetentionReport, options: RetentionOptions, out: TextIO) -> None:
    would = "would " if r.dry_run else ""
    kept = ", ".join(f"{format_resolution(res)} {format_duration(ms)}"
                     for res, ms in sorted(options.retention_ms_by_resolution.items())) or "none"
    print(f"retention at {rfc3339(r.now_ms)} ({'dry run' if r.dry_run else 'for real'}): retention {kept}; "
          f"delete delay {format_duration(int(options.delete_delay_s * 1000))}", file=out)
    just_marked = {a.ulid for a in r.marked}
    pending = [a for a in r.pending if a.ulid not in just_marked]
    for verb, actions in ((f"{would}mark", r.marked), (f"{would}delete", r.deleted), ("pending", pending),
                          ("keep", r.kept)):
        for a in actions:
            print(f"{verb:<13} {a.ulid}  {format_resolution(a.resolution):>3}  {rfc3339(a.min_time)} .. "
                  f"{rfc3339(a.max_time)}  {a.reason}", file=out)
    for p in r.partial_deleted:
        print(f"{would + 'delete':<13} {p.ulid}  partial: no meta.json, {_objects(len(p.objects))}, last written "
              f"{rfc3339(p.last_activity_ms)}", file=out)
    for e in r.errors:
        print(f"{'error':<13} {e.ulid}  {e.message}", file=out)
    print(f"{'would be ' if r.dry_run else ''}marked: {len(r.marked)}, deleted: {len(r.deleted)}, "
          f"partial deleted: {len(r.partial_deleted)}; pending: {len(r.pending)}, kept: {len(r.kept)}, "
          f"errors: {len(r.errors)}", file=out)
