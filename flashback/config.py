"""Configuration: one YAML file, validated once into frozen options.

Example (every key optional; these are the defaults)::

    listen: 127.0.0.1:9201
    data_dir: ./data
    head:
      chunk_range: 2h
      out_of_bounds_window: 28h
      max_ahead: 10m
      name_validation: utf8        # or legacy
      retention: 28h               # persisted data stays in memory this long
    bucket:                        # Thanos objstore format; default a directory under data_dir
      type: FILESYSTEM
      config: {directory: ./data/bucket}
    compactor:
      enabled: true
      window: 28h                  # head windows become level-1 blocks once closed
      grace: 1h                    # how long after its end a window may still get late samples
      interval: 1m                 # how often the compactor looks for work
      levels: [1, 6, 24]           # windows per block at each compaction level (28h, 7d, 28d)
      retention: {}                # per resolution, e.g. {raw: 90d, 5m: 1y}; none: keep forever
      delete_delay: 48h            # how long a block marked for deletion stays readable
      downsampling: true           # 5m blocks of every raw block, 1h blocks of second-level (7d) ranges
    wal:
      checkpoint_interval: 5m
    remote_write:
      max_body_bytes: 33554432
    query:
      lookback_delta: 5m
      max_samples: 50000000
      timeout: 2m
      max_concurrency: 20          # queries evaluating at once; more wait in line until their timeout
      split_interval: 24h          # range queries are split at multiples of this and cached per split
      results_cache_size: 256MiB   # answers of splits, kept while the data under them is unchanged
      align_queries_with_step: false   # round start/end of range queries down to a multiple of step
      caches:                      # bucket caches, bounded by bytes
        metadata: 16MiB            # decoded meta.json files
        index: 256MiB              # block index files and data-file footers
        chunks: 512MiB             # decoded column chunks of blocks
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import yaml

from store.db import DBOptions
from store.head import HeadOptions


class ConfigError(ValueError):
    """A configuration file or flag that cannot be used."""


_DURATION = re.compile(r"(\d+)(ms|s|m|h|d|w|y)")
_RESOLUTIONS = {"raw": 0, "5m": 300_000, "1h": 3_600_000}
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000,
            "y": 31_536_000_000}


def parse_duration_ms(value: object, key: str) -> int:
    """Prometheus durations (``1h30m``, ``15s``) or plain seconds."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return int(value * 1000)
    s = str(value).strip()
    pos, total = 0, 0
    for m in _DURATION.finditer(s):
        if m.start() != pos:
            break
        total += int(m.group(1)) * _UNIT_MS[m.group(2)]
        pos = m.end()
    if pos != len(s) or not s:
        raise ConfigError(f"{key}: cannot parse {value!r} as a duration (e.g. 15s, 5m, 28h)")
    return total


_BYTES = re.compile(r"^\s*(\d+)\s*(B|KiB|MiB|GiB|KB|MB|GB)?\s*$")
_BYTE_UNITS = {None: 1, "B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30,
               "KB": 10**3, "MB": 10**6, "GB": 10**9}


def parse_bytes(value: object, key: str) -> int:
    """A size: an integer number of bytes or ``512MiB``, ``1GiB``, ``100MB``; 0 turns a cache off."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    m = _BYTES.match(str(value)) if not isinstance(value, bool) else None
    if m is None:
        raise ConfigError(f"{key}: cannot parse {value!r} as a size (e.g. 512MiB, 1GiB, 0)")
    return int(m.group(1)) * _BYTE_UNITS[m.group(2)]


@dataclass(frozen=True, slots=True)
class QueryOptions:
    lookback_delta_ms: int = 300_000
    max_samples: int = 50_000_000
    timeout_s: float = 120.0
    max_concurrency: int = 20
    split_interval_ms: int = 86_400_000
    results_cache_bytes: int = 256 << 20
    align_queries_with_step: bool = False
    metadata_cache_bytes: int = 16 << 20
    index_cache_bytes: int = 256 << 20
    chunks_cache_bytes: int = 512 << 20


@dataclass(frozen=True, slots=True)
class CompactorOptions:
    enabled: bool = True
    window_ms: int = 28 * 3_600_000
    grace_ms: int = 3_600_000
    interval_s: float = 60.0
    levels: tuple[int, ...] = (1, 6, 24)
    retention_ms: tuple[tuple[int, int], ...] = ()  # (resolution ms, retention ms); empty: keep forever
    delete_delay_s: float = 48 * 3600.0
    downsampling: bool = True

    @property
    def min_span_1h_ms(self) -> int | None:
        """Raw blocks at least this long get 1h blocks: those of the second compaction level
        (7 days by default); None (no 1h blocks) with a single level."""
        return self.window_ms * self.levels[1] if len(self.levels) > 1 else None


@dataclass(frozen=True, slots=True)
class Options:
    listen_host: str = "127.0.0.1"
    listen_port: int = 9201
    data_dir: str = "./data"
    db: DBOptions = field(default_factory=DBOptions)
    max_body_bytes: int = 32 << 20
    query: QueryOptions = field(default_factory=QueryOptions)
    bucket: dict | None = None  # objstore config; None: FILESYSTEM under data_dir/bucket
    compactor: CompactorOptions = field(default_factory=CompactorOptions)

    def bucket_config(self) -> dict:
        """The objstore configuration to use (the default one if none is configured)."""
        import os

        return self.bucket or {"type": "FILESYSTEM", "config": {"directory": os.path.join(self.data_dir, "bucket")}}


def parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(f"listen: {value!r} is not HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


def _section(doc: dict, key: str) -> dict:
    v = doc.get(key) or {}
    if not isinstance(v, dict):
        raise ConfigError(f"{key}: expected a mapping")
    return v


def _unknown(d: dict, known: set[str], where: str) -> None:
    extra = set(d) - known
    if extra:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(map(str, extra)))}")


def load(path: str | None, *, listen: str | None = None, data_dir: str | None = None) -> Options:
    """Options from a YAML file (optional) with command-line overrides."""
    doc: dict = {}
    if path:
        try:
            with open(path) as f:
                doc = yaml.safe_load(f) or {}
        except OSError as e:
            raise ConfigError(f"read config {path}: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"parse config {path}: {e}") from None
        if not isinstance(doc, dict):
            raise ConfigError(f"config {path}: expected a mapping at the top level")
    _unknown(doc, {"listen", "data_dir", "head", "wal", "remote_write", "query", "bucket", "compactor"}, "config")
    head, wal, rw, q, comp = (_section(doc, k) for k in ("head", "wal", "remote_write", "query", "compactor"))
    bucket = doc.get("bucket")
    if bucket is not None:
        from store.bucket import bucket_from_config
        from store.errors import BucketConfigError

        if not isinstance(bucket, dict):
            raise ConfigError("bucket: expected a mapping (objstore format: type, config)")
        try:
            bucket_from_config(bucket).close()
        except BucketConfigError as e:
            raise ConfigError(f"bucket: {e}") from None
    _unknown(head, {"chunk_range", "out_of_bounds_window", "max_ahead", "name_validation", "retention"}, "head")
    _unknown(comp, {"enabled", "window", "grace", "interval", "levels", "retention", "delete_delay", "downsampling"},
             "compactor")
    ret = comp.get("retention") or {}
    if not isinstance(ret, dict):
        raise ConfigError("compactor.retention: expected a mapping of resolution (raw, 5m, 1h) to a duration")
    _unknown(ret, set(_RESOLUTIONS), "compactor.retention")
    retention = tuple(sorted((_RESOLUTIONS[k], parse_duration_ms(v, f"compactor.retention.{k}"))
                             for k, v in ret.items()))
    if any(ms <= 0 for _, ms in retention):
        raise ConfigError("compactor.retention: durations must be positive")
    levels = comp.get("levels", [1, 6, 24])
    if (not isinstance(levels, list) or not levels or levels[0] != 1
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in levels)
            or any(b <= a or b % a for a, b in zip(levels, levels[1:]))):
        raise ConfigError("compactor.levels: expected a list of window counts starting with 1, each a multiple "
                          "of the one before (e.g. [1, 6, 24])")
    if not isinstance(comp.get("enabled", True), bool):
        raise ConfigError("compactor.enabled: expected true or false")
    if not isinstance(comp.get("downsampling", True), bool):
        raise ConfigError("compactor.downsampling: expected true or false")
    compactor = CompactorOptions(
        enabled=comp.get("enabled", True),
        window_ms=parse_duration_ms(comp.get("window", "28h"), "compactor.window"),
        grace_ms=parse_duration_ms(comp.get("grace", "1h"), "compactor.grace"),
        interval_s=parse_duration_ms(comp.get("interval", "1m"), "compactor.interval") / 1000,
        levels=tuple(levels), retention_ms=retention,
        delete_delay_s=parse_duration_ms(comp.get("delete_delay", "48h"), "compactor.delete_delay") / 1000,
        downsampling=comp.get("downsampling", True))
    if compactor.window_ms <= 0 or compactor.interval_s <= 0:
        raise ConfigError("compactor: window and interval must be positive")
    _unknown(wal, {"checkpoint_interval"}, "wal")
    _unknown(rw, {"max_body_bytes"}, "remote_write")
    _unknown(q, {"lookback_delta", "max_samples", "timeout", "max_concurrency", "split_interval",
                 "results_cache_size", "align_queries_with_step", "caches"}, "query")
    caches = _section(q, "caches")
    _unknown(caches, {"metadata", "index", "chunks"}, "query.caches")
    max_concurrency = q.get("max_concurrency", 20)
    if not isinstance(max_concurrency, int) or isinstance(max_concurrency, bool) or max_concurrency <= 0:
        raise ConfigError("query.max_concurrency: expected a positive integer")
    align = q.get("align_queries_with_step", False)
    if not isinstance(align, bool):
        raise ConfigError("query.align_queries_with_step: expected true or false")
    host, port = parse_listen(listen or str(doc.get("listen", "127.0.0.1:9201")))
    try:
        head_opts = HeadOptions(
            chunk_range_ms=parse_duration_ms(head.get("chunk_range", "2h"), "head.chunk_range"),
            out_of_bounds_window_ms=parse_duration_ms(head.get("out_of_bounds_window", "28h"),
                                                      "head.out_of_bounds_window"),
            max_ahead_ms=parse_duration_ms(head.get("max_ahead", "10m"), "head.max_ahead"),
            name_validation=str(head.get("name_validation", "utf8")))
    except ValueError as e:
        raise ConfigError(f"head: {e}") from None
    max_body = rw.get("max_body_bytes", 32 << 20)
    if not isinstance(max_body, int) or max_body <= 0:
        raise ConfigError("remote_write.max_body_bytes: expected a positive integer")
    max_samples = q.get("max_samples", 50_000_000)
    if not isinstance(max_samples, int) or max_samples <= 0:
        raise ConfigError("query.max_samples: expected a positive integer")
    return Options(
        listen_host=host, listen_port=port,
        data_dir=data_dir or str(doc.get("data_dir", "./data")),
        db=DBOptions(head=head_opts, checkpoint_interval_s=parse_duration_ms(
            wal.get("checkpoint_interval", "5m"), "wal.checkpoint_interval") / 1000,
            retention_ms=parse_duration_ms(head.get("retention", "28h"), "head.retention")),
        bucket=bucket,
        compactor=compactor,
        max_body_bytes=max_body,
        query=QueryOptions(
            lookback_delta_ms=parse_duration_ms(q.get("lookback_delta", "5m"), "query.lookback_delta"),
            max_samples=max_samples,
            timeout_s=parse_duration_ms(q.get("timeout", "2m"), "query.timeout") / 1000,
            max_concurrency=max_concurrency,
            split_interval_ms=parse_duration_ms(q.get("split_interval", "24h"), "query.split_interval"),
            results_cache_bytes=parse_bytes(q.get("results_cache_size", "256MiB"), "query.results_cache_size"),
            align_queries_with_step=align,
            metadata_cache_bytes=parse_bytes(caches.get("metadata", "16MiB"), "query.caches.metadata"),
            index_cache_bytes=parse_bytes(caches.get("index", "256MiB"), "query.caches.index"),
            chunks_cache_bytes=parse_bytes(caches.get("chunks", "512MiB"), "query.caches.chunks")))
