"""Anomaly maps: shape, resolution, blur."""

import torch

from patchcore.maps import anomaly_maps


def test_map_has_the_input_resolution():
    maps = anomaly_maps(torch.rand(2, 32, 32), (256, 256))
    assert maps.shape == (2, 256, 256)


def test_constant_scores_stay_constant():
    maps = anomaly_maps(torch.full((1, 28, 28), 3.5), (224, 224))
    assert torch.allclose(maps, torch.full_like(maps, 3.5), atol=1e-5)


def test_blur_spreads_a_single_hot_patch_like_a_gaussian_of_sigma_4():
    scores = torch.zeros(1, 32, 32)
    scores[0, 16, 16] = 1.0
    blurred = anomaly_maps(scores, (256, 256))[0]
    sharp = anomaly_maps(scores, (256, 256), sigma=0)[0]
    # Blurring keeps the total mass (away from borders) and lowers the peak.
    assert abs(float(blurred.sum() - sharp.sum())) < 1e-3 * float(sharp.sum())
    assert float(blurred.max()) < float(sharp.max())
    # The peak stays where the hot patch is: patch 16 of 32 covers pixels 128..135.
    row, col = divmod(int(blurred.argmax()), 256)
    assert 124 <= row <= 136 and 124 <= col <= 136
    # Variance along a row grows by sigma^2 = 16 px^2 over the unblurred profile.
    positions = torch.arange(256, dtype=torch.float64)
    def variance(profile):
        weights = profile.double() / profile.double().sum()
        mean = (weights * positions).sum()
        return float((weights * (positions - mean) ** 2).sum())
    assert abs(variance(blurred.sum(0)) - variance(sharp.sum(0)) - 16.0) < 0.5


def test_map_equals_interpolation_then_torchvisions_gaussian_blur():
    import torch.nn.functional as F
    from torchvision.transforms.v2.functional import gaussian_blur

    scores = torch.rand(3, 28, 32, generator=torch.Generator().manual_seed(0))
    upsampled = F.interpolate(scores[:, None], size=(224, 224), mode="bilinear", align_corners=False)
    expected = gaussian_blur(upsampled, kernel_size=[33, 33], sigma=[4.0, 4.0])[:, 0]
    assert torch.allclose(anomaly_maps(scores, (224, 224)), expected, atol=1e-5)


def test_a_non_square_map_equals_interpolation_then_torchvisions_gaussian_blur():
    # The aspect and tile modes: a 12 x 50 grid to a 96 x 400 input, each axis its own matrix.
    import torch.nn.functional as F
    from torchvision.transforms.v2.functional import gaussian_blur

    scores = torch.rand(2, 12, 50, generator=torch.Generator().manual_seed(1))
    upsampled = F.interpolate(scores[:, None], size=(96, 400), mode="bilinear", align_corners=False)
    expected = gaussian_blur(upsampled, kernel_size=[33, 33], sigma=[4.0, 4.0])[:, 0]
    maps = anomaly_maps(scores, (96, 400))
    assert maps.shape == (2, 96, 400)
    assert torch.allclose(maps, expected, atol=1e-5)


def _paper_gaussian(sigma: float = 4.0, radius: int = 16) -> torch.Tensor:
    """The paper's blur written out here, not taken from maps.py: taps exp(-x^2 / 2 sigma^2), summing to 1."""
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    taps = torch.exp(-(x**2) / (2 * sigma**2))
    return taps / taps.sum()


def test_map_equals_a_direct_float64_upsample_and_sigma_4_blur():
    # Independent of maps.py and of torchvision: upsample bilinearly, mirror the borders, then
    # convolve with a 33 x 33 sigma-4 Gaussian (separable, so the outer product of two 1-D ones).
    import torch.nn.functional as F

    scores = torch.rand(2, 9, 13, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    upsampled = F.interpolate(scores[:, None], size=(72, 104), mode="bilinear", align_corners=False)
    taps = _paper_gaussian()
    kernel = (taps[:, None] * taps[None, :])[None, None]  # (1, 1, 33, 33)
    expected = F.conv2d(F.pad(upsampled, (16, 16, 16, 16), mode="reflect"), kernel)[:, 0]
    maps = anomaly_maps(scores.float(), (72, 104))
    assert maps.shape == expected.shape == (2, 72, 104)
    assert float((maps.double() - expected).abs().max()) < 1e-5
    # The same blur at sigma 3 differs by far more than that: the comparison pins sigma.
    taps3 = _paper_gaussian(3.0, 12)
    blur3 = F.conv2d(F.pad(upsampled, (12, 12, 12, 12), mode="reflect"), (taps3[:, None] * taps3[None, :])[None, None])[:, 0]
    assert float((blur3 - expected).abs().max()) > 1e-3
