"""Models nobody here wrote: transformers' audio models (small configs, random weights), which
already use PyTorch's ``parametrizations.weight_norm`` (Wav2Vec2 and HuBERT along dim 2).

For each: fold leaves Parameters and the same outputs and touches only the model it is given;
adopting PyTorch's weight norm keeps outputs bit for bit and what the model's own
save_pretrained/from_pretrained reads; every layer normalized + data_init + a training step;
wnorm.load_state_dict both ways between the original and the wnorm model.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import wnorm
from wnorm._pytorch_wn import find
from wnorm._reparam import slots

transformers = pytest.importorskip("transformers")


def _audio(batch: int = 2, n: int = 400) -> torch.Tensor:
    return torch.randn(batch, n, generator=torch.Generator().manual_seed(3))


def wav2vec2():
    c = transformers.Wav2Vec2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
        conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2)
    return transformers.Wav2Vec2Model(c), (_audio(),), lambda o: o.last_hidden_state


def hubert():
    c = transformers.HubertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
        conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2)
    return transformers.HubertModel(c), (_audio(),), lambda o: o.last_hidden_state


def hifigan():
    c = transformers.SpeechT5HifiGanConfig(
        model_in_dim=8, upsample_initial_channel=32, upsample_rates=[2, 2],
        upsample_kernel_sizes=[4, 4], resblock_kernel_sizes=[3], resblock_dilation_sizes=[[1, 3]])
    m = transformers.SpeechT5HifiGan(c)
    m.apply_weight_norm()
    spec = torch.randn(2, 10, 8, generator=torch.Generator().manual_seed(3))
    return m, (spec,), lambda o: o


class _Encoder(nn.Module):
    """The continuous part of a codec (its encoder): the quantizer's argmin would turn a
    rounding difference into another code."""

    def __init__(self, codec: nn.Module) -> None:
        super().__init__()
        self.codec = codec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.codec.encoder(x)


def encodec():
    c = transformers.EncodecConfig(num_filters=4, hidden_size=16, upsampling_ratios=[2, 2],
                                   codebook_size=16, num_lstm_layers=1, norm_type="weight_norm")
    return _Encoder(transformers.EncodecModel(c)), (_audio(2, 64)[:, None],), lambda o: o


def dac():
    c = transformers.DacConfig(encoder_hidden_size=4, downsampling_ratios=[2, 2],
                               decoder_hidden_size=16, n_codebooks=2, codebook_size=16,
                               codebook_dim=4, hidden_size=16)
    m = transformers.DacModel(c)
    m.apply_weight_norm()
    return _Encoder(m), (_audio(2, 64)[:, None],), lambda o: o


MODELS = {"wav2vec2": wav2vec2, "hubert": hubert, "hifigan": hifigan, "encodec": encodec,
          "dac": dac}


def build(name: str):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, args, out = MODELS[name]()
    return model.eval(), args, out


def run(model, args, out):
    with torch.no_grad():
        return out(model(*args))


def pytorch_normalized(model: nn.Module) -> int:
    return sum(len(find(m)) for m in model.modules())


@pytest.mark.parametrize("name", list(MODELS))
def test_fold_gives_parameters_and_the_same_outputs(name):
    model, args, out = build(name)
    assert pytorch_normalized(model) > 0
    y = run(model, args, out)
    plain_numel = sum(p.numel() for p in wnorm.fold(copy.deepcopy(model)).parameters())
    folded = wnorm.fold(copy.deepcopy(model))
    assert run(model, args, out).equal(y)  # the original still works, untouched
    assert pytorch_normalized(folded) == 0
    n_weights = sum(m.weight.numel() for m in folded.modules()
                    if isinstance(m, nn.modules.conv._ConvNd))
    assert plain_numel == sum(p.numel() for p in folded.parameters()) >= n_weights
    assert all(not m._buffers.get("weight") for m in folded.modules())
    torch.testing.assert_close(run(folded, args, out), y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(MODELS))
def test_adopting_pytorch_weight_norm_keeps_outputs_bit_for_bit(name):
    model, args, out = build(name)
    y = run(model, args, out)
    before = pytorch_normalized(model)
    dims = sorted(str(f.dim) for m in model.modules() for f in find(m))
    wnorm.apply(model, types=())  # adopt only: no other layer is touched
    assert pytorch_normalized(model) == 0 and sum(1 for _ in slots(model)) == before
    assert sorted(str(s.map.dim) for _, _, s in slots(model)) == dims
    assert run(model, args, out).equal(y)


@pytest.mark.parametrize("name", ["wav2vec2", "hubert"])
def test_the_models_own_save_and_load_read_an_adopted_model(name, tmp_path):
    """After adopting, save_pretrained writes '<name>_g'/'<name>_v' keys (PyTorch's old API
    names), which the original class's from_pretrained loads into its parametrized layers."""
    model, args, out = build(name)
    y = run(model, args, out)
    wnorm.apply(model, types=())
    model.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = type(model).from_pretrained(tmp_path).eval()
    assert pytorch_normalized(again) == sum(1 for _ in slots(model))
    assert run(again, args, out).equal(y)


def test_a_folded_hifigan_saves_what_its_own_from_pretrained_reads(tmp_path):
    """SpeechT5HifiGan is built without weight norm (apply_weight_norm() adds it for
    training): fold before save_pretrained, and from_pretrained gives the same vocoder."""
    model, args, out = build("hifigan")
    wnorm.apply(model)
    wnorm.data_init(model, args)
    y = run(model, args, out)
    wnorm.fold(model).save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = type(model).from_pretrained(tmp_path).eval()
    torch.testing.assert_close(run(again, args, out), y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(MODELS))
def test_every_layer_normalized_then_data_init_and_a_training_step(name):
    model, args, out = build(name)
    wnorm.apply(model)
    assert pytorch_normalized(model) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # layers it cannot set (dim=2 pos conv) are reported
        report = wnorm.data_init(model.train(), args)
    assert report.initialized
    for r in report.skipped:
        assert r.reason
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss = out(model(*args)).float().square().mean()
    loss.backward()
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("name", list(MODELS))
def test_load_state_dict_both_ways_between_original_and_wnorm_model(name):
    original, args, out = build(name)
    normalized, _, _ = build(name)
    wnorm.apply(normalized)
    with torch.no_grad():
        for p in original.parameters():  # other values than the twin's
            p.mul_(0.9)
    y = run(original, args, out)
    wnorm.load_state_dict(normalized, original.state_dict())
    torch.testing.assert_close(run(normalized, args, out), y, rtol=1e-5, atol=1e-5)
    fresh, _, _ = build(name)
    wnorm.load_state_dict(fresh, normalized.state_dict())
    torch.testing.assert_close(run(fresh, args, out), y, rtol=1e-5, atol=1e-5)
