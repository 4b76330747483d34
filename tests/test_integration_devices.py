"""The device Ray assigns, as Ray really sets it: fake GPUs and NPUs declared on the test cluster."""

import os

from wanray.devices import VISIBLE_DEVICES_ENV, assigned_device_index, ray_assigned_ids


def test_ray_actors_each_see_their_own_device_at_index_0(ray_cluster):
    """What Ray really sets: two actors holding one (fake) GPU or NPU each on one node. Indexing by
    local rank would send the second one to a device it cannot see."""
    import ray

    @ray.remote(num_cpus=0.01)
    class Probe:
        def device(self, kind):
            ids = ray_assigned_ids(kind)
            return ids, os.environ.get(VISIBLE_DEVICES_ENV[kind]), assigned_device_index(kind, os.environ, ids)

    for kind, opts in (("cuda", {"num_gpus": 1}), ("npu", {"resources": {"NPU": 1}})):
        probes = [Probe.options(**opts).remote() for _ in range(2)]
        seen = ray.get([p.device.remote(kind) for p in probes])
        assert sorted(s[0][0] for s in seen) == ["0", "1"], seen
        assert all(visible == ids[0] and index == 0 for ids, visible, index in seen), seen
        for p in probes:
            ray.kill(p)
