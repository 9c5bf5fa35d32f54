"""GATEWAY_SPOOL_*: off by default, validated in one line naming the variable, one spool per worker."""

from __future__ import annotations

import pytest

from gateway.settings.settings import SettingsError, load_settings
from gateway.settings.spool import DEFAULT_SPOOL_MAX_BYTES

BASE = {"MQTT_HOST": "broker", "TOPIC": "a/#", "KIN_STREAM_NAME": "s"}


def test_without_a_spool_directory_there_is_no_spool() -> None:
    assert load_settings(BASE).spool is None


def test_the_spool_defaults_to_1_gib_and_block() -> None:
    spool = load_settings({**BASE, "GATEWAY_SPOOL_DIR": "/var/spool/gw"}).spool
    assert spool is not None
    assert (spool.directory, spool.max_bytes, spool.when_full) == ("/var/spool/gw", DEFAULT_SPOOL_MAX_BYTES, "block")
    assert DEFAULT_SPOOL_MAX_BYTES == 1024**3


def test_drop_oldest_and_a_size_in_bytes_are_taken() -> None:
    spool = load_settings({**BASE, "GATEWAY_SPOOL_DIR": "/d", "GATEWAY_SPOOL_MAX_BYTES": "536870912",
                           "GATEWAY_SPOOL_WHEN_FULL": "DROP_OLDEST"}).spool
    assert spool is not None and (spool.max_bytes, spool.when_full) == (536870912, "drop_oldest")


@pytest.mark.parametrize(("name", "value"), [
    ("GATEWAY_SPOOL_MAX_BYTES", "512MiB"), ("GATEWAY_SPOOL_MAX_BYTES", "1000"), ("GATEWAY_SPOOL_WHEN_FULL", "wait"),
])
def test_a_bad_spool_setting_is_one_line_naming_the_variable(name: str, value: str) -> None:
    with pytest.raises(SettingsError) as error:
        load_settings({**BASE, "GATEWAY_SPOOL_DIR": "/d", name: value})
    assert str(error.value).startswith(f"{name}: ") and "\n" not in str(error.value)


def test_spool_settings_without_a_spool_directory_are_reported_as_ignored() -> None:
    ignored = load_settings({**BASE, "GATEWAY_SPOOL_WHEN_FULL": "drop_oldest"}).ignored
    assert any(line.startswith("GATEWAY_SPOOL_WHEN_FULL is ignored") for line in ignored)


def test_each_worker_gets_a_spool_directory_of_its_own() -> None:
    spool = load_settings({**BASE, "GATEWAY_SPOOL_DIR": "/var/spool/gw/"}).spool
    assert spool is not None
    assert [spool.for_worker(i) for i in range(2)] == ["/var/spool/gw/worker-0", "/var/spool/gw/worker-1"]
