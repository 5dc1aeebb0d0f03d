"""GracefulStop turns SIGTERM/SIGINT into a flag, with a hard stop on a second Ctrl-C."""

from __future__ import annotations

import os
import signal
import time

import pytest

from automodel_cli.components.checkpoint import GracefulStop


def send(sig: int, stop: GracefulStop | None = None) -> None:
    """Signal this process and give Python a moment to run the handler."""
    os.kill(os.getpid(), sig)
    for _ in range(200):
        if stop is None or stop.requested:
            return
        time.sleep(0.005)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_sets_flag_and_handlers_are_restored(sig):
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    with GracefulStop() as stop:
        assert not stop.requested
        send(sig, stop)
        assert stop.requested
        assert stop.signal_name == signal.Signals(sig).name
        send(signal.SIGTERM, stop)  # a repeated SIGTERM only keeps the request
        assert stop.requested
    assert {s: signal.getsignal(s) for s in before} == before


def test_second_sigint_interrupts_immediately():
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        with GracefulStop() as stop:
            send(signal.SIGTERM, stop)
            assert stop.requested
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # interrupted long before this ends
            pytest.fail("second SIGINT did not interrupt")
    assert signal.getsignal(signal.SIGINT) is before


def test_previous_handler_restored_after_nesting():
    calls = []
    previous = signal.signal(signal.SIGTERM, lambda *a: calls.append("outer"))
    try:
        with GracefulStop(signals=(signal.SIGTERM,)) as stop:
            send(signal.SIGTERM, stop)
        assert stop.requested and calls == []
        send(signal.SIGTERM)
        for _ in range(200):
            if calls:
                break
            time.sleep(0.005)
        assert calls == ["outer"]
    finally:
        signal.signal(signal.SIGTERM, previous)
