"""Signed caches: sign a complete cache, verify it locally, on S3 and over HTTP, with softcache
and with model-signing's own tool; any changed byte, a wrong key, a missing or foreign
signature fails; ``train --verify-key`` refuses an unverified cache before any student trains."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
from pathlib import Path

import fsspec
import pytest
import zarr
from batchkit import build_tiny, main, tiny_teacher
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from test_remote import HttpServer, S3Server, http_root, s3  # noqa: F401 - fixtures

import softcache
from softcache.cache import store
from softcache.errors import CacheError, UsageError
from softcache.cache.manifest import MANIFEST_ATTR

STUDENT = "softcache.models:mlp,hidden=8"


def _key_pair(folder: Path, name: str, curve: ec.EllipticCurve | None = None) -> tuple[str, str]:
    """A PEM private key and its public key, as `openssl ecparam ... -genkey` would write them."""
    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(curve or ec.SECP256R1())
    private, public = folder / f"{name}.pem", folder / f"{name}.pub.pem"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return str(private), str(public)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    return _key_pair(tmp_path_factory.mktemp("keys"), "team")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One complete cache; each test signs and tampers with its own copy."""
    out = tmp_path_factory.mktemp("built") / "cache.zarr"
    build_tiny(tiny_teacher(), out)
    return out


@pytest.fixture
def signed(built: Path, keys: tuple[str, str], tmp_path: Path) -> Path:
    url = tmp_path / "cache.zarr"
    shutil.copytree(built, url)
    result = main("sign", str(url), "--key", keys[0], "--json")
    assert result.returncode == 0, result.stderr
    return url


def _verify(url: str | Path, key: str, *extra: str) -> tuple[int, dict, str]:
    result = main("verify", str(url), "--key", key, "--json", *extra)
    return result.returncode, json.loads(result.stdout), result.stderr


def _flip_byte(path: Path, at: int = 3) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def _model_signing_verify(url: Path, signature: Path, public: str) -> subprocess.CompletedProcess[str]:
    """model-signing's own command line, as a receiver without softcache would run it."""
    return subprocess.run([sys.executable, "-m", "model_signing", "verify", "key", str(url), "--signature",
                           str(signature), "--public_key", public], capture_output=True, text=True, timeout=120)


def test_sign_then_verify_with_softcache_and_with_model_signing(built: Path, keys: tuple[str, str],
                                                                tmp_path: Path) -> None:
    url = tmp_path / "cache.zarr"
    shutil.copytree(built, url)
    before = sorted(p.relative_to(url) for p in url.rglob("*"))
    result = main("sign", str(url), "--key", keys[0], "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert set(report) == {"url", "signature", "key_id", "files", "cache_key"}
    assert report["signature"] == f"{url}.sig" and Path(report["signature"]).is_file()
    assert report["files"] == len([p for p in before if (url / p).is_file()])
    assert sorted(p.relative_to(url) for p in url.rglob("*")) == before  # nothing added inside the store

    code, verified, err = _verify(url, keys[1])
    assert code == 0, err
    assert set(verified) == {"url", "signature", "verified", "reason", "key_id", "files", "listed", "cache_key"}
    assert verified["verified"] and verified["reason"] is None and verified["listed"] is True
    assert verified["key_id"] == report["key_id"] and verified["files"] == report["files"]
    assert verified["cache_key"] == report["cache_key"]
    human = main("verify", str(url), "--key", keys[1])
    assert human.returncode == 0 and human.stdout.startswith(f"verified {url}: {report['files']} files")

    ms = _model_signing_verify(url, Path(f"{url}.sig"), keys[1])
    assert ms.returncode == 0 and "Verification succeeded" in ms.stdout, ms.stderr

    assert softcache.verify(str(url), keys[1])["verified"]
    assert store.open_cache(str(url)).complete  # the cache opens and validates as before
    assert softcache.validate(str(url))["errors"] == []


def test_any_changed_byte_fails_verification(signed: Path, keys: tuple[str, str]) -> None:
    chunk = next(p for p in sorted((signed / "soft_labels" / "c").rglob("*")) if p.is_file())
    name = chunk.relative_to(signed).as_posix()
    _flip_byte(chunk)
    code, result, err = _verify(signed, keys[1])
    assert code == 1 and not result["verified"]
    assert result["reason"] == f"1 file(s) changed since signing (first: {name})"
    assert err.startswith("softcache: error: not verified: 1 file(s) changed") and err.count("\n") == 1
    ms = _model_signing_verify(signed, Path(f"{signed}.sig"), keys[1])
    assert ms.returncode != 0 and name in ms.stderr
    _flip_byte(chunk)  # restored: verified again
    assert _verify(signed, keys[1])[0] == 0

    group = zarr.open_group(str(signed), mode="r+")  # an in-range edit of the manifest attribute
    recorded = dict(group.attrs[MANIFEST_ATTR])
    group.attrs[MANIFEST_ATTR] = {**recorded, "temperature": recorded["temperature"] * 2}
    code, result, _ = _verify(signed, keys[1])
    assert code == 1 and "changed since signing (first: zarr.json)" in result["reason"]
    with pytest.raises(CacheError, match="not verified: 1 file"):
        softcache.verify(str(signed), keys[1])


def test_missing_and_extra_files_fail_verification(signed: Path, keys: tuple[str, str]) -> None:
    chunk = next(p for p in sorted((signed / "labels" / "c").rglob("*")) if p.is_file())
    moved = chunk.with_name("moved")
    chunk.rename(moved)
    code, result, _ = _verify(signed, keys[1])
    assert code == 1 and f"1 file(s) missing (first: {chunk.relative_to(signed).as_posix()})" in result["reason"]
    moved.rename(chunk)
    (signed / "notes.txt").write_text("added after signing")
    code, result, _ = _verify(signed, keys[1])
    assert code == 1 and result["reason"] == "1 file(s) not signed (first: notes.txt)"


def test_a_symlink_in_the_store_is_refused(signed: Path, keys: tuple[str, str], tmp_path: Path) -> None:
    chunk = next(p for p in sorted((signed / "soft_labels" / "c").rglob("*")) if p.is_file())
    outside = tmp_path / "outside"
    shutil.copyfile(chunk, outside)  # same bytes, reached through a link
    chunk.unlink()
    chunk.symlink_to(outside)
    code, result, _ = _verify(signed, keys[1])
    assert code == 1 and "symlink" in result["reason"]


def test_wrong_key_missing_signature_and_foreign_signature(signed: Path, keys: tuple[str, str],
                                                           tmp_path: Path) -> None:
    _, stranger = _key_pair(tmp_path / "other", "stranger", ec.SECP384R1())
    code, result, _ = _verify(signed, stranger)
    assert code == 1 and "signed with another key" in result["reason"]

    sig = Path(f"{signed}.sig")
    original = sig.read_bytes()
    bundle = json.loads(original)  # the signed statement itself altered: the signature no longer matches
    payload = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
    payload["predicate"]["resources"][0]["digest"] = "0" * 64
    bundle["dsseEnvelope"]["payload"] = base64.b64encode(json.dumps(payload).encode()).decode()
    sig.write_text(json.dumps(bundle))
    code, result, _ = _verify(signed, keys[1])
    assert code == 1 and result["reason"].startswith("invalid signature")
    sig.write_text("not a signature")
    code, result, _ = _verify(signed, keys[1])
    assert code == 1 and "not a model-signing bundle" in result["reason"]

    sig.unlink()
    code, result, err = _verify(signed, keys[1])
    assert code == 1 and result["reason"].startswith(f"no signature at {sig}")
    assert "softcache sign" in err

    other = tmp_path / "other.zarr"  # another cache signed by the same team
    build_tiny(tiny_teacher(), other, temperature=2.0)
    assert main("sign", str(other), "--key", keys[0]).returncode == 0
    shutil.copyfile(f"{other}.sig", sig)
    code, result, _ = _verify(signed, keys[1])
    assert code == 1 and "changed since signing" in result["reason"]
    sig.write_bytes(original)
    assert _verify(signed, keys[1])[0] == 0


def test_only_a_complete_cache_is_signed_and_keys_are_checked(keys: tuple[str, str], tmp_path: Path) -> None:
    partial = tmp_path / "partial.zarr"
    build_tiny(tiny_teacher(), partial, shard="0/2")
    refused = main("sign", str(partial), "--key", keys[0])
    assert refused.returncode == 1 and "not complete" in refused.stderr and not Path(f"{partial}.sig").exists()
    with pytest.raises(CacheError, match="no cache there"):
        softcache.sign(str(tmp_path / "absent.zarr"), keys[0])

    complete = tmp_path / "complete.zarr"
    build_tiny(tiny_teacher(), complete)
    swapped = main("sign", str(complete), "--key", keys[1])  # a public key cannot sign
    assert swapped.returncode == 2 and "not an elliptic-curve private key" in swapped.stderr
    assert main("sign", str(complete), "--key", str(tmp_path / "nope.pem")).returncode == 2
    rsa_key = tmp_path / "rsa.pem"
    rsa_key.write_bytes(rsa.generate_private_key(65537, 2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    assert main("sign", str(complete), "--key", str(rsa_key)).returncode == 2
    assert main("sign", str(complete), "--key", keys[0]).returncode == 0
    private_for_verify = main("verify", str(complete), "--key", keys[0])
    assert private_for_verify.returncode == 2 and "-pubout" in private_for_verify.stderr


def test_signature_inside_the_cache_is_left_out_of_what_is_signed(built: Path, keys: tuple[str, str],
                                                                  tmp_path: Path) -> None:
    url = tmp_path / "cache.zarr"
    shutil.copytree(built, url)
    inside = url / "softcache.sig"
    assert softcache.sign(str(url), keys[0], signature=str(inside))["signature"] == str(inside)
    assert softcache.verify(str(url), keys[1], signature=str(inside))["verified"]
    assert _model_signing_verify(url, inside, keys[1]).returncode == 0


def test_train_verify_key_refuses_an_altered_cache_before_training(signed: Path, keys: tuple[str, str],
                                                                   tmp_path: Path) -> None:
    args = ["train", "--cache", str(signed), "--student", STUDENT, "--epochs", "1", "--verify-key", keys[1]]
    ok = main(*args, "--out", str(tmp_path / "ok"), "--json")
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "ok" / "leaderboard.parquet").is_file()

    _flip_byte(next(p for p in sorted((signed / "soft_labels" / "c").rglob("*")) if p.is_file()))
    refused = main(*args, "--out", str(tmp_path / "refused"))
    assert refused.returncode == 1 and "not verified" in refused.stderr and refused.stderr.count("\n") == 1
    assert not (tmp_path / "refused").exists()  # no student trained, nothing written
    with pytest.raises(CacheError, match="not verified"):
        softcache.train(str(signed), [STUDENT], verify_key=keys[1], progress=False)


def test_run_verify_key_only_for_a_received_cache(tmp_path: Path, keys: tuple[str, str]) -> None:
    pipeline = Path(__file__).resolve().parent.parent / "pipelines" / "digits.toml"
    builds = main("run", str(pipeline), "--set", f"workdir={tmp_path}", "--verify-key", keys[1])
    assert builds.returncode == 2 and "--only train" in builds.stderr
    missing = main("run", str(pipeline), "--set", f"workdir={tmp_path}", "--only", "train", "--verify-key", keys[1])
    assert missing.returncode == 1 and "no signature" in missing.stderr


def test_sign_and_verify_an_s3_cache_without_a_local_copy(s3: S3Server, keys: tuple[str, str],  # noqa: F811
                                                          tmp_path: Path) -> None:
    url = "s3://caches/signed.zarr"
    build_tiny(tiny_teacher(), url)
    signed = softcache.sign(url, keys[0])
    assert signed["signature"] == f"{url}.sig"
    result = softcache.verify(url, keys[1])
    assert result["verified"] and result["files"] == signed["files"] and result["listed"]

    local = tmp_path / "downloaded.zarr"  # the same statement model-signing makes for a local copy
    fs = fsspec.filesystem("s3")
    fs.get("caches/signed.zarr", str(local), recursive=True)
    fs.get("caches/signed.zarr.sig", f"{local}.sig")
    assert softcache.verify(str(local), keys[1])["verified"]
    assert _model_signing_verify(local, Path(f"{local}.sig"), keys[1]).returncode == 0

    chunk = next(p for p in sorted(fs.find("caches/signed.zarr/soft_labels/c")))
    original = fs.cat_file(chunk)
    fs.pipe_file(chunk, bytes([original[0] ^ 1]) + original[1:])
    code, report, _ = _verify(url, keys[1])
    assert code == 1 and report["reason"] == (
        f"1 file(s) changed since signing (first: {chunk.removeprefix('caches/signed.zarr/')})")
    fs.pipe_file(chunk, original)
    fs.pipe_file("caches/signed.zarr/extra", b"x")
    code, report, _ = _verify(url, keys[1])
    assert code == 1 and report["reason"] == "1 file(s) not signed (first: extra)"


def test_verify_over_http_checks_every_signed_file(http_root: HttpServer, built: Path,  # noqa: F811
                                                   keys: tuple[str, str]) -> None:
    local = http_root.root / "served.zarr"
    shutil.copytree(built, local)
    softcache.sign(str(local), keys[0])
    url = f"{http_root.base}/served.zarr"
    result = softcache.verify(url, keys[1])
    assert result["verified"] and not result["listed"] and result["signature"] == f"{url}.sig"
    with pytest.raises(UsageError, match="read-only"):
        softcache.sign(url, keys[0])
    _flip_byte(next(p for p in sorted((local / "labels" / "c").rglob("*")) if p.is_file()))
    with pytest.raises(CacheError, match="changed since signing"):
        softcache.verify(url, keys[1])


@pytest.mark.parametrize("storage, dtype, array", [("topk:4", "uint8", "soft_ids"), ("topk:4", "float16", "soft_rest"),
                                                   ("sample:6", "float16", "soft_labels")])
def test_signing_and_deep_validation_cover_compact_arrays(storage: str, dtype: str, array: str,
                                                          keys: tuple[str, str], tmp_path: Path) -> None:
    """Every array a compact mode adds is signed and digested: editing one chunk of it is caught."""
    url = tmp_path / "compact.zarr"
    build_tiny(tiny_teacher(), url, storage=storage, dtype=dtype if storage.startswith("topk") else "float16")
    assert main("sign", str(url), "--key", keys[0], "--json").returncode == 0
    assert _verify(url, keys[1])[0] == 0 and softcache.validate(str(url), deep=True)["valid"]
    chunk = next(p for p in (url / array).rglob("*") if p.is_file() and p.name != "zarr.json")
    _flip_byte(chunk)
    code, verified, _ = _verify(url, keys[1])
    assert code != 0 and not verified["verified"]
    assert not softcache.validate(str(url), deep=True)["valid"]
