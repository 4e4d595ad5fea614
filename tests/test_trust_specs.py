"""Nothing in a cache or a weights file chooses code to run: recorded SPECs and ``softcache.arch``
resolve only against an exact allowlist, or modules the user (never the cache) trusts."""

from __future__ import annotations

import importlib
import itertools
import json
import shutil
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zarr
from batchkit import EVAL, main, tiny_teacher

from softcache.teacher.build import build
from softcache.config import TrainConfig
from softcache.demo import DATA_SPEC, DATAFREE_AUGMENT, EVAL_SPEC, MLP, TEACHER_SPEC, TINY
from softcache.errors import CacheError, UsageError
from softcache.cache.manifest import Manifest, Spec, compute_cache_key
from softcache.models import mlp
from softcache.cache.trust import RECORDED_TARGETS, TRUSTED_MODULES_ENV, Trust, recorded_spec_problems, spec_problems
from softcache.spec import call_spec
from softcache.weights import load_model, save_model
from softcache.cache.store import Cache
from softcache.student.train import train
from softcache.cache.check import validate

AUGMENT = "softcache.augment:compose,shift=1"
_names = itertools.count()


@pytest.fixture(autouse=True)
def _no_user_trust(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Each test starts with no trusted module: no env setting, no pyproject.toml in the cwd."""
    monkeypatch.delenv(TRUSTED_MODULES_ENV, raising=False)
    monkeypatch.chdir(tmp_path)


def marker_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: str = "") -> tuple[str, Path]:
    """A fresh importable module that creates a marker file the moment it is imported."""
    name, marker = f"cachenamed{next(_names)}", tmp_path / "imported.marker"
    code = f"import pathlib\npathlib.Path({str(marker)!r}).write_text('imported')\n{body}"
    (tmp_path / f"{name}.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    return name, marker


def edited_copy(src: str, dst: Path, edit: Callable[[dict[str, Any]], None]) -> str:
    """A copy of a cache whose manifest was edited as a sender could (the key kept consistent)."""
    shutil.copytree(src, dst)
    group = zarr.open_group(str(dst), mode="r+", use_consolidated=False)
    manifest = json.loads(json.dumps(group.attrs["softcache"]))
    edit(manifest)
    m = Manifest.model_validate(manifest)
    manifest["cache_key"] = compute_cache_key(m.teacher, m.source, m.classes, m.temperature, m.storage, m.views,
                                              m.eval.source if m.eval else None)
    group.attrs["softcache"] = manifest
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        zarr.consolidate_metadata(str(dst))
    return str(dst)


def spec_json(text: str) -> dict[str, Any]:
    return Spec.parse(text).model_dump(mode="json")


@pytest.fixture(scope="module")
def view_cache(tmp_path_factory: pytest.TempPathFactory) -> Cache:
    """597 rows x 2 replayable views, with an eval split: every kind of recorded SPEC."""
    out = tmp_path_factory.mktemp("views") / "v.zarr"
    return build(tiny_teacher(), EVAL, str(out), eval_data=EVAL, views=2, augment=AUGMENT, chunk_rows=200,
                 progress=False)


def test_the_allowlist_is_exact_and_covers_what_softcache_records() -> None:
    for target in RECORDED_TARGETS:
        module, _, name = target.partition(":")
        assert callable(getattr(importlib.import_module(module), name)), target
    for spec in (TEACHER_SPEC, MLP, TINY, DATA_SPEC, EVAL_SPEC, DATAFREE_AUGMENT, AUGMENT):
        assert spec_problems(Spec.parse(spec)) == ([], True), spec


@pytest.mark.parametrize("text, fixable", [
    ("softcache.augment:call_spec,spec=os:system,command=touch x", False),  # a SPEC runner
    ("softcache.digits:np.load,file=x.npy,allow_pickle=true", False),      # an unpickler via an attribute path
    ("softcache.augment:compose,crop=os:system", False),                   # a keyword naming code
    ("softcache.models:mlp,hidden=evil.safetensors", False),               # a keyword naming a weights file
    ("softcache.augment:call_spec", True),                                  # softcache, but not on the list
    ("softcache.specs:load_model", True),
    ("os:system,command=touch x", True),
    ("mymodule:load", True),
])
def test_hostile_or_unknown_recorded_specs_are_refused_as_text(text: str, fixable: bool) -> None:
    problems, can_fix = spec_problems(Spec.parse(text))
    assert problems and can_fix is fixable, problems


def test_recorded_keywords_are_json_scalars_or_flat_lists() -> None:
    for kwargs in ({"hidden": {"spec": "os:system"}}, {"hidden": [1, [2]]}, {"__class__": 1}, {"_x": 1}):
        problems, fixable = spec_problems(Spec(target="softcache.models:mlp", kwargs=kwargs))
        assert problems and not fixable, kwargs
    assert spec_problems(Spec(target="softcache.models:mlp", kwargs={"hidden": 8, "depth": None})) == ([], True)


def test_modules_the_user_trusts_are_exact_and_never_private(tmp_path: Path) -> None:
    trust = Trust.from_user(["mymodule"])
    assert spec_problems(Spec.parse("mymodule:load,split=train"), trust) == ([], True)
    for text in ("mymodule.sub:load", "mymodule:_private", "other:load"):
        assert spec_problems(Spec.parse(text), trust)[0], text
    assert spec_problems(Spec.parse("mymodule:load,x=os:system"), trust)[1] is False  # still no smuggling
    assert spec_problems(Spec.parse("os:system,command=x"), Trust(cache_specs=True)) == ([], True)


def test_call_spec_follows_no_attribute_paths() -> None:
    with pytest.raises(UsageError, match="attribute paths"):
        call_spec("softcache.digits:np.load")
    with pytest.raises(UsageError, match="not a module name"):
        call_spec("os system:x")
    assert call_spec("collections:OrderedDict,a=1") == {"a": 1}  # any module a user types


HOSTILE = {
    "runner": ("views", "softcache.augment:call_spec,spec=os:system,command=touch {m}", CacheError, "refuses"),
    "attribute path": ("views", "softcache.digits:np.load,file={m},allow_pickle=true", CacheError, "attribute"),
    "outside": ("views", "os:system,command=touch {m}", UsageError, "--trust-cache-specs"),
}


def _set(where: str, text: str) -> Callable[[dict[str, Any]], None]:
    def edit(manifest: dict[str, Any]) -> None:
        if where == "views":
            manifest["views"]["augment"] = spec_json(text)
        else:
            manifest["source"]["spec"] = spec_json(text)
    return edit


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_recorded_augmentation_never_runs_even_when_the_user_passes_the_data(
        case: str, view_cache: Cache, tmp_path: Path) -> None:
    where, text, error, needle = HOSTILE[case]
    marker = tmp_path / "ran"
    url = edited_copy(view_cache.url, tmp_path / "hostile.zarr", _set(where, text.format(m=marker)))
    with pytest.raises(error, match=needle):
        train(url, [MLP], data=EVAL, eval_data=EVAL, config=TrainConfig(epochs=1), progress=False)
    result = main("train", "--cache", url, "--student", MLP, "--data", EVAL, "--eval-data", EVAL, "--epochs", "1",
                  "--out", str(tmp_path / "students"), "--quiet")
    assert result.returncode == error.exit_code and needle in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1

    pipeline = tmp_path / "p.toml"
    pipeline.write_text(f'version = 1\nname = "p"\nworkdir = "{tmp_path}"\n[teacher]\nspec = "{TEACHER_SPEC}"\n'
                        f'[data]\ntrain = "{EVAL}"\neval = "{EVAL}"\n[cache]\nurl = "{url}"\nviews = 2\naugment = "{AUGMENT}"\n'
                        f'[[train]]\nname = "s"\nepochs = 1\n[[train.students]]\nspec = "{MLP}"\n')
    ran = main("run", str(pipeline), "--only", "train", "--quiet")
    assert ran.returncode == error.exit_code and needle in ran.stderr, ran.stderr
    assert not validate(url)["valid"]
    assert not marker.exists()


def test_a_recorded_dataset_spec_with_an_attribute_path_never_runs(cache: Cache, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    url = edited_copy(cache.url, tmp_path / "hostile.zarr",
                      _set("source", f"softcache.digits:np.load,file={marker},allow_pickle=true"))
    with pytest.raises(CacheError, match="attribute paths"):
        train(url, [MLP], config=TrainConfig(epochs=1), progress=False, trust=False)
    result = validate(url, deep=True)
    assert not result["valid"] and any("np.load" in e for e in result["errors"]), result
    board = train(url, [MLP], data=DATA_SPEC, config=TrainConfig(epochs=1), progress=False).leaderboard  # the user's data
    assert board.height == 1 and not marker.exists()


def test_read_only_commands_never_import_what_a_cache_names(
        view_cache: Cache, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    name, marker = marker_module(tmp_path, monkeypatch, "from softcache.augment import shift as aug\n")

    def edit(manifest: dict[str, Any]) -> None:
        manifest["teacher"]["spec"] = spec_json(f"{name}:net,width=4")
        manifest["source"]["spec"] = spec_json(f"{name}:load,split=test")
        manifest["eval"]["source"]["spec"] = spec_json(f"{name}:load,split=test")
        manifest["views"]["augment"] = spec_json(f"{name}:aug,max_shift=1")

    url = edited_copy(view_cache.url, tmp_path / "named.zarr", edit)
    shown = main("inspect", url, "--json")
    assert shown.returncode == 0, shown.stderr
    assert len(json.loads(shown.stdout)["trust"]["recorded_spec_problems"]) == 3  # the teacher SPEC only runs when a user rebuilds: not a problem
    assert main("stats", url).returncode == 0
    for deep in ([], ["--deep"]):
        checked = main("validate", url, "--json", *deep)
        assert checked.returncode == 1 and f"{name}:aug" in checked.stdout, checked.stdout
    assert not marker.exists() and name not in sys.modules

    monkeypatch.setenv(TRUSTED_MODULES_ENV, name)  # the user says so, once
    assert validate(url)["valid"], validate(url)
    assert json.loads(main("inspect", url, "--json").stdout)["trust"]["recorded_spec_problems"] == []
    assert not marker.exists()
    # the control: training does run the trusted module's augmentation (so the marker can appear)
    trained = main("train", "--cache", url, "--student", MLP, "--data", EVAL, "--eval-data", EVAL, "--epochs", "1",
                   "--out", str(tmp_path / "s"), "--quiet")
    assert trained.returncode == 0, trained.stderr
    assert marker.exists()


def test_recorded_spec_problems_imports_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                view_cache: Cache) -> None:
    name, marker = marker_module(tmp_path, monkeypatch)
    manifest = view_cache.manifest.model_copy(deep=True)
    manifest.views.augment = Spec.parse(f"{name}:aug")
    assert recorded_spec_problems(manifest) and recorded_spec_problems(manifest, Trust.from_user([name])) == []
    assert recorded_spec_problems(view_cache.manifest) == []
    assert not marker.exists()


@pytest.fixture()
def hostile_weights(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    marker = tmp_path / "ran"
    path = save_model(tiny_teacher(), tmp_path / "w.safetensors", f"os:system,command=touch {marker}")
    yield path, marker
    assert not marker.exists()


def test_a_weights_file_never_chooses_its_architecture_code(hostile_weights: tuple[Path, Path], tmp_path: Path,
                                                            cache: Cache) -> None:
    path, _ = hostile_weights
    for args in (["build", "--teacher", str(path), "--data", EVAL, "--out", str(tmp_path / "c.zarr")],
                 ["train", "--cache", cache.url, "--student", str(path), "--epochs", "1", "--out", str(tmp_path / "s")]):
        result = main(*args, "--quiet")
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1, result.stderr
        assert str(path) in lines[0] and "os:system" in lines[0] and "softcache.arch" in lines[0], lines[0]
    with pytest.raises(UsageError, match="os:system"):
        load_model(str(path), trust=Trust.from_user(["posix"]))
    named = main("build", "--teacher", str(path), "--teacher-arch", "softcache.models:teacher_cnn,width=4",
                 "--data", EVAL, "--out", str(tmp_path / "named.zarr"), "--chunk-rows", "300", "--quiet")
    assert named.returncode == 0, named.stderr


def test_an_allowlisted_architecture_that_does_not_fit_is_refused_before_it_is_built(tmp_path: Path) -> None:
    """A weights file of a 4-unit MLP that records a 2-million-unit one: compared on the meta
    device first, so the recorded sizes are never allocated."""
    path = save_model(mlp(hidden=4), tmp_path / "m.safetensors", "softcache.models:mlp,hidden=2000000")
    with pytest.raises(UsageError, match=r"first difference at '1\."):
        load_model(str(path))
    fits = save_model(mlp(hidden=4), tmp_path / "fits.safetensors", "softcache.models:mlp,hidden=4")
    assert sum(p.numel() for p in load_model(str(fits)).parameters()) == 64 * 4 + 4 + 4 * 10 + 10


def test_a_weights_file_of_the_users_own_module_loads_once_trusted(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    name, _ = marker_module(tmp_path, monkeypatch, "from softcache.models import mlp as net\n")
    path = save_model(mlp(hidden=4), tmp_path / "own.safetensors", f"{name}:net,hidden=4")
    with pytest.raises(UsageError, match=f"--trust-module {name}"):
        load_model(str(path))
    assert load_model(str(path), trust=Trust.from_user([name])) is not None
    monkeypatch.setenv(TRUSTED_MODULES_ENV, f"other, {name}")
    assert load_model(str(path)) is not None


def test_trusted_modules_come_from_the_flag_the_environment_and_pyproject(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, view_cache: Cache) -> None:
    monkeypatch.setenv(TRUSTED_MODULES_ENV, "envmod,shared")
    (tmp_path / "pyproject.toml").write_text('[tool.softcache]\ntrusted-modules = ["projmod", "shared"]\n')
    trust = Trust.from_user(["flagmod"])
    assert [(m.name, m.source) for m in trust.modules] == [
        ("flagmod", "--trust-module"), ("envmod", f"${TRUSTED_MODULES_ENV}"), ("shared", f"${TRUSTED_MODULES_ENV}"),
        ("projmod", str(tmp_path / "pyproject.toml"))]
    info = json.loads(main("inspect", view_cache.url, "--json", "--trust-module", "flagmod").stdout)
    assert [m["module"] for m in info["trust"]["modules"]] == ["flagmod", "envmod", "shared", "projmod"]
    assert "projmod" in main("inspect", view_cache.url).stdout

    with pytest.raises(UsageError, match="not a module name"):
        Trust.from_user(["os;rm"])
    (tmp_path / "pyproject.toml").write_text('[tool.softcache]\ntrusted-modules = "projmod"\n')
    with pytest.raises(UsageError, match="list of module names"):
        Trust.from_user()


@pytest.fixture()
def own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, str]:
    """A cache built from the user's own dataset module (a wrapper over the digits)."""
    name, _ = marker_module(tmp_path, monkeypatch, "from softcache.digits import load\n")
    url = str(tmp_path / "own.zarr")
    build(tiny_teacher(), f"{name}:load,split=test", url, eval_data=f"{name}:load,split=test", chunk_rows=300,
          progress=False)
    return name, url


def test_an_own_module_cache_names_every_needed_flag_at_once_and_trains_once_trusted(
        own_cache: tuple[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    name, url = own_cache
    refused = main("train", "--cache", url, "--student", MLP, "--epochs", "1", "--out", str(tmp_path / "a"), "--quiet")
    assert refused.returncode == 2, refused.stderr
    line = refused.stderr.strip()
    assert "--data" in line and "--eval-data" in line and f"--trust-module {name}" in line, line
    assert not validate(url)["valid"]

    ok = main("train", "--cache", url, "--student", MLP, "--epochs", "1", "--out", str(tmp_path / "b"), "--quiet",
              "--trust-module", name)
    assert ok.returncode == 0, ok.stderr
    (tmp_path / "pyproject.toml").write_text(f'[tool.softcache]\ntrusted-modules = ["{name}"]\n')
    assert validate(url)["valid"]
    board = train(url, [MLP], config=TrainConfig(epochs=1), progress=False).leaderboard
    assert board["test_accuracy"][0] is not None
