"""The writer's heartbeat at every voter, and the acknowledgement gate it keeps.

In automatic failover the writer renews `heartbeat/<epoch>.json` at each
voter every `heartbeat_every` seconds: a PUT of a body never written before,
then a lease check (docs/format.md §2.4) that must show no newer epoch. Each
renewal feeds the `WriterGate` (control/failover_rules.py), which says until
when the writer may acknowledge anything; the volume asks it before every
answer. A lease check that shows a newer epoch fences the writer at once.

Every voter has its own loop and its own client with short timeouts and no
retries, so one slow voter delays nothing else, and renewals never queue
behind segment uploads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from vaultsync.control.failover_rules import Timing, WriterGate
from vaultsync.control.lease import FencedError, check_lease, lease_clock
from vaultsync.format.bucket_layout import heartbeat_key
from vaultsync.format.heartbeat import Heartbeat, voter_identity
from vaultsync.store.objectstore import ObjectStore, StoreError

log = logging.getLogger("vaultsync.failover")


@dataclass
class VoterState:
    """What the writer last saw of one voter, for status and logs."""

    renewed_at: float = float("-inf")  # lease_clock() when the newest renewal began
    error: str = ""
    failures: int = 0


@dataclass
class Heartbeats:
    """The renewal loops of one writer process (epoch `epoch`, site `site`)."""

    voters: list[ObjectStore]
    epoch: int
    site: str
    timing: Timing
    on_fenced: Callable[[str], None]
    on_gate_change: Callable[[], None] = lambda: None
    gate: WriterGate = field(init=False)
    state: dict[str, VoterState] = field(init=False)
    _run: str = field(default_factory=lambda: secrets.token_hex(8))
    _counter: int = 0
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _was_open: bool = False

    def __post_init__(self) -> None:
        self.gate = WriterGate(tuple(v.name for v in self.voters), self.timing)
        self.state = {v.name: VoterState() for v in self.voters}

    def start(self) -> None:
        for v in self.voters:
            self._tasks.append(asyncio.create_task(self._loop(v), name=f"heartbeat-{v.name}"))
        self._tasks.append(asyncio.create_task(self._watch_gate(), name="heartbeat-gate"))

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks.clear()

    def open_until(self) -> float:
        """Until when (lease_clock) this writer may acknowledge; -inf: not now."""
        return self.gate.open_until()

    def is_open(self) -> bool:
        return self.gate.is_open(lease_clock())

    def _body(self) -> bytes:
        self._counter += 1
        return Heartbeat(
            epoch=self.epoch,
            site=self.site,
            run=self._run,
            counter=self._counter,
            hold=self.timing.hold,
            probation=self.timing.probation,
            heartbeat_every=self.timing.heartbeat_every,
            written_ns=time.time_ns(),
            voters=tuple(
                sorted(voter_identity(v.target.bucket, v.target.prefix) for v in self.voters)
            ),
        ).to_bytes()

    async def renew(self, store: ObjectStore) -> None:
        """One renewal at `store`: FencedError if a newer lease is there, StoreError if
        it could not be done (the voter is then not renewed this round)."""
        began = lease_clock()
        await store.put(heartbeat_key(self.epoch), self._body())
        acked = lease_clock()
        checked = await check_lease(store, self.epoch)
        self.gate.renewed(store.name, began, acked, checked)
        self.state[store.name].renewed_at = began

    async def _loop(self, store: ObjectStore) -> None:
        st = self.state[store.name]
        every = self.timing.heartbeat_every
        while True:
            t0 = lease_clock()
            try:
                async with asyncio.timeout(every * 2):
                    await self.renew(store)
                if st.failures:
                    log.info("heartbeat at voter %s renewed again", store.name)
                st.error, st.failures = "", 0
            except FencedError as e:
                self.on_fenced(str(e))
                return
            except (StoreError, TimeoutError) as e:
                st.failures += 1
                st.error = getattr(e, "reason", None) or "timed out"
                if st.failures == 1:
                    log.warning("heartbeat at voter %s failed: %s", store.name, st.error)
            due = self.gate.confirm_due(store.name)
            if due is not None and due < t0 + every:
                # A new run: the check that confirms it as soon as the probation allows.
                await asyncio.sleep(max(0.0, due - lease_clock()))
                try:
                    async with asyncio.timeout(every):
                        self.gate.checked(store.name, await check_lease(store, self.epoch))
                except FencedError as e:
                    self.on_fenced(str(e))
                    return
                except (StoreError, TimeoutError):
                    pass  # the next renewal's check confirms it
            await asyncio.sleep(max(0.0, every - (lease_clock() - t0)))

    def _gate_moved(self) -> bool:
        now_open = self.is_open()
        moved = now_open != self._was_open
        self._was_open = now_open
        return moved

    async def _watch_gate(self) -> None:
        """Say when the gate closes by running out (no renewal answers to notice it)."""
        while True:
            until = self.open_until()
            now = lease_clock()
            if self._gate_moved():
                if not self._was_open:
                    held = ", ".join(self.gate.held(now)) or "none"
                    log.warning(
                        "acknowledgements paused: this writer holds %s of the %d voters it "
                        "needs a majority of (held: %s)",
                        len(self.gate.held(now)),
                        len(self.voters),
                        held,
                    )
                else:
                    log.info("acknowledgements resumed: a majority of voters is held")
                self.on_gate_change()
            await asyncio.sleep(min(0.25, max(0.01, until - now)) if until > now else 0.25)
