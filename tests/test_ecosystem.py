"""Models nobody here wrote: transformers' audio models (small configs, random weights), which
already use PyTorch's ``parametrizations.weight_norm`` (Wav2Vec2 and HuBERT along dim 2).

For each: fold leaves Parameters and the same outputs and touches only the model it is given;
adopting PyTorch's weight norm keeps outputs bit for bit and what the model's own
save_pretrained/from_pretrained reads (for DAC and HiFi-GAN, whose from_pretrained builds plain
layers, through a model the class builds), and lets the model's own remove_weight_norm() take it
off; every layer normalized + data_init + a training step; wnorm.load_state_dict both ways
between the original and the wnorm model.
"""

from __future__ import annotations

import copy
import re
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import wnorm
from wnorm._pytorch_wn import find
from wnorm._slot import slots

transformers = pytest.importorskip("transformers")
from ecosystem_models import (  # noqa: E402
    APPLIES_WEIGHT_NORM, NAMES, OWN_REMOVAL, build, example, model_class, output)

MODELS = NAMES
#: the models whose constructor builds their weight norm: their from_pretrained reads g and v
BUILT_NORMALIZED = [n for n in NAMES if n not in APPLIES_WEIGHT_NORM]


def run(name: str, model: nn.Module) -> torch.Tensor:
    """The model's main output, or a codec's encoder output (before the quantizer's argmin)."""
    return output(name, model, continuous=True)


def grad_output(name: str, model: nn.Module) -> torch.Tensor:
    """The same output with autograd recording, for a training step."""
    inputs = example(name)
    if name in ("encodec", "dac"):
        return model.encoder(inputs["input_values"])
    out = model(**inputs)
    return out.last_hidden_state if name in ("wav2vec2", "hubert") else out


def pytorch_normalized(model: nn.Module) -> int:
    return sum(len(find(m)) for m in model.modules())


@pytest.mark.parametrize("name", list(MODELS))
def test_fold_gives_parameters_and_the_same_outputs(name):
    model = build(name)
    assert pytorch_normalized(model) > 0
    y = run(name, model)
    plain_numel = sum(p.numel() for p in wnorm.fold(copy.deepcopy(model)).parameters())
    folded = wnorm.fold(copy.deepcopy(model))
    assert run(name, model).equal(y)  # the original still works, untouched
    assert pytorch_normalized(folded) == 0
    n_weights = sum(m.weight.numel() for m in folded.modules()
                    if isinstance(m, nn.modules.conv._ConvNd))
    assert plain_numel == sum(p.numel() for p in folded.parameters()) >= n_weights
    assert all(not m._buffers.get("weight") for m in folded.modules())
    torch.testing.assert_close(run(name, folded), y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(MODELS))
def test_adopting_pytorch_weight_norm_keeps_outputs_bit_for_bit(name):
    model = build(name)
    y = run(name, model)
    before = pytorch_normalized(model)
    dims = sorted(str(f.dim) for m in model.modules() for f in find(m))
    wnorm.apply(model, types=())  # adopt only: no other layer is touched
    assert pytorch_normalized(model) == 0 and sum(1 for _ in slots(model)) == before
    assert sorted(str(s.map.dim) for _, _, s in slots(model)) == dims
    assert run(name, model).equal(y)


def test_the_models_with_their_own_removal_are_the_ones_tested():
    assert OWN_REMOVAL == {n for n in MODELS if hasattr(model_class(n), "remove_weight_norm")}


@pytest.mark.parametrize("adopt_only", [True, False], ids=["adopted", "all"])
@pytest.mark.parametrize("name", sorted(OWN_REMOVAL))
def test_the_models_own_remove_weight_norm_leaves_plain_layers_with_the_same_outputs(
        name, adopt_only):
    """HiFi-GAN recipes call model.remove_weight_norm() before export: after adoption and a
    training step it leaves plain layers (no g, v, hook or parametrization) computing what the
    normalized model computed, bit for bit. (Every layer wnorm.apply selects in these models
    is one their apply_weight_norm() normalized.)"""
    model = build(name)
    held = {mname for mname, m in model.named_modules() if find(m)}
    wnorm.apply(model, types=()) if adopt_only else wnorm.apply(model)
    assert {mname for mname, _, _ in slots(model)} == held
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)  # g and v move apart from PyTorch's
    grad_output(name, model).float().square().mean().backward()
    opt.step()
    y, z = output(name, model), run(name, model)
    model.remove_weight_norm()
    assert output(name, model).equal(y) and run(name, model).equal(z)
    for mname in held:
        m = model.get_submodule(mname)
        assert type(m) in (nn.Conv1d, nn.ConvTranspose1d), mname
        assert not m._forward_pre_hooks and not wnorm.is_weight_normalized(m), mname
        assert sorted(n for n, _ in m.named_parameters()) == ["bias", "weight"], mname
    assert not any(k.endswith(("_g", "_v")) or "parametrizations" in k
                   for k in model.state_dict())


@pytest.mark.parametrize("name", BUILT_NORMALIZED)
def test_the_models_own_save_and_load_read_an_adopted_model(name, tmp_path):
    """After adopting, save_pretrained writes '<name>_g'/'<name>_v' keys (PyTorch's old API
    names), which the original class's from_pretrained loads into its parametrized layers."""
    model = build(name)
    y = run(name, model)
    wnorm.apply(model, types=())
    model.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = type(model).from_pretrained(tmp_path).eval()
    assert pytorch_normalized(again) == sum(1 for _ in slots(model))
    assert run(name, again).equal(y)


@pytest.mark.parametrize("name", sorted(APPLIES_WEIGHT_NORM))
def test_an_adopted_dac_or_hifigan_is_saved_through_a_model_the_class_builds(name, tmp_path):
    """DAC and SpeechT5HifiGan get their weight norm from apply_weight_norm() after
    construction: their from_pretrained builds plain layers and re-initializes the adopted
    ones saved as g and v (transformers only logs it). The README's recipe, the trained
    weights loaded into a model the class builds, saves what from_pretrained reads."""
    model = wnorm.apply(build(name), types=())
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    grad_output(name, model).float().square().mean().backward()
    opt.step()
    y = run(name, model.eval())
    model.save_pretrained(tmp_path / "adopted")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lost, info = type(model).from_pretrained(tmp_path / "adopted", output_loading_info=True)
    assert len(info["missing_keys"]) == sum(1 for _ in slots(model))  # each adopted weight
    assert not torch.allclose(run(name, lost.eval()), y)
    stock = type(model)(model.config)
    wnorm.load_state_dict(stock, model.state_dict())
    stock.save_pretrained(tmp_path / "stock")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = type(model).from_pretrained(tmp_path / "stock").eval()
    assert pytorch_normalized(again) == 0 and not any(wnorm.is_weight_normalized(m)
                                                      for m in again.modules())
    assert run(name, again).equal(y)


def test_the_readme_says_which_models_own_loader_reads_an_adopted_model():
    """The README named all five audio models as read back by their own from_pretrained after
    adopting; DAC and HiFi-GAN are not (the test above)."""
    readme = Path(__file__).resolve().parent.parent / "README.md"
    text = " ".join(readme.read_text().split())
    claim = re.search(r"After adopting only, `save_pretrained` writes `<name>_g`/`<name>_v`, "
                      r"which `from_pretrained` reads for ([^:.]+)[:.]", text)
    assert claim, "the README's transformers paragraph no longer limits the claim"
    shown = {"wav2vec2": "Wav2Vec2", "hubert": "HuBERT", "encodec": "EnCodec"}
    assert set(re.split(r", | and ", claim.group(1))) == {shown[n] for n in BUILT_NORMALIZED}


def test_a_folded_hifigan_saves_what_its_own_from_pretrained_reads(tmp_path):
    """SpeechT5HifiGan is built without weight norm (apply_weight_norm() adds it for
    training): fold before save_pretrained, and from_pretrained gives the same vocoder."""
    model = build("hifigan")
    wnorm.apply(model)
    wnorm.data_init(model, example("hifigan"))
    y = run("hifigan", model)
    wnorm.fold(model).save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = type(model).from_pretrained(tmp_path).eval()
    torch.testing.assert_close(run("hifigan", again), y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(MODELS))
def test_every_layer_normalized_then_data_init_and_a_training_step(name):
    model = build(name)
    wnorm.apply(model)
    assert pytorch_normalized(model) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # layers it cannot set (dim=2 pos conv) are reported
        # a codec's decoder runs on quantized codes, which a random codebook can map to one
        # code for the whole batch (sigma 0, an error): initialize the encoder on the audio
        target = model.encoder if name in ("encodec", "dac") else model
        report = wnorm.data_init(target.train(), (example(name)["input_values"],)
                                 if name in ("encodec", "dac") else example(name))
    assert report.initialized
    for r in report.skipped:
        assert r.reason
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss = grad_output(name, model).float().square().mean()
    loss.backward()
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("name", list(MODELS))
def test_load_state_dict_both_ways_between_original_and_wnorm_model(name):
    original, normalized = build(name, seed=1), build(name)
    wnorm.apply(normalized)
    y = run(name, original)
    wnorm.load_state_dict(normalized, original.state_dict())
    torch.testing.assert_close(run(name, normalized), y, rtol=1e-5, atol=1e-5)
    fresh = build(name)
    wnorm.load_state_dict(fresh, normalized.state_dict())
    torch.testing.assert_close(run(name, fresh), y, rtol=1e-5, atol=1e-5)


def test_readme_transformers_example(tmp_path, monkeypatch):
    from conftest import readme_example

    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(readme_example("transformers"), "README transformers example", "exec"),
             scope)
    model, again = scope["model"].eval(), scope["again"].eval()
    assert sum(1 for _ in slots(model)) == 1 and pytorch_normalized(model) == 0
    assert pytorch_normalized(again) == 1  # the class's own parametrized pos_conv_embed
    x = torch.randn(2, 800, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(x).last_hidden_state, again(x).last_hidden_state)


def test_a_codec_decoder_fed_one_code_is_blamed_on_what_feeds_it_not_the_batch():
    # a fresh EnCodec's quantizer maps the whole batch to one code, so its decoder's first conv
    # sees a constant input: the error says so and how to go on, and leaves the model as it was
    model = wnorm.apply(build("encodec"))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(wnorm.WnormError, match=r"^decoder\.layers\.0\.conv \(Conv1d\): every "
                       r"one of its 16 units has the same pre-activation .* its input, computed by "
                       r"the model, does not vary on the batch: what comes before this layer "
                       r"makes it constant .*data_init\(model\.encoder"):
        wnorm.data_init(model.train(), example("encodec"))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_layers_a_training_forward_drops_are_reported_with_the_way_to_reach_them():
    # wav2vec2's LayerDrop skips encoder layers at random in training mode (here always)
    model = build("wav2vec2")
    model.config.layerdrop = 1.0
    wnorm.apply(model)
    with pytest.warns(UserWarning, match=r"encoder\.layers\.0\..*model\.eval\(\)"):
        report = wnorm.data_init(model.train(), example("wav2vec2"))
    dropped = [r for r in report.skipped if r.name.startswith("encoder.layers.")]
    assert dropped and all("LayerDrop" in r.reason for r in dropped)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the dim=2 pos conv is still reported
        report = wnorm.data_init(model.eval(), example("wav2vec2"))
    assert not [r for r in report.skipped if r.name.startswith("encoder.layers.")]


@pytest.mark.parametrize("how", ["adopt", "apply"])
@pytest.mark.parametrize("name", list(MODELS))
def test_a_model_the_class_builds_takes_the_trained_weights_for_save_pretrained(
        name, how, tmp_path):
    """The README's recipe for a checkpoint the stock class reads, whatever wnorm normalized:
    load the trained state dict into a model the class builds, then save_pretrained. (Saving
    the wnorm model itself works only for adopt-only models: from_pretrained would re-init
    the Linears saved as g and v, and fold drops wav2vec2's parametrized pos conv.)"""
    model = build(name)
    wnorm.apply(model, types=()) if how == "adopt" else wnorm.apply(model)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    grad_output(name, model).float().square().mean().backward()
    opt.step()
    model.eval()
    y = run(name, model)
    stock = type(model)(model.config)
    wnorm.load_state_dict(stock, model.state_dict())
    stock.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = type(model).from_pretrained(tmp_path).eval()
    assert run(name, again).equal(y)


def test_gpt2s_conv1d_layers_are_initialized_by_data_init():
    # transformers' Conv1D (GPT-2's Linear, weight stored (in, out)) was skipped as having "no
    # per-unit pre-activation to standardize"; its features are last, as a Linear's
    tf = pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model = tf.GPT2Model(tf.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50,
                                       n_positions=16, bos_token_id=0, eos_token_id=0,
                                       attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)).eval()
    wnorm.apply(model, types=(Conv1D,))
    ids = torch.randint(1, 50, (8, 12))
    report = wnorm.data_init(model, ids)
    assert sorted(r.name for r in report.initialized) == [
        "h.0.attn.c_attn", "h.0.attn.c_proj", "h.0.mlp.c_fc", "h.0.mlp.c_proj"]
    mods = dict(model.named_modules())
    seen = {}
    hooks = [mods[n].register_forward_hook(lambda m, a, y, n=n: seen.setdefault(n, y))
             for n in ("h.0.attn.c_attn", "h.0.mlp.c_fc")]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    for name, y in seen.items():  # standardized per output unit over the batch
        flat = y.reshape(-1, y.shape[-1]).double()
        assert flat.mean(0).abs().max() < 1e-4 and (flat.std(0, correction=0) - 1).abs().max() \
            < 1e-4, name
