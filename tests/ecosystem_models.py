"""Small random-weight transformers models that use PyTorch's weight norm, for ecosystem tests.

Factories only (no tests). Each model is built from a small config in well under a second
(importing transformers takes a few), in eval mode, with every parameter scaled by a random
factor so that g != ||v|| (a converter that dropped g would be caught). Call
``pytest.importorskip("transformers")`` before using them.

    model = build("wav2vec2")
    y = output("wav2vec2", model)            # the main output tensor on a fixed example input
    z = output("dac", build("dac"), continuous=True)  # a codec's encoder: before its argmin

``NAMES``: every model. ``APPLIES_WEIGHT_NORM``: the models whose weight norm is added by
``model.apply_weight_norm()`` after construction (DAC, SpeechT5HifiGan); their
``from_pretrained`` builds and reads plain weights. The others (Wav2Vec2, HuBERT, EnCodec)
build weight norm in ``__init__`` (Wav2Vec2/HuBERT's ``pos_conv_embed`` along dim 2), so
``from_pretrained`` reads g and v. ``OWN_REMOVAL``: the models with a ``remove_weight_norm()``
method of their own (DAC, SpeechT5HifiGan), which calls ``torch.nn.utils.remove_weight_norm``
on each layer ``apply_weight_norm()`` normalized (PyTorch's old API, whichever API put it on).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

NAMES = ("wav2vec2", "hubert", "encodec", "dac", "hifigan")
APPLIES_WEIGHT_NORM = frozenset({"dac", "hifigan"})
OWN_REMOVAL = frozenset({"dac", "hifigan"})


def config(name: str) -> Any:
    """The small transformers config of model ``name``."""
    import transformers as tf

    if name in ("wav2vec2", "hubert"):
        cls = tf.Wav2Vec2Config if name == "wav2vec2" else tf.HubertConfig
        return cls(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                   intermediate_size=37, conv_dim=(16, 16), conv_stride=(5, 2),
                   conv_kernel=(10, 3), num_conv_pos_embeddings=16,
                   num_conv_pos_embedding_groups=2)
    if name == "encodec":
        return tf.EncodecConfig(num_filters=4, hidden_size=16, upsampling_ratios=[2, 2],
                                codebook_size=16, num_lstm_layers=1, norm_type="weight_norm")
    if name == "dac":
        return tf.DacConfig(encoder_hidden_size=4, downsampling_ratios=[2, 2],
                            decoder_hidden_size=16, n_codebooks=2, codebook_size=16,
                            codebook_dim=4, hidden_size=16)
    if name == "hifigan":
        return tf.SpeechT5HifiGanConfig(model_in_dim=8, upsample_initial_channel=32,
                                        upsample_rates=[2, 2], upsample_kernel_sizes=[4, 4],
                                        resblock_kernel_sizes=[3],
                                        resblock_dilation_sizes=[[1, 3]])
    raise KeyError(f"unknown model {name!r}; expected one of {NAMES}")


def model_class(name: str) -> type[nn.Module]:
    import transformers as tf

    return {"wav2vec2": tf.Wav2Vec2Model, "hubert": tf.HubertModel, "encodec": tf.EncodecModel,
            "dac": tf.DacModel, "hifigan": tf.SpeechT5HifiGan}[name]


def build(name: str, seed: int = 0, weight_norm: bool = True) -> nn.Module:
    """Model ``name`` in eval mode, random weights from ``seed``, with PyTorch's weight norm
    (``weight_norm=False`` leaves DAC and SpeechT5HifiGan plain, as their constructor does)."""
    torch.manual_seed(seed)
    model = model_class(name)(config(name))
    if weight_norm and name in APPLIES_WEIGHT_NORM:
        model.apply_weight_norm()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1 + 0.2 * torch.rand(p.shape, generator=gen))
    return model.eval()


def example(name: str, seed: int = 0) -> dict[str, Tensor]:
    """Keyword arguments of one forward call of model ``name`` (batch of 2)."""
    gen = torch.Generator().manual_seed(seed)
    if name in ("wav2vec2", "hubert"):
        return {"input_values": torch.randn(2, 800, generator=gen)}
    if name in ("encodec", "dac"):
        return {"input_values": torch.randn(2, 1, 64, generator=gen)}
    if name == "hifigan":
        return {"spectrogram": torch.randn(2, 10, 8, generator=gen)}
    raise KeyError(f"unknown model {name!r}; expected one of {NAMES}")


def output(name: str, model: nn.Module, inputs: dict[str, Tensor] | None = None,
           continuous: bool = False) -> Tensor:
    """The main output tensor of ``model`` (no grad) on ``inputs`` (default: ``example(name)``):
    the last hidden state, the decoded audio or the waveform. ``continuous=True``: for the
    codecs (EnCodec, DAC), the encoder's output instead, before the quantizer, whose argmin
    turns a rounding difference into another code (compare with a tolerance only there)."""
    inputs = example(name) if inputs is None else inputs
    with torch.no_grad():
        if continuous and name in ("encodec", "dac"):
            return model.encoder(inputs["input_values"])
        out = model(**inputs)
    if name in ("wav2vec2", "hubert"):
        return out.last_hidden_state
    if name in ("encodec", "dac"):
        return out.audio_values
    return out
