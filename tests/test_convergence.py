"""On a small problem with badly scaled layers, each *_sgg optimizer reaches at least its base's loss."""

import pytest

from llava_sgg.sgg_example import train


@pytest.mark.parametrize("base", ["adamw", "adafactor", "lamb"])
def test_sgg_reaches_at_least_the_base_loss_on_badly_scaled_layers(base):
    for seed in range(3):
        plain = train(base, steps=200, seed=seed).losses
        sgg = train(f"{base}_sgg", steps=200, seed=seed).losses
        assert sgg[-1] <= plain[-1], f"seed {seed}: {base}_sgg {sgg[-1]:.5f} vs {base} {plain[-1]:.5f}"
        assert plain[-1] < 0.5 * plain[0]  # both actually train
