"""Outpainting: canvas geometry, window schedule, the jitted per-window sampler and the video pipeline."""
