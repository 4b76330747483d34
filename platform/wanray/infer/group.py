"""Experts over several devices: Ulysses context parallelism inside one Serve replica or batch actor.

    this process (rank 0: the Serve replica or the batch actor) ──► ExpertRank actors 1 .. N-1
        denoise(expert, params, text, state) ─── the same call on every rank, in lockstep ───┐
        each rank: the whole expert, 1/N of every sample's tokens (diffusers' _cp_plan),      │
        the same scheduler steps on the same gathered model output                           │
        ◄── rank 0's DenoiseState goes on to the next stage ◄────────────────────────────────┘

The ranks form one process group (gloo on CPU, nccl on CUDA, hccl on NPU). Where the other ranks
run: a Serve expert stage's replica has a placement group of N bundles (`placement_group_bundles`),
so the N devices are reserved together and ranks 1 .. N-1 take bundles 1 .. N-1; a batch actor
comes from a Ray Data actor pool, which reserves one device per actor, so its ranks are placed on
the actor's own node (a node-affinity requirement: the collectives stay on the node's fabric) and
the actor waits for them at most RANKS_TIMEOUT_S. Everything else about a stage (its queue, the
hand-off of DenoiseState to the next stage) is unchanged: a group is one ExpertStage to the rest.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch

from wanray.devices import accelerator
from wanray.errors import ConfigError
from wanray.infer.request import (
    AgreedFailure,
    Cancelled,
    DenoiseState,
    GenerationParams,
    StageUnavailable,
    TextEmbeddings,
)
from wanray.infer.sampler import ExpertStage
from wanray.infer.spec import StageSpec

IN_STEP = (Cancelled, AgreedFailure)
"""What every rank raises at the same point: the group stays usable."""
RANKS_TIMEOUT_S = 600.0
"""How long a batch actor waits for its other ranks to be placed and load their experts."""
COLLECTIVE_TIMEOUT_S = 600.0
"""The group's collective timeout (init_process_group's; nccl's default, gloo's would be 30 minutes): how long a
rank waits in a collective that never pairs before gloo raises or the nccl / hccl watchdog ends the process."""


def _join(spec: StageSpec, expert: str, rank: int, world: int, store) -> None:
    from datetime import timedelta

    import torch.distributed as dist

    backend = accelerator(spec.resources[expert].device).dist_backend
    timeout = timedelta(seconds=COLLECTIVE_TIMEOUT_S)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)


def _store(host: str, port: int, world: int, master: bool):
    """The group's rendezvous: rank 0 hosts a TCPStore on a port the OS picks (port 0), the others join it."""
    from torch.distributed import TCPStore

    return TCPStore(host, port, world, master, wait_for_workers=False) if master else TCPStore(host, port, world, False)


class ExpertRank:
    """Rank 1 .. N-1 of a group (a Ray actor): the same experts as rank 0, on its own device."""

    def start(self, spec: StageSpec, experts: tuple[str, ...], rank: int, world: int, host: str, port: int) -> None:
        """Join rank 0's group and load the experts (not in __init__: rank 0 first waits for every rank to
        be placed, and joining blocks until all have joined)."""
        _join(spec, experts[0], rank, world, _store(host, port, world, master=False))
        self.stages = {e: ExpertStage(spec, e) for e in experts}

    def denoise(
        self,
        expert: str,
        params: GenerationParams,
        text: TextEmbeddings,
        state: DenoiseState | None,
        condition: torch.Tensor | None,
    ) -> None:
        self.stages[expert].denoise(params, text, state, condition)  # rank 0 returns the state


class RankGroup:
    """`experts` over `world` ranks: this process is rank 0, ranks 1 .. N-1 are ExpertRank actors
    started with `placement(rank)`'s Ray options (resources and scheduling strategy)."""

    def __init__(
        self,
        spec: StageSpec,
        experts: tuple[str, ...],
        world: int,
        placement: Callable[[int], dict],
        timeout_s: float | None = None,
    ):
        import ray

        host = ray.util.get_node_ip_address()
        store = _store(host, 0, world, master=True)
        self.ranks = [ray.remote(ExpertRank).options(**placement(r)).remote() for r in range(1, world)]
        if timeout_s is not None:  # the ranks may never be placed (no free device on the node): say so
            placed, _ = ray.wait(
                [r.__ray_ready__.remote() for r in self.ranks], num_returns=len(self.ranks), timeout=timeout_s
            )
            if len(placed) < len(self.ranks):
                for r in self.ranks:
                    ray.kill(r)
                raise ConfigError(
                    f"{len(self.ranks) - len(placed)} of the {world - 1} other ranks of a {world}-device "
                    f"group were not placed within {timeout_s:.0f} s: each needs the resources of "
                    "rank 0 free on its node"
                )
        started = [r.start.remote(spec, experts, i, world, host, store.port) for i, r in enumerate(self.ranks, 1)]
        _join(spec, experts[0], 0, world, store)  # returns once every rank has joined
        self.stages = {e: ExpertStage(spec, e) for e in experts}
        ray.get(started)  # a rank that failed to load fails here
        self.broken = ""
        """Why the ranks are out of step ("" while they are not): no request runs on them again."""

    def expert(self, name: str) -> GroupExpert:
        return GroupExpert(self, name)

    def fail(self, why: str) -> None:
        """One rank failed in a request while the others wait in a collective that will never pair (the next
        request's collectives would pair with it instead): kill the other ranks, which ends rank 0's wait on
        gloo (and on nccl / hccl, at the watchdog's COLLECTIVE_TIMEOUT_S), and refuse every later request. A
        Serve replica's health check then fails (ExpertDeployment.check_health), and Serve replaces it."""
        import ray

        if self.broken:
            return
        self.broken = why
        for r in self.ranks:
            ray.kill(r)


class GroupExpert:
    """One expert of a RankGroup, called like an ExpertStage: every rank runs the request in lockstep."""

    def __init__(self, group: RankGroup, name: str):
        self.group, self.name = group, name

    @property
    def should_stop(self):
        return self.group.stages[self.name].should_stop

    @should_stop.setter
    def should_stop(self, stop) -> None:  # rank 0 decides; every rank stops at the same step (ExpertStage._stopping)
        self.group.stages[self.name].should_stop = stop

    @property
    def broken(self) -> str:
        """Why the group's ranks are out of step ("" while they are not)."""
        return self.group.broken

    @property
    def adapters(self):
        """Rank 0's adapters (every rank loads and activates the same ones)."""
        return self.group.stages[self.name].adapters

    def denoise(
        self,
        params: GenerationParams,
        text: TextEmbeddings,
        state: DenoiseState | None = None,
        condition: torch.Tensor | None = None,
    ) -> DenoiseState:
        import ray

        group = self.group
        if group.broken:
            raise StageUnavailable(f"{self.name} expert's ranks are out of step ({group.broken}): the stage restarts")
        others = [r.denoise.remote(self.name, params, text, state, condition) for r in group.ranks]
        finished = threading.Event()
        threading.Thread(target=self._watch, args=(others, finished), daemon=True).start()
        try:
            out = group.stages[self.name].denoise(params, text, state, condition)
        except IN_STEP:  # the other ranks stopped at the same point: their exception is this one's
            ray.wait(others, num_returns=len(others))
            raise
        except Exception as e:
            group.fail(f"rank 0: {type(e).__name__}: {e}")
            raise RuntimeError(f"{self.name} expert's ranks are out of step ({group.broken})") from e
        finally:
            finished.set()
        try:
            ray.get(others)
        except Exception as e:
            group.fail(f"{type(e).__name__}: {e}")
            raise
        return out

    def _watch(self, others: list, finished: threading.Event) -> None:
        """While rank 0 runs the request: a rank that fails leaves rank 0 waiting in a collective, so fail the
        group (killing the ranks ends that wait). A rank's Cancelled or AgreedFailure is in step: rank 0 raises the
        same."""
        import ray

        pending = list(others)
        while pending and not finished.is_set():
            ready, pending = ray.wait(pending, num_returns=1, timeout=1.0)
            for ref in ready:
                try:
                    ray.get(ref)
                except IN_STEP:
                    pass
                except Exception as e:
                    self.group.fail(f"another rank: {type(e).__name__}: {str(e).splitlines()[0]}")
                    return


def ExpertGroup(spec: StageSpec, expert: str) -> GroupExpert:
    """A Serve expert stage over spec.devices[expert] devices, in the replica's placement group."""
    from ray.util import get_current_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    pg, options = get_current_placement_group(), spec.resources[expert].ray_options()

    def placement(rank: int) -> dict:
        return {
            **options,
            "scheduling_strategy": PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=rank),
        }

    return RankGroup(spec, (expert,), spec.devices[expert], placement).expert(expert)


def batch_group(spec: StageSpec, experts: tuple[str, ...], world: int, options: dict) -> RankGroup:
    """A batch actor's experts over `world` devices: its other ranks on its own node, `options` each."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node = ray.get_runtime_context().get_node_id()
    placement = lambda r: {**options, "scheduling_strategy": NodeAffinitySchedulingStrategy(node, soft=False)}
    return RankGroup(spec, experts, world, placement, RANKS_TIMEOUT_S)
