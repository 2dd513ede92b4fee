"""Executors: run a set of tasks with dependencies, locally or on a Ray cluster.

A `Task` is a module-level function, a picklable payload and the ids of the tasks it depends on.
The function returns a result dict with `status` "ok" or "failed"; an exception escaping it (or a
worker that dies) is turned into a failed result here, so one task's failure never stops the others.
A task whose dependency did not finish "ok" is not run: it gets a failed result saying which
dependency failed. `Executor.run(tasks, on_done)` calls `on_done(task, result)` in the driver as
each task finishes, dependencies always before their dependents.

    LocalExecutor(workers=1)   in this process, one task at a time (the default on CPU: torch
                               already uses every core for one tiny model)
    LocalExecutor(workers=N)   a pool of N spawned processes; with CUDA, one GPU per worker
    RayExecutor(address=None)  one Ray task per run with its CPU/GPU request; a local cluster when
                               no address is given (shut down at the end), else an existing one

Every task sets torch's thread count to its share of the cores: on a busy machine, oversubscribed
OpenMP threads make tiny models 10-30x slower than one thread each.
"""

from __future__ import annotations

import abc
import concurrent.futures as cf
import dataclasses
import multiprocessing
import os
import sys
import traceback
from typing import Any, Callable, Iterable

TRACEBACK_LINES = 25  # the tail of a traceback kept in a failed result


@dataclasses.dataclass(frozen=True)
class Task:
    """One unit of work: `fn(payload)` after every task in `depends_on` finished ok."""

    id: str
    fn: Callable[[Any], dict]
    payload: Any
    depends_on: tuple[str, ...] = ()
    name: str = ""  # shown in messages (e.g. "anchor-3fa2c1"); defaults to the id

    @property
    def label(self) -> str:
        return self.name or self.id


OnDone = Callable[[Task, dict], None]


def error_info(exc: BaseException) -> dict:
    """Type, message and the last lines of the traceback of an exception."""
    lines = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).splitlines()
    return {"type": type(exc).__name__, "message": str(exc), "traceback": "\n".join(lines[-TRACEBACK_LINES:])}


def failed_result(task: Task, exc: BaseException) -> dict:
    return {"status": "failed", "error": error_info(exc)}


def dependency_failed_result(task: Task, dependency: str) -> dict:
    return {"status": "failed", "error": {"type": "DependencyFailed", "message": f"dependency {dependency} failed",
                                          "traceback": ""}}


def order_tasks(tasks: Iterable[Task]) -> list[Task]:
    """Tasks in dependency order (stable otherwise); unknown dependencies and cycles are errors.

    A dependency that is not among `tasks` must be absent on purpose (already finished): callers drop
    such ids before building tasks, so an unknown id here is a bug worth naming.
    """
    tasks = list(tasks)
    by_id: dict[str, Task] = {}
    for t in tasks:
        if t.id in by_id:
            raise ValueError(f"duplicate task id {t.id!r}")
        by_id[t.id] = t
    for t in tasks:
        missing = [d for d in t.depends_on if d not in by_id]
        if missing:
            raise ValueError(f"task {t.label} depends on unknown task(s) {', '.join(missing)}")
    ordered, state = [], {}  # state: 1 visiting, 2 done

    def visit(t: Task, chain: tuple[str, ...]) -> None:
        if state.get(t.id) == 2:
            return
        if state.get(t.id) == 1:
            raise ValueError("dependency cycle: " + " -> ".join(chain + (t.id,)))
        state[t.id] = 1
        for d in t.depends_on:
            visit(by_id[d], chain + (t.id,))
        state[t.id] = 2
        ordered.append(t)

    for t in tasks:
        visit(t, ())
    return ordered


def _first_failed_dependency(task: Task, results: dict[str, dict], names: dict[str, str]) -> str | None:
    for dep in task.depends_on:
        if results.get(dep, {}).get("status") != "ok":
            return names.get(dep, dep)
    return None


def call_task(fn: Callable[[Any], dict], payload: Any, threads: int | None) -> dict:
    """Run one task function in the current process, turning an exception into a failed result."""
    if threads:
        torch = sys.modules.get("torch")
        if torch is not None:
            torch.set_num_threads(max(1, int(threads)))
        else:  # a fresh worker: torch reads this when the task imports it (importing it here costs seconds)
            os.environ["OMP_NUM_THREADS"] = str(max(1, int(threads)))
    try:
        result = fn(payload)
    except Exception as exc:  # noqa: BLE001 - a failing run is recorded, never fatal to the sweep
        return {"status": "failed", "error": error_info(exc)}
    if not isinstance(result, dict) or result.get("status") not in ("ok", "failed"):
        return {"status": "failed", "error": {"type": "BadTaskResult", "traceback": "",
                                              "message": f"task returned {type(result).__name__}, not a result dict"}}
    return result


class Executor(abc.ABC):
    """Runs tasks respecting dependencies; `on_done(task, result)` is called in the driver."""

    @abc.abstractmethod
    def run(self, tasks: list[Task], on_done: OnDone) -> None:
        ...

    def describe(self) -> str:
        return type(self).__name__


def _cuda_devices() -> int:
    """Number of visible GPUs, without initializing CUDA in this process when torch is absent."""
    try:
        import torch
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:
        return 0


class LocalExecutor(Executor):
    """Tasks on this machine: in-process one at a time (workers=1) or in a spawned process pool.

    workers: None = one per GPU when CUDA is present, else 1.
    threads: torch threads per task; None = the cores divided among the workers (with one worker,
    torch's own default is kept).
    """

    def __init__(self, workers: int | None = None, threads: int | None = None):
        gpus = _cuda_devices()
        self.gpus = gpus
        self.workers = workers if workers is not None else max(1, gpus)
        if self.workers < 1:
            raise ValueError(f"invalid workers: expected a positive integer, got {self.workers}")
        if threads is None and self.workers > 1:
            threads = max(1, (os.cpu_count() or 1) // self.workers)
        self.threads = threads

    def describe(self) -> str:
        return f"local ({self.workers} worker{'s' if self.workers > 1 else ''}" + \
               (f", {self.threads} thread{'s' if self.threads > 1 else ''} each)" if self.threads else ")")

    def run(self, tasks: list[Task], on_done: OnDone) -> None:
        ordered = order_tasks(tasks)
        if self.workers == 1:
            self._run_inline(ordered, on_done)
        else:
            self._run_pool(ordered, on_done)

    def _run_inline(self, ordered: list[Task], on_done: OnDone) -> None:
        results: dict[str, dict] = {}
        names = {t.id: t.label for t in ordered}
        for task in ordered:
            failed_dep = _first_failed_dependency(task, results, names)
            result = dependency_failed_result(task, failed_dep) if failed_dep else \
                call_task(task.fn, task.payload, self.threads)
            results[task.id] = result
            on_done(task, result)

    def _run_pool(self, ordered: list[Task], on_done: OnDone) -> None:
        ctx = multiprocessing.get_context("spawn")  # fork would copy torch's thread pools and CUDA state
        gpu_ids = ctx.Queue()
        for i in range(min(self.gpus, self.workers)):
            gpu_ids.put(i)
        results: dict[str, dict] = {}
        names = {t.id: t.label for t in ordered}
        waiting = list(ordered)
        running: dict[cf.Future, Task] = {}
        with cf.ProcessPoolExecutor(self.workers, mp_context=ctx, initializer=_init_pool_worker,
                                    initargs=(gpu_ids, self.gpus > 0)) as pool:
            while waiting or running:
                still_waiting = []
                for task in waiting:  # dispatch every task whose dependencies are all settled
                    if any(d not in results for d in task.depends_on):
                        still_waiting.append(task)
                        continue
                    failed_dep = _first_failed_dependency(task, results, names)
                    if failed_dep:
                        results[task.id] = dependency_failed_result(task, failed_dep)
                        on_done(task, results[task.id])
                        continue
                    running[pool.submit(call_task, task.fn, task.payload, self.threads)] = task
                if len(still_waiting) == len(waiting) and not running:
                    raise RuntimeError("no task can start: " + ", ".join(t.label for t in still_waiting))
                waiting = still_waiting
                if not running:
                    continue
                done, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
                for future in done:
                    task = running.pop(future)
                    try:
                        result = future.result()
                    except Exception as exc:  # noqa: BLE001 - e.g. a worker killed by the OOM killer
                        result = failed_result(task, exc)
                    results[task.id] = result
                    on_done(task, result)


def _init_pool_worker(gpu_ids, use_gpus: bool) -> None:
    """Pin each pool worker to its own GPU before torch initializes CUDA in it."""
    if use_gpus:
        try:
            os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu_ids.get_nowait())
        except Exception:  # noqa: BLE001 - more workers than GPUs: leave the default visible set
            pass


def _ray_task(fn: Callable[[Any], dict], payload: Any, threads: int, dep_names: tuple[str, ...],
              *dep_results: dict) -> dict:
    """Body of every Ray task: Ray passes the dependencies' results once they exist."""
    for name, result in zip(dep_names, dep_results):
        if not isinstance(result, dict) or result.get("status") != "ok":
            return {"status": "failed", "error": {"type": "DependencyFailed", "message": f"dependency {name} failed",
                                                  "traceback": ""}}
    return call_task(fn, payload, threads)


class RayExecutor(Executor):
    """One Ray task per run, with its resource request; dependencies are passed as object refs.

    address: an existing cluster ("auto", "ray://host:10001", "host:6379"); None starts a local
    cluster of `num_cpus` CPUs (default: every core) that is shut down when `run` returns. A cluster
    this executor connected to is left running. Workers must import hiermem (installed on every node,
    or shipped with `init_kwargs={"runtime_env": {...}}`), and run directories must be on a filesystem
    every node shares.
    max_retries: Ray re-runs a task whose worker died (node lost, preempted); runs resume from their
    checkpoint, so a retry is safe. Exceptions are never retried (they are recorded).
    """

    def __init__(self, address: str | None = None, num_cpus_per_run: float = 1, num_gpus_per_run: float = 0,
                 num_cpus: int | None = None, max_retries: int = 1, init_kwargs: dict | None = None):
        if num_cpus_per_run <= 0 or num_gpus_per_run < 0:
            raise ValueError(f"invalid Ray resources: num_cpus_per_run must be > 0 and num_gpus_per_run >= 0, got "
                             f"{num_cpus_per_run} and {num_gpus_per_run}")
        self.address, self.num_cpus = address, num_cpus
        self.num_cpus_per_run, self.num_gpus_per_run = num_cpus_per_run, num_gpus_per_run
        self.max_retries, self.init_kwargs = max_retries, dict(init_kwargs or {})

    def describe(self) -> str:
        where = self.address or f"local cluster, {self.num_cpus or os.cpu_count()} CPUs"
        return f"ray ({where}; {self.num_cpus_per_run} CPU, {self.num_gpus_per_run} GPU per run)"

    def _init(self):
        try:
            import ray
        except ImportError as e:
            raise ImportError("the ray executor needs Ray: pip install 'hiermem[distributed]'") from e
        if ray.is_initialized():
            return ray, False
        kwargs = dict(self.init_kwargs)
        if self.address:
            ray.init(address=self.address, **kwargs)
            return ray, False
        kwargs.setdefault("num_cpus", self.num_cpus or os.cpu_count())
        kwargs.setdefault("include_dashboard", False)
        kwargs.setdefault("object_store_memory", 100 * 1024 ** 2)  # results are small dicts
        ray.init(**kwargs)
        return ray, True

    def run(self, tasks: list[Task], on_done: OnDone) -> None:
        ordered = order_tasks(tasks)
        if not ordered:
            return
        ray, started_here = self._init()
        try:
            remote = ray.remote(_ray_task)
            names = {t.id: t.label for t in ordered}
            refs: dict[str, Any] = {}
            pending: dict[Any, Task] = {}
            threads = max(1, int(self.num_cpus_per_run))
            for task in ordered:
                ref = remote.options(num_cpus=self.num_cpus_per_run, num_gpus=self.num_gpus_per_run,
                                     max_retries=self.max_retries, retry_exceptions=False,
                                     name=task.label).remote(
                    task.fn, task.payload, threads, tuple(names[d] for d in task.depends_on),
                    *(refs[d] for d in task.depends_on))
                refs[task.id] = ref
                pending[ref] = task
            results: dict[str, dict] = {}
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    task = pending.pop(ref)
                    try:
                        result = ray.get(ref)
                    except Exception as exc:  # noqa: BLE001 - worker died, or a dependency's worker died
                        failed_dep = _first_failed_dependency(task, results, names)
                        result = dependency_failed_result(task, failed_dep) if failed_dep else failed_result(task, exc)
                    results[task.id] = result
                    on_done(task, result)
        finally:
            if started_here:
                ray.shutdown()
