"""PipelinedExecutor: order, overlap, errors, cancellation, bounded memory, trace. Plain sleeps, no models."""
from __future__ import annotations

import itertools
import random
import threading
import time

import pytest

from atomkit.errors import PipelineError
from atomkit.pipeline.executor import PipelinedExecutor, SequentialExecutor


def _stage_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("atomkit-stage-")]


@pytest.fixture(autouse=True)
def no_threads_left():
    assert not _stage_threads()
    yield
    assert not _stage_threads(), "a worker thread outlived its map"


def _sleeper(tag: str, seed: int, max_s: float = 0.004):
    rng = random.Random(seed)
    delays = [rng.uniform(0, max_s) for _ in range(1000)]

    def stage(x):
        time.sleep(delays[x[0] % len(delays)])
        return (x[0], x[1] + [tag])

    stage.__name__ = f"stage_{tag}"
    return stage


def _fixed(delay: float):
    def stage(x):
        time.sleep(delay)
        return x
    return stage


def _failing_at(n: int):
    def boom(x):
        if x == n:
            raise ValueError(f"bad item {x}")
        return x
    return boom


def _counting(source):
    pulled = [0]

    def gen():
        for x in source:
            pulled[0] += 1
            yield x
    return gen(), pulled


def test_order_preserved_and_equal_to_sequential():
    stages = [_sleeper("a", 1), _sleeper("b", 2), _sleeper("c", 3)]
    items = [(i, []) for i in range(50)]
    seq = list(SequentialExecutor().map(iter(items), stages))
    pip = list(PipelinedExecutor(depth=2).map(iter(items), stages))
    assert pip == seq
    assert [i for i, _ in pip] == list(range(50))
    assert all(tags == ["a", "b", "c"] for _, tags in pip)


def test_stages_overlap():
    stages = [_fixed(0.05)] * 3
    t0 = time.perf_counter()
    assert list(SequentialExecutor().map(range(10), stages)) == list(range(10))
    t_seq = time.perf_counter() - t0
    t0 = time.perf_counter()
    assert list(PipelinedExecutor().map(range(10), stages)) == list(range(10))
    t_pip = time.perf_counter() - t0
    assert t_pip < 0.6 * t_seq, (t_pip, t_seq)


@pytest.mark.parametrize("bad_stage", [0, 1, 2])
def test_error_in_stage_is_wrapped(bad_stage):
    stages = [_fixed(0.001)] * 3
    stages[bad_stage] = _failing_at(3)
    got = []
    with pytest.raises(PipelineError) as info:
        for x in PipelinedExecutor().map(range(20), stages):
            got.append(x)
    err = info.value
    assert isinstance(err.__cause__, ValueError)
    assert str(err).startswith(f"stage {bad_stage} (boom) failed on item 3:")
    assert "bad item 3" in str(err)
    assert got == list(range(len(got))) and len(got) <= 3  # a prefix, nothing at or after item 3


def test_error_while_iterating_items():
    def items():
        yield from range(3)
        raise ValueError("source broke")

    with pytest.raises(PipelineError) as info:
        list(PipelinedExecutor().map(items(), [_fixed(0.001)] * 3))
    assert isinstance(info.value.__cause__, ValueError)
    assert "item 3" in str(info.value) and "source broke" in str(info.value)


def test_consumer_break_stops_promptly():
    source, pulled = _counting(itertools.count())
    t0 = time.perf_counter()
    got = []
    for x in PipelinedExecutor().map(source, [_fixed(0.01)] * 3):
        got.append(x)
        if len(got) == 2:
            break
    # the generator is closed when the loop drops it; CPython does that at once
    assert time.perf_counter() - t0 < 2
    assert got == [0, 1]


def test_consumer_close_and_exception_in_loop_body():
    gen = PipelinedExecutor().map(itertools.count(), [_fixed(0.005)] * 3)
    assert next(gen) == 0
    gen.close()
    assert not _stage_threads()

    with pytest.raises(KeyError):
        for x in PipelinedExecutor().map(itertools.count(), [_fixed(0.005)] * 3):
            if x == 4:
                raise KeyError(x)


def test_cancel_from_another_thread():
    ex = PipelinedExecutor()
    timer = threading.Timer(0.2, ex.cancel)
    timer.start()
    got = []
    t0 = time.perf_counter()
    with pytest.raises(PipelineError, match="^cancelled$") as info:
        for x in ex.map(itertools.count(), [_fixed(0.01)] * 3):
            got.append(x)
    timer.join()
    assert time.perf_counter() - t0 < 2
    assert info.value.__cause__ is None
    assert got == list(range(len(got))) and got


def test_cancel_without_running_map_is_harmless():
    ex = PipelinedExecutor()
    ex.cancel()
    assert list(ex.map(range(3), [_fixed(0)])) == [0, 1, 2]


@pytest.mark.parametrize("depth", [1, 2, 4])
def test_memory_is_bounded(depth):
    n_stages = 3
    source, pulled = _counting(itertools.count())
    stages = [_fixed(0), _fixed(0), _fixed(0.03)]
    gen = PipelinedExecutor(depth=depth).map(source, stages)
    for _ in range(5):
        next(gen)
    time.sleep(0.3)  # let the fast stages run ahead as far as they can
    assert pulled[0] <= 5 + n_stages * (depth + 1) + 2, pulled[0]
    gen.close()


def test_trace_records_every_call_in_stage_order():
    ex = PipelinedExecutor(trace=True)
    stages = [_sleeper("a", 4), _sleeper("b", 5), _sleeper("c", 6)]
    list(ex.map(((i, []) for i in range(12)), stages))
    keys = [(s, n) for s, n, _, _ in ex.trace]
    assert sorted(keys) == [(s, n) for s in range(3) for n in range(12)]
    spans = {(s, n): (t0, t1) for s, n, t0, t1 in ex.trace}
    for n in range(12):
        for s in range(2):
            assert spans[s, n][1] <= spans[s + 1, n][0]
    list(ex.map(((i, []) for i in range(2)), stages))  # reset per map
    assert len(ex.trace) == 6


def test_sequential_trace():
    ex = SequentialExecutor(trace=True)
    assert list(ex.map(range(4), [_fixed(0)] * 2)) == [0, 1, 2, 3]
    assert [(s, n) for s, n, _, _ in ex.trace] == [(s, n) for n in range(4) for s in range(2)]
    assert SequentialExecutor().trace == []


def test_empty_input():
    assert list(PipelinedExecutor().map([], [_fixed(0)] * 3)) == []
    assert list(PipelinedExecutor().map(iter(()), [_fixed(0)] * 3)) == []


def test_threads_recorded_and_checked():
    ex = PipelinedExecutor(threads=[1, 4, None])
    assert ex.stage_threads == [1, 4, None]
    assert list(ex.map(range(3), [_fixed(0)] * 3)) == [0, 1, 2]
    with pytest.raises(ValueError):
        list(ex.map(range(3), [_fixed(0)] * 2))
    with pytest.raises(ValueError):
        PipelinedExecutor(depth=0)


def test_not_iterable_items():
    with pytest.raises(TypeError):
        list(PipelinedExecutor().map(42, [_fixed(0)]))


def test_no_stages_passes_items_through():
    assert list(PipelinedExecutor().map(iter(range(3)), [])) == [0, 1, 2]


def test_per_stage_torch_thread_budgets():
    """Each worker runs with its own torch thread count; the caller's count is restored afterwards."""
    import torch

    before = torch.get_num_threads()
    seen = {}

    def stage(i):
        def f(x):
            seen[i] = torch.get_num_threads()
            return x
        f.__name__ = f"s{i}"
        return f

    out = list(PipelinedExecutor(threads=[1, None, 2]).map(range(3), [stage(0), stage(1), stage(2)]))
    assert out == [0, 1, 2]
    assert seen[0] == 1 and seen[2] == 2
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("bad_stage", [0, 1, 2])
def test_caller_stages_keep_order_errors_and_budgets(bad_stage):
    """caller_stages=2: the last two stages run on the caller's thread in turn, only the first runs ahead."""
    import torch

    where = {}

    def stage(i):
        def f(x):
            where.setdefault(i, set()).add((threading.current_thread().name, torch.get_num_threads()))
            return (x[0], x[1] + [i])
        f.__name__ = f"s{i}"
        return f

    stages = [stage(0), stage(1), stage(2)]
    items = [(i, []) for i in range(20)]
    expected = list(SequentialExecutor().map(iter(items), stages))
    where.clear()
    ex = PipelinedExecutor(caller_stages=2, threads=[1, None, None])
    assert list(ex.map(iter(items), stages)) == expected
    assert {name for name, _ in where[0]} == {"atomkit-stage-0"} and where[0] == {("atomkit-stage-0", 1)}
    assert {name for name, _ in where[1] | where[2]} == {threading.current_thread().name}
    bad = list(stages)

    def boom(x):
        if x[0] == 3:
            raise ValueError("bad item 3")
        return x
    bad[bad_stage] = boom
    with pytest.raises(PipelineError, match=f"stage {bad_stage} \\(boom\\) failed on item 3"):
        list(PipelinedExecutor(caller_stages=2).map(iter(items), bad))
    with pytest.raises(ValueError, match="caller_stages"):
        PipelinedExecutor(caller_stages=0)


def test_executor_by_name():
    from atomkit.pipeline.executor import EXECUTORS, executor_by_name

    made = {name: executor_by_name(name, "cpu", trace=True) for name in EXECUTORS}
    assert isinstance(made["sequential"], SequentialExecutor) and made["pipelined"].stage_threads is None
    assert made["pipelined-disjoint"].stage_threads[0] == 1
    assert made["prefetch"].caller_stages == 2 and made["prefetch"].stage_threads == [1, None, None]
    assert all(ex.tracing for ex in made.values())
    with pytest.raises(ValueError, match="unknown executor 'fastest'"):
        executor_by_name("fastest", "cpu")
