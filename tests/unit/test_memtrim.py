"""lmgw.memtrim: the heap is trimmed once per burst of released bodies, never below the mark."""

from __future__ import annotations

import trio

from lmgw.memtrim import HeapTrimmer, malloc_trim, rss_bytes


class FakeTrim:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, pad: int) -> int:
        assert pad == 0
        self.calls += 1
        return 1


async def until(cond: object) -> None:
    with trio.fail_after(5):
        while not cond():  # type: ignore[operator]
            await trio.sleep(0.005)


async def test_one_trim_per_burst_past_the_mark() -> None:
    trim = FakeTrim()
    reported: list[int] = []
    trimmer = HeapTrimmer(1000, pause_s=0.2, trim=trim, on_trim=reported.append)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trimmer.run)
        trimmer.released(999)
        await trio.sleep(0.3)
        assert trim.calls == 0  # below the mark: nothing to give back
        for _ in range(5):  # a burst: the first crosses the mark, the rest land in the pause
            trimmer.released(600)
            await trio.lowlevel.checkpoint()
        await until(lambda: reported)
        await trio.sleep(0.3)
        assert trim.calls == 1 and len(reported) == 1 and reported[0] >= 0
        assert trimmer.pending == 0
        trimmer.released(1000)  # the next burst: the next trim
        await until(lambda: len(reported) == 2)
        assert trim.calls == 2 and trimmer.trims == 2
        nursery.cancel_scope.cancel()


async def test_trims_when_the_resident_memory_grew_past_the_mark() -> None:
    """Steady traffic frees heap without a large body: a check every ``check_s`` trims once the
    RSS grew ``growth_bytes`` past what the last trim left, and only then."""
    trim = FakeTrim()
    rss = [100]
    reported: list[int] = []

    def fake_trim(pad: int) -> int:
        rss[0] -= 30  # what glibc gives back
        return trim(pad)

    trimmer = HeapTrimmer(
        0, growth_bytes=50, check_s=0.05, trim=fake_trim, on_trim=reported.append,
        rss=lambda: rss[0],
    )  # fmt: skip
    assert trimmer.enabled
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trimmer.run)
        await trio.sleep(0.2)
        assert trimmer.mark == 100 and trim.calls == 0  # no growth yet
        rss[0] = 140
        await trio.sleep(0.2)
        assert trim.calls == 0  # 40 < 50
        rss[0] = 160
        await until(lambda: reported)
        assert reported == [30] and trimmer.mark == 130  # the mark: what is left
        await trio.sleep(0.2)
        assert trim.calls == 1  # held memory is not trimmed again and again
        rss[0] = 185
        await until(lambda: len(reported) == 2)
        assert trimmer.mark == 155
        nursery.cancel_scope.cancel()


async def test_off_at_zero_or_without_malloc_trim() -> None:
    assert not HeapTrimmer(0, trim=FakeTrim()).enabled
    assert not HeapTrimmer(1000, trim=None).enabled
    with trio.fail_after(1):  # run() returns at once when off
        await HeapTrimmer(0, trim=FakeTrim()).run()


def test_the_real_malloc_trim_and_rss_on_this_libc() -> None:
    """On glibc (the Debian machines lmgw ships for) both are there."""
    assert malloc_trim is not None
    assert malloc_trim(0) in (0, 1)
    assert rss_bytes() > 1 << 20
