"""``run_if``: a skip mark that holds when a condition fails and names each failing condition."""

from __future__ import annotations

import torch

from .runif import _version, run_if


def test_no_condition_runs_everywhere() -> None:
    mark = run_if()
    assert mark.name == "skipif" and mark.args == (False,)


def test_each_failing_condition_is_named_in_the_reason() -> None:
    mark = run_if(min_cuda_gpus=torch.cuda.device_count() + 1, min_torch="999.0", packages=("no_such_package_x",))
    reason = mark.kwargs["reason"]
    assert mark.args == (True,)
    assert "CUDA GPU" in reason and "torch>=999.0" in reason and "no_such_package_x" in reason


def test_versions_compare_by_their_numeric_release() -> None:
    assert _version("2.5.1+cu121") == (2, 5, 1) and _version("2.6.0a0") == (2, 6, 0)
    assert _version("2.10.0") > _version("2.9.1")
