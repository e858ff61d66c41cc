"""Fair sharing of the GPU: slots per (upstream, model) and a fair queue across users.

`core` holds the scheduler (no HTTP), `policy` what the config says (slots, shares),
`estimate` a request's token estimate, `stage` the pipeline stage that asks for a slot.
"""

from gateway.scheduler.core import FairScheduler, Grant, QueueRejected, SlotKey, Ticket

__all__ = ["FairScheduler", "Grant", "QueueRejected", "SlotKey", "Ticket"]
