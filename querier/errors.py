"""Typed errors of the query path and the API error type each maps to.

The HTTP API maps them to Prometheus' ``errorType`` and status code in one
place (``querier/api.py``); messages follow Prometheus' wording.
"""


class QueryError(Exception):
    """Base class of errors raised while parsing or evaluating a query."""

    error_type = "execution"


class ParseError(QueryError):
    """The expression does not parse; the message reads ``parse error: ...``."""

    error_type = "bad_data"


class Unsupported(QueryError):
    """A valid PromQL feature this engine does not implement (yet)."""

    error_type = "bad_data"


class ExecutionError(QueryError):
    """A query that parses but fails at evaluation (duplicate series, bad argument)."""

    error_type = "execution"


class TooManySamples(ExecutionError):
    """The query would hold more samples in memory than ``max_samples``."""


class QueryTimeout(QueryError):
    """The query ran past its deadline."""

    error_type = "timeout"


class QueryCanceled(QueryError):
    """The client went away; evaluation stopped."""

    error_type = "canceled"
