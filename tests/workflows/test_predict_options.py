"""`loupe predict`'s worker options: a bad value is one clear line and exit status 2, before any slide is read."""

from __future__ import annotations

import pytest

from loupe.cli import USAGE_ERROR, main


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--workers", "-1", "--workers -1: expected an integer ≥ 0"),
        ("--loader-workers", "-2", "--loader-workers -2: expected an integer ≥ 0"),
        ("--claim-expiry", "0", "--claim-expiry 0.0: expected a number of seconds > 0"),
    ],
)
def test_a_bad_worker_option_is_one_line_and_status_2(tmp_path, capsys, option, value, message):
    code = main(["predict", str(tmp_path), str(tmp_path / "x.svs"), "--out", str(tmp_path / "o"), option, value])
    err = capsys.readouterr().err.strip()
    assert code == USAGE_ERROR
    assert err.splitlines() == [f"loupe predict: error: {message}"], err
    assert not (tmp_path / "o").exists()
