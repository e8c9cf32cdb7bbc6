import os

import pytest
from hypothesis import settings

# Compiled (numba) code pays its compile time on first call; time limits per example only add noise.
settings.register_profile("flashback", deadline=None)
settings.load_profile("flashback")



def require_nats() -> None:
    """Fails (or, with FLASHBACK_SKIP_NATS=1, skips) when no nats-server binary is installed."""
    from store.natscluster import NatsServerError, find_nats_server

    try:
        find_nats_server()
        return
    except NatsServerError as e:
        missing = str(e)
    if os.environ.get("FLASHBACK_SKIP_NATS") == "1":
        pytest.skip(f"FLASHBACK_SKIP_NATS=1: {missing}")
    pytest.fail(f"{missing}. Set FLASHBACK_SKIP_NATS=1 to skip the NATS tests.", pytrace=False)


@pytest.fixture(scope="module")
def nats_required() -> None:
    """``require_nats`` for every test of a module: ``pytestmark = pytest.mark.usefixtures("nats_required")``."""
    require_nats()


@pytest.fixture(scope="module")
def nats_cluster(tmp_path_factory):
    """A local 3-node NATS JetStream cluster for the tests of one module."""
    from store.natscluster import NatsCluster

    require_nats()
    c = NatsCluster(str(tmp_path_factory.mktemp("nats")), size=3)
    c.start()
    yield c
    c.stop()
