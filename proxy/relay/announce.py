"""Ends recorded but perhaps never told: the last step of "nothing accepted is lost" across replicas.

A prompt's end is recorded (`Store.finish`) before its `executing` null leaves the replica that recorded
it through the event bus. A replica killed in between would leave a prompt complete in history whose
client, connected to another replica, waits forever. So `finish` records the end as unannounced in the
same atomic step, the bus confirms it once sent (proxy.relay.bus), and whoever holds a backend's upstream
socket announces the ends still unconfirmed after `GRACE_S`, when it takes the socket over and on every
sweep (proxy.relay.upstream). The grace keeps a live publisher that is merely slow from being doubled up.

What the client sees for an end announced here: the terminal message its history records
(`execution_success`, `execution_error` or `execution_interrupted`), its tenant's queue `status`, then
`executing` with node null and its prompt_id: the order of a normal end. Whatever of these the dying
replica had sent already, or a slow replica sends after all, the hub that holds the client's socket
delivers once (`EndsTold`, by the prompt's id), unless the client reconnected to another replica between
the two: a second `executing` null is harmless to ComfyUI clients (they stop waiting at the first); a
missing one would hang them.
"""

from __future__ import annotations

import time

import structlog

from proxy.relay import messages
from proxy.relay.hub import ClientEvent
from proxy.relay.router import EventRouter
from proxy.store import FINISHED, Store

log = structlog.get_logger(__name__)

GRACE_S = 2.0    # an end this young may still be on its way out of a live replica
HOLD_S = 10.0    # an end claimed by an announcer that died comes back to the sweep after this
BATCH = 100      # ends announced per sweep at most


async def announce_ends(store: Store, router: EventRouter) -> int:
    """Tell the clients of ends that no bus confirmed sent; returns how many were announced.
    May raise `StoreUnavailable`: what was not announced stays for the next sweep."""
    ids = await store.ends_to_announce(time.time() - GRACE_S, HOLD_S, BATCH)
    if not ids:
        return 0
    records = [r for r in await store.get_many(ids) if r.state == FINISHED]
    told = {r.prompt_id for r in records}
    gone = [pid for pid in ids if pid not in told]
    if gone:   # expired or deleted from history since: there is nothing left to tell
        await store.ends_announced(gone)
    counts = {tenant: await store.count_active(tenant) for tenant in {r.tenant for r in records}}
    for rec in records:
        router.relay_terminal(rec, rec.history or {})
        router.queue_status.show(rec.tenant, counts[rec.tenant])
        # Published even when it reaches nobody (no client_id): the bus confirms the end by this event.
        router.publish(ClientEvent(rec.tenant, rec.client_id, messages.executing(None, rec.prompt_id), "executing",
                                   settles=rec.prompt_id, end_of=rec.prompt_id))
        log.warning("end_announced", prompt_id=rec.prompt_id, tenant=rec.tenant, backend=rec.backend,
                    outcome=rec.outcome)
    return len(records)
