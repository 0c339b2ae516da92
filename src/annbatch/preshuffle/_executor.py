"""Building datasets on an executor: a ``concurrent.futures.Executor`` or a ``dask.distributed.Client``.

The caller plans (which rows go where, each dataset's obs and row order: obs only) and commits; each
dataset is one :class:`DatasetJob` that a worker runs on its own. A job carries what its worker needs to
open its sources again (paths, zarr groups; AnnData objects travel whole) and the zarr group it writes
its staged dataset to. A job rewrites its group from scratch, so running it twice (a dask retry after a
worker died) gives the same result.
"""

from __future__ import annotations

import concurrent.futures as cf
import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

import numpy as np
import pandas as pd
import zarr
from tqdm.auto import tqdm

from annbatch._zarr import zarrs_pipeline

from ._build import DatasetTask, SourceSpec, plan_rows, write_rows
from ._inputs import InputAnnData, InputError, InputOrigin, RowElement
from ._plan import ElementSpec, VarSpace

Executor: TypeAlias = Any  # a concurrent.futures.Executor or a dask.distributed.Client


@dataclass
class DatasetJob:
    """One dataset to build on a worker: its rows in output order and where to read and write them."""

    task: DatasetTask
    obs: pd.DataFrame  # in output order
    order: np.ndarray
    sources: list[_ShippedSource]  # by source index; those the task does not read are placeholders
    var_space: VarSpace
    elements: dict[str, ElementSpec]
    store: Any  # the collection's zarr store (it pickles: a folder path or an obstore configuration)
    path: str  # of the staged group in ``store``

    def run(self) -> str:
        """Build the dataset into its staged group; returns the group's path."""
        opened: list[InputAnnData] = []
        try:
            opened.extend(source.open() for source in self.sources)
            # write_rows reads only the sources' arrays: obs (is_new, obs_schema) were handled by plan_rows
            spec = SourceSpec(sources=opened, is_new=[], var_space=self.var_space, elements=self.elements,
                              obs_schema={})  # fmt: skip
            with zarrs_pipeline(self.store):
                target = zarr.open_group(self.store, path=self.path, mode="w")
                write_rows(self.task, spec, self.obs, self.order, target, progress=False)
        finally:
            for inp in opened:
                inp.close()
        return self.path


@dataclass
class _ShippedSource:
    """A source as it travels to a worker: how to open it again, or its arrays themselves."""

    name: str
    origin: InputOrigin | None = None
    elements: dict[str, RowElement] | None = None  # AnnData inputs: the in-memory arrays

    def open(self) -> InputAnnData:
        if self.origin is not None:
            return self.origin.open(self.name)
        assert self.elements is not None
        return InputAnnData(name=self.name, obs=pd.DataFrame(), var=pd.DataFrame(), elements=self.elements)


_UNUSED = _ShippedSource(name="<not read by this dataset>", elements={})


def make_jobs(
    tasks: dict[str, DatasetTask], spec: SourceSpec, store: Any, staged_path: Callable[[str], str]
) -> list[DatasetJob]:
    """One job per task, writing to ``staged_path(name)`` in ``store`` (the job creates the group)."""
    shipped = [_ship(src) for src in spec.sources]
    jobs = []
    for name, task in tasks.items():
        obs, order = plan_rows(task, spec)
        needed = {block.source for block in task.blocks}
        sources = [shipped[i] if i in needed else _UNUSED for i in range(len(shipped))]
        jobs.append(DatasetJob(task=task, obs=obs, order=order, sources=sources, var_space=spec.var_space,
                               elements=spec.elements, store=store, path=staged_path(name)))  # fmt: skip
    return jobs


def run_jobs(jobs: Sequence[DatasetJob], executor: Executor, *, progress: bool = True) -> None:
    """Run every job on ``executor``; raises the first failure once no job is still running.

    Waiting for the others before raising matters: the caller then removes the staging area, which a
    job still running would write into again.
    """
    if _is_dask_client(executor):
        _run_on_dask(jobs, executor, progress=progress)
        return
    if not isinstance(executor, cf.Executor):
        raise TypeError(
            f"`executor` must be a concurrent.futures.Executor (e.g. ProcessPoolExecutor) or a "
            f"dask.distributed.Client, got {type(executor).__name__}."
        )
    _check_not_forking(executor)
    futures = [executor.submit(_run_job, job) for job in jobs]
    error: BaseException | None = None
    with tqdm(total=len(jobs), desc="Writing datasets", unit="dataset", disable=not progress) as bar:
        for future in cf.as_completed(futures):
            if future.cancelled():
                continue
            err = future.exception()
            if err is not None and error is None:
                error = err
                for other in futures:  # those not started never will; running ones finish first
                    other.cancel()
            bar.update()
    if error is not None:
        raise error


def _run_on_dask(jobs: Sequence[DatasetJob], client: Any, *, progress: bool) -> None:
    from distributed import as_completed, wait

    # pure=False: two jobs are never the same task; a worker that dies mid-job has it retried elsewhere
    futures = [client.submit(_run_job, job, pure=False) for job in jobs]
    try:
        with tqdm(total=len(jobs), desc="Writing datasets", unit="dataset", disable=not progress) as bar:
            for future in as_completed(futures):
                future.result()  # raises the job's error
                bar.update()
    except BaseException:
        wait(futures)  # every job has stopped before the caller clears staging
        raise
    finally:
        client.cancel(futures)  # release the results (the staged paths) held on the workers


def _run_job(job: DatasetJob) -> str:
    return job.run()


def _check_not_forking(executor: cf.Executor) -> None:
    """Refuse a process pool that forks: a forked worker inherits zarr's I/O thread's locks and hangs."""
    context = getattr(executor, "_mp_context", None)  # set by ProcessPoolExecutor
    if isinstance(executor, cf.ProcessPoolExecutor) and context is not None and context.get_start_method() == "fork":
        raise ValueError(
            "`executor` is a ProcessPoolExecutor that forks its workers, which hang in zarr's I/O; make it "
            "start them fresh: `ProcessPoolExecutor(n, mp_context=multiprocessing.get_context('spawn'))` "
            "(or 'forkserver')."
        )


def _is_dask_client(executor: object) -> bool:
    if importlib.util.find_spec("distributed") is None:
        return False
    from distributed import Client

    return isinstance(executor, Client)


def _ship(source: InputAnnData) -> _ShippedSource:
    if source.origin is not None:
        return _ShippedSource(name=source.name, origin=source.origin)
    for key, element in source.elements.items():
        if element.reads_open_file:
            raise InputError(
                f"{key} of {source.name} is read from an open HDF5 file (a backed AnnData), which cannot be "
                "sent to an executor's workers. Pass the file's path instead of the AnnData."
            )
    return _ShippedSource(name=source.name, elements=source.elements)
