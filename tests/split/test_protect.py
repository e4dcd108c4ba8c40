"""Activation noise and per-sample gradient clipping: hand-worked values, and hooked into a split step."""

from __future__ import annotations

import copy

import pytest
import torch

from fedtune.split import cut_model, split_step
from fedtune.split.protect import (
    ProtectConfig,
    add_activation_noise,
    channel_mad,
    channel_std,
    clip_and_noise_gradients,
    protect_parts,
    sample_rms,
    token_mad,
    token_rms,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_clipping_scales_large_samples_to_c_and_leaves_small_ones():
    # Prepare: sample 0 is a 3-4-5 triangle (norm 5), sample 1 has norm 0.5
    g = torch.zeros(2, 2, 3)
    g[0, 0, 0], g[0, 1, 2] = 3.0, 4.0
    g[1, 1, 1] = 0.5
    # Execute
    out = clip_and_noise_gradients(g, clip_norm=1.0, noise_multiplier=0.0, generator=_gen())
    # Assert: 5 -> scaled by 1/5; 0.5 <= C -> unchanged; noise off -> exact
    expected = torch.zeros(2, 2, 3)
    expected[0, 0, 0], expected[0, 1, 2] = 3.0 / 5, 4.0 / 5
    expected[1, 1, 1] = 0.5
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-7)
    assert out.flatten(1).norm(dim=1).tolist() == pytest.approx([1.0, 0.5])


def test_clipping_bounds_every_sample_norm_and_keeps_zero_gradients_zero():
    g = torch.randn(8, 5, 7, generator=_gen(3)) * torch.linspace(0, 4, 8).view(-1, 1, 1)  # sample 0 all-zero
    out = clip_and_noise_gradients(g, clip_norm=2.0, noise_multiplier=0.0, generator=_gen())
    norms = out.flatten(1).norm(dim=1)
    assert bool((norms <= 2.0 + 1e-6).all())
    assert norms[0] == 0
    # clipping only rescales: the direction of every sample is kept
    cos = torch.nn.functional.cosine_similarity(out[1:].flatten(1), g[1:].flatten(1), dim=1)
    torch.testing.assert_close(cos, torch.ones(7))


def test_gradient_noise_has_std_multiplier_times_c_and_is_seeded():
    g = torch.zeros(4, 50, 100)  # nothing to clip: the output is the noise alone
    out = clip_and_noise_gradients(g, clip_norm=0.5, noise_multiplier=2.0, generator=_gen(7))
    again = clip_and_noise_gradients(g, clip_norm=0.5, noise_multiplier=2.0, generator=_gen(7))
    assert torch.equal(out, again)
    assert float(out.std()) == pytest.approx(2.0 * 0.5, rel=0.02)  # 20,000 draws: ~0.5% error


def test_activation_noise_is_relative_to_each_samples_rms_over_valid_positions():
    # Prepare: sample 0 is all 3s (RMS 3); sample 1 is 1s on 2 valid positions and 100s on padding
    h = torch.full((2, 4, 256), 3.0)
    h[1, :2], h[1, 2:] = 1.0, 100.0
    valid = torch.tensor([4, 2])
    # Execute
    rms = sample_rms(h, valid)
    noised = add_activation_noise(h, 0.5, _gen(1), valid)
    # Assert: padding does not inflate the scale; noise std = sigma * RMS
    assert rms.tolist() == pytest.approx([3.0, 1.0])
    noise = noised - h
    assert float(noise[0].std()) == pytest.approx(0.5 * 3.0, rel=0.05)
    assert float(noise[1].std()) == pytest.approx(0.5 * 1.0, rel=0.05)
    assert torch.equal(noised, add_activation_noise(h, 0.5, _gen(1), valid))
    assert add_activation_noise(h, 0.0, _gen(1)) is h


def _plus_minus(n: int) -> torch.Tensor:
    """n values alternating +1, -1: mean 0, std 1 (population), median absolute deviation 1."""
    return torch.tensor([1.0, -1.0]).repeat(n // 2)


def test_channel_scale_gives_each_channel_noise_of_its_own_std():
    # Prepare: channel c alternates +-s_c over positions, s = (1, 1, 100, 1); padding holds 1e4s
    s = torch.tensor([1.0, 1.0, 100.0, 1.0])
    h = (_plus_minus(2000).view(1, 2000, 1) * s).repeat(2, 1, 1)
    h[1, 1000:] = 1e4
    valid = torch.tensor([2000, 1000])
    # Execute
    noised = add_activation_noise(h, 0.5, _gen(1), valid, scale="channel")
    # Assert: std_c = s_c exactly, padding left out; the huge channel's noise does not spill over
    torch.testing.assert_close(channel_std(h, valid), s.view(1, 1, 4))
    noise_std = (noised - h)[0].std(dim=0)  # 2,000 draws per channel: ~1.6% error
    assert noise_std.tolist() == pytest.approx((0.5 * s).tolist(), rel=0.1)
    assert float(sample_rms(h[:1]).squeeze()) == pytest.approx(50.0, rel=0.01)  # what "sample" would use


def test_channel_mad_ignores_one_outlier_position_that_inflates_the_std():
    # Prepare: every channel alternates +-1, but position 0 (an attention sink) holds 1000 in channel 0
    h = _plus_minus(100).view(1, 100, 1).repeat(1, 1, 3)
    h[0, 0, 0] = 1000.0
    # Execute
    std, mad = channel_std(h), channel_mad(h)
    # Assert: the MAD is 1 * 1.4826 in every channel; the std of channel 0 is ~sqrt(1000^2 / 100) = 100
    torch.testing.assert_close(mad, torch.full((1, 1, 3), 1.4826))
    assert float(std[0, 0, 0]) == pytest.approx(100.0, rel=0.01)
    assert std[0, 0, 1:].tolist() == pytest.approx([1.0, 1.0])


def test_token_scales_are_each_positions_own_rms_and_robust_std():
    # Prepare: position 0 is all 2s (RMS 2); position 1 alternates +-1 with one channel at 300
    h = torch.zeros(1, 2, 1000)
    h[0, 0] = 2.0
    h[0, 1] = _plus_minus(1000)
    h[0, 1, 0] = 300.0
    # Execute
    rms, mad = token_rms(h), token_mad(h)
    noised = add_activation_noise(h, 0.5, _gen(4), scale="token")
    # Assert: RMS of position 1 = sqrt((999 + 300^2) / 1000) ~ 9.5, its MAD ignores the outlier channel;
    # a constant vector has no spread, so its robust std is 0
    torch.testing.assert_close(rms.flatten(), torch.tensor([2.0, ((999 + 300.0**2) / 1000) ** 0.5]))
    torch.testing.assert_close(mad.flatten(), torch.tensor([0.0, 1.4826]))
    noise_std = (noised - h)[0].std(dim=1)  # 1,000 draws per position: ~2% error
    assert noise_std.tolist() == pytest.approx((0.5 * rms.flatten()).tolist(), rel=0.1)


def test_sample_scale_is_the_default_and_unknown_scales_are_rejected():
    h = torch.randn(2, 5, 8, generator=_gen(5))
    assert torch.equal(
        add_activation_noise(h, 1.0, _gen(6)), add_activation_noise(h, 1.0, _gen(6), scale="sample")
    )
    assert ProtectConfig().activation_scale == "sample"
    with pytest.raises(ValueError, match="activation_scale must be one of"):
        ProtectConfig(activation_sigma=1.0, activation_scale="per_channel")


def test_activation_noise_passes_gradients_through_unchanged():
    h = torch.randn(2, 3, 8, generator=_gen(2), requires_grad=True)
    (add_activation_noise(h, 1.0, _gen(3)) * 2.0).sum().backward()
    assert h.grad is not None
    torch.testing.assert_close(h.grad, torch.full_like(h, 2.0))


def test_config_rejects_noise_without_a_clip_bound():
    with pytest.raises(ValueError, match="needs grad_clip_norm"):
        ProtectConfig(grad_noise_multiplier=1.0)
    with pytest.raises(ValueError, match="activation_sigma"):
        ProtectConfig(activation_sigma=-0.1)


def _step_with(lora_pair, batch, config: ProtectConfig):
    _, model = lora_pair("llama")
    head, trunk, tail = cut_model(model, 2, 2)
    with protect_parts(head, tail, config):
        result = split_step(head, trunk, tail, batch)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return result, grads


def test_protection_off_gives_the_plain_split_step(lora_pair, batch):
    plain, plain_grads = _step_with(lora_pair, batch, ProtectConfig())
    off, off_grads = _step_with(lora_pair, batch, ProtectConfig(activation_sigma=0.0, seed=5))
    assert off.loss == plain.loss
    for a, b in zip(plain.crossings, off.crossings, strict=True):
        assert a.route == b.route and all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    assert plain_grads.keys() == off_grads.keys()
    assert all(torch.equal(plain_grads[n], off_grads[n]) for n in plain_grads)


def test_protection_changes_exactly_what_crosses(lora_pair, batch):
    # Prepare
    clean, _ = _step_with(lora_pair, batch, ProtectConfig())
    config = ProtectConfig(activation_sigma=0.5, grad_clip_norm=1e-4, grad_noise_multiplier=0.0)
    # Execute
    noised, grads = _step_with(lora_pair, batch, config)
    # Assert: h1 differs by noise of about sigma * RMS; the loss moves; training still reaches the head
    h1_clean = clean.crossings[0].tensors["hidden"].detach()
    h1_noised = noised.crossings[0].tensors["hidden"].detach()
    assert not torch.equal(h1_clean, h1_noised)
    ratio = float((h1_noised - h1_clean).pow(2).mean().sqrt() / sample_rms(h1_clean).mean())
    assert ratio == pytest.approx(0.5, rel=0.2)
    assert noised.loss != clean.loss
    # the gradient sent to the server is the clipped one, per sample
    sent = noised.crossings[2].tensors["grad"]
    assert noised.crossings[2].route == "tail->trunk"
    assert bool((sent.flatten(1).norm(dim=1) <= 1e-4 * (1 + 1e-5)).all())
    assert any("layers.0." in n and "lora_" in n for n in grads)


def test_protection_is_reproducible_and_removable(lora_pair, batch):
    config = ProtectConfig(activation_sigma=1.0, grad_clip_norm=1.0, grad_noise_multiplier=0.5, seed=3)
    first, _ = _step_with(lora_pair, batch, config)
    second, _ = _step_with(lora_pair, batch, copy.copy(config))
    assert first.loss == second.loss
    assert torch.equal(first.crossings[2].tensors["grad"], second.crossings[2].tensors["grad"])
    # after the context manager the parts are plain again
    _, model = lora_pair("llama")
    head, _, _ = cut_model(model, 2, 2)
    with protect_parts(head, None, config):
        pass
    valid = batch["valid"]
    assert torch.equal(head(batch["input_ids"], valid), head(batch["input_ids"], valid))


def test_a_channel_scale_from_the_prompt_noises_single_position_decode_steps(lora_pair, batch):
    # Prepare: a decode step sends one position per sample, and a std over one position is 0
    _, model = lora_pair("llama")
    head, _, _ = cut_model(model, 2, 2)
    ids, valid = batch["input_ids"][:1], batch["valid"][:1]
    n = int(valid[0])
    config = ProtectConfig(activation_sigma=1.0, activation_scale="channel")

    def prompt_then_step() -> torch.Tensor:
        cache = head.new_cache()
        head(ids[:, : n - 1], valid - 1, cache=cache)
        return head(ids[:, n - 1 : n], valid, cache=cache)

    # Execute
    with protect_parts(head, None, config) as protection:
        with pytest.raises(ValueError, match="more than one position"):
            head(ids[:, :1], torch.tensor([1]))  # no estimate yet: refused rather than sent un-noised
        noised_step = prompt_then_step()
        prompt_scale = protection._batch_scale
    plain_step = prompt_then_step()
    # Assert: the step reused the prompt's (non-zero) per-channel estimate and was noised with it
    assert prompt_scale is not None and bool((prompt_scale > 0).all())
    assert not torch.equal(noised_step, plain_step)
