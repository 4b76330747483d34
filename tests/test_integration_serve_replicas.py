"""Replicas per Serve stage (infer.stages.<stage>.replicas): two replicas of each expert stage share the
requests, and the frames stay those of the single-replica pipeline."""

import glob
import io
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests
from conftest import tiny_config
from reference import wanpipeline_frames

from wanray.infer.request import GenerationParams
from wanray.model_files import TINY_BOUNDARY
from wanray.runtime import free_port

BODY = dict(
    prompt="a red circle moving left to right", height=64, width=48, num_frames=9, num_inference_steps=40, seed=3
)


def test_two_replicas_of_each_expert_stage_share_the_requests(tiny_model, ray_cluster):
    import ray
    from ray import serve

    from wanray.infer.serve import APP_NAME, start

    cfg = tiny_config(
        tiny_model,
        f"infer.port={free_port()}",
        "infer.stages.high.replicas=2",
        "infer.stages.low.replicas=2",
        "infer.max_queued=3",
    )
    started = time.time()
    url = start(cfg, str(tiny_model))
    try:
        status = serve.status().applications[APP_NAME].deployments
        assert {name: d.replica_states.get("RUNNING", 0) for name, d in status.items()} == {
            "text_encoder": 1,
            "high_noise_expert": 2,
            "low_noise_expert": 2,
            "vae_decoder": 1,
            "Ingress": 1,
        }
        health = requests.get(f"{url}/v1/health", timeout=30).json()
        assert health["stages"]["high"]["replicas"] == 2 and health["queue"]["capacity"] == 4  # (3 + 1) x 1
        bodies = [dict(BODY, seed=s) for s in range(4)]
        with ThreadPoolExecutor(4) as pool:
            answers = list(
                pool.map(
                    lambda b: requests.post(
                        f"{url}/v1/generate",
                        data=json.dumps({**b, "output": "frames"}),
                        headers={"content-type": "application/json"},
                        timeout=300,
                    ),
                    bodies,
                )
            )
        assert [a.status_code for a in answers] == [200] * 4
        for body, answer in zip(bodies, answers):
            ref = wanpipeline_frames(
                tiny_model,
                GenerationParams(**{**body, "negative_prompt": "", "guidance_scale": 4.0, "guidance_scale_2": 3.0}),
                TINY_BOUNDARY,
            )
            assert np.abs(np.load(io.BytesIO(answer.content)) - ref).max() <= 1e-4
        # Serve's access lines in each expert replica's log: both replicas of each stage ran requests
        logs = ray._private.worker._global_node.get_logs_dir_path()
        for stage in ("high_noise_expert", "low_noise_expert"):
            files = [
                p for p in glob.glob(f"{logs}/serve/replica_wanray_{stage}_*.log") if os.path.getmtime(p) >= started
            ]
            calls = [Path(p).read_text().count("CALL denoise OK") for p in files]
            assert len(calls) == 2 and all(n >= 1 for n in calls), (stage, calls)
    finally:
        serve.delete(APP_NAME)
        serve.shutdown()
