"""Where a cache or a weights file lives: one URL, answered once.

A :class:`Location` is made from a local path or an fsspec URL and says everything softcache
needs to know about it: whether it is remote or read-only, which filesystem and path reach it,
the storage options (including the timeout) every remote request uses, and how it may be
printed or recorded. Nothing secret or machine-specific leaves through it: :func:`redact`
strips credentials from URLs before they are printed or written into a manifest, and
:func:`record_spec` rewrites local paths so a shared cache names files relative to itself.

Recorded path format (a manifest field that names a file, e.g. a teacher's ``.safetensors``):

- a remote URL: the URL with its credentials removed (user info, signing query parameters);
- a local file below the cache directory's parent: a path relative to the cache directory,
  always starting ``./`` or ``../`` (``../teacher.safetensors`` for a teacher saved next to
  ``cache.zarr``); :func:`resolve_recorded` turns it back into a path;
- any other local file: ``NAME#sha256=HEX``, its name and the sha256 of its bytes (the form pip
  uses for pinned files), so a receiver can check a copy without learning where it lived;
- any other local directory: its name only.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import posixpath
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from softcache.errors import CacheError, UsageError

TIMEOUT_ENV = "SOFTCACHE_TIMEOUT"
DEFAULT_TIMEOUT = 60.0
"""Seconds a remote request may wait for an answer (connecting, or between received bytes).
Not a limit on a whole transfer: a large chunk on a slow but live link still completes."""

READ_ONLY_SCHEMES = ("http", "https")
LOCAL_SCHEMES = ("", "file", "local")

_SECRET_QUERY = re.compile(r"sig|signature|token|secret|passw|pwd|credential|auth|session|key|^x-amz-|^x-goog-",
                           re.IGNORECASE)
"""Query parameters that carry credentials: presigned S3 / GCS URLs, SAS tokens, API keys."""

_USERINFO = re.compile(r"[^/:]*:(?!\d+(?:/|$))")
"""``user:secret`` before an ``@`` (a ``host:port/...`` path holding an ``@`` is not one)."""

_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>()\[\]{},]+")


def redact(url: str) -> str:
    """``url`` without credentials: user info and credential-like query parameters removed.

    Plain paths come back unchanged. This is the one function that decides what of a URL may be
    shown or recorded; every message and manifest field that names a URL goes through it."""
    text = str(url)
    if "://" not in text:
        return text
    scheme, _, rest = text.partition("://")
    head = re.split(r"[?#]", rest, maxsplit=1)[0]
    if "@" in head and _USERINFO.match(head.partition("@")[0]):  # a secret holding "/" ends the netloc early
        text = f"{scheme}://{rest[len(head.partition('@')[0]) + 1:]}"
    parts = urlsplit(text)
    netloc = parts.netloc.rpartition("@")[2]
    query = urlencode([(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True)
                       if not _SECRET_QUERY.search(k)])
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact_text(text: str) -> str:
    """Every URL inside ``text`` (an error message, a printed report) passed through :func:`redact`."""
    return _URL_IN_TEXT.sub(lambda m: redact(m.group(0)), text)


def default_timeout() -> float:
    """The timeout in effect: ``$SOFTCACHE_TIMEOUT`` (the CLI's ``--timeout`` sets it for the
    duration of a command, so worker processes inherit it), else 60 seconds."""
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    return DEFAULT_TIMEOUT if not raw else parse_timeout(raw, TIMEOUT_ENV)


def parse_timeout(raw: str | float, what: str = "--timeout") -> float:
    try:
        seconds = float(raw)
    except ValueError:
        raise UsageError(f"{what} must be a number of seconds, not {raw!r}") from None
    if not 0 < seconds < float("inf"):
        raise UsageError(f"{what} must be a positive number of seconds, not {raw!r}")
    return seconds


@contextlib.contextmanager
def timeout_scope(seconds: float | None) -> Iterator[None]:
    """Make ``seconds`` the default timeout while the block runs (None: leave it as it is)."""
    if seconds is None:
        yield
        return
    before = os.environ.get(TIMEOUT_ENV)
    os.environ[TIMEOUT_ENV] = repr(parse_timeout(seconds))
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(TIMEOUT_ENV, None)
        else:
            os.environ[TIMEOUT_ENV] = before


@dataclass(frozen=True)
class Location:
    """A local path or fsspec URL, with what softcache needs to reach it safely."""

    url: str
    """As given: may hold credentials, so never print or record it (use :attr:`redacted`)."""
    timeout: float

    @classmethod
    def of(cls, url: str | Path | Location, timeout: float | None = None) -> Location:
        if isinstance(url, Location):
            return url if timeout is None else cls(url.url, parse_timeout(timeout))
        return cls(str(url), default_timeout() if timeout is None else parse_timeout(timeout))

    @property
    def scheme(self) -> str:
        return self.url.split("://", 1)[0].lower() if "://" in self.url else ""

    @property
    def redacted(self) -> str:
        return redact(self.url)

    @property
    def remote(self) -> bool:
        return self.scheme not in LOCAL_SCHEMES

    @property
    def read_only(self) -> bool:
        return self.scheme in READ_ONLY_SCHEMES

    @property
    def listable(self) -> bool:
        """Whether the store's keys can be listed (HTTP servers cannot: only named keys are read)."""
        return not self.read_only

    def require_writable(self, doing: str) -> None:
        """Refuse to ``doing`` (write a cache, finalize it, sign it) at a read-only location:
        the one message for it."""
        if self.read_only:
            raise UsageError(f"{self}: cannot {doing} there: http(s) URLs are read-only; "
                             "caches are written to a path, file:// or s3://")

    def native(self) -> Location:
        """The same place named as zarr and fsspec open it: a ``file://`` URL as the local path
        it names (written caches record and report that path), anything else as it is."""
        return self if self.zarr_url == self.url else Location(self.zarr_url, self.timeout)

    def sibling(self, suffix: str) -> Location | None:
        """The location named ``URL + suffix`` beside this one (build-lock entries, signatures);
        None for a store at the root of a bucket or disk, which has nothing beside it."""
        if "/" not in self.path.rstrip("/"):
            return None
        return Location(self.url.rstrip("/") + suffix, self.timeout)

    @property
    def local_path(self) -> Path | None:
        """The filesystem path of a local location (``file://`` included); None when remote."""
        if self.remote:
            return None
        return Path(os.path.expanduser(self.url.split("://", 1)[1] if "://" in self.url else self.url))

    @property
    def zarr_url(self) -> str:
        """What to hand zarr and fsspec: a plain path for local locations (zarr's fsspec route
        for ``file://`` does not create directories, so writing there would fail), else the URL."""
        local = self.local_path
        return str(local) if local is not None else self.url

    @property
    def storage_options(self) -> dict[str, Any]:
        """fsspec options for this location: the timeout, for the protocols that take one.

        http(s): aiohttp's connect and socket-read timeouts (no total limit, which would cut off
        a large download that is still progressing). s3: botocore's connect and read timeouts,
        with one retry at the botocore level (s3fs retries timeouts itself)."""
        if self.scheme in READ_ONLY_SCHEMES:
            import aiohttp

            timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.timeout, sock_read=self.timeout)
            return {"client_kwargs": {"timeout": timeout}}
        if self.scheme in ("s3", "s3a"):
            return {"config_kwargs": {"connect_timeout": self.timeout, "read_timeout": self.timeout,
                                      "retries": {"max_attempts": 2, "mode": "standard"}}}
        return {}

    @cached_property
    def _fs_and_path(self) -> tuple[Any, str]:
        import fsspec

        with self.errors():
            return fsspec.core.url_to_fs(self.zarr_url, **self.storage_options)

    @property
    def fs(self) -> Any:
        """The fsspec filesystem (made once per Location, with :attr:`storage_options`)."""
        return self._fs_and_path[0]

    @property
    def path(self) -> str:
        """The path on :attr:`fs` (absolute for local locations)."""
        return self._fs_and_path[1]

    def __str__(self) -> str:
        return self.redacted

    def no_answer(self) -> CacheError:
        return CacheError(f"{self.redacted}: no answer within {self.timeout:g} s "
                          f"(a slow or unreachable server; raise it with --timeout SECONDS or ${TIMEOUT_ENV})")

    @contextlib.contextmanager
    def errors(self) -> Iterator[None]:
        """Turn a remote request that timed out into one line naming this (redacted) location."""
        try:
            yield
        except Exception as exc:
            if is_timeout(exc):
                raise self.no_answer() from None
            raise


def is_timeout(exc: BaseException) -> bool:
    """A request that got no answer in time: asyncio/aiohttp (``TimeoutError``) or botocore,
    whose timeout errors derive from ``OSError`` only."""
    if isinstance(exc, TimeoutError):
        return True
    boto = sys.modules.get("botocore.exceptions")
    return boto is not None and isinstance(exc, (boto.ReadTimeoutError, boto.ConnectTimeoutError))


# --- paths and URLs recorded in a manifest ---------------------------------------------------


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def record_location(target: str, cache: Location) -> str:
    """How a file or URL named while building the cache at ``cache`` is written into its
    manifest (format in the module docstring)."""
    where = Location.of(target, cache.timeout)
    if where.remote:
        return where.redacted
    path = Path(os.path.abspath(where.local_path))  # type: ignore[arg-type]
    base = cache.local_path
    if base is not None:
        base = Path(os.path.abspath(base))
        if path == base.parent or base.parent in path.parents:
            rel = os.path.relpath(path, base).replace(os.sep, "/")
            return rel if rel.startswith("../") or rel == ".." else f"./{rel}"
    if path.is_file():
        return f"{path.name}#sha256={file_digest(path)}"
    return path.name


def _is_path_like(value: str) -> bool:
    """A keyword value that names a local file: absolute, home-relative, ``./``/``../``, or ``file://``.
    Other strings (``split=train``) are left alone: they may be words, not paths."""
    return value.startswith(("/", "~", "./", "../", "file://")) or (os.sep != "/" and os.path.isabs(value))


def record_value(value: Any, cache: Location) -> Any:
    """A SPEC keyword value as recorded: URLs redacted, local paths as :func:`record_location`."""
    if isinstance(value, str):
        if _is_path_like(value) or "://" in value:
            return record_location(value, cache)
        return value
    if isinstance(value, list):
        return [record_value(v, cache) for v in value]
    if isinstance(value, dict):
        return {k: record_value(v, cache) for k, v in value.items()}
    return value


def resolve_recorded(target: str, cache: Location) -> str:
    """Where a file recorded in the manifest of ``cache`` is now: the inverse of
    :func:`record_location` for relative paths (resolved against the cache directory) and for
    ``NAME#sha256=HEX`` (a file of that name and digest next to the cache); URLs as they are."""
    name, sep, digest = target.partition("#sha256=")
    if sep:
        base = cache.local_path
        candidate = Path(os.path.abspath(base)).parent / name if base is not None else None
        if candidate is None or not candidate.is_file() or file_digest(candidate) != digest:
            raise UsageError(f"the cache records the file {name} (sha256 {digest[:12]}...) by name and digest only; "
                             f"put that file next to the cache or pass it explicitly")
        return str(candidate)
    if not target.startswith(("./", "../")) and target != "..":
        return target
    base = cache.local_path
    if base is not None:
        return os.path.normpath(os.path.join(os.path.abspath(base), target))
    root = cache.url.rstrip("/")
    scheme, _, rest = root.partition("://")
    return f"{scheme}://{posixpath.normpath(posixpath.join(rest, target))}"
