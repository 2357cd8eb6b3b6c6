"""MonotonicClock: the runtime's real-time clock, finer than uvloop's millisecond ``loop.time()``."""

from __future__ import annotations

import asyncio
import time

import pytest
import uvloop

from helix_async.clock import Clock, MonotonicClock


def test_now_resolves_below_a_millisecond_and_timers_fire_in_order() -> None:
    async def main() -> None:
        clock = MonotonicClock()
        assert isinstance(clock, Clock)
        seen = {clock.now() for _ in range(1000)}
        assert len(seen) > 10  # uvloop's loop.time() would give one or two values here
        order: list[str] = []
        t = clock.now()
        clock.call_at(t + 0.02, order.append, "late")
        clock.call_at(t + 0.005, order.append, "early")
        clock.call_soon(order.append, "soon")
        clock.call_at(t - 1.0, order.append, "past")  # a deadline already past runs at once
        await clock.sleep_until(t + 0.03)
        assert clock.now() >= t + 0.03
        assert order[:2] in (["soon", "past"], ["past", "soon"]) and order[2:] == ["early", "late"]
        t1 = clock.now()
        await clock.sleep(0.01)
        assert clock.now() - t1 >= 0.009
        with pytest.raises(ValueError, match="NaN"):
            await clock.sleep_until(float("nan"))

    uvloop.run(asyncio.wait_for(main(), 10))
    assert MonotonicClock().now() <= time.monotonic()
