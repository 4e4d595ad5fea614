"""Signed caches: a team signs a finished cache, a receiver checks it before training from it.

The signature is an OpenSSF model-signing signature (a Sigstore bundle holding a DSSE envelope
whose in-toto statement lists every file of the cache with its SHA-256 digest), made with an
elliptic-curve key pair (P-256, P-384 or P-521; PEM files). It lives **beside** the cache, at
``URL + ".sig"`` (``cache.zarr`` -> ``cache.zarr.sig``), so the signed directory is exactly the
Zarr store: nothing is added to it, Zarr never meets an unknown file, and the receiver of a
local cache can check it with model-signing's own tool::

    model_signing verify key cache.zarr --signature cache.zarr.sig --public_key pub.pem

What is signed is every byte of every file in the store (chunks and every ``zarr.json``, so the
manifest too), except the paths model-signing leaves out by default (``.git``, ``.github``,
``.gitignore``, ``.gitattributes``), which Zarr never reads. Any changed, missing or extra file
fails the check.

Local caches are hashed by model-signing itself (which refuses symlinks and special files).
Object stores (``s3://`` and the like) are hashed by streaming each object through SHA-256, with
no copy on disk, and the same statement is signed or checked, so a cache signed in a bucket and
downloaded verifies with ``model_signing`` too. ``http(s)://`` caches can be verified but not
signed (read-only), and since HTTP cannot list a directory, only the signed files are checked
there: an extra file is not noticed, which is harmless because Zarr reads only what the signed
metadata names.

Make a key pair with OpenSSL (or ``cryptography``)::

    openssl ecparam -name prime256v1 -genkey -noout -out key.pem
    openssl ec -in key.pem -pubout -out pub.pem
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import pathlib
import tempfile
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import fsspec

from softcache.cache import store
from softcache.cache.location import Location
from softcache.errors import CacheError, UsageError

SIGNATURE_SUFFIX = ".sig"
HASH = "sha256"
DEFAULT_IGNORED = (".git", ".gitattributes", ".github", ".gitignore")
"""model-signing's default exclusions (its ``ignore_git_paths``), recorded in every signature."""
MAX_SIGNATURE_BYTES = 256 * 2**20
"""A signature lists every file of the cache (about 150 bytes each); anything larger is refused."""
MAX_KEY_BYTES = 2**16
READ_BLOCK = 2**20
STREAM_WORKERS = 8


@dataclass(frozen=True)
class SignedTarget:
    """Where a cache and its signature are, and how their files are reached."""

    cache: Location
    signature: Location

    @classmethod
    def of(cls, url: str | Location, signature: str | os.PathLike[str] | None) -> SignedTarget:
        cache = Location.of(url)
        beside = cache.sibling(SIGNATURE_SUFFIX) if signature is None else Location.of(os.fspath(signature))
        if beside is None:
            raise UsageError(f"{cache}: a cache at the root of a bucket or disk has no place beside it for "
                             "the signature; pass --signature URL")
        return cls(cache, beside)

    @property
    def url(self) -> str:
        return self.cache.url

    @property
    def signature_url(self) -> str:
        return self.signature.url

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        return self.cache.fs

    @property
    def root(self) -> str:
        return self.cache.path.rstrip("/")

    @property
    def local(self) -> bool:
        return not self.cache.remote

    @property
    def listable(self) -> bool:
        """HTTP servers cannot list a directory: there only the signed files are checked."""
        return self.cache.listable

    def signature_inside(self) -> str | None:
        """The signature's path relative to the cache when it was put inside it (then excluded)."""
        sig_fs, sig_path = self.signature.fs, self.signature.path
        if type(sig_fs) is not type(self.fs):
            return None
        if self.local:
            sig_path, root = os.path.realpath(sig_path), os.path.realpath(self.root)
        else:
            root = self.root
        return sig_path[len(root) + 1:] if sig_path.startswith(root + "/") else None


def _ms() -> SimpleNamespace:
    """model-signing, imported on use (it takes about a second to import).

    The key signer and verifier classes and the payload builder are used directly because the
    library's public entry points take only local paths; object-store caches need the same
    statement built from streamed digests. Tested against model-signing 1.1."""
    try:
        from model_signing import hashing, manifest
        from model_signing._hashing import hashing as digests
        from model_signing._signing import sign_ec_key, sign_sigstore_pb, signing
    except ImportError as exc:  # model-signing 1.1 imports pyOpenSSL without declaring it
        raise UsageError(f"signing needs the model-signing package and its dependencies ({exc})") from None
    return SimpleNamespace(hashing=hashing, manifest=manifest, digests=digests, ec_key=sign_ec_key,
                           bundle=sign_sigstore_pb, signing=signing)


def key_id(public_key_pem: bytes) -> str:
    """SHA-256 of the public key (PEM, SubjectPublicKeyInfo): the hint model-signing records."""
    return hashlib.sha256(public_key_pem).hexdigest()



def _load_key(path: str | os.PathLike[str], private: bool, password: str | None = None) -> tuple[Any, str]:
    """model-signing's signer (``private``) or verifier for a PEM key file, and the key's id; a
    key that is missing, of another kind or of an unsupported curve is one line, exit 2."""
    from cryptography.hazmat.primitives import serialization

    ms = _ms()
    kind = "private" if private else "public"
    if not os.path.isfile(path) or os.path.getsize(path) > MAX_KEY_BYTES:
        raise UsageError(f"--key {path}: no such key file" if not os.path.isfile(path) else
                         f"--key {path}: too large to be a PEM key")
    secret = password.encode() if password is not None else None
    try:
        data = pathlib.Path(path).read_bytes()
        if private:
            public = serialization.load_pem_private_key(data, secret).public_key()
            handle = ms.ec_key.Signer(pathlib.Path(path), secret)
        else:
            public = serialization.load_pem_public_key(data)
            handle = ms.ec_key.Verifier(pathlib.Path(path))
    except TypeError as exc:  # password missing, or given for an unencrypted key
        raise UsageError(f"--key {path}: {exc}") from None
    except (ValueError, AttributeError) as exc:
        hint = "" if private else " (to verify, give the public key: openssl ec -in key.pem -pubout -out pub.pem)"
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UsageError(f"--key {path}: not an elliptic-curve {kind} key in PEM format (P-256, P-384 or P-521): "
                         f"{detail}{hint}") from None
    pem = public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return handle, key_id(pem)


def _ignored(name: str, ignore: frozenset[str]) -> bool:
    return any(name == p or name.startswith(p.rstrip("/") + "/") for p in ignore)


def _stream_sha256(fs: fsspec.AbstractFileSystem, path: str) -> str | None:
    """Digest of one object read block by block (bounded memory); None when it is missing."""
    digest = hashlib.sha256()
    try:
        with fs.open(path, "rb", block_size=READ_BLOCK) as handle:
            while block := handle.read(READ_BLOCK):
                digest.update(block)
    except FileNotFoundError:
        return None
    return digest.hexdigest()


def _streamed(loc: SignedTarget, names: list[str] | None, ignore: frozenset[str]) -> dict[str, str | None]:
    """``{relative name: sha256 hex}`` of the objects of a remote cache: every object listed under
    it, or the given names (HTTP cannot list), hashed by a few threads at once."""
    if names is None:
        prefix = loc.root + "/"
        loc.fs.invalidate_cache()  # object-store clients cache listings and object versions, also below root
        names = sorted(p[len(prefix):] for p in loc.fs.find(loc.root) if p.startswith(prefix))
    names = [n for n in names if not _ignored(n, ignore)]
    with concurrent.futures.ThreadPoolExecutor(STREAM_WORKERS) as pool:
        hashed = pool.map(lambda n: _stream_sha256(loc.fs, f"{loc.root}/{n}"), names)
        return dict(zip(names, hashed))


def _local_digests(loc: SignedTarget, ignore: frozenset[str]) -> dict[str, str]:
    """model-signing's own hashing of a local cache (symlinks and special files refused)."""
    ms = _ms()
    config = ms.hashing.Config().set_ignored_paths(paths=sorted(ignore), ignore_git_paths=False)
    try:
        found = config.hash(loc.root)
    except ValueError as exc:  # a symlink or a special file in the store
        raise CacheError(f"{loc.cache}: {str(exc).splitlines()[0]}") from None
    return {rd.identifier: rd.digest.digest_hex for rd in found.resource_descriptors()}


def _complete_manifest(where: Location) -> Any:
    found = store.peek_manifest(where)
    if found is None:
        raise CacheError(f"{where}: no cache there (no zarr.json)")
    if found.status.state != "complete":
        raise CacheError(f"{where}: the cache is not complete (state {found.status.state!r}); only a finalized cache "
                         "can be signed: finish it first (softcache build --resume, or softcache finalize)")
    return found


def sign(url: str, key: str | os.PathLike[str], *, signature: str | os.PathLike[str] | None = None,
         password: str | None = None) -> dict[str, Any]:
    """Sign the complete cache at ``url`` with an EC private key (PEM) and write the signature
    beside it (``url + ".sig"`` unless ``signature`` says where). Returns what was signed:
    ``url``, ``signature``, ``key_id`` (SHA-256 of the public key), ``files``, ``cache_key``."""
    loc = SignedTarget.of(url, signature)
    loc.cache.require_writable("sign a cache")
    manifest = _complete_manifest(loc.cache)
    signer, kid = _load_key(key, private=True, password=password)
    inside = loc.signature_inside()
    ignore = frozenset(DEFAULT_IGNORED) | ({inside} if inside else frozenset())
    digests = _local_digests(loc, ignore) if loc.local else _streamed(loc, None, ignore)
    ms = _ms()
    serialization = ms.manifest.SerializationType.from_args(
        {"method": "files", "hash_type": HASH, "allow_symlinks": False, "ignore_paths": sorted(ignore)})
    items = [serialization.new_item(name, ms.digests.Digest(HASH, bytes.fromhex(digest)))
             for name, digest in sorted(digests.items()) if digest is not None]
    statement = ms.manifest.Manifest(os.path.basename(loc.root), items, serialization)
    bundle = signer.sign(ms.signing.Payload(statement))
    _write_signature(loc.signature, bundle)
    return {"url": url, "signature": loc.signature_url, "key_id": kid,
            "files": len(items), "cache_key": manifest.cache_key}


def _write_signature(where: Location, bundle: Any) -> None:
    """Write through a temporary name and rename (local) or one PUT (object stores), so a reader
    never sees half a signature."""
    fs, path = where.fs, where.path
    with tempfile.TemporaryDirectory() as tmp:
        staged = pathlib.Path(tmp) / "signature"
        bundle.write(staged)
        if not where.remote:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            partial = f"{path}.partial"
            fs.put_file(str(staged), partial)
            os.replace(partial, path)
        else:
            fs.put_file(str(staged), path)


def _read_signature(where: Location) -> tuple[Any | None, str | None]:
    """The signature bundle at ``where``, or why there is none usable."""
    ms = _ms()
    fs, path = where.fs, where.path
    try:
        size = fs.size(path)
        if size is not None and size > MAX_SIGNATURE_BYTES:
            return None, f"the signature {where} is {size} bytes, more than a signature can be ({MAX_SIGNATURE_BYTES})"
        raw = fs.cat_file(path)
    except FileNotFoundError:
        return None, f"no signature at {where} (sign it with: softcache sign URL --key KEY)"
    if len(raw) > MAX_SIGNATURE_BYTES:
        return None, f"the signature {where} is larger than a signature can be ({MAX_SIGNATURE_BYTES} bytes)"
    with tempfile.TemporaryDirectory() as tmp:
        staged = pathlib.Path(tmp) / "signature"
        staged.write_bytes(raw)
        try:
            return ms.bundle.Signature.read(staged), None
        except Exception as exc:
            return None, f"the signature {where} is not a model-signing bundle ({type(exc).__name__})"


def verification(url: str, key: str | os.PathLike[str], *,
                 signature: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Check the cache at ``url`` against its signature and an EC public key (PEM).

    Never raises for a cache that fails the check: the result says ``verified`` and why not
    (``reason``), for ``softcache verify --json``. Keys: ``url``, ``signature``, ``verified``,
    ``reason``, ``key_id``, ``files`` (signed files checked), ``listed`` (whether files that are
    not in the signature could be looked for: false on http), ``cache_key`` (when verified).
    A bad key file or URL is a UsageError."""
    loc = SignedTarget.of(url, signature)
    verifier, kid = _load_key(key, private=False)
    result: dict[str, Any] = {"url": url, "signature": loc.signature_url, "verified": False, "reason": None,
                              "key_id": kid, "files": 0, "listed": loc.listable, "cache_key": None}
    bundle, why = _read_signature(loc.signature)
    if bundle is None:
        return {**result, "reason": why}
    try:
        signed = verifier.verify(bundle)
    except Exception as exc:
        message = str(exc).splitlines()[0] if str(exc) else "the signature does not match its content"
        if "Key mismatch" in message:
            message = "signed with another key (the key recorded in the signature is not this public key)"
        return {**result, "reason": f"invalid signature: {message} ({type(exc).__name__})"}
    params = signed.serialization_type
    if params.get("method") != "files" or params.get("hash_type") != HASH:
        return {**result, "reason": f"unsupported signature layout {params.get('method')}/{params.get('hash_type')}: "
                                    f"softcache checks per-file {HASH} signatures"}
    expected = {rd.identifier: rd.digest.digest_hex for rd in signed.resource_descriptors()}
    inside = loc.signature_inside()
    ignore = frozenset(str(p) for p in params.get("ignore_paths", ())) | ({inside} if inside else frozenset())
    if loc.local:
        if not os.path.isdir(loc.root):
            return {**result, "reason": f"{loc.cache}: no cache there"}
        try:
            actual: dict[str, str | None] = dict(_local_digests(loc, ignore))
        except CacheError as exc:
            return {**result, "reason": str(exc)}
    else:
        actual = _streamed(loc, None if loc.listable else sorted(expected), ignore)
    problem = _difference(expected, actual)
    if problem:
        return {**result, "files": len(expected), "reason": problem}
    found = store.peek_manifest(loc.cache)
    return {**result, "verified": True, "files": len(expected), "cache_key": found.cache_key if found else None}


def _difference(expected: dict[str, str], actual: dict[str, str | None]) -> str | None:
    """One line naming what differs between the signed files and the cache's files."""
    present = {name for name, digest in actual.items() if digest is not None}
    changed = sorted(n for n in present & expected.keys() if actual[n] != expected[n])
    missing = sorted(expected.keys() - present)
    extra = sorted(present - expected.keys())
    parts = []
    for what, names in (("changed since signing", changed), ("missing", missing), ("not signed", extra)):
        if names:
            parts.append(f"{len(names)} file(s) {what} (first: {names[0]})")
    return "; ".join(parts) or None


def verify(url: str, key: str | os.PathLike[str], *, signature: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Check the cache at ``url`` against its signature and an EC public key (PEM); raise
    CacheError naming the first problem unless every signed file is there, unchanged, and
    nothing else is. Returns :func:`verification`'s result when verified."""
    result = verification(url, key, signature=signature)
    if not result["verified"]:
        raise CacheError(f"{url}: not verified: {result['reason']}")
    return result
