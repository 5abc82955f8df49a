"""``wnorm convert`` on transformers checkpoints: save_pretrained folders (single file and
sharded) and state-dict files of Wav2Vec2, HuBERT, EnCodec, DAC and SpeechT5HifiGan come out in
a layout the model's own loader (``from_pretrained``, ``load_state_dict``) reads, with the same
outputs; folders are written whole or not at all, and bad folders are errors naming the file."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import wnorm
from wnorm.cli import main

st = pytest.importorskip("safetensors.torch")


def convert(src: Path, dst: Path, to: str, *args: str) -> None:
    assert main(["convert", str(src), str(dst), "--to", to, *args]) == 0


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a save_pretrained folder, by key, checking the index where there is one."""
    index = folder / "model.safetensors.index.json"
    if not index.exists():
        return st.load_file(str(folder / "model.safetensors"))
    weight_map = json.loads(index.read_text())["weight_map"]
    out: dict[str, torch.Tensor] = {}
    for name in sorted(set(weight_map.values())):
        shard = st.load_file(str(folder / name))
        assert all(weight_map[k] == name for k in shard)  # every key where the index says
        out.update(shard)
    assert sorted(out) == sorted(weight_map)
    return out


def loaded_cleanly(info: dict) -> bool:
    return not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys",
                                         "error_msgs"))


# --------------------------------------------------------------------------- transformers
@pytest.fixture(scope="module")
def eco():
    pytest.importorskip("transformers")
    import ecosystem_models

    return ecosystem_models


@pytest.mark.parametrize("name,shard", [("wav2vec2", False), ("wav2vec2", True),
                                        ("hubert", False), ("encodec", False),
                                        ("encodec", True)])
def test_folder_round_trip_is_read_by_from_pretrained_with_the_same_outputs(
    eco, tmp_path: Path, capsys, name: str, shard: bool
) -> None:
    model = eco.build(name)
    src = tmp_path / "saved"
    model.save_pretrained(src, **({"max_shard_size": "20KB"} if shard else {}))
    assert (src / "model.safetensors.index.json").exists() == shard
    convert(src, tmp_path / "wnorm", "wnorm")
    for to in ("torch-new", "torch-old"):
        out = tmp_path / to
        convert(tmp_path / "wnorm", out, to)
        assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in src.iterdir())
        assert (out / "config.json").read_bytes() == (src / "config.json").read_bytes()
        back, info = eco.model_class(name).from_pretrained(out, output_loading_info=True)
        assert loaded_cleanly(info), info
        assert torch.equal(eco.output(name, back.eval()), eco.output(name, model))
    # torch-new of wnorm of the saved folder: the same tensors, bitwise, under the same keys
    before, after = tensors(src), tensors(tmp_path / "torch-new")
    assert sorted(after) == sorted(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert "weight(s) converted to torch-new (folder)" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["wav2vec2", "hubert"])
def test_pos_conv_embed_keeps_dim_2_or_moves_where_told(eco, tmp_path: Path, name: str) -> None:
    model = eco.build(name)
    model.save_pretrained(tmp_path / "saved")
    convert(tmp_path / "saved", tmp_path / "old", "torch-old")
    g = tensors(tmp_path / "old")["encoder.pos_conv_embed.conv.weight_g"]
    assert g.shape == (1, 1, 16)  # the model's own layout: from_pretrained reads it (above)
    convert(tmp_path / "saved", tmp_path / "dim0", "torch-old", "--dim", "0")
    sd = tensors(tmp_path / "dim0")
    assert sd["encoder.pos_conv_embed.conv.weight_g"].shape == (32, 1, 1)
    # along dim 0 the model's own loader refuses it (its g is (1, 1, 16)): wnorm's reads it
    target = eco.build(name, seed=5)
    wnorm.load_state_dict(target, sd)
    torch.testing.assert_close(eco.output(name, target), eco.output(name, model),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["wav2vec2", "hubert", "encodec", "dac", "hifigan"])
@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_state_dict_files_round_trip_into_the_models_own_load_state_dict(
    eco, tmp_path: Path, name: str, suffix: str
) -> None:
    model = eco.build(name)
    src = tmp_path / f"in{suffix}"
    if suffix == ".pt":
        torch.save(model.state_dict(), src)
    else:
        st.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(src))
    convert(src, tmp_path / f"wnorm{suffix}", "wnorm")
    for to in ("torch-old", "torch-new"):
        out = tmp_path / f"{to}{suffix}"
        convert(tmp_path / f"wnorm{suffix}", out, to)
        sd = torch.load(out, weights_only=True) if suffix == ".pt" else st.load_file(str(out))
        target = eco.build(name, seed=3)  # other weights: everything must come from the file
        target.load_state_dict(sd)  # PyTorch's strict loader (its hook renames _g/_v)
        assert torch.equal(eco.output(name, target), eco.output(name, model))


@pytest.mark.parametrize("name", ["dac", "hifigan"])
def test_plain_folder_of_apply_weight_norm_models_is_read_by_from_pretrained(
    eco, tmp_path: Path, name: str
) -> None:
    # DAC and SpeechT5HifiGan build plain layers and add weight norm in apply_weight_norm():
    # their from_pretrained reads plain weights, which --to plain writes
    model = eco.build(name)
    model.save_pretrained(tmp_path / "saved")
    convert(tmp_path / "saved", tmp_path / "plain", "plain")
    back, info = eco.model_class(name).from_pretrained(tmp_path / "plain",
                                                       output_loading_info=True)
    assert loaded_cleanly(info), info
    # w = g v/||v|| computed in float64 here, in float32 by PyTorch: equal up to rounding
    torch.testing.assert_close(eco.output(name, back.eval(), continuous=True),
                               eco.output(name, model, continuous=True), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- folders by hand
def folder(path: Path, sharded: bool = False, extra: dict[str, bytes] | None = None) -> Path:
    """A save_pretrained-like folder: a weight-normalized conv along dim 2 (g in one shard, v
    in another when sharded), a bias, config.json and ``extra`` files."""
    path.mkdir()
    torch.manual_seed(0)
    sd = {"conv.parametrizations.weight.original0": torch.rand(1, 1, 5) + 0.5,
          "conv.parametrizations.weight.original1": torch.randn(4, 2, 5),
          "conv.bias": torch.randn(4)}
    (path / "config.json").write_text('{"model_type": "toy"}\n')
    for name, data in (extra or {}).items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(data)
    if not sharded:
        st.save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
        return path
    shards = {"model-00001-of-00002.safetensors": ["conv.parametrizations.weight.original0"],
              "model-00002-of-00002.safetensors": ["conv.parametrizations.weight.original1",
                                                   "conv.bias"]}
    for name, keys in shards.items():
        st.save_file({k: sd[k] for k in keys}, str(path / name), metadata={"format": "pt"})
    index = {"metadata": {"total_size": 999}, "weight_map": {k: n for n, ks in shards.items()
                                                             for k in ks}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    return path


def listing(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def test_sharded_folder_keeps_each_key_in_its_shard_and_updates_the_index(tmp_path: Path) -> None:
    src = folder(tmp_path / "in", sharded=True)
    convert(src, tmp_path / "old", "torch-old")
    index = json.loads((tmp_path / "old" / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {"conv.weight_g": "model-00001-of-00002.safetensors",
                                   "conv.weight_v": "model-00002-of-00002.safetensors",
                                   "conv.bias": "model-00002-of-00002.safetensors"}
    out = tensors(tmp_path / "old")
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in out.values())
    assert out["conv.weight_g"].shape == (1, 1, 5)  # dim 2 kept across shards
    convert(src, tmp_path / "plain", "plain")
    plain = json.loads((tmp_path / "plain" / "model.safetensors.index.json").read_text())
    assert plain["weight_map"] == {"conv.weight": "model-00002-of-00002.safetensors",
                                   "conv.bias": "model-00002-of-00002.safetensors"}
    assert listing(tmp_path / "plain") == ["config.json", "model-00002-of-00002.safetensors",
                                           "model.safetensors.index.json"]


def test_other_files_are_copied_and_other_weight_formats_are_left_out_and_said(
    tmp_path: Path, capsys
) -> None:
    src = folder(tmp_path / "in", extra={"tokenizer.json": b"{}", "sub/notes.txt": b"hi",
                                         "pytorch_model.bin": b"stale pickle"})
    convert(src, tmp_path / "out", "wnorm")
    assert listing(tmp_path / "out") == ["config.json", "model.safetensors", "sub",
                                         "sub/notes.txt", "tokenizer.json"]
    assert (tmp_path / "out" / "sub" / "notes.txt").read_bytes() == b"hi"
    assert "not copied: ['pytorch_model.bin'] (weights in another format" in (
        capsys.readouterr().out)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "out" / "model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}


def refused(capsys, src: Path, dst: Path, match: str, *args: str) -> str:
    before = listing(src.parent)
    assert main(["convert", str(src), str(dst), "--to", "torch-old", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("wnorm: error: ") and match in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert listing(src.parent) == before  # nothing written, nothing left behind
    return err


def test_out_must_be_a_new_folder_outside_in(tmp_path: Path, capsys) -> None:
    src = folder(tmp_path / "in")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    refused(capsys, src, tmp_path / "full", "full: expected a new or empty folder; got a folder "
                                            "with files")
    refused(capsys, src, src / "inside", "inside: expected a folder outside the input folder")
    refused(capsys, src, src, "in: expected a folder outside the input folder")
    refused(capsys, src, tmp_path / "out.pt", "--key picks an entry of a .pt/.pth checkpoint",
            "--key", "model")
    (tmp_path / "file").write_text("x")
    refused(capsys, src, tmp_path / "file", "file: expected a new folder for the converted "
                                            "checkpoint")
    (tmp_path / "empty").mkdir()
    convert(src, tmp_path / "empty", "torch-old")  # an empty folder is taken
    assert (tmp_path / "empty" / "model.safetensors").exists()


def test_bad_folders_are_errors_naming_the_file(tmp_path: Path, capsys) -> None:
    both = folder(tmp_path / "both", sharded=True)
    st.save_file({"x": torch.ones(1)}, str(both / "model.safetensors"))
    refused(capsys, both, tmp_path / "o1", "holds both model.safetensors and "
                                           "model.safetensors.index.json")
    lost = folder(tmp_path / "lost", sharded=True)
    (lost / "model-00002-of-00002.safetensors").unlink()
    refused(capsys, lost, tmp_path / "o2", "index.json: names shard files the folder lacks: "
                                           "['model-00002-of-00002.safetensors']")
    wrong = folder(tmp_path / "wrong", sharded=True)
    (wrong / "model.safetensors.index.json").write_text('{"weight_map": []}')
    refused(capsys, wrong, tmp_path / "o3", "index.json: expected JSON with a 'weight_map'")
    bins = tmp_path / "bins"
    bins.mkdir()
    (bins / "pytorch_model.bin").write_bytes(b"x")
    refused(capsys, bins, tmp_path / "o4", "expected a transformers checkpoint folder "
                                           "(save_pretrained layout: model.safetensors, or shards "
                                           "named by model.safetensors.index.json, beside "
                                           "config.json); got only ['pytorch_model.bin']")
    noisy = folder(tmp_path / "noisy")
    (noisy / "model.safetensors").write_bytes(b"\x00" * 16)
    refused(capsys, noisy, tmp_path / "o5", "model.safetensors: not a readable safetensors file")
    bad_dim = folder(tmp_path / "dim")
    refused(capsys, bad_dim, tmp_path / "o6", "'conv.parametrizations.weight.original1': dim 3 "
                                              "is out of range", "--dim", "3")


def test_a_failed_write_leaves_no_folder_and_no_temporary(tmp_path: Path, capsys,
                                                          monkeypatch) -> None:
    src = folder(tmp_path / "in", sharded=True)
    calls = []

    def disk_full(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:  # the second shard: the first is already on disk
            raise OSError(28, "No space left on device")
        return real(tensors, path, metadata=metadata)

    real = st.save_file
    monkeypatch.setattr(st, "save_file", disk_full)
    err = refused(capsys, src, tmp_path / "out", "out: writing the folder failed (nothing "
                                                 "written); got [Errno 28] No space left")
    assert len(calls) == 2 and "Errno 28" in err


def test_a_bad_tensor_in_a_sharded_folder_names_the_folder_and_its_shard(tmp_path: Path,
                                                                         capsys) -> None:
    src = folder(tmp_path / "in", sharded=True)
    shard = src / "model-00002-of-00002.safetensors"
    sd = st.load_file(str(shard))
    sd["conv.parametrizations.weight.original1"][0, 0, 0] = float("nan")
    st.save_file(sd, str(shard), metadata={"format": "pt"})
    assert main(["convert", str(src), str(tmp_path / "out"), "--to", "plain"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"wnorm: error: {src}: 'conv.parametrizations.weight.original1'")
    assert err.strip().endswith("(in model-00002-of-00002.safetensors)")
    assert not (tmp_path / "out").exists()


def test_out_given_as_the_empty_current_folder_is_filled_in_place(tmp_path: Path, capsys,
                                                                  monkeypatch) -> None:
    # `mkdir out && cd out && wnorm convert ../in . --to wnorm` crashed with a traceback (Path(".")
    # has no name to put a temporary beside); renaming a new folder over the empty one would
    # leave the shell in a deleted folder that shows no files
    src = folder(tmp_path / "in", sharded=True)
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.chdir(out)
    convert(src, Path("."), "torch-old")
    assert listing(Path(".")) == listing(src)  # seen from inside the very folder
    assert os.path.samefile(".", out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]  # no temporary left
    v = tensors(src)["conv.parametrizations.weight.original1"]
    assert torch.equal(tensors(out)["conv.weight_v"], v)
    # a failure while filling it leaves it empty
    (tmp_path / "out2").mkdir()
    monkeypatch.chdir(tmp_path / "out2")
    monkeypatch.setattr(st, "save_file", lambda *a, **k: (_ for _ in ()).throw(OSError(28, "full")))
    refused(capsys, src, Path("."), "writing the folder failed (nothing written)")
    assert list(Path(".").iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out", "out2"]
