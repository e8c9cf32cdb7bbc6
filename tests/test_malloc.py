import pytest

from flashback import malloc


@pytest.mark.skipif(malloc.glibc() is None, reason="mallopt is glibc's")
def test_settings_are_applied_on_glibc():
    assert malloc.tune({}) is True


def test_malloc_environment_variables_take_precedence():
    # The operator's MALLOC_* settings are left as glibc read them.
    assert malloc.tune({"MALLOC_ARENA_MAX": "2"}) is False
    assert malloc.tune({"MALLOC_MMAP_THRESHOLD_": "131072"}) is False


def test_flashback_applies_them_before_running_a_command(monkeypatch):
    from flashback import cli

    calls = []
    monkeypatch.setattr(malloc, "tune", lambda *a: calls.append(a) or True)
    monkeypatch.setattr(cli, "cmd_promqltest", lambda args: 0)
    assert cli.main(["promqltest", "nothing.test"]) == 0
    assert calls == [()]
