"""The fair scheduler on its own: slots, order, counters, caps, departures, reloads.

Real asyncio, the real policy built from a parsed config; no HTTP (the gateway-level tests
are in test_scheduler_gateway.py). Each test drives dispatch by releasing grants, so the
order of service is observed exactly, without timing.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import yaml

from gateway.config_load import parse_config
from gateway.scheduler import FairScheduler, Grant, QueueRejected, Ticket
from gateway.scheduler.policy import DEFAULT_UPSTREAM, GatewaySchedulingPolicy

MODEL = "llama3.2:latest"


def policy(**overrides: Any) -> GatewaySchedulingPolicy:
    doc: dict[str, Any] = {
        "upstream": {"slots": 1},
        "roles": {
            "user": {"models": ["*"]},
            "heavy": {"models": ["*"], "weight": 3},
            "vip": {"models": ["*"], "priority": 5},
            "admin": {"models": ["*"]},
        },
    }
    for key, value in overrides.items():
        doc[key] = {**doc.get(key, {}), **value}
    return GatewaySchedulingPolicy.from_config(parse_config(yaml.safe_dump(doc)))


def ticket(user: str, tokens: int = 100, model: str = MODEL, roles: str = "user") -> Ticket:
    return Ticket(
        user=user,
        key=(DEFAULT_UPSTREAM, model),
        estimate=tokens,
        roles=frozenset(roles.split(",")),
    )


class Recorder:
    """Starts requests as tasks and records the order in which they are granted."""

    def __init__(self, scheduler: FairScheduler) -> None:
        self.scheduler = scheduler
        self.order: list[str] = []
        self.grants: dict[str, Grant] = {}
        self.tasks: dict[str, asyncio.Task[Grant]] = {}

    async def submit(self, label: str, t: Ticket) -> asyncio.Task[Grant]:
        async def run() -> Grant:
            grant = await self.scheduler.acquire(t)
            self.order.append(label)
            self.grants[label] = grant
            return grant

        task = asyncio.ensure_future(run())
        self.tasks[label] = task
        await asyncio.sleep(0)  # let it reach the queue (or take a free slot)
        return task

    async def finish(self, label: str, tokens: int | None = None) -> None:
        self.grants[label].release(tokens)
        await asyncio.sleep(0)
        await asyncio.sleep(0)  # the granted task records itself


async def test_free_slot_is_taken_at_once_and_slots_bound_the_running() -> None:
    scheduler = FairScheduler(policy(upstream={"slots": 2}))
    rec = Recorder(scheduler)
    for label in ("a1", "a2", "a3"):
        await rec.submit(label, ticket("alice"))
    assert rec.order == ["a1", "a2"]
    assert scheduler.slots() == [((DEFAULT_UPSTREAM, MODEL), 2, 2)]
    await rec.finish("a1")
    assert rec.order == ["a1", "a2", "a3"]
    assert scheduler.slots()[0][1] == 2


async def test_a_newcomer_goes_before_a_waiting_batch() -> None:
    scheduler = FairScheduler(policy())
    rec = Recorder(scheduler)
    for i in range(8):
        await rec.submit(f"a{i}", ticket("alice"))
    await rec.submit("b0", ticket("bob"))
    assert rec.order == ["a0"]
    await rec.finish("a0")
    assert rec.order == ["a0", "b0"], "bob waits one generation, not eight"


async def test_one_users_requests_keep_their_order() -> None:
    scheduler = FairScheduler(policy())
    rec = Recorder(scheduler)
    for i in range(4):
        await rec.submit(f"a{i}", ticket("alice"))
    for i in range(3):
        await rec.finish(f"a{i}")
    assert rec.order == ["a0", "a1", "a2", "a3"]


async def test_equal_weights_alternate_and_tokens_not_requests_decide() -> None:
    scheduler = FairScheduler(policy())
    rec = Recorder(scheduler)
    await rec.submit("hold", ticket("carol"))
    # Alice's requests are 4x as long as Bob's: Bob should get about 4 per Alice's 1.
    for i in range(4):
        await rec.submit(f"a{i}", ticket("alice", tokens=400))
    for i in range(12):
        await rec.submit(f"b{i}", ticket("bob", tokens=100))
    await rec.finish("hold")
    served: list[str] = []
    for _ in range(10):
        label = rec.order[-1]
        served.append(label[0])
        await rec.finish(label)
    alice_tokens = 400 * served.count("a")
    bob_tokens = 100 * served.count("b")
    assert served.count("b") > 2 * served.count("a")
    assert abs(alice_tokens - bob_tokens) <= 400


async def test_weights_share_tokens_in_proportion() -> None:
    scheduler = FairScheduler(policy(scheduler={"max_queue_per_user": 40}))
    rec = Recorder(scheduler)
    await rec.submit("hold", ticket("carol"))
    for i in range(40):
        await rec.submit(f"l{i}", ticket("light", roles="user"))
        await rec.submit(f"h{i}", ticket("heavy", roles="heavy"))
    await rec.finish("hold")
    for _ in range(40):
        await rec.finish(rec.order[-1])
    served = [label[0] for label in rec.order[1:41]]
    ratio = served.count("h") / served.count("l")
    assert 2.5 <= ratio <= 3.5, served


async def test_reconciled_tokens_move_the_counter() -> None:
    scheduler = FairScheduler(policy())
    rec = Recorder(scheduler)
    await rec.submit("a0", ticket("alice", tokens=100))
    await rec.finish("a0", tokens=1000)  # Ollama said it was ten times longer
    assert scheduler.counter("alice") == pytest.approx(1000)
    await rec.submit("a1", ticket("alice", tokens=100))
    await rec.finish("a1", tokens=0)  # never ran: refunded
    assert scheduler.counter("alice") == pytest.approx(1000)


async def test_idle_time_is_not_banked() -> None:
    scheduler = FairScheduler(policy())
    rec = Recorder(scheduler)
    # Alice works alone for a long time; Bob, idle all along, must not then own the GPU.
    for i in range(20):
        await rec.submit(f"a{i}", ticket("alice"))
        await rec.finish(f"a{i}")
    await rec.submit("hold", ticket("alice"))
    for i in range(3):
        await rec.submit(f"b{i}", ticket("bob"))
        await rec.submit(f"x{i}", ticket("alice"))
    assert scheduler.counter("bob") >= scheduler.counter("alice") - 100
    await rec.finish("hold")
    for _ in range(3):
        await rec.finish(rec.order[-1])
    assert sorted(label[0] for label in rec.order[-4:]) == ["b", "b", "x", "x"]


async def test_priority_goes_first_whatever_the_counters() -> None:
    scheduler = FairScheduler(policy())
    rec = Recorder(scheduler)
    await rec.submit("hold", ticket("alice"))
    for i in range(3):
        await rec.submit(f"a{i}", ticket("alice"))
    await rec.submit("v0", ticket("victor", roles="vip", tokens=10_000))
    await rec.submit("v1", ticket("victor", roles="vip", tokens=10_000))
    await rec.finish("hold")
    await rec.finish("v0")
    assert rec.order[:3] == ["hold", "v0", "v1"]


async def test_slots_are_per_model() -> None:
    scheduler = FairScheduler(policy(upstream={"slots": 1, "model_slots": {"nomic*": 2}}))
    rec = Recorder(scheduler)
    await rec.submit("l0", ticket("alice"))
    await rec.submit("l1", ticket("alice"))
    await rec.submit("n0", ticket("alice", model="nomic-embed-text:latest"))
    await rec.submit("n1", ticket("alice", model="nomic-embed-text:latest"))
    assert rec.order == ["l0", "n0", "n1"]
    await rec.submit("c0", ticket("alice", model="gpt-oss:120b-cloud"))
    await rec.submit("c1", ticket("alice", model="gpt-oss:120b-cloud"))
    assert rec.order[-2:] == ["c0", "c1"], "cloud models use no local slot"


async def test_caps_answer_at_once_with_retry_after() -> None:
    scheduler = FairScheduler(policy(scheduler={"max_queue_per_user": 2, "max_queue": 3}))
    rec = Recorder(scheduler)
    await rec.submit("a0", ticket("alice"))
    await rec.submit("a1", ticket("alice"))
    await rec.submit("a2", ticket("alice"))
    with pytest.raises(QueueRejected) as user_full:
        await scheduler.acquire(ticket("alice"))
    assert user_full.value.reason == "user_queue_full" and user_full.value.retry_after >= 1
    await rec.submit("b0", ticket("bob"))
    with pytest.raises(QueueRejected) as all_full:
        await scheduler.acquire(ticket("carol"))
    assert all_full.value.reason == "queue_full"
    assert scheduler.waiting_total == 3


async def test_queue_timeout() -> None:
    scheduler = FairScheduler(policy(scheduler={"queue_timeout": 0.05}))
    rec = Recorder(scheduler)
    await rec.submit("a0", ticket("alice"))
    with pytest.raises(QueueRejected) as timed_out:
        await scheduler.acquire(ticket("bob"))
    assert timed_out.value.reason == "timeout"
    assert timed_out.value.waited >= 0.05 and timed_out.value.retry_after >= 1
    assert scheduler.waiting_total == 0 and scheduler.backlogged_users() == set()


async def test_a_departed_waiter_leaves_the_queue_and_never_gets_the_slot() -> None:
    scheduler = FairScheduler(policy())
    rec = Recorder(scheduler)
    await rec.submit("a0", ticket("alice"))
    gone = await rec.submit("b0", ticket("bob"))
    await rec.submit("c0", ticket("carol"))
    gone.cancel()
    await asyncio.sleep(0)
    assert scheduler.waiting_total == 1
    await rec.finish("a0")
    assert rec.order == ["a0", "c0"]
    assert gone.cancelled()


async def test_a_slot_granted_to_a_waiter_that_just_left_is_given_back() -> None:
    scheduler = FairScheduler(policy())
    rec = Recorder(scheduler)
    await rec.submit("a0", ticket("alice"))
    waiter = await rec.submit("b0", ticket("bob"))
    rec.grants["a0"].release(None)  # b0's future gets the slot ...
    waiter.cancel()  # ... and its client leaves before it runs
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert scheduler.slots()[0][1] == 0, "the slot is not leaked"
    assert scheduler.counter("bob") == 0, "nothing ran, nothing charged"


async def test_release_is_idempotent() -> None:
    scheduler = FairScheduler(policy(upstream={"slots": 2}))
    rec = Recorder(scheduler)
    await rec.submit("a0", ticket("alice"))
    await rec.submit("a1", ticket("alice"))
    await rec.submit("a2", ticket("alice"))
    rec.grants["a0"].release(None)
    rec.grants["a0"].release(None)
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert scheduler.slots()[0][1] == 2 and scheduler.waiting_total == 0


async def test_reload_applies_new_slots_and_shares_to_waiting_requests() -> None:
    scheduler = FairScheduler(policy())
    rec = Recorder(scheduler)
    await rec.submit("a0", ticket("alice"))
    for label in ("a1", "a2", "b0"):
        await rec.submit(label, ticket("alice" if label[0] == "a" else "bob"))
    scheduler.reconfigure(policy(upstream={"slots": 3}))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert sorted(rec.order) == ["a0", "a1", "b0"], "two more slots: two more dispatched"
    assert scheduler.waiting_total == 1
    # A priority granted by the reload lifts the waiting user over newer arrivals.
    await rec.submit("c0", ticket("carol"))
    scheduler.reconfigure(policy(upstream={"slots": 3}, roles={"user": {"priority": 1}}))
    assert scheduler.waiting_by_priority() == {1: 2}


async def test_retry_after_follows_recent_service_time() -> None:
    clock = [0.0]
    scheduler = FairScheduler(policy(scheduler={"max_queue_per_user": 1}), clock=lambda: clock[0])
    rec = Recorder(scheduler)
    await rec.submit("a0", ticket("alice"))
    for _ in range(20):  # generations of 40 s each
        clock[0] += 40
        await rec.finish(rec.order[-1])
        await rec.submit(f"a{len(rec.order)}", ticket("alice"))
    await rec.submit("b0", ticket("bob"))
    with pytest.raises(QueueRejected) as full:
        await scheduler.acquire(ticket("bob"))
    assert 30 <= full.value.retry_after <= 90  # one in service, one ahead: about 2 x 40 s


async def test_a_refund_never_puts_the_releasing_user_ahead_of_a_newcomer() -> None:
    scheduler = FairScheduler(policy())
    rec = Recorder(scheduler)
    await rec.submit("a0", ticket("alice", tokens=100))
    await rec.submit("a1", ticket("alice", tokens=100))
    await rec.submit("b0", ticket("bob", tokens=100))  # lifted to alice's level
    await rec.finish("a0", tokens=99)  # Ollama counted one token less than estimated
    assert rec.order == ["a0", "b0"]
    assert scheduler.counter("alice") == pytest.approx(99)


async def test_a_users_own_weight_and_priority_override_its_roles() -> None:
    hashed = "$2b$04$" + "a" * 53
    doc = {
        "roles": {"user": {"models": ["*"], "weight": 1}, "admin": {"models": ["*"]}},
        "auth": {
            "users": {
                "alice": {"password": hashed, "roles": ["user"], "weight": 5, "priority": 2},
                "bob": {"password": hashed, "roles": ["user"]},
            }
        },
    }
    scheduling = GatewaySchedulingPolicy.from_config(parse_config(yaml.safe_dump(doc)))
    assert scheduling.share_of("alice", frozenset({"user"})) == (5, 2)
    assert scheduling.share_of("bob", frozenset({"user"})) == (1, 0)


async def test_made_up_model_names_do_not_grow_the_pools_without_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from gateway.scheduler import core

    monkeypatch.setattr(core, "MAX_POOLS", 8)
    scheduler = FairScheduler(policy())
    held = await scheduler.acquire(ticket("alice"))  # a busy pool survives the clean-up
    for i in range(50):
        (await scheduler.acquire(ticket("bob", model=f"junk-{i}:latest"))).release(0)
    assert len(scheduler.slots()) <= 8
    assert ((DEFAULT_UPSTREAM, MODEL), 1, 1) in scheduler.slots()
    held.release(None)
