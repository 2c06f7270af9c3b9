"""The server-wide budget's admission rule: never more than the capacity in use, first come first
served within each class, a small request not held up by a large one waiting (a reserve), and a
large one not starved by a stream of small ones. Event-loop steps only: no wall-clock timing."""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from qwen25vl_embed_server.core.admission.budget import Budget
from qwen25vl_embed_server.core.errors import DeadlineExceededError

# Capacity 80: large above 10, a reserve of 20 for small ones, at most 60 held by large ones.
CAPACITY = 80


async def settle() -> None:
    """Let every ready task run until none can progress (a few event-loop steps)."""
    for _ in range(5):
        await asyncio.sleep(0)


def small_used(budget: Budget) -> int:
    return budget.used - budget.used_large


def test_the_classes_and_the_clamp() -> None:
    budget = Budget(CAPACITY, "units")
    assert (budget.large_above, budget.reserve) == (10, 20)
    assert not budget.is_large(10)
    assert budget.is_large(11)
    assert budget.share(10) == 10
    assert budget.share(1000) == 60  # large ones together hold at most capacity - reserve
    assert budget.share(-3) == 0
    tiny = Budget(5, "units")  # below 8: no reserve, every amount large, plain FIFO
    assert (tiny.large_above, tiny.reserve, tiny.share(50)) == (0, 0, 5)


def test_a_small_request_passes_a_large_one_waiting_within_the_reserve() -> None:
    """No head-of-line blocking: one strict FIFO line per budget would make the small ones wait behind ``big``."""

    async def scenario() -> None:
        budget = Budget(CAPACITY, "units")
        assert await budget.acquire(60) == 60  # large ones' room is full
        big = asyncio.ensure_future(budget.acquire(30))
        await settle()
        assert not big.done()
        smalls = [asyncio.ensure_future(budget.acquire(5)) for _ in range(5)]
        await settle()
        assert [s.done() for s in smalls] == [True] * 4 + [False]  # 4 x 5 = the reserve
        assert small_used(budget) == budget.reserve
        assert not big.done()
        budget.release(60)  # the large one fits; with no large one waiting, small ones use the rest
        await settle()
        assert big.done()
        assert smalls[4].done()
        assert (budget.used, budget.used_large, budget.waiting) == (30 + 25, 30, 0)
        budget.release(30)
        for _ in smalls:
            budget.release(5)
        assert (budget.used, budget.used_large, budget.peak) == (0, 0, 80)

    asyncio.run(scenario())


def test_a_large_request_is_not_starved_by_a_stream_of_small_ones() -> None:
    """Small ones fill the whole budget before ``big`` arrives; then one finishes and a new one
    arrives, over and over. The newcomers wait (the small ones hold more than the reserve), so
    ``big`` gets in as soon as enough have finished; a second large one, waiting for the large
    ones' room, gets in when ``big`` finishes, the small ones kept to the reserve meanwhile."""

    async def scenario() -> None:
        budget = Budget(CAPACITY, "units")
        held = [await budget.acquire(5) for _ in range(16)]
        assert budget.used == CAPACITY
        big = asyncio.ensure_future(budget.acquire(30))
        newcomers: list[asyncio.Future[int]] = []
        steps = 0
        while not big.done():
            budget.release(held.pop())
            newcomers.append(asyncio.ensure_future(budget.acquire(5)))
            await settle()
            steps += 1
            assert not any(n.done() for n in newcomers)  # none overtakes the large one waiting
        assert steps == 6  # 80 - 6 x 5 + 30 = 80: it fits exactly when six have finished
        assert await big == 30
        second = asyncio.ensure_future(budget.acquire(40))  # 30 + 40 > 60: waits for big
        while held:
            budget.release(held.pop())
            await settle()
            assert small_used(budget) >= budget.reserve  # the stream keeps to the reserve ...
        assert small_used(budget) == budget.reserve  # ... once below it, and no further
        assert [n.done() for n in newcomers] == [True] * 4 + [False] * 2
        assert not second.done()
        budget.release(30)
        await settle()
        assert second.done()
        assert all(n.done() for n in newcomers)
        assert (budget.used, budget.used_large, budget.peak) == (40 + 6 * 5, 40, CAPACITY)

    asyncio.run(scenario())


def test_waits_clamp_and_deadlines_and_cancellation_wake_those_behind() -> None:
    async def scenario() -> None:
        budget = Budget(CAPACITY, "units")
        assert await budget.acquire(40) == 40
        big = asyncio.ensure_future(budget.acquire(500))  # clamped to 60: waits for the 40
        await settle()
        behind = asyncio.ensure_future(budget.acquire(20))  # 40 + 20 fits, but first come, first served
        await settle()
        assert not big.done()
        assert not behind.done()
        with pytest.raises(DeadlineExceededError, match="waiting for units"):
            await budget.acquire(11, deadline=time.monotonic() - 1)
        assert budget.waiting == 2
        big.cancel()  # leaving the line lets the one behind it in
        with pytest.raises(asyncio.CancelledError):
            await big
        assert await behind == 20
        budget.release(40)
        budget.release(20)
        assert (budget.used, budget.used_large, budget.waiting, budget.peak) == (0, 0, 0, 60)

    asyncio.run(scenario())


def test_a_random_mix_never_exceeds_the_capacity_and_keeps_each_class_in_order() -> None:
    """Property-style: 400 requests of random sizes, hold times, deadlines already passed and
    cancellations, on a fixed seed. After every step: within the capacity, large ones within their
    room; at the end everything was given back, and those of a class that waited got in in
    arrival order."""
    rng = random.Random(11)
    capacity = 100  # large above 12, reserve 24, large ones' room 76

    async def scenario() -> None:
        budget = Budget(capacity, "units")
        waited: dict[bool, list[int]] = {False: [], True: []}
        events = 0  # releases and departures from the line: what lets a waiting request in
        admitted = 0

        def check() -> None:
            assert 0 <= budget.used_large <= budget.used <= capacity
            assert budget.used_large <= capacity - budget.reserve

        async def request(number: int, amount: int, hold: int, expired: bool) -> None:
            nonlocal events, admitted
            large = budget.is_large(budget.share(amount))
            before = events
            try:
                taken = await budget.acquire(amount, deadline=time.monotonic() - 1 if expired else None)
            except (DeadlineExceededError, asyncio.CancelledError):
                events += 1
                return
            admitted += 1
            if events != before:  # it waited (the fast path returns before anything else runs)
                waited[large].append(number)
            check()
            try:
                for _ in range(hold):
                    await asyncio.sleep(0)
            finally:  # cancelled while holding, too
                budget.release(taken)
                events += 1

        tasks = []
        for number in range(400):
            amount = rng.choice([rng.randint(0, 12), rng.randint(1, 12), rng.randint(13, 150)])
            tasks.append(asyncio.ensure_future(request(number, amount, rng.randint(0, 8), rng.random() < 0.05)))
            if rng.random() < 0.05:
                rng.choice(tasks).cancel()
            for _ in range(rng.randint(0, 3)):
                await asyncio.sleep(0)
                check()
        await asyncio.gather(*tasks, return_exceptions=True)
        assert (budget.used, budget.used_large, budget.waiting) == (0, 0, 0)
        assert 0 < budget.peak <= capacity
        assert admitted > 300
        for large in (False, True):
            # Waiters without a deadline resume in the order they were let in: arrival order.
            assert waited[large] == sorted(waited[large])
            assert len(waited[large]) > 20  # both classes did wait
