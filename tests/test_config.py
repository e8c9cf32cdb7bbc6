import re

import pytest

from flashback.config import ConfigError, load, parse_duration_ms


@pytest.mark.parametrize("text,ms", [("15s", 15_000), ("1h30m", 5_400_000), ("28h", 100_800_000), ("500ms", 500),
                                     (90, 90_000), ("1d", 86_400_000)])
def test_durations(text, ms):
    assert parse_duration_ms(text, "k") == ms


@pytest.mark.parametrize("text", ["", "5", "1h 2m", "-1s", "abc", "5x"])
def test_bad_durations(text):
    with pytest.raises(ConfigError, match="k: cannot parse"):
        parse_duration_ms(text, "k")


def test_defaults_without_a_file():
    o = load(None)
    assert (o.listen_host, o.listen_port, o.data_dir) == ("127.0.0.1", 9201, "./data")
    assert o.db.head.out_of_bounds_window_ms == 28 * 3600_000


def test_bucket_and_compactor_settings(tmp_path):
    o = load(None, data_dir="/d")
    assert o.bucket_config() == {"type": "FILESYSTEM", "config": {"directory": "/d/bucket"}}
    assert (o.compactor.window_ms, o.compactor.grace_ms, o.db.retention_ms) == (28 * 3600_000, 3600_000, 28 * 3600_000)
    p = tmp_path / "c.yml"
    p.write_text("bucket: {type: S3, config: {bucket: b, endpoint: '127.0.0.1:9000', access_key: a, secret_key: s, "
                 "insecure: true}}\ncompactor: {window: 2h, grace: 5m, interval: 10s, enabled: false}\n"
                 "head: {retention: 3h}\n")
    o = load(str(p))
    assert o.bucket_config()["type"] == "S3" and not o.compactor.enabled
    assert (o.compactor.window_ms, o.compactor.grace_ms, o.compactor.interval_s) == (7200_000, 300_000, 10.0)
    assert o.db.retention_ms == 3 * 3600_000
    assert load(None).compactor.levels == (1, 6, 24) and load(None).compactor.retention_ms == ()
    p.write_text("compactor: {retention: {raw: 30d, 1h: 1y}, delete_delay: 1h}\n")
    o = load(str(p))
    assert o.compactor.retention_ms == ((0, 30 * 86_400_000), (3_600_000, 31_536_000_000))
    assert o.compactor.delete_delay_s == 3600


def test_file_and_flag_overrides(tmp_path):
    p = tmp_path / "c.yml"
    p.write_text("listen: 0.0.0.0:9999\ndata_dir: /x\nhead: {chunk_range: 1h, name_validation: legacy}\n"
                 "query: {lookback_delta: 1m}\nwal: {checkpoint_interval: 30s}\n")
    o = load(str(p), listen="127.0.0.1:1234")
    assert (o.listen_host, o.listen_port, o.data_dir) == ("127.0.0.1", 1234, "/x")
    assert o.db.head.chunk_range_ms == 3_600_000 and o.db.head.name_validation == "legacy"
    assert o.query.lookback_delta_ms == 60_000 and o.db.checkpoint_interval_s == 30


@pytest.mark.parametrize("text,msg", [
    ("nope: 1\n", "unknown key(s) nope"),
    ("bucket: {type: GCS, config: {}}\n", "bucket: objstore config: unsupported bucket type"),
    ("bucket: [1]\n", "bucket: expected a mapping"),
    ("compactor: {window: 0s}\n", "window and interval must be positive"),
    ("compactor: {enabled: maybe}\n", "compactor.enabled: expected true or false"),
    ("compactor: {speed: 1}\n", "compactor: unknown key(s) speed"),
    ("compactor: {levels: [2, 4]}\n", "compactor.levels: expected a list"),
    ("compactor: {retention: {raw: 0s}}\n", "durations must be positive"),
    ("compactor: {retention: {2h: 1d}}\n", "compactor.retention: unknown key(s) 2h"),
    ("compactor: {retention: 30d}\n", "compactor.retention: expected a mapping"),
    ("compactor: {levels: [1, 4, 6]}\n", "compactor.levels: expected a list"),
    ("head: {colour: red}\n", "head: unknown key(s) colour"),
    ("head: {name_validation: ascii}\n", "name_validation must be utf8 or legacy"),
    ("listen: nowhere\n", "is not HOST:PORT"),
    ("- a\n", "expected a mapping"),
    ("a: [\n", "parse config"),
    ("remote_write: {max_body_bytes: -1}\n", "max_body_bytes"),
])
def test_bad_config_files(tmp_path, text, msg):
    p = tmp_path / "c.yml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(msg)):
        load(str(p))


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="read config"):
        load(str(tmp_path / "none.yml"))


def test_query_front_and_cache_options(tmp_path):
    p = tmp_path / "c.yml"
    p.write_text("query:\n  max_concurrency: 4\n  split_interval: 12h\n  results_cache_size: 64MiB\n"
                 "  align_queries_with_step: true\n  caches: {metadata: 1MiB, index: 0, chunks: 1GiB}\n")
    q = load(str(p)).query
    assert (q.max_concurrency, q.split_interval_ms, q.results_cache_bytes, q.align_queries_with_step) == \
        (4, 12 * 3600_000, 64 << 20, True)
    assert (q.metadata_cache_bytes, q.index_cache_bytes, q.chunks_cache_bytes) == (1 << 20, 0, 1 << 30)


@pytest.mark.parametrize("yaml_text,message", [
    ("query: {max_concurrency: 0}", "query.max_concurrency: expected a positive integer"),
    ("query: {max_concurrency: true}", "query.max_concurrency: expected a positive integer"),
    ("query: {results_cache_size: lots}", "query.results_cache_size: cannot parse 'lots' as a size"),
    ("query: {caches: {index: -1}}", "query.caches.index: cannot parse -1 as a size"),
    ("query: {caches: {l2: 1MiB}}", "unknown"),
    ("query: {align_queries_with_step: yes please}", "query.align_queries_with_step: expected true or false"),
])
def test_query_front_option_errors(tmp_path, yaml_text, message):
    p = tmp_path / "c.yml"
    p.write_text(yaml_text + "\n")
    with pytest.raises(ConfigError, match=message):
        load(str(p))
