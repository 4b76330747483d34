"""An expert stage over several devices: Ulysses context parallelism inside one Serve replica.

    Serve replica (rank 0, placement group bundle 0) ──► ExpertRank actors 1 .. N-1 (bundles 1 .. N-1)
        denoise(params, text, state) ─── the same call on every rank, in lockstep ───┐
        each rank: the whole expert, 1/N of every sample's tokens (diffusers' _cp_plan),  │
        the same scheduler steps on the same gathered model output                       │
        ◄── rank 0's DenoiseState goes on to the next stage ◄────────────────────────────┘

The ranks form one process group (gloo on CPU, nccl on CUDA, hccl on NPU) over the placement
group Serve reserves for the replica (`placement_group_bundles`), so the N devices of a stage are
scheduled together. Everything else about the stage (its queue, the hand-off of DenoiseState to
the next stage) is unchanged: the group is one ExpertStage to the rest of the application.
"""
from __future__ import annotations

import torch

from wanray.devices import accelerator
from wanray.infer.sampler import DenoiseState, ExpertStage, GenerationParams, StageSpec, TextEmbeddings


def _join(spec: StageSpec, expert: str, rank: int, world: int, store) -> None:
    import torch.distributed as dist

    backend = accelerator(getattr(spec.stages, expert).device).dist_backend
    dist.init_process_group(backend, store=store, rank=rank, world_size=world)


def _store(host: str, port: int, world: int, master: bool):
    """The group's rendezvous: rank 0 hosts a TCPStore on a port the OS picks (port 0), the others join it."""
    from torch.distributed import TCPStore

    return TCPStore(host, port, world, master, wait_for_workers=False) if master else TCPStore(host, port, world, False)


class ExpertRank:
    """Rank 1 .. N-1 of a multi-device expert stage (a Ray actor in the replica's placement group)."""

    def __init__(self, spec: StageSpec, expert: str, rank: int, world: int, host: str, port: int):
        _join(spec, expert, rank, world, _store(host, port, world, master=False))
        self.stage = ExpertStage(spec, expert)

    def denoise(self, params: GenerationParams, text: TextEmbeddings, state: DenoiseState | None,
                condition: torch.Tensor | None) -> None:
        self.stage.denoise(params, text, state, condition)  # rank 0 returns the state


class ExpertGroup:
    """Stage 2 or 3 over spec.devices[expert] devices: this process is rank 0 (the Serve replica), the
    others are ExpertRank actors placed in the replica's placement group bundles 1 .. N-1."""

    def __init__(self, spec: StageSpec, expert: str):
        import ray
        from ray.util import get_current_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        world = spec.devices[expert]
        host = ray.util.get_node_ip_address()
        store = _store(host, 0, world, master=True)
        group = get_current_placement_group()
        options = getattr(spec.stages, expert).ray_options()
        self.ranks = [ray.remote(ExpertRank).options(
            **options, scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=r))
            .remote(spec, expert, r, world, host, store.port) for r in range(1, world)]
        _join(spec, expert, 0, world, store)  # returns once every rank has joined
        self.stage = ExpertStage(spec, expert)
        ray.get([r.__ray_ready__.remote() for r in self.ranks])  # a rank that failed to start fails here

    def denoise(self, params: GenerationParams, text: TextEmbeddings, state: DenoiseState | None = None,
                condition: torch.Tensor | None = None) -> DenoiseState:
        import ray

        others = [r.denoise.remote(params, text, state, condition) for r in self.ranks]
        out = self.stage.denoise(params, text, state, condition)
        ray.get(others)
        return out
