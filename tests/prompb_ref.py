"""Reference protobuf messages of Prometheus' remote protocol, built by the protobuf runtime.

Tests use these (Google's protobuf implementation, not our hand-written
codecs) to encode requests and decode responses, so our codecs are checked
against an independent implementation. The schema is prometheus/prompb
(types.proto, remote.proto), declared here without protoc.
"""

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

F = descriptor_pb2.FieldDescriptorProto


def _file() -> descriptor_pb2.FileDescriptorProto:
    fd = descriptor_pb2.FileDescriptorProto(name="flashback_test_prompb.proto", package="prometheus", syntax="proto3")

    def msg(name, *fields, enums=()):
        m = fd.message_type.add(name=name)
        for e_name, values in enums:
            e = m.enum_type.add(name=e_name)
            for i, v in enumerate(values):
                e.value.add(name=v, number=i)
        for number, fname, ftype, label, type_name in fields:
            f = m.field.add(name=fname, number=number, type=ftype, label=label)
            if type_name:
                f.type_name = type_name
        return m

    opt, rep = F.LABEL_OPTIONAL, F.LABEL_REPEATED
    msg("Label", (1, "name", F.TYPE_STRING, opt, None), (2, "value", F.TYPE_STRING, opt, None))
    msg("Sample", (1, "value", F.TYPE_DOUBLE, opt, None), (2, "timestamp", F.TYPE_INT64, opt, None))
    msg("Exemplar", (1, "labels", F.TYPE_MESSAGE, rep, ".prometheus.Label"),
        (2, "value", F.TYPE_DOUBLE, opt, None), (3, "timestamp", F.TYPE_INT64, opt, None))
    msg("Histogram", (15, "timestamp", F.TYPE_INT64, opt, None))
    msg("TimeSeries", (1, "labels", F.TYPE_MESSAGE, rep, ".prometheus.Label"),
        (2, "samples", F.TYPE_MESSAGE, rep, ".prometheus.Sample"),
        (3, "exemplars", F.TYPE_MESSAGE, rep, ".prometheus.Exemplar"),
        (4, "histograms", F.TYPE_MESSAGE, rep, ".prometheus.Histogram"))
    msg("MetricMetadata", (1, "type", F.TYPE_INT32, opt, None), (2, "metric_family_name", F.TYPE_STRING, opt, None),
        (4, "help", F.TYPE_STRING, opt, None), (5, "unit", F.TYPE_STRING, opt, None))
    msg("WriteRequest", (1, "timeseries", F.TYPE_MESSAGE, rep, ".prometheus.TimeSeries"),
        (3, "metadata", F.TYPE_MESSAGE, rep, ".prometheus.MetricMetadata"))
    return fd


_pool = descriptor_pool.DescriptorPool()
_pool.Add(_file())


def _cls(name):
    return message_factory.GetMessageClass(_pool.FindMessageTypeByName(f"prometheus.{name}"))


WriteRequest = _cls("WriteRequest")
TimeSeries = _cls("TimeSeries")
Label = _cls("Label")
Sample = _cls("Sample")


def write_request(series) -> bytes:
    """``series``: iterable of (list of (name, value) pairs in send order, list of (t_ms, value))."""
    req = WriteRequest()
    for labels, samples in series:
        ts = req.timeseries.add()
        for n, v in labels:
            ts.labels.add(name=n, value=v)
        for t, v in samples:
            ts.samples.add(timestamp=t, value=v)
    return req.SerializeToString()
