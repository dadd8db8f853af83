"""Which process of a run this is, known from the launcher's variables before any process group exists."""

from __future__ import annotations

import pytest

from loupe.ranks import is_first_process, world


def test_without_a_process_group_this_is_a_world_of_one():
    assert world() == (1, 0)


@pytest.mark.parametrize(
    ("env", "first"),
    [
        ({}, True),
        ({"LOCAL_RANK": "0"}, True),
        ({"LOCAL_RANK": "1"}, False),  # a process Lightning's launcher started
        ({"LOCAL_RANK": "0", "NODE_RANK": "1"}, False),  # the first process of the second node
        ({"RANK": "3", "LOCAL_RANK": "1"}, False),  # torchrun
        ({"SLURM_PROCID": "0"}, True),
        ({"SLURM_PROCID": "5"}, False),
    ],
)
def test_the_first_process_is_known_before_any_process_group(monkeypatch, env: dict[str, str], first: bool):
    for name in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert is_first_process() is first
