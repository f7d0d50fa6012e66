"""fedsim's changes to Flower's waits on a SuperNode (`fedsim.runtime.deploy.polling`) and the warm
runner's children forgetting fedsim's own modules (`fedsim.runtime.deploy.warm`)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from flwr.supernode import start_client_internal
from flwr.supernode.runtime import run_clientapp

from fedsim.runtime.deploy import polling

ROOT = Path(__file__).resolve().parents[3]


def test_the_idle_wait_is_flowers_until_a_message_then_short_and_growing_back_to_flowers() -> None:
    backoff = polling.Backoff(0.2)
    assert [backoff.wait_s() for _ in range(2)] == [3.0, 3.0]
    backoff.message()
    waits = [backoff.wait_s() for _ in range(16)]
    assert waits[:3] == pytest.approx([0.2, 0.25, 0.3125])
    assert sum(w < 3.0 for w in waits) == 13 and sum(waits[:6]) < 3.0 < sum(waits[:7])  # six asks in 3 s
    assert waits[-1] == 3.0


def test_the_clock_replaces_only_flowers_two_waits(monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []
    backoff = polling.Backoff(0.2)
    backoff.message()
    clock = polling._Clock(backoff, sleep=slept.append)
    for seconds in (3, 0.5, 1.0, 3):
        clock.sleep(seconds)
    assert slept == pytest.approx([0.2, 0.05, 1.0, 0.25])
    assert clock.monotonic is time.monotonic  # everything else is the time module's


def test_the_installed_flower_is_the_one_the_patch_was_written_for() -> None:
    assert polling.patch_problem() == ""


def test_the_patched_supernode_notices_messages_and_sleeps_the_backoffs_waits(monkeypatch: pytest.MonkeyPatch) -> None:
    pulls = iter([None, 42, None])
    monkeypatch.setattr(start_client_internal, "_pull_and_store_message", lambda **kw: next(pulls))
    monkeypatch.setattr(start_client_internal, "time", time)  # restored after the test
    backoff = polling.patch(0.1)
    assert isinstance(start_client_internal.time, polling._Clock)
    assert start_client_internal._pull_and_store_message() is None and backoff.next_s == 3.0
    assert start_client_internal._pull_and_store_message() == 42 and backoff.next_s == 0.1
    assert start_client_internal._pull_and_store_message() is None and backoff.wait_s() == 0.1


def test_a_clientapp_retries_its_pull_within_a_tenth_of_a_second(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}
    monkeypatch.setattr(run_clientapp, "pull_and_inflate_object_from_tree", lambda *a, **kw: seen.update(kw))
    polling.patch_clientapp_pull()
    run_clientapp.pull_and_inflate_object_from_tree("tree", "pull", "confirm", return_type=int)
    assert seen == {"initial_backoff": 0.05, "backoff_cap": 0.1, "return_type": int}


def test_a_warm_child_forgets_fedsims_modules_so_the_clientapp_imports_its_app_bundles() -> None:
    code = (
        "import sys; import fedsim.runtime.deploy.warm as w; import clients.app; w.forget_app_modules(); "
        "print(sorted({m.partition('.')[0] for m in sys.modules} & {'fedsim', 'clients', 'strategies'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_clientapp_imports_neither_ray_nor_dp_accounting() -> None:
    """A real device never packs nor accounts: each message's ClientApp process must not pay Ray's or
    dp_accounting's import (about 0.2 s each)."""
    code = "import sys, clients.app; print(sorted({'ray', 'dp_accounting'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
