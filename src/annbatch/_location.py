"""Where a collection lives: a local path, or a URL of object storage opened through obstore.

``s3://``, ``gs://``, ``az://`` (and the other schemes of :func:`obstore.store.from_url`) become a
:class:`zarr.storage.ObjectStore`; ``file://`` URLs are local paths. Credentials come from
``storage_options`` or the standard environment variables (``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT_URL``,
``GOOGLE_SERVICE_ACCOUNT``, ``AZURE_STORAGE_ACCOUNT_KEY``, ...), which obstore reads itself. A URL is
only ever shown through :func:`display_url`, which drops anything that may hold a secret.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from annbatch.errors import CollectionError

__all__ = ["display_url", "is_url", "local_or_url", "object_store", "remove_objects", "url_has_objects", "url_path"]

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# obstore's keyword arguments that are not store configuration keys
_OBSTORE_KWARGS = ("client_options", "retry_config", "credential_provider")


def is_url(value: object) -> bool:
    """Whether ``value`` is a URL (``scheme://...``) rather than a local path."""
    return isinstance(value, str) and bool(_SCHEME.match(value))


def url_path(url: str) -> Path | None:
    """The local path of a ``file://`` URL; ``None`` for other URLs."""
    parts = urlsplit(url)
    if parts.scheme.lower() != "file":
        return None
    if parts.netloc not in ("", "localhost"):
        raise CollectionError(f"{display_url(url)!r}: only local file:// URLs are supported (file:///path).")
    return Path(unquote(parts.path))


def display_url(url: str) -> str:
    """The URL without user info, query or fragment: what messages and reprs may show."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return f"{parts.scheme}://{host}{parts.path}"


def object_store(url: str, storage_options: dict[str, Any] | None = None, *, read_only: bool = False):
    """A zarr store for the object-storage URL ``url`` (its path is the store's prefix).

    ``storage_options`` are obstore's settings of the store kind (e.g. for S3 ``endpoint``,
    ``region``, ``access_key_id``, ``secret_access_key``, ``session_token``), plus ``client_options``
    (e.g. ``{"allow_http": True}``), ``retry_config`` and ``credential_provider``; what is not given
    comes from the environment.
    """
    try:
        from obstore.exceptions import BaseError
        from obstore.store import from_url
    except ImportError:  # pragma: no cover - obstore is a dependency; a broken install lacks it
        raise CollectionError(
            f"Opening {display_url(url)!r} needs obstore: `pip install obstore`."
        ) from None
    from zarr.storage import ObjectStore

    options = dict(storage_options or {})
    if not all(isinstance(k, str) for k in options):
        raise TypeError("`storage_options` keys must be strings (obstore setting names).")
    kwargs = {k: options.pop(k) for k in _OBSTORE_KWARGS if k in options}
    try:
        store = from_url(url, **kwargs, **options)
    except (BaseError, TypeError, ValueError) as err:  # obstore names a bad setting, never its value
        reason = _first_line(err).replace(url, display_url(url))
        hint = " (see obstore's store configuration for the valid keys)" if "Configuration key" in reason else ""
        raise CollectionError(f"Cannot open {display_url(url)!r}: {reason}{hint}") from None
    return ObjectStore(store, read_only=read_only)


def url_has_objects(url: str, storage_options: dict[str, Any] | None = None) -> bool:
    """Whether any object exists under the URL's prefix."""
    from zarr.core.sync import sync

    return not sync(object_store(url, storage_options, read_only=True).is_empty(""))


def remove_objects(url: str, storage_options: dict[str, Any] | None = None, *, keep: str | None = None) -> None:
    """Delete every object under the URL's prefix but ``keep`` (a key relative to it)."""
    from zarr.core.sync import sync

    store = object_store(url, storage_options)

    async def run() -> None:
        keys = [key async for key in store.list() if key != keep]
        for key in keys:
            await store.delete(key)

    sync(run())


def local_or_url(location: str | os.PathLike) -> Path | str:
    """A local path (``file://`` URLs included) as a :class:`~pathlib.Path`; other URLs as they are."""
    if is_url(location):
        assert isinstance(location, str)
        path = url_path(location)
        return path if path is not None else location
    return Path(location)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
