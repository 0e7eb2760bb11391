"""Executors decide how the stages of captioning (load frames -> encode -> decode) are scheduled.

Both executors have the same interface: ``map(items, stages)`` returns an iterator of
``stages[-1](...stages[1](stages[0](item)))`` for every item, in input order. With ``trace=True``
each stage call is recorded in ``executor.trace`` as ``(stage_index, item_index, t_start, t_end)``
(``time.perf_counter()`` seconds); the list is reset when a map starts, so trace one map at a time.
"""
from __future__ import annotations

import queue
import threading
import time
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch

from atomkit.config import EXECUTORS  # the names executor_by_name takes
from atomkit.errors import PipelineError

Stage = Callable[[Any], Any]

_POLL_S = 0.05  # how often a blocked worker or consumer looks at the stop flag
_END = object()  # flows through the queues after the last item


def _stage_name(stage: Stage) -> str:
    return getattr(stage, "__name__", repr(stage))


class _Executor:
    """Shared bits: the optional timing trace."""

    name = "base"

    def __init__(self, trace: bool = False):
        self.tracing = trace
        self.trace: list[tuple[int, int, float, float]] = []
        self._trace_lock = threading.Lock()

    def _call(self, s: int, n: int, stage: Stage, value: Any) -> Any:
        """Run ``stage`` (index ``s``) on item ``n``, recording its timing when tracing."""
        if not self.tracing:
            return stage(value)
        t0 = time.perf_counter()
        out = stage(value)
        t1 = time.perf_counter()
        with self._trace_lock:
            self.trace.append((s, n, t0, t1))
        return out


class SequentialExecutor(_Executor):
    """Each item passes through every stage before the next item starts. Results in input order.

    Exceptions from a stage propagate unchanged, on the caller's thread.
    """

    name = "sequential"

    def map(self, items: Iterable[Any], stages: Sequence[Stage]) -> Iterator[Any]:
        self.trace = []
        for n, item in enumerate(items):
            for s, stage in enumerate(stages):
                item = self._call(s, n, stage, item)
            yield item


class _Run:
    """State of one running ``PipelinedExecutor.map``."""

    def __init__(self, n_stages: int, depth: int):
        self.stop = threading.Event()
        self.queues = [queue.Queue(maxsize=depth) for _ in range(n_stages)]
        self.error: PipelineError | None = None
        self._lock = threading.Lock()

    def fail(self, message: str, exc: BaseException | None) -> None:
        """Record the first failure (later ones are consequences) and stop every worker."""
        with self._lock:
            if self.error is None:
                self.error = PipelineError(message)
                self.error.__cause__ = exc
        self.stop.set()

    def put(self, q: queue.Queue, obj: Any) -> bool:
        """Put unless stopped; False means the pipeline is stopping and ``obj`` was dropped."""
        while not self.stop.is_set():
            try:
                q.put(obj, timeout=_POLL_S)
                return True
            except queue.Full:
                pass
        return False

    def get(self, q: queue.Queue) -> Any:
        """Get unless stopped; returns ``_END`` when the pipeline is stopping."""
        while not self.stop.is_set():
            try:
                return q.get(timeout=_POLL_S)
            except queue.Empty:
                pass
        return _END


class PipelinedExecutor(_Executor):
    """Runs the stages concurrently (ATOM's parallel execution): one worker thread per stage except
    the last (the last ``caller_stages``), which runs on the caller's thread as it consumes results.

    The last stage is the caption decoder. Measured on the 2-core CPU host: the same ``generate``
    call takes 2.33 s on the main thread and 2.70-3.10 s on any other thread, whatever its torch
    thread count, so the decoder stays on the caller's thread and the earlier stages prefetch.

    While the last stage works on item i, the stage before it works on item i+1, and so on:
    with ``[load, encode, decode]`` frames of clip i+2 are decoded while clip i+1 is encoded and
    clip i is captioned. Stages that release the GIL (PyAV decoding, torch ops, sleeps) overlap.

    * Order: results come out in input order (each stage handles items FIFO).
    * Laziness and memory: ``items`` is iterated lazily by the first stage's thread (it may be an
      infinite generator); the stages are joined by ``queue.Queue(maxsize=depth)``, so at most
      about ``len(stages) * (depth + 1)`` items are in flight beyond those already consumed.
    * Errors: the first exception raised by a stage, or by iterating ``items``, stops every worker
      and is re-raised on the caller's thread as ``PipelineError("stage i (name) failed on item
      n: ...")`` with the original exception as ``__cause__``. Results of the items before it
      may already have been yielded; none after it are.
    * Cancellation: if the caller stops iterating (``break``, ``close()``, an exception in the
      loop body), the generator's ``finally`` stops the workers, drains the queues and joins the
      threads. ``cancel()`` (meant for another thread, e.g. a UI) stops the running map; the
      caller's loop then gets ``PipelineError("cancelled")`` rather than a silently short result.
      Either way a stage call already in progress is finished, not interrupted, so stopping
      takes up to the longest single stage call. Once the generator has ended, by any path, none
      of its worker threads (named ``atomkit-stage-<i>``) is alive.
    * ``caller_stages``: how many of the last stages run on the caller's thread, one after the other
      (default 1, the decoder; 2 = only the stages before the encoder run ahead, see
      ``prefetch_executor``).
    * ``threads``: optional per-stage budget of torch intra-op threads (None = inherit). Each
      worker calls ``torch.set_num_threads`` on its own thread: with PyTorch's OpenMP backend the
      count is per calling thread (measured: a worker at 1 leaves the caller at 2), but it also
      becomes the default of threads created later, so the caller's count is restored when the
      map ends.
    """

    name = "pipelined"

    def __init__(self, depth: int = 2, threads: Sequence[int | None] | None = None, trace: bool = False,
                 caller_stages: int = 1):
        super().__init__(trace)
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        if caller_stages < 1:
            raise ValueError(f"caller_stages must be >= 1, got {caller_stages}")
        self.depth = depth
        self.caller_stages = caller_stages
        self.stage_threads = None if threads is None else list(threads)
        self._runs: set[_Run] = set()
        self._runs_lock = threading.Lock()

    def cancel(self) -> None:
        """Stop the running map(s); safe to call from any thread. Their iterators raise PipelineError."""
        with self._runs_lock:
            runs = list(self._runs)
        for run in runs:
            run.fail("cancelled", None)

    def map(self, items: Iterable[Any], stages: Sequence[Stage]) -> Iterator[Any]:
        stages = list(stages)
        self.trace = []
        if not stages:
            yield from items
            return
        if self.stage_threads is not None and len(self.stage_threads) != len(stages):
            raise ValueError(f"threads has {len(self.stage_threads)} entries for {len(stages)} stages")
        source = iter(items)  # a non-iterable fails here, on the caller's thread; pulls nothing yet
        k = min(self.caller_stages, len(stages))
        early, final = stages[:len(stages) - k], stages[len(stages) - k:]
        if not early:
            for n, item in enumerate(source):
                yield self._on_caller(final, 0, n, item)
            return
        run = _Run(len(early), self.depth)
        workers = [threading.Thread(target=self._work, args=(run, s, stage, source), daemon=True,
                                    name=f"atomkit-stage-{s}") for s, stage in enumerate(early)]
        with self._runs_lock:
            self._runs.add(run)
        caller_threads = torch.get_num_threads()
        try:
            for w in workers:
                w.start()
            last = run.queues[-1]
            while True:
                got = run.get(last)
                if run.stop.is_set():  # checked before every yield: nothing comes out after an error
                    break
                if got is _END:
                    return
                yield self._on_caller(final, len(early), *got)
            if run.error is not None:
                raise run.error
        finally:
            run.stop.set()
            for w in workers:
                while w.is_alive():
                    for q in run.queues:  # drop what is in flight so it can be freed
                        try:
                            while True:
                                q.get_nowait()
                        except queue.Empty:
                            pass
                    w.join(_POLL_S)
            with self._runs_lock:
                self._runs.discard(run)
            if self.stage_threads is not None:
                torch.set_num_threads(caller_threads)

    def _on_caller(self, stages: Sequence[Stage], first: int, n: int, value: Any) -> Any:
        """The last stage(s) run on the caller's thread, one after the other (see the class docstring for why)."""
        for s, stage in enumerate(stages, start=first):
            if self.stage_threads is not None and self.stage_threads[s] is not None:
                torch.set_num_threads(self.stage_threads[s])
            try:
                value = self._call(s, n, stage, value)
            except BaseException as exc:
                raise PipelineError(f"stage {s} ({_stage_name(stage)}) failed on item {n}: {exc!r}") from exc
        return value

    def _work(self, run: _Run, s: int, stage: Stage, items: Iterator[Any]) -> None:
        """Worker of stage ``s``: reads ``items`` (stage 0) or the previous queue, writes its own."""
        out = run.queues[s]
        name = _stage_name(stage)
        source = items if s == 0 else None
        n = 0
        try:
            if self.stage_threads is not None and self.stage_threads[s] is not None:
                torch.set_num_threads(self.stage_threads[s])
            while not run.stop.is_set():
                if source is not None:
                    try:
                        value = next(source)
                    except StopIteration:
                        break
                    except BaseException as exc:
                        run.fail(f"iterating items failed at item {n}: {exc!r}", exc)
                        return
                    got = (n, value)
                else:
                    got = run.get(run.queues[s - 1])
                    if got is _END:
                        break
                n, value = got
                try:
                    value = self._call(s, n, stage, value)
                except BaseException as exc:
                    run.fail(f"stage {s} ({name}) failed on item {n}: {exc!r}", exc)
                    return
                if not run.put(out, (n, value)):
                    return
                n += 1
            run.put(out, _END)
        except BaseException as exc:  # a bug here must not leave the consumer waiting
            run.fail(f"stage {s} ({name}) worker crashed: {exc!r}", exc)
        finally:
            close = getattr(source, "close", None)
            if close is not None:  # run the generator's own cleanup on the thread that iterated it
                try:
                    close()
                except BaseException as exc:
                    run.fail(f"closing items failed: {exc!r}", exc)


def prefetch_executor(depth: int = 2, trace: bool = False) -> PipelinedExecutor:
    """Frames are decoded ahead on a worker thread (one torch thread), while the caller's thread encodes and
    captions in turn with all of its cores: ``[load, encode, decode]`` with the last two on the caller.

    For a CPU where the encoder and decoder both want every core but the decoder leaves gaps (Python
    between kernels) that video decoding can fill. Measured on the 2-core host with the int4 decoder:
    4 clips in 3.03 s against 3.28 s sequential; with the frame worker at the default thread count,
    4.38 s (its resizes fought the decoder's OpenMP threads); with the exact fp32 decoder, no gain.
    """
    return PipelinedExecutor(depth=depth, threads=[1, None, None], trace=trace, caller_stages=2)


def disjoint_threads(cores: int | None = None) -> list[int]:
    """Per-stage torch threads [frames, encode, decode] that put encoder and decoder on disjoint cores."""
    import os

    cores = cores or os.cpu_count() or 1
    enc = max(1, cores // 2)
    return [1, enc, max(1, cores - enc)]


def executor_by_name(name: str, device: str, *, depth: int = 2, trace: bool = False) -> "SequentialExecutor | PipelinedExecutor":
    """An executor by name (``EXECUTORS``): ``auto`` (``auto_executor``), ``sequential``, ``pipelined``,
    ``pipelined-disjoint`` (each stage its own share of the CPU cores, ``disjoint_threads``) or ``prefetch``
    (frames decoded ahead, ``prefetch_executor``)."""
    if name == "auto":
        ex = auto_executor(device)
    elif name == "sequential":
        ex = SequentialExecutor()
    elif name == "pipelined":
        ex = PipelinedExecutor(depth=depth)
    elif name == "pipelined-disjoint":
        ex = PipelinedExecutor(depth=depth, threads=disjoint_threads())
    elif name == "prefetch":
        ex = prefetch_executor(depth=depth)
    else:
        raise ValueError(f"unknown executor {name!r}; executors are {', '.join(EXECUTORS)}")
    ex.tracing = trace
    return ex


def auto_executor(device: str, cores: int | None = None) -> "SequentialExecutor | PipelinedExecutor":
    """The executor that measured faster for this kind of machine.

    Pipelining pays when the stages do not compete for the same compute: a GPU beside the CPU, or
    enough cores to give the frame/encoder stages and the decoder disjoint thread budgets. On the
    2-core CPU host (default models) it measured slower (10.80 s vs 10.50 s for 4 clips; L_E 0.19 s
    against L_D 2.42 s, so at most 7 % could be hidden, and the concurrent encoder slows the decoder
    by more than that), so there the sequential executor is chosen.
    """
    import os

    cores = cores or os.cpu_count() or 1
    if device.startswith("cuda"):
        return PipelinedExecutor(depth=2)
    if cores >= 4:
        half = max(1, cores // 4)
        return PipelinedExecutor(depth=2, threads=[1, half, cores - half - 1])
    return SequentialExecutor()
