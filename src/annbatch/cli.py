"""The ``annbatch`` command line: ``convert``, ``info``, ``demo`` and ``train``."""

from __future__ import annotations

import argparse
import contextlib
import re
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from ._location import local_or_url, remove_objects, url_has_objects
from .collection import Collection, CollectionError
from .errors import AnnbatchError, rename_parameters


# How annbatch's messages name a parameter: in backticks, alone (`dataset_size`) or with its value
# (`join='inner'`, `groupby=['donor']`).
def _flags(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Each option's destination (the Python API's parameter of that name) → its long flag."""
    return {
        a.dest: max(a.option_strings, key=len)
        for a in parser._actions
        if a.option_strings and not isinstance(a, argparse._HelpAction | argparse._VersionAction)
    }


def _message(err: BaseException, parser: argparse.ArgumentParser) -> str:
    text = err.args[0] if isinstance(err, KeyError) and len(err.args) == 1 else str(err)  # no repr quotes
    return rename_parameters(str(text), _flags(parser))


def _size(value: str) -> str | int:
    """A size option: a whole number (rows, or bytes for --memory-limit), or a number with a unit."""
    if re.fullmatch(r"\s*[-+]?\d+\s*", value):
        return int(value)
    if re.fullmatch(r"\s*[-+]?(\d+\.\d*|\.\d+)\s*", value):
        raise argparse.ArgumentTypeError(
            f"{value!r} is neither a whole number nor a size with a unit (such as 512MB or 1GB)"
        )
    return value


def _count(minimum: int):
    def parse(value: str) -> int:
        try:
            n = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid int value: {value!r}") from None
        if n < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {n}")
        return n

    parse.__name__ = "int"  # argparse's messages name the type
    return parse


class _Parser(argparse.ArgumentParser):
    """The ``annbatch`` parser; ``commands`` holds its subcommands' parsers, by name."""

    commands: Mapping[str, argparse.ArgumentParser]


def _parser() -> _Parser:
    from . import __version__

    parser = _Parser(prog="annbatch", description="Preshuffled single-cell collections.")
    parser.add_argument("--version", action="version", version=f"annbatch {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    parser.commands = sub.choices  # the subcommands' parsers, by name

    convert = sub.add_parser(
        "convert", help="convert .h5ad/.zarr AnnData files into a collection (or append)"
    )
    convert.add_argument("inputs", nargs="+", help=".h5ad files or .zarr AnnData stores")
    convert.add_argument("-o", "--output", required=True,
                         help="collection path or URL such as s3://bucket/cells.zarr (created, or appended to)")  # fmt: skip
    convert.add_argument("--groupby", action="append", default=None, help="obs column to sort datasets by")
    convert.add_argument("--seed", type=_count(0), default=None,
                         help="random seed (same seed, same collection)")  # fmt: skip
    convert.add_argument("--dataset-size", type=_size, default="20GB", help="rows, or bytes like 20GB")
    convert.add_argument("--shuffle-chunk-size", type=int, default=1000, help="rows per dealt block")
    convert.add_argument("--join", choices=["outer", "inner"], default="outer")
    convert.add_argument("--no-shuffle", action="store_true", help="keep the input order")
    convert.add_argument("--memory-limit", type=_size, default=None, help="peak memory to plan for, e.g. 4GB")
    convert.add_argument("--n-obs-per-chunk", type=int, default=32)
    convert.add_argument("--shard-size", type=_size, default="1GB")
    convert.add_argument("--lock-timeout", type=float, default=10.0,
                         help="seconds to wait while another process writes to the collection")  # fmt: skip
    convert.add_argument("--scheduler", default=None, metavar="ADDRESS",
                         help="build the datasets on the dask.distributed cluster at ADDRESS (tcp://host:8786, or the "
                              "scheduler file a `dask scheduler --scheduler-file` wrote)")
    convert.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    _storage_option_flag(convert)

    info = sub.add_parser("info", help="describe a collection")
    info.add_argument("path", help="collection path or URL")
    _storage_option_flag(info)

    demo = sub.add_parser("demo", help="generate synthetic data, convert it and show the collection")
    demo.add_argument("--output", default=None, help="where to write (default: a temporary folder)")
    demo.add_argument("--n-files", type=_count(1), default=3)
    demo.add_argument("--n-obs", type=_count(1), default=20_000, help="cells per file")
    demo.add_argument("--n-vars", type=_count(1), default=2_000)
    demo.add_argument("--seed", type=_count(0), default=0)
    demo.add_argument("-q", "--quiet", action="store_true", help="no progress bars")

    # Listed for `annbatch --help`; `main` hands `train` and everything after it to Hydra before parsing.
    sub.add_parser(
        "train",
        add_help=False,
        help="train a model with Lightning, configured by Hydra (see: annbatch train --help)",
    )
    return parser


def _storage_option_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--storage-option", action="append", default=None, metavar="KEY=VALUE", type=_key_value,
        help="object-store setting for a URL, e.g. endpoint=https://... or region=eu-west-1 (repeatable); "
        "credentials are read from the standard environment variables (AWS_ACCESS_KEY_ID, ...)",
    )  # fmt: skip


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), value


def _storage_options(args: argparse.Namespace) -> dict[str, Any] | None:
    """``--storage-option`` flags as obstore settings; ``allow_http`` is a client option there."""
    if not args.storage_option:
        return None
    options: dict[str, Any] = {}
    for key, value in args.storage_option:
        if key == "allow_http":
            options.setdefault("client_options", {})["allow_http"] = value.lower() in ("1", "true", "yes")
        else:
            options[key] = value
    return options


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``annbatch`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:
        # Hydra parses the rest (overrides, --cfg, -m, --help); lightning and hydra load only here.
        from .train import main as train

        return train(argv[1:])
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "convert":
            return _convert(args)
        if args.command == "info":
            location = local_or_url(args.path)
            if isinstance(location, Path) and not location.exists():
                raise CollectionError(
                    f"No collection at {args.path!r}. Create one with `annbatch convert INPUT.h5ad ... -o {args.path}`."
                )
            print(Collection(args.path, mode="r", storage_options=_storage_options(args)))
        else:
            _demo(args)
    except (AnnbatchError, ValueError, KeyError, OSError) as err:
        # The API's messages name its parameters; say them as the flags the user typed.
        message = _message(err, parser.commands[args.command])
        print(f"annbatch {args.command}: error: {message}", file=sys.stderr)
        return 2
    return 0


def _progress(args: argparse.Namespace) -> bool:
    """Progress bars on a terminal only: a batch job's log gets no bar redraws."""
    return not args.quiet and sys.stderr.isatty()


@contextlib.contextmanager
def _executor(scheduler: str | None) -> Iterator[Any]:
    """A dask.distributed client of the cluster at ``scheduler`` (closed afterwards), or None."""
    if scheduler is None:
        yield None
        return
    try:
        from distributed import Client
    except ImportError:
        raise SystemExit("annbatch convert: --scheduler needs dask.distributed: pip install 'annbatch[dask]'") from None
    try:
        if scheduler.endswith(".json") and Path(scheduler).is_file():
            client = Client(scheduler_file=scheduler, timeout=30)
        else:
            client = Client(scheduler, timeout=30)
    except OSError as err:
        raise SystemExit(f"annbatch convert: cannot reach the dask scheduler at {scheduler} ({err}).") from None
    with client:
        yield client


def _convert(args: argparse.Namespace) -> int:
    location, options = local_or_url(args.output), _storage_options(args)
    output = location if isinstance(location, Path) else args.output
    created = not location.exists() if isinstance(location, Path) else not url_has_objects(args.output, options)
    before = 0 if created else Collection(output, mode="r", storage_options=options).n_obs
    try:
        with _reraise_swallowed_interrupts(), _executor(args.scheduler) as executor:
            coll = Collection(output, storage_options=options).add_adatas(
                args.inputs, shuffle=not args.no_shuffle, seed=args.seed, dataset_size=args.dataset_size,
                shuffle_chunk_size=args.shuffle_chunk_size, groupby=args.groupby, join=args.join,
                memory_limit=args.memory_limit, n_obs_per_chunk=args.n_obs_per_chunk,
                shard_size=args.shard_size, lock_timeout=args.lock_timeout, progress=_progress(args),
                executor=executor,
            )  # fmt: skip
    except BaseException as err:
        if created:  # the folder (or prefix) is ours: a failed conversion leaves nothing behind
            _remove_unused(output, options)
        if not isinstance(err, KeyboardInterrupt):
            raise
        if created:
            state = "not created"
        else:
            # Opening for writing finishes a commit that had reached its journal, or drops what was staged.
            after = Collection(output, mode="a", storage_options=options).n_obs
            state = (
                f"unchanged, {after:,} rows"
                if after == before
                else f"appended before the interrupt, {after:,} rows"
            )
        print(f"annbatch convert: interrupted; {args.output} {state}", file=sys.stderr)
        return 130
    print(coll)
    return 0


@contextlib.contextmanager
def _reraise_swallowed_interrupts() -> Iterator[None]:
    """Make Ctrl-C stop the conversion even when it lands where Python only reports it.

    A KeyboardInterrupt raised inside a weakref callback or a finaliser is printed as "Exception
    ignored" and dropped, and the work would go on. Such a one is raised again a moment later, from a
    timer signal, where it stops the conversion.
    """

    def hook(unraisable: Any) -> None:
        if isinstance(unraisable.exc_value, KeyboardInterrupt):
            signal.setitimer(signal.ITIMER_REAL, 0.01)
            return
        default(unraisable)

    def again(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    default, sys.unraisablehook = sys.unraisablehook, hook
    alarm = signal.signal(signal.SIGALRM, again)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, alarm)
        sys.unraisablehook = default


def _remove_unused(output: Path | str, options: dict[str, Any] | None) -> None:
    """Remove a collection this command created, unless another writer has taken it up since."""
    from ._lock import LOCK, WriteLock

    try:
        coll = Collection(output, mode="r", storage_options=options)
    except CollectionError:  # not (yet) a collection: only this command wrote there
        if isinstance(output, Path):
            shutil.rmtree(output, ignore_errors=True)
        return
    lock = WriteLock(coll.group)
    if lock.try_acquire():  # no one is writing into it, and, checked under the lock, nothing was committed
        with lock:
            if coll.is_empty:
                if isinstance(output, Path):
                    shutil.rmtree(output, ignore_errors=True)
                else:
                    remove_objects(output, options, keep=LOCK)


def _demo(args: argparse.Namespace) -> None:
    from .synthetic import write_h5ad_files

    if args.output and Path(args.output).exists() and not Path(args.output).is_dir():
        raise ValueError(f"`output={args.output!r}` is a file: give a folder (created if missing).")
    if args.output and (Path(args.output) / "demo.zarr").exists():
        raise ValueError(
            f"`output={args.output!r}` already holds a demo.zarr: give another folder, or remove it first."
        )
    root = Path(args.output) if args.output else Path(tempfile.mkdtemp(prefix="annbatch-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    print(
        f"Generating {args.n_files} synthetic .h5ad files of {args.n_obs:,} cells × {args.n_vars:,} genes in {root}"
    )
    paths = write_h5ad_files(
        root / "inputs", args.n_files, args.n_obs, args.n_vars, overlap=0.9, seed=args.seed
    )
    start = time.perf_counter()
    coll = Collection(root / "demo.zarr", mode="w-").add_adatas(
        paths, seed=args.seed, groupby="donor", progress=_progress(args)
    )
    print(f"Converted in {time.perf_counter() - start:.1f} s")
    print(coll)
    obs = coll.obs(["src_path", "donor", "cell_type"])
    print("\nFirst rows (rows from all inputs are interleaved, sorted by donor within each dataset):")
    print(obs.head().to_string())
    loader = coll.loader(
        batch_size=1024, chunk_size=256, preload_nchunks=16, seed=args.seed, obs_columns=["cell_type"]
    )
    start, n, first = time.perf_counter(), 0, None
    for batch in loader:
        first = batch if first is None else first
        n += batch["X"].shape[0]
    rate = n / (time.perf_counter() - start)
    assert first is not None  # the demo writes at least one row, and the loader keeps a last partial batch
    obs = first["obs"]
    assert obs is not None  # asked for with `obs_columns`
    print(f"\nOne shuffled epoch: {len(loader)} batches, {n:,} cells, {rate:,.0f} cells/s")
    print(
        f"First batch: X {type(first['X']).__name__} {first['X'].shape}, "
        f"cell types {obs['cell_type'].value_counts().head(3).to_dict()}"
    )


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
