"""Rows, row files, link settings and the physical limit."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from fedgate.bench import (
    SEED_ROWS,
    LinkRow,
    link_settings,
    load_rows_file,
    netem_argv,
    parse_row,
    physical_limit_mbit,
)
from fedgate.errors import ConfigError


def test_parse_row_with_and_without_rate() -> None:
    assert parse_row("80:1", rate_mbit=100) == LinkRow(80.0, 1.0, 100.0)
    assert parse_row("320:10:50", rate_mbit=100) == LinkRow(320.0, 10.0, 50.0)
    assert LinkRow(320, 10, 100).name == "320ms/10%"


@pytest.mark.parametrize("text", ["80", "80:x", "80:1:2:3", "80:100", "-5:1", "80:1:0"])
def test_parse_row_rejects_bad_rows(text: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_row(text, rate_mbit=100)
    assert "--row" in str(info.value)


def test_rows_file(tmp_path: Path) -> None:
    path = tmp_path / "rows.toml"
    path.write_text(
        "[[row]]\nrtt_ms = 40\nloss_pct = 0.1\n\n[[row]]\nrtt_ms = 320\nloss_pct = 4\nrate_mbit = 50\n"
    )
    assert load_rows_file(path, rate_mbit=100) == [LinkRow(40, 0.1, 100), LinkRow(320, 4, 50)]


def test_rows_file_unknown_key_names_its_path(tmp_path: Path) -> None:
    path = tmp_path / "rows.toml"
    path.write_text("[[row]]\nrtt_ms = 40\nlos_pct = 0.1\n")
    with pytest.raises(ConfigError) as info:
        load_rows_file(path, rate_mbit=100)
    assert "row[0]" in str(info.value) and "los_pct" in str(info.value) and "rows.toml" in str(info.value)


def test_link_settings_split_rtt_and_size_the_queue() -> None:
    s = link_settings(LinkRow(80, 1, 100))
    assert s.a_to_b.delay_s == s.b_to_a.delay_s == 0.040
    assert s.a_to_b.loss == s.b_to_a.loss == 0.01
    assert s.a_to_b.rate_bps == 100e6
    assert s.a_to_b.queue_bytes == 1_000_000  # one BDP: 100 Mbit/s x 80 ms
    data_only = link_settings(LinkRow(80, 1, 100), ack_loss=False, queue_bdp=0.5)
    assert data_only.b_to_a.loss == 0.0 and data_only.a_to_b.queue_bytes == 500_000
    assert s.a_to_b.tick_s == s.b_to_a.tick_s == 0.0
    ticked = link_settings(LinkRow(80, 1, 100), tick_s=0.00025)
    assert ticked.a_to_b.tick_s == ticked.b_to_a.tick_s == 0.00025


def test_physical_limit() -> None:
    assert physical_limit_mbit(LinkRow(80, 1, 100), payload_share=1.0) == pytest.approx(99.0)
    assert physical_limit_mbit(LinkRow(320, 10, 100), payload_share=0.9) == pytest.approx(81.0)


def test_seed_rows_are_the_six_of_the_issue() -> None:
    assert SEED_ROWS == ((20, 0.01), (40, 0.1), (80, 1), (160, 2), (320, 4), (320, 10))


def test_netem_command_for_a_row() -> None:
    shape = link_settings(LinkRow(80, 1, 100)).a_to_b
    argv = netem_argv("ns", "dev", shape, mtu=1500, min_packet=1500)
    assert argv[:9] == ["tc", "-n", "ns", "qdisc", "replace", "dev", "dev", "root", "netem"]
    text = " ".join(argv)
    assert "delay 40000us" in text and "loss random 1%" in text and "rate 100000000bit" in text
    # the packet limit holds the queue (1 BDP) plus the delay line (rate x one-way delay) in MTU packets
    limit = int(argv[argv.index("limit") + 1])
    assert limit == math.ceil((1_000_000 + 100e6 / 8 * 0.040) / 1500)
