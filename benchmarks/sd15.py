"""Stable Diffusion 1.5's UNet config (diffusers' ``unet/config.json`` of runwayml/stable-diffusion-v1-5, the keys
that differ from ``UNet2DConditionModel``'s defaults), for benchmarks that build a model of that shape with random
weights: nothing is downloaded."""

SD15_UNET = dict(
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768,
    attention_head_dim=8,
    layers_per_block=2,
    in_channels=4,
    out_channels=4,
    sample_size=64,  # latents of 512-px images
)


def scaled(scale: int = 1, **overrides) -> dict:
    """SD 1.5's UNet config with every width divided by ``scale`` (1: the real one) and ``overrides`` applied."""
    return {**SD15_UNET, "block_out_channels": tuple(c // scale for c in SD15_UNET["block_out_channels"]), **overrides}
