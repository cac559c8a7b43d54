"""A bundle from someone else must not run its code (``compressor.trust``, ``check_bundle``).

Bundles are written by hand around one real ONNX file of the tiny BERT (data) and hostile
code-bearing artifacts: a ``.pt2`` whose pickled weight writes a marker file when
``torch.export.load`` unpickles it (checked to fire when loaded directly), and spies in
place of the loaders of shared libraries. Every refusal is one line, before any file is
opened; an unsigned bundle still benches its ONNX; a signature is this machine's or nothing.
"""

from __future__ import annotations

import io
import json
import os
import stat
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from compressor.app.bench import BenchConfig, bench_bundle
from compressor.app.cli import main
from compressor.bundle import BundleWriter, check_bundle, verify_bundle
from compressor.errors import CompressorError
from compressor.manifest import MANIFEST, sha256_file
from compressor.trust import (
    SIGNATURE,
    _create_key,
    check_signature,
    decide_trust,
    key_path,
    load_key,
    sign_bundle,
)

QUICK: dict[str, Any] = {
    "batch_sizes": (1,), "seq_len": 8, "threads": 1, "warmup": 0, "repeats": 1, "baseline": None, "fidelity": False,
}  # fmt: skip


def hostile_pt2(path: Path, marker: Path) -> Path:
    """A real ExportedProgram archive whose first weight is a pickle that creates ``marker``
    when unpickled (``torch.export.load`` reads pickled weights with ``weights_only=False``)."""

    class Payload:
        def __reduce__(self) -> tuple[Any, ...]:
            return (exec, (f"open({str(marker)!r}, 'w').write('code ran')",))

    ep = torch.export.export(torch.nn.Linear(2, 2), (torch.randn(1, 2),))
    clean = io.BytesIO()
    torch.export.save(ep, clean)
    payload = io.BytesIO()
    torch.save(Payload(), payload)
    with zipfile.ZipFile(clean) as src, zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as out:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename.endswith("data/weights/model_weights_config.json"):
                config = json.loads(data)
                config["config"]["weight"]["use_pickle"] = True
                data = json.dumps(config).encode()
            elif info.filename.endswith("data/weights/weight_0"):
                data = payload.getvalue()
            out.writestr(info.filename, data)
    return path


@pytest.fixture(scope="session")
def tiny_onnx(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny BERT as a plain ONNX file (what the bundle's ``ort`` engine runs)."""
    from compressor.adapters.hf_encoder import HFEncoderAdapter
    from compressor.data import sample, stdlib_docstring_splits
    from compressor.exporters.onnx.onnx import export_onnx

    adapter = HFEncoderAdapter()
    model = adapter.load(str(tiny_bert_dir))
    spec = adapter.export_spec(
        model, adapter.tokenize(sample(stdlib_docstring_splits().eval, 2, 0), 16), False
    )
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    export_onnx(spec.module, spec, path, 17)
    return path


@pytest.fixture(scope="session")
def recipe_dict(tiny_bert_dir: Path) -> dict[str, Any]:
    from compressor.recipe import parse_recipe

    raw = {
        "name": "hand-made",
        "target": "cpu",
        "model": {"source": str(tiny_bert_dir)},
        "data": {"calibration_samples": 8, "train_samples": 0, "eval_samples": 8, "max_length": 16},
        "passes": [],
        "exports": [{"format": "onnx"}],
    }
    return parse_recipe(raw, "hand-made.yaml").to_dict()


@pytest.fixture()
def marker(tmp_path: Path) -> Path:
    return tmp_path / "CODE-RAN"


@pytest.fixture()
def make_bundle(tmp_path: Path, tiny_onnx: Path, recipe_dict: dict[str, Any]) -> Callable[..., Path]:
    """``make_bundle(artifacts, files=None, **manifest)``: a bundle folder holding model.onnx,
    whose manifest lists ``files`` (default: every regular file in it) with their real sha256,
    as an attacker who rewrites the hashes would."""

    def make(artifacts: dict[str, str], files: list[str] | None = None, **extra: Any) -> Path:
        folder = tmp_path / "bundle"
        folder.mkdir(exist_ok=True)
        if not (folder / "model.onnx").exists():
            (folder / "model.onnx").write_bytes(tiny_onnx.read_bytes())
        if files is None:
            files = [
                p.relative_to(folder).as_posix()
                for p in sorted(folder.rglob("*"))
                if p.is_file() and not p.is_symlink() and p.name not in (MANIFEST, SIGNATURE)
            ]
        listed = {f: {"sha256": sha256_file(folder / f), "bytes": (folder / f).stat().st_size} for f in files}
        manifest = {"format_version": 1, "recipe": recipe_dict, "artifacts": artifacts, "files": listed}
        manifest.update(extra)
        (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))
        return folder

    return make


def one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_the_hostile_pt2_runs_code_when_loaded_directly(tmp_path: Path) -> None:
    """The payload the other tests refuse is real: loading it runs code."""
    marker = tmp_path / "ran"
    path = hostile_pt2(tmp_path / "evil.pt2", marker)
    with pytest.raises(Exception):  # noqa: B017 - the payload returns None, which export then rejects
        torch.export.load(str(path))
    assert marker.read_text() == "code ran"


@pytest.mark.parametrize(
    "where", ["dotdot", "absolute", "symlinked-folder", "symlinked-file", "unlisted"], ids=str
)
def test_a_code_artifact_outside_the_bundle_is_refused_before_it_is_opened(
    where: str,
    make_bundle: Callable[..., Path],
    tmp_path: Path,
    marker: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    evil = hostile_pt2(outside / "evil.pt2", marker)
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    files = None
    if where == "dotdot":
        rel = "../outside/evil.pt2"
    elif where == "absolute":
        rel = str(evil)
    elif where == "symlinked-folder":
        (bundle / "weights").symlink_to(outside)
        rel, files = "weights/evil.pt2", ["model.onnx", "weights/evil.pt2"]  # its hash even matches
    elif where == "symlinked-file":
        (bundle / "model.exported.pt2").symlink_to(evil)
        rel, files = "model.exported.pt2", ["model.onnx", "model.exported.pt2"]
    else:
        hostile_pt2(bundle / "model.exported.pt2", marker)
        rel, files = "model.exported.pt2", ["model.onnx"]  # never hashed
    make_bundle({"onnx": "model.onnx", "torch_export": rel}, files)
    for trust in ([], ["--trust"]):  # not even --trust loads what the bundle does not hold
        err = one_line_error(
            capsys, ["bench", str(bundle), "--engines", "torch_eager", "--no-baseline", *trust]
        )
        assert "artifacts.torch_export" in err or "files" in err, err
    err = one_line_error(capsys, ["verify", str(bundle)])
    assert {"dotdot": "leads out of the bundle", "absolute": "absolute path", "symlinked-folder": "symlink",
            "symlinked-file": "symlink", "unlisted": "not listed in files"}[where] in err  # fmt: skip
    assert not marker.exists()


@pytest.mark.parametrize("rel", ["../outside/x.onnx", "ABSOLUTE"])
def test_an_onnx_artifact_outside_the_bundle_is_not_run(
    rel: str, make_bundle: Callable[..., Path], tmp_path: Path, tiny_onnx: Path
) -> None:
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "x.onnx").write_bytes(tiny_onnx.read_bytes())
    rel = str(tmp_path / "outside" / "x.onnx") if rel == "ABSOLUTE" else rel
    bundle = make_bundle({"onnx": rel})
    with pytest.raises(CompressorError, match="artifacts.onnx: .*(leads out of the bundle|absolute path)"):
        bench_bundle(bundle, BenchConfig(**QUICK))


def test_onnx_external_data_must_be_a_listed_file_inside(
    make_bundle: Callable[..., Path], tmp_path: Path
) -> None:
    import onnx
    from onnx import TensorProto, helper

    weight = helper.make_tensor("w", TensorProto.FLOAT, [1], [0.0])
    weight.data_location = TensorProto.EXTERNAL
    weight.ClearField("float_data")
    weight.external_data.add(key="location", value="../../etc/passwd")
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        [weight],
    )
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "ext.onnx").write_bytes(helper.make_model(graph).SerializeToString())
    make_bundle({"onnx": "model.onnx", "onnx_qdq": "ext.onnx"})
    with pytest.raises(CompressorError, match=r"ext.onnx: external data: '\.\./\.\./etc/passwd' leads out"):
        check_bundle(bundle)
    assert onnx  # the check reads the graph without loading external data


def test_a_rewritten_hash_on_a_code_artifact_skips_its_engines_and_still_benches_onnx(
    make_bundle: Callable[..., Path], tmp_path: Path, marker: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bundle's own ExportedProgram and AOTInductor package replaced, hashes rewritten: every
    hash matches, nothing is signed, so no engine loads them; ONNX Runtime still runs the ONNX."""
    import torch._inductor

    loaded: list[str] = []
    monkeypatch.setattr(torch._inductor, "aoti_load_package", lambda p, *a, **k: loaded.append(p))
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    hostile_pt2(bundle / "model.exported.pt2", marker)
    (bundle / "model.pt2").write_bytes(b"PK\x05\x06" + bytes(18))  # stands in for a hostile .so inside
    (bundle / "model_a100.plan").write_bytes(b"plan")
    arts = {"onnx": "model.onnx", "torch_export": "model.exported.pt2", "aoti": "model.pt2"}
    make_bundle(dict(arts, tensorrt_plan="model_a100.plan"))
    verify_bundle(bundle)  # integrity holds: the attacker rewrote the hashes
    r = bench_bundle(bundle, BenchConfig(**QUICK))
    assert not marker.exists() and loaded == []
    engines = r["engines"]
    assert engines["ort"]["status"] == "ok" and set(r["latency"][0]["engines"]) == {"ort"}
    for name in ("torch_eager", "torch_compile", "aoti", "native", "tensorrt"):
        assert engines[name]["status"] == "skipped", name
        assert engines[name]["reason"].startswith("skipped: the bundle is not signed by this machine's key (")
        assert engines[name]["reason"].endswith("); pass --trust if you trust its author")
    assert "(it loads pickled code)" in engines["torch_eager"]["reason"]
    assert "(it loads a shared library)" in engines["native"]["reason"]
    assert r["trust"] == {"trusted": False, "why": "the bundle is not signed by this machine's key",
                          "signature": "unsigned"}  # fmt: skip


def test_a_code_engine_asked_for_on_an_untrusted_bundle_is_one_line_exit_2(
    make_bundle: Callable[..., Path], tmp_path: Path, marker: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    hostile_pt2(bundle / "model.exported.pt2", marker)
    make_bundle({"onnx": "model.onnx", "torch_export": "model.exported.pt2"})
    err = one_line_error(capsys, ["bench", str(bundle), "--engines", "ort,torch_eager", "--no-baseline"])
    assert err == (
        "error: bench: --engines torch_eager: the bundle is not signed by this machine's key "
        "(it loads pickled code); pass --trust if you trust its author"
    )
    assert not marker.exists()


@pytest.fixture()
def spy_exported_program(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """``exported_program_engine`` replaced by a recorder that reports the engine unavailable."""
    import compressor.app.engines
    from compressor.app.engines import EngineUnavailable

    opened: list[Path] = []

    def spy(path: Path, *args: Any, **kwargs: Any) -> Any:
        opened.append(Path(path))
        raise EngineUnavailable("spy: would load")

    monkeypatch.setattr(compressor.app.engines, "exported_program_engine", spy)
    return opened


def test_a_bundle_signed_here_is_trusted_and_a_changed_one_is_not(
    make_bundle: Callable[..., Path], tmp_path: Path, spy_exported_program: list[Path]
) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "model.exported.pt2").write_bytes(b"a program")
    make_bundle({"onnx": "model.onnx", "torch_export": "model.exported.pt2"})
    assert sign_bundle(bundle)
    cfg = BenchConfig(engines=None, **QUICK)
    r = bench_bundle(bundle, cfg)
    assert r["trust"]["trusted"] and r["trust"]["signature"] == "valid"
    assert spy_exported_program == [bundle / "model.exported.pt2"] * 2  # torch_eager and torch_compile
    assert r["engines"]["torch_eager"]["reason"] == "spy: would load"
    # one byte of the manifest changed after signing (a rewritten hash, say): not trusted any more
    text = (bundle / MANIFEST).read_text()
    (bundle / MANIFEST).write_text(text.replace('"format_version": 1', '"format_version":  1'))
    r = bench_bundle(bundle, cfg)
    assert r["trust"] == {"trusted": False, "why": "the bundle's manifest was changed after it was signed",
                          "signature": "mismatch"}  # fmt: skip
    assert len(spy_exported_program) == 2
    assert r["engines"]["torch_eager"]["reason"].startswith("skipped: the bundle's manifest was changed")


def test_trust_flag_loads_an_unsigned_bundle(
    make_bundle: Callable[..., Path], tmp_path: Path, spy_exported_program: list[Path]
) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "model.exported.pt2").write_bytes(b"a program")
    make_bundle({"onnx": "model.onnx", "torch_export": "model.exported.pt2"})
    r = bench_bundle(bundle, BenchConfig(trust=True, **QUICK))
    assert r["trust"]["trusted"] and r["trust"]["signature"] == "unsigned"
    assert r["trust"]["why"].startswith("trusted by the user (--trust)")
    assert len(spy_exported_program) == 2


def test_another_machines_key_is_told_apart_from_a_tampered_manifest(
    make_bundle: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle = make_bundle({"onnx": "model.onnx"})
    sign_bundle(bundle)
    data = (bundle / MANIFEST).read_bytes()
    assert check_signature(bundle, data).state == "valid"
    assert check_signature(bundle, data + b" ").state == "mismatch"
    monkeypatch.setenv("COMPRESSOR_CONFIG_DIR", str(tmp_path / "elsewhere"))
    sig = check_signature(bundle, data)
    assert sig.state == "no-key" and not (tmp_path / "elsewhere").exists()  # checking never makes a key
    load_key(create=True)
    sig = check_signature(bundle, data)
    assert sig.state == "other-key" and "signed by another key" in sig.detail
    assert decide_trust(bundle, data).why == "the bundle is signed by another machine's key"
    (bundle / SIGNATURE).write_text("not a signature")
    assert check_signature(bundle, data).state == "malformed"


def test_the_key_is_private_made_once_and_refused_when_others_can_read_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COMPRESSOR_CONFIG_DIR", str(tmp_path / "cfg"))
    key = load_key(create=True)
    assert key is not None and len(key) == 32
    path = key_path()
    assert path == tmp_path / "cfg" / "signing.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_key(create=True) == key  # made once; no temporary files left beside it
    assert sorted(p.name for p in path.parent.iterdir()) == ["signing.key"]
    assert _create_key(path) == key  # a racing first compile ends with the key that won
    os.chmod(path, 0o644)
    with pytest.raises(CompressorError, match="open to other users .*chmod 600"):
        load_key(create=False)


def test_a_compile_where_no_key_can_be_made_writes_an_unsigned_bundle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("COMPRESSOR_CONFIG_DIR", str(tmp_path / "a-file" / "compressor"))
    with BundleWriter(tmp_path / "b") as b:
        b.manifest.name = "x"
    assert not (tmp_path / "b" / SIGNATURE).exists() and verify_bundle(tmp_path / "b")["name"] == "x"
    assert "the bundle is not signed" in caplog.text


def test_the_config_dir_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from compressor.trust import config_dir

    monkeypatch.delenv("COMPRESSOR_CONFIG_DIR")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert config_dir() == tmp_path / "xdg" / "compressor"
    monkeypatch.delenv("XDG_CONFIG_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert config_dir() == tmp_path / "home" / ".config" / "compressor"


def test_the_bundle_writer_signs_what_it_writes(tmp_path: Path) -> None:
    with BundleWriter(tmp_path / "b") as b:
        assert b.path is not None
        (b.path / "model.onnx").write_bytes(b"\x08\x07")
        b.add_artifacts({"onnx": "model.onnx"})
    checked = check_bundle(tmp_path / "b")
    assert SIGNATURE not in checked.manifest["files"]
    assert check_signature(tmp_path / "b", checked.manifest_bytes).valid


def test_verify_prints_what_would_run_exits_0_unsigned_and_2_tampered(
    make_bundle: Callable[..., Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = tmp_path / "bundle"
    (bundle / "triton" / "m").mkdir(parents=True)
    (bundle / "triton" / "m" / "config.pbtxt").write_text("name: 'm'")
    (bundle / "model.exported.pt2").write_bytes(b"a program")
    arts = {"onnx": "model.onnx", "torch_export": "model.exported.pt2", "triton_repository": "triton"}
    make_bundle(arts)
    assert main(["verify", str(bundle)]) == 0
    out = capsys.readouterr().out
    assert "paths and hashes: ok (3 files, 3 artifacts" in out
    assert "signature: not signed (no manifest.sig)" in out and "not trusted" in out
    rows = {line.split()[0]: line for line in out.splitlines() if line.split()}
    assert "data (ONNX graph)" in rows["onnx"] and rows["onnx"].rstrip().endswith("yes")
    assert "code (pickled ExportedProgram)" in rows["torch_export"]
    assert "torch_eager, torch_compile" in rows["torch_export"] and "no: not trusted" in rows["torch_export"]
    assert "no bench engine loads it" in rows["triton_repository"]
    sign_bundle(bundle)
    assert main(["verify", str(bundle)]) == 0
    out = capsys.readouterr().out
    assert "signed by this machine's key" in out and "trusted: compressor bench loads every" in out
    (bundle / MANIFEST).write_text((bundle / MANIFEST).read_text() + "\n")  # changed after signing
    assert main(["verify", str(bundle)]) == 2  # paths and hashes still hold, but it was tampered with
    captured = capsys.readouterr()
    assert "signature: manifest.json was changed after it was signed" in captured.out
    assert "not trusted" in captured.out
    assert captured.err.count("error: ") == 1 and "changed after it was signed" in captured.err


@pytest.mark.parametrize(
    "damage",
    ["hash", "size", "missing", "unlisted-in-folder", "symlink-in-folder", "files-not-a-dict", "bad-sha"],
)
def test_verify_exits_2_on_any_path_or_hash_problem(
    damage: str, make_bundle: Callable[..., Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = tmp_path / "bundle"
    (bundle / "triton").mkdir(parents=True)
    (bundle / "triton" / "config.pbtxt").write_text("name: 'm'")
    make_bundle({"onnx": "model.onnx", "triton_repository": "triton"})
    manifest = json.loads((bundle / MANIFEST).read_text())
    if damage == "hash":
        manifest["files"]["model.onnx"]["sha256"] = "0" * 64
    elif damage == "size":
        manifest["files"]["model.onnx"]["bytes"] += 1
    elif damage == "missing":
        (bundle / "triton" / "config.pbtxt").unlink()
    elif damage == "unlisted-in-folder":
        (bundle / "triton" / "model.py").write_text("import os")
    elif damage == "symlink-in-folder":
        (bundle / "triton" / "link").symlink_to("/etc")
    elif damage == "files-not-a-dict":
        manifest["files"] = ["model.onnx"]
    else:
        manifest["files"]["model.onnx"]["sha256"] = "../x"
    (bundle / MANIFEST).write_text(json.dumps(manifest))
    one_line_error(capsys, ["verify", str(bundle)])


@pytest.mark.parametrize(
    "manifest",
    [None, "recipe-string", "not-a-dict", "not-utf8", "nested"],
)
def test_a_manifest_without_a_usable_recipe_is_one_line_exit_2(
    manifest: str | None, make_bundle: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = make_bundle({"onnx": "model.onnx"})
    m = json.loads((bundle / MANIFEST).read_text())
    if manifest is None:
        del m["recipe"]
        (bundle / MANIFEST).write_text(json.dumps(m))
    elif manifest == "recipe-string":
        m["recipe"] = "minilm-cpu-int8"
        (bundle / MANIFEST).write_text(json.dumps(m))
    elif manifest == "not-a-dict":
        (bundle / MANIFEST).write_text("[1, 2]")
    elif manifest == "not-utf8":
        (bundle / MANIFEST).write_bytes(b'{"recipe": "\xff"}')
    else:
        (bundle / MANIFEST).write_text("[" * 100_000 + "]" * 100_000)
    err = one_line_error(capsys, ["bench", str(bundle), "--no-baseline"])
    assert "manifest" in err


def test_the_compile_benches_its_partial_bundle_and_signs_the_result(
    tiny_bert_dir: Path, tmp_path: Path
) -> None:
    """The compile benches the bundle it is writing (not yet hashed or signed) with ORT, then
    signs it: the finished bundle is trusted here."""
    from compressor.app.compile import compile_recipe
    from compressor.recipe import parse_recipe

    recipe = parse_recipe(
        {
            "name": "tiny-signed",
            "target": "cpu",
            "model": {"source": str(tiny_bert_dir)},
            "data": {"calibration_samples": 8, "train_samples": 0, "eval_samples": 8, "max_length": 16},
            "passes": [],
            "exports": [{"format": "onnx", "verify_batch_sizes": [2], "verify_lengths": [8]}],
            "evaluation": {
                "bench": {"batch_sizes": [1], "seq_len": 8, "threads": 1, "warmup": 0, "repeats": 1}
            },
        },
        "tiny-signed.yaml",
    )
    manifest = compile_recipe(recipe, tmp_path / "b")
    assert manifest["benchmark"]["engines"]["ort"]["status"] == "ok"
    checked = check_bundle(tmp_path / "b")
    assert decide_trust(tmp_path / "b", checked.manifest_bytes).trusted


@pytest.mark.parametrize("folder", ["remote-code", "pickle-beside-a-decoy"])
def test_the_manifests_model_source_cannot_run_code(
    folder: str,
    make_bundle: Callable[..., Path],
    tiny_bert_dir: Path,
    recipe_dict: dict[str, Any],
    tmp_path: Path,
    marker: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """bench loads the original model from the manifest's ``recipe.model.source``: a hostile
    manifest pointing it at a folder that asks for its own Python code, or holds a pickle next
    to an empty ``.safetensors``, gets one line and exit 2, and nothing of the folder runs."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_bert_dir, model)
    if folder == "remote-code":
        config = json.loads((model / "config.json").read_text())
        config["auto_map"] = {
            "AutoModel": "modeling_evil.EvilModel",
            "AutoConfig": "modeling_evil.EvilConfig",
        }
        (model / "config.json").write_text(json.dumps(config))
        (model / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('code ran')\n")
    else:
        (model / "model.safetensors").unlink()
        (model / "decoy.safetensors").write_bytes(b"")

        class Payload:
            def __reduce__(self) -> tuple[Any, ...]:
                return (exec, (f"open({str(marker)!r}, 'w').write('code ran')",))

        torch.save(Payload(), model / "pytorch_model.bin")
    recipe = json.loads(json.dumps(recipe_dict))
    recipe["model"]["source"] = str(model)
    bundle = make_bundle({"onnx": "model.onnx"}, recipe=recipe)
    one_line_error(capsys, ["bench", str(bundle), "--no-baseline", "--batch", "1", "--repeats", "1"])
    assert not marker.exists()
