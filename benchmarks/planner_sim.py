"""Discrete-event simulator of a pdserve deployment, driven by a `Calibration`.

Model (each worker is one GPU; times from the calibrated profiles), as pdserve runs it:
- steps are built as engine/scheduler.py builds them: the token budget
  (`prefill_token_budget`, max_num_batched_tokens) goes first to running sequences (one
  token per decoding sequence, the rest of a chunked prompt), then to waiting prompts in
  FCFS order, the last one chunked to fit what is left (long_prefill_threshold 0); a
  prompt's token 0 comes from the step that computes its last chunk. A step's prompt part
  lasts prefill_ms(T, sum_sq): T its prompt tokens, sum_sq the attention term (a chunk of n
  tokens after s computed ones adds n (2 s + n), so a whole prompt adds its square).
- xPyD: the coordinator (coordinator/router.py, least_loaded) reserves KV blocks on the
  decode worker with the most free blocks as the coordinator sees them (`route_key`: the
  worker's load at its last heartbeat, every HEARTBEAT_S, plus what was reserved on it
  since; then the fewest sequences) when the request arrives, then sends the prompt to the
  prefill worker with the fewest prompt tokens in flight (counted until the KV landed, as
  the coordinator counts them). A prefill worker runs steps of queued prompts
  (prefill/batching.py). Token 0 reaches the client when its step ends (pdserve emits it
  while the KV moves); the KV push starts with the step when the step has >= 1024 tokens
  (layer-wise: layers go out as computed), else after it, and holds the decode worker's
  receiver, one transfer at a time, for the prompt's share of the forward (its tokens' part
  of the step past the fixed cost, when layer-wise) plus transfer_ms(prompt *
  kv_bytes_per_token), the time after the forward. `push` (KVPush, planner_setups.py) says
  which steps are layer-wise: on one host with peer copies after the forward (the engine's
  default since 9df90d7) none is; its default is the old behaviour, with which every
  committed capstone run was made. Decode workers run continuous batching: each step lasts
  decode_step_ms(B, context, sync) and gives every running sequence one token, sync when the
  batch changed since the step before (a sequence joined or ended, or a prompt ran:
  engine/step_pipeline.py overlaps the host's work with the GPU's only for an unchanged
  batch; capstone_decode.py); a landed request joins at the next step boundary (a prompt to
  prefill there too, or, when it came during a step after which the engine launched the next
  one ahead, at the one after: `launches_ahead`); beyond `max_batch` it waits for a slot
  (engine/scheduler.py admit_remote): in landing order (`landed_fifo`, since branch fifo),
  else newest first as before (the oldest may wait for seconds; every committed capstone
  run). So a request's TPOT includes its transfer and the wait for a step. decode_step_ms is
  linear in B and context: past the batch sizes it was profiled on
  (`SimRun.mean_decode_batch` against the calibration's range) it is an extrapolation.
- colocated (`Nboth`): a step runs prompt chunks and every running sequence together; it
  lasts decode_step_ms + what its prompt tokens add to a decode step (`mixed_ms`: the mixed
  profile, capstone_mixed.py), a step without decodes prefill_ms; prefill stalls decode: the
  interference that disaggregation removes. Requests go to the worker with the most free KV
  blocks, as for decode, a routed prompt counted until the next heartbeat with
  `push.counts_generate` (the coordinator since session 12; before, every request between
  two heartbeats went to one worker), an ended request's blocks given back until then with
  `push.counts_release` (since session 13). Heartbeats come every HEARTBEAT_S, the workers'
  phases evenly spread, or at the times given (`heartbeats`: a run's recorded ones,
  benchmarks/capstone_heartbeats.py), then every HEARTBEAT_S after the last one.
- conditional (`xPyD-condT`, the coordinator's --pd-threshold-tokens T): a prompt under T
  tokens goes straight to the decode worker the coordinator picks, which prefills it in its
  own steps as a colocated worker does (no prefill worker, no transfer); the rest take the
  xPyD path.
- a finite run (`horizon_s`): requests not finished by then are cut, as the capstone's time
  limit cuts them (judged on what was seen, see `planner_metrics.sim_summary`).
- prefix caching (`caches`, planner_cache.py): a request with a `key` that its worker
  prefilled before (in this run or, as the capstone resends a search's prompts, in an
  earlier one) computes only what the cache does not hold; without `caches` (or keys) every
  prompt is computed whole.
- the relay (planner_relay.py, with a `relay` or `relay_host` profile): requests are routed
  once the host path has set them up, one at a time in arrival order, and tokens reach the
  client (`first`, `last`, `end`) when it has carried them; without the profile both happen
  at once. `made`: when a worker made token 0. A decode step makes a message per running
  sequence or, with the run's workers streaming several tokens a message (`cal.meta["stream
  interval"]`, `pdserve worker --stream-interval`), one per sequence whose token goes out.
The simulator ignores the coordinator's latency (its RPCs: about 2.5 ms of TTFT, worker
idle, 2 x H100) past the relay's queue, and preemption.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Hashable, Sequence

from pdserve.benchmarks.capstone_calibration import Calibration
from pdserve.benchmarks.planner_batching import (
    Chunk,
    Loop,
    SimReq,
    SimRun,
    fill_budget,
    join_landed,
    launches_ahead,
    schedule_heartbeats,
)
from pdserve.benchmarks.planner_cache import PrefixCaches
from pdserve.benchmarks.planner_relay import Relay, on_arrival
from pdserve.benchmarks.planner_setups import KVPush, Setup


class _Decoder:
    """A decode (or colocated) worker: continuous batching; colocated and local requests
    are prefilled here too, in the same steps (the engine's mixed batches)."""

    def __init__(self, loop: Loop, cal: Calibration, colocated: bool, name: str = "",
                 caches: PrefixCaches | None = None, landed_fifo: bool = False,
                 relay: Relay | None = None, releases: bool = False) -> None:
        self.loop, self.cal, self.colocated, self.relay = loop, cal, colocated, relay
        self.releases = releases  # an ended request's tokens leave since_hb (counts_release)
        self.name, self.caches, self.landed_fifo = name, caches, landed_fifo
        self.every = int(cal.meta.get("stream interval", 1))  # worker --stream-interval
        self.on_take = caches.admit(name) if caches is not None else None  # prefix lookups
        self.running: list[SimReq] = []  # decoding, one token per step
        self.prefilling: list[SimReq] = []  # admitted prompts with chunks left (running too)
        self.waiting: deque[SimReq] = deque()  # prompts to prefill here, FCFS
        self.landed: deque[SimReq] = deque()  # xPyD: KV arrived, joins at the next step
        self.held: deque[SimReq] = deque()  # landed past max_num_seqs: FIFO or newest first
        self.busy = False
        self.changed = False  # the batch changed in the last step: the next is synchronous
        self.reserved: list[SimReq] = []  # xPyD requests routed here whose KV has not landed
        self.recv_free_s = 0.0  # when its receiver is free for the next transfer
        self.batch_time = [0.0, 0.0]  # sum of decode batch x step time, sum of step time
        self.hb_held = self.hb_seqs = 0  # KV tokens held and sequences at the last heartbeat
        self.since_hb = 0  # KV tokens reserved here since that heartbeat, less those released
        self.inflight = self.routed = 0  # requests routed here not finished / ever

    def heartbeat(self) -> None:
        """The load the worker reports (worker/coordinator_link.py): blocks held by its
        running and prefilling sequences and by reservations, and its sequences."""
        self.hb_held = sum(r.prompt + r.generated for r in self.running) + \
            sum(r.prompt for q in (self.prefilling, self.landed, self.held, self.reserved)
                for r in q)
        self.hb_seqs = len(self.running) + len(self.prefilling) + len(self.waiting) + \
            len(self.landed) + len(self.held)
        self.since_hb = 0

    def route_key(self) -> tuple[int, int, int]:
        """The coordinator's order (coordinator/router.py `_decode_key`, registry.py): most
        free KV blocks as of the last heartbeat less those reserved since (a Reserve counts
        them, a Generate with `counts_generate`), then the most of the reported and the
        in-flight sequences, then the fewest routed."""
        return self.hb_held + self.since_hb, max(self.hb_seqs, self.inflight), self.routed

    def route(self, r: SimReq, reserve: bool) -> None:
        """The coordinator picked this worker for `r` (`reserve`: its blocks are counted
        until the next heartbeat: a P/D Reserve, or a Generate with `counts_generate`)."""
        self.routed += 1
        self.inflight += 1
        r.worker = self.name
        if reserve:
            self.since_hb += r.prompt + 1

    def finish(self, r: SimReq, t: float) -> None:
        """`r` ended here at `t` (with `releases`, the coordinator counts its tokens free)."""
        r.end = t
        self.inflight -= 1
        self.since_hb -= (r.prompt + r.generated) if self.releases else 0

    def add(self, r: SimReq) -> None:
        prefills = self.colocated or r.local
        (self.waiting if prefills else self.landed).append(r)
        if not self.busy:
            self._step()

    def _step(self, admit: bool = True) -> None:
        """The next step; `admit` False: the decode step launched ahead of what arrived
        during the step before (`launches_ahead`), which admits nothing."""
        cal = self.cal
        joined = len(self.running)  # admit_remote: the landed join while there is room
        chunks: list[Chunk] = []
        if admit:
            join_landed(self.landed, self.held, self.running,
                        cal.max_batch - len(self.prefilling), self.landed_fifo)
            budget = cal.prefill_token_budget - len(self.running)  # decodes: 1 token each
            seqs = [len(self.running) + len(self.prefilling)]  # max_num_seqs caps admissions

            def may_take(r: SimReq) -> bool:
                seqs[0] += 1
                return seqs[0] <= cal.max_batch
            chunks = fill_budget(budget, self.prefilling, self.waiting, may_take, self.on_take)
        sync = self.changed or len(self.running) > joined
        for c in chunks:
            if c.req not in self.prefilling:
                self.prefilling.append(c.req)
        if not self.running and not chunks:
            self.busy = False
            return
        full = len(self.running) + len(self.prefilling) >= cal.max_batch
        ahead = admit and launches_ahead(self.running, bool(chunks),
                                         bool(self.waiting or self.held), full)
        ms = 0.0
        if chunks:  # beside decodes, one forward: the prompts add the mixed profile's part
            tokens, sq = sum(c.tokens for c in chunks), sum(c.sq for c in chunks)
            ms += cal.mixed_ms(tokens, sq) if self.running else cal.prefill_ms(tokens, sq)
        if self.running:
            ctx = sum(r.prompt + r.generated for r in self.running)
            ms += cal.decode_step_ms(len(self.running), ctx, sync or bool(chunks))
            self.batch_time[0] += len(self.running) * ms
            self.batch_time[1] += ms
        self.busy = True
        end = self.loop.now + ms / 1e3
        self.loop.at(end, lambda: self._done(chunks, end, ahead))

    def _done(self, chunks: list[Chunk], t: float, ahead: bool = False) -> None:
        made, every, colo = t, self.every, self.colocated
        n = sum(c.completes for c in chunks) + (  # messages: token 0s, then the decodes'
            len(self.running) if every == 1 else
            sum(r.sends(every, colo or r.local) for r in self.running))
        if self.relay is not None and n:
            t = self.relay.deliver(n)
        still = []
        for r in self.running:
            r.generated += 1
            r.last = t
            if r.generated >= r.output:
                self.finish(r, t)
            else:
                still.append(r)
        self.changed = len(still) < len(self.running) or bool(chunks)
        self.running = still
        for c in chunks:
            r = c.req
            done = c.completes
            r.computed += c.tokens
            if not done:
                continue
            self.prefilling.remove(r)
            if self.caches is not None:
                self.caches.add(self.name, r.key, r.prompt)
            r.first, r.last, r.generated, r.made = t, t, 1, made  # this step made token 0
            if r.output <= 1:
                self.finish(r, t)
            else:
                self.running.append(r)
        self._step(admit=not (ahead and self.waiting))  # a prompt came: launches_ahead


HEARTBEAT_S = 1.0  # worker/config.py heartbeat_s (default): how often a worker reports its load


class _Prefiller:
    """A prefill worker (prefill/batching.py): steps of whole prompts up to the token
    budget, the last one chunked to fill it."""

    def __init__(self, loop: Loop, cal: Calibration, name: str = "",
                 caches: PrefixCaches | None = None, push: KVPush = KVPush(),
                 relay: Relay | None = None) -> None:
        self.loop, self.cal, self.name, self.caches, self.push = loop, cal, name, caches, push
        self.relay = relay
        self.on_take = caches.admit(name) if caches is not None else None  # prefix lookups
        self.queue: deque[SimReq] = deque()
        self.partial: list[SimReq] = []  # a chunked prompt, continued first
        self.inflight_tokens = 0  # the coordinator's count: prompts routed, KV not landed
        self.busy = False
        self.steps: list[tuple[int, float]] = []  # (tokens, ms) of every step it ran

    def route_key(self) -> int:
        """coordinator/router.py: fewest queued prompt tokens, which the coordinator counts
        from a Prefill call's start to its last reply (the KV landed)."""
        return self.inflight_tokens

    def add(self, r: SimReq) -> None:
        self.queue.append(r)
        self.inflight_tokens += r.prompt
        if not self.busy:
            self._step()

    def _step(self) -> None:
        chunks = fill_budget(self.cal.prefill_token_budget, self.partial, self.queue,
                             on_take=self.on_take)
        if not chunks:
            self.busy = False
            return
        tokens = sum(c.tokens for c in chunks)
        ms = self.cal.prefill_ms(tokens, sum(c.sq for c in chunks))
        self.steps.append((tokens, ms))
        self.busy = True
        start = self.loop.now
        for c in chunks:
            if math.isnan(c.req.scheduled):
                c.req.scheduled = start
        end = start + ms / 1e3
        layerwise = self.push.layerwise(tokens)  # prefill/role.py, sender_direct.py
        var_ms = ms - self.cal.prefill["c0"]  # the forward past its fixed part

        def done() -> None:
            finished = []
            for c in chunks:
                if c.completes:
                    finished.append((c.req, var_ms * c.tokens / tokens))
                    if self.caches is not None:
                        self.caches.add(self.name, c.req.key, c.req.prompt)
                c.req.computed += c.tokens
            self.partial = [c.req for c in chunks if c.req.computed < c.req.prompt]
            self._done(finished, start if layerwise else end)
        self.loop.at(end, done)

    def _done(self, finished: list[tuple[SimReq, float]], push_from: float) -> None:
        """Token 0 of every prompt completed in the step leaves now; its KV push started
        at `push_from` (the step's start when layer-wise: its layers go out as the forward
        computes them; else, a peer copy after the forward too, its end), and holds the
        decode worker's receiver (one progress thread and staging pool, the scatter on the
        decode GPU: kvtransfer/receiver.py) for its share of the forward (its tokens' part
        of the step past the fixed cost, when layer-wise) plus the transfer after the
        forward (`transfer_ms`). The sender is not a queue: its sends to
        different receivers overlap."""
        now = self.loop.now
        seen = now if self.relay is None or not finished else self.relay.deliver(len(finished))
        for r, share_ms in finished:
            r.first, r.last, r.generated, r.made = seen, seen, 1, now  # with the prefill reply
            dec = r.dec
            assert dec is not None
            if r.output <= 1:
                dec.finish(r, seen)
                dec.reserved.remove(r)
                self.inflight_tokens -= r.prompt
                continue
            start = max(push_from, dec.recv_free_s)
            tail_s = self.cal.transfer_ms(r.prompt * self.cal.kv_bytes_per_token) / 1e3
            fwd_s = share_ms / 1e3 if push_from < now else 0.0
            land_s = max(start + fwd_s, now) + tail_s
            dec.recv_free_s = land_s

            def land(r: SimReq = r, dec: _Decoder = dec) -> None:
                r.landed = self.loop.now
                dec.reserved.remove(r)
                self.inflight_tokens -= r.prompt
                dec.add(r)
            self.loop.at(land_s, land)
        self._step()


def simulate(cal: Calibration, prefill: int, decode: int, both: int,
             arrivals: Sequence[float], lengths: Sequence[tuple[int, int]],
             cond_tokens: int = 0, horizon_s: float = math.inf,
             info: SimRun | None = None, keys: Sequence[Hashable] | None = None,
             caches: PrefixCaches | None = None,
             heartbeats: Sequence[Sequence[float]] | None = None,
             push: KVPush = KVPush(), landed_fifo: bool = False) -> list[SimReq]:
    """Every request's first-token and finish time on the given setup; with `cond_tokens`,
    prompts under it are prefilled on their decode worker. Events after `horizon_s` (the
    run's time limit, seconds from the first arrival's clock 0) do not happen: requests
    still running then keep NaN for what they did not reach. `info`, when given, gets what
    the workers ran (SimRun). `keys` name the prompts (equal keys: equal token ids) for the
    workers' prefix caches `caches`, which the run reads and updates (pass the same object
    to the next run of the same setup). `heartbeats`: per decode (or colocated) worker, the
    times (same clock as `arrivals`) its load reaches the coordinator (None: evenly
    staggered phases). `push`: which prefill steps push KV layer by layer (KVPush).
    `landed_fifo`: landed requests wait for a slot in landing order (else newest first)."""
    if both and (prefill or decode):
        raise ValueError("simulate either xPyD or Nboth, not a mix")
    if not both and (prefill < 1 or decode < 1):
        raise ValueError("xPyD needs at least one prefill and one decode worker")
    loop = Loop()
    relay = Relay(loop, cal.relay, cal.relay_host) if cal.relay or cal.relay_host else None
    reqs = [SimReq(t, max(1, i), max(1, o)) for t, (i, o) in zip(arrivals, lengths)]
    for r, k in zip(reqs, keys or ()):
        r.key = k
    pres: list[_Prefiller] = []
    decs = [_Decoder(loop, cal, bool(both), f"{'both' if both else 'decode'}-{j}", caches,
                     landed_fifo, relay, push.counts_release) for j in range(both or decode)]
    if both:
        def place(r: SimReq) -> None:
            dec = min(decs, key=_Decoder.route_key)
            dec.route(r, reserve=push.counts_generate)
            dec.add(r)
        for r in reqs:
            loop.at(r.arrival, on_arrival(relay, True, lambda r=r: place(r)))
    else:
        pres = [_Prefiller(loop, cal, f"prefill-{j}", caches, push, relay)
                for j in range(prefill)]

        def arrive(r: SimReq) -> None:
            dec = min(decs, key=_Decoder.route_key)
            dec.route(r, reserve=not r.local or push.counts_generate)
            if r.local:
                dec.add(r)
                return
            r.dec = dec
            dec.reserved.append(r)
            r.pre = min(pres, key=_Prefiller.route_key)
            r.pre.add(r)
        for r in reqs:
            r.local = r.prompt < cond_tokens
            loop.at(r.arrival, on_arrival(relay, r.local, lambda r=r: arrive(r)))
    last = max((r.arrival for r in reqs), default=0.0)
    if heartbeats is not None and len(heartbeats) != len(decs):
        raise ValueError(f"heartbeats for {len(heartbeats)} workers, the setup has {len(decs)}")
    schedule_heartbeats(loop, [d.heartbeat for d in decs], heartbeats, last, HEARTBEAT_S)
    loop.run(horizon_s)
    if info is not None:
        info.mean_decode_batch = max((d.batch_time[0] / d.batch_time[1] for d in decs
                                      if d.batch_time[1] > 0), default=0.0)
        info.prefill_steps = [s for p in pres for s in p.steps]
    for r in reqs:  # what reached the client after the time limit was not seen
        if r.first > horizon_s:
            r.first = r.last = math.nan
        r.end, r.last = (math.nan if r.end > horizon_s else r.end), min(r.last, horizon_s)
    return reqs


def simulate_setup(cal: Calibration, setup: Setup, arrivals: Sequence[float],
                   lengths: Sequence[tuple[int, int]], horizon_s: float = math.inf,
                   info: SimRun | None = None, keys: Sequence[Hashable] | None = None,
                   caches: PrefixCaches | None = None,
                   heartbeats: Sequence[Sequence[float]] | None = None,
                   push: KVPush = KVPush(), landed_fifo: bool = False) -> list[SimReq]:
    """`simulate` for any Setup."""
    return simulate(cal, setup.prefill, setup.decode, setup.both, arrivals, lengths,
                    setup.cond_tokens, horizon_s, info, keys, caches, heartbeats, push,
                    landed_fifo)
