"""A local "noisy web": synthetic, learnable image/alt-text pairs with ALIGN-style noise and
on-demand transport and decoding faults, served over real HTTP on 127.0.0.1."""

from align_ray.web.faults import EXPECTED_OUTCOME, FAULT_NAMES
from align_ray.web.noise import NOISE_KINDS
from align_ray.web.server import NoisyWeb
from align_ray.web.synth import jpeg_bytes, render, sample_spec

__all__ = ["EXPECTED_OUTCOME", "FAULT_NAMES", "NOISE_KINDS", "NoisyWeb", "jpeg_bytes", "render", "sample_spec"]
