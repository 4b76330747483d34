"""Inference: the two-stage sampler, its Ray Serve application, the REST API and video export."""
