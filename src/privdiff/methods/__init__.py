"""Methods: short recipes composed of the shared stages (train a denoiser, sample)."""
