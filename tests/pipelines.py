"""Tiny random diffusers pipelines for the tests (built by ``fgds_engine.models.tiny_pipeline``)."""

from fgds_engine.models import tiny_pipeline


def tiny_sd_pipeline(folder=None, *, seed: int = 0):
    return tiny_pipeline("sd", seed=seed)


def tiny_unclip_pipeline(folder=None, *, seed: int = 0):
    return tiny_pipeline("unclip", seed=seed)
