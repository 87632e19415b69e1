"""A peer copy whose landing never fires (a hung sender GPU or kernel): the request ends with
a clear error in bounded time, while its blocks stay held (KVReceiver.held_blocks) until the
sender's event fires or the sender is gone; on_release then gives them back.

On CPU a sender sends `end` once its copy is done and names no event, so the receiver here
(the `_landing_event` seam) takes every `end` as naming an event of the test's."""

from __future__ import annotations

import logging
import threading
import time

import pytest
from kvtransfer_peer import make_pool

from pdserve.kvtransfer import KVReceiver, KVSender, TransferOptions

NB = 32
OPTS = {"staging_bytes": 3 * 8192, "min_message_bytes": 8192, "num_staging_buffers": 2,
        "deadline_s": 20.0, "drain_timeout_s": 1.0}
BOUND_S = 10.0  # generous: proves the result came, not how fast


class Event:
    """A sender's copy event as the receiver sees it: query() is False until fired."""

    def __init__(self) -> None:
        self.fired = False
        self.error: str | None = None

    def query(self) -> bool:
        if self.error is not None:
            raise RuntimeError(self.error)
        return self.fired


class Hung(KVReceiver):
    """A receiver whose every peer copy `end` names `self.event`; records results (with what
    held_blocks() said when each came) and releases."""

    def __init__(self, pool, **opts) -> None:
        self.event = Event()
        self.results: list = []
        self.released: list = []
        super().__init__(pool, "ucx", TransferOptions(**{**OPTS, **opts}),
                         on_result=lambda r: self.results.append((r, self.held_blocks())),
                         on_release=lambda rid, blocks: self.released.append((rid, blocks)))

    def _landing_event(self, peer, msg):
        return self.event


def _until(cond, timeout_s: float = BOUND_S) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.01)
    return False


def _ended(rx: Hung, rid: str) -> bool:
    """The sender's `end` arrived: its copy may still run (the test's event)."""
    req = rx._reqs.get(rid)
    return req is not None and req.landing is not None


@pytest.fixture()
def tx():
    s = KVSender(make_pool(NB, seed=2, num_layers=2, stacked=True), "ucx", TransferOptions(**OPTS))
    yield s
    s.close()


def _start(rx: Hung, tx: KVSender, rid: str, dst: list[int], deadline_s: float | None = None):
    rx.expect(rid, dst, deadline_s)
    tx.start(rid, rx.address, list(range(len(dst))), dst)
    tx.finish(rid, {"first_token": 1})


@pytest.mark.timeout(60)
@pytest.mark.parametrize("fail,release", [("landing_timeout", "fires"),
                                          ("landing_timeout", "sender_gone"),
                                          ("landing_timeout", "event_error"),
                                          ("deadline", "fires"), ("abort", "sender_gone")])
def test_an_unlanded_copy_fails_in_bounded_time_and_holds_its_blocks(tx, caplog, fail, release):
    caplog.set_level(logging.INFO, logger="pdserve.kvtransfer")
    rx = Hung(make_pool(NB, seed=1, num_layers=2, stacked=True),
              landing_timeout_s=0.5 if fail == "landing_timeout" else 60.0)
    try:
        dst = [3, 4, 5]
        _start(rx, tx, "h", dst, deadline_s=1.0 if fail == "deadline" else None)
        assert _until(lambda: _ended(rx, "h"))
        if fail == "abort":
            rx.abort("h")
        (res,) = rx.wait(BOUND_S, ["h"])
        assert not res.ok and res.via == "peer_copy"
        why = {"landing_timeout": "did not land", "deadline": "deadline exceeded",
               "abort": "aborted"}[fail]
        assert why in res.error and (fail == "abort" or "held" in res.error), res.error
        assert rx.results[0][1] == {"h": dst}  # held already when the result came
        assert rx.landings_timed_out == (fail == "landing_timeout")
        assert rx.num_inflight == 0
        (tres,) = tx.wait(BOUND_S, ["h"])  # the sender is told too
        assert not tres.ok
        time.sleep(0.3)  # polled many times: still not safe
        assert rx.released == [] and rx.held_blocks() == {"h": dst}
        assert "blocks held in all" in caplog.text
        if release == "fires":
            rx.event.fired = True
        elif release == "event_error":
            rx.event.error = "context destroyed"
        else:
            tx.close()
        assert _until(lambda: rx.released == [("h", dst)])
        assert rx.held_blocks() == {}
        assert "3 blocks of request 'h' released" in caplog.text
    finally:
        rx.close()


@pytest.mark.timeout(60)
def test_a_copy_that_lands_before_the_timeout_succeeds(tx):
    rx = Hung(make_pool(NB, seed=3, num_layers=2, stacked=True), landing_timeout_s=30.0)
    try:
        _start(rx, tx, "ok", [7, 8])
        assert _until(lambda: _ended(rx, "ok"))
        assert rx.wait(0.3, ["ok"]) == []  # not done before its copy landed
        threading.Timer(0.1, lambda: setattr(rx.event, "fired", True)).start()
        (res,) = rx.wait(BOUND_S, ["ok"])
        assert res.ok and res.aux == {"first_token": 1} and res.via == "peer_copy"
        assert tx.wait(BOUND_S, ["ok"])[0].ok
        assert rx.held_blocks() == {} and rx.released == [] and rx.landings_timed_out == 0
    finally:
        rx.close()


@pytest.mark.timeout(60)
def test_close_reports_and_logs_blocks_it_leaves_held(tx, caplog):
    caplog.set_level(logging.WARNING, logger="pdserve.kvtransfer")
    rx = Hung(make_pool(NB, seed=4, num_layers=2, stacked=True), landing_timeout_s=60.0)
    _start(rx, tx, "c", [1, 2])
    assert _until(lambda: _ended(rx, "c"))
    rx.close()
    assert len(rx.results) == 1 and not rx.results[0][0].ok
    assert rx.results[0][1] == {"c": [1, 2]}
    assert "closed with 2 blocks of 1 requests still held" in caplog.text


class Deaf(KVSender):
    """A sender that ignores take-backs (`fail`): its grants never settle, so the receiver
    drops the pair itself after drain_timeout_s, as it would a sender stuck in a hung GPU."""

    def _on_message(self, peer, msg) -> None:
        if msg["t"] != "fail":
            super()._on_message(peer, msg)


@pytest.mark.timeout(60)
def test_a_pair_the_receiver_drops_itself_does_not_release_held_blocks():
    """Its sender may live on with the copy still running: only the event releases them."""
    rx = Hung(make_pool(NB, seed=5, num_layers=2, stacked=True), landing_timeout_s=0.5)
    tx = Deaf(make_pool(NB, seed=6, num_layers=2, stacked=True), "ucx", TransferOptions(**OPTS))
    try:
        _start(rx, tx, "h", [3, 4])
        (res,) = rx.wait(BOUND_S, ["h"])
        assert not res.ok and "did not land" in res.error and rx.held_blocks() == {"h": [3, 4]}
        rx.expect("g", [9])  # granted to the deaf sender, then taken back: never settled
        time.sleep(0.2)
        rx.abort("g")
        (gres,) = rx.wait(BOUND_S, ["g"])  # once the pair was dropped
        assert not gres.ok and _until(lambda: not tx.connected(rx.address))
        time.sleep(0.3)
        assert rx.released == [] and rx.held_blocks() == {"h": [3, 4]}
        rx.event.fired = True
        assert _until(lambda: rx.released == [("h", [3, 4])]) and rx.held_blocks() == {}
    finally:
        tx.close()
        rx.close()


def test_worker_flag_sets_the_receivers_landing_timeout():
    """--landing-timeout reaches the decode side's TransferOptions; 0 is refused by name."""
    import argparse

    import torch

    from pdserve import worker_cli
    from pdserve.kvtransfer.link import _options

    p = argparse.ArgumentParser()
    worker_cli.add_arguments(p)
    cfg = worker_cli.config_from_args(p.parse_args(["--role", "decode", "--landing-timeout", "3.5"]))
    assert cfg.transfer.landing_timeout_s == 3.5
    opts = _options(cfg.transfer, [torch.zeros(4, 2, 16, 2, 8)], "127.0.0.1", None)
    assert opts.landing_timeout_s == 3.5
    assert worker_cli.config_from_args(p.parse_args(["--role", "decode"])).transfer.landing_timeout_s == 10.0
    with pytest.raises(SystemExit):
        p.parse_args(["--role", "decode", "--landing-timeout", "0"])


def test_worker_refuses_a_transfer_setting_by_name_without_a_traceback():
    """A value the transfer config refuses ends the worker with status 2 and its reason."""
    from worker_exit import worker_refusal

    err = worker_refusal("--role", "decode", "--transfer-timeout", "0")
    assert "pdserve worker: error: transfer timeout_s must be positive" in err
