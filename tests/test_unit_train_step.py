"""One optimizer step's loss over micro-batches of different sizes (buckets): the mean over its clips."""
from types import SimpleNamespace

import torch
import torch.distributed as dist

from conftest import tiny_config
from wanray.runtime import free_port
from wanray.train import loop
from wanray.train.data import Batch, StepData
from wanray.train.flow import FlowDraw


class Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.p = torch.nn.Parameter(torch.ones(()))

    def set_requires_gradient_sync(self, on: bool) -> None:
        pass


def test_the_step_loss_is_the_mean_over_its_clips_whatever_the_micro_batch_sizes(monkeypatch, tmp_path):
    # each micro-batch's own mean loss is (its clip count + 1) x p: 3 for 2 clips, 2 for 1 clip
    monkeypatch.setattr(loop, "flow_loss", lambda model, batch, *_: model.p * (batch.latents.shape[0] + 1))
    monkeypatch.setattr(loop, "draw_for", lambda batch, spec: FlowDraw(torch.zeros(batch.latents.shape[0]),
                                                                       torch.zeros(1), torch.zeros(1, dtype=bool)))
    spec = SimpleNamespace(cfg=tiny_config(tmp_path, "train.clip_grad=0"))
    model = Toy()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    batches = [Batch(torch.zeros(2, 16, 1, 2, 2), torch.zeros(2, 4, 8)), Batch(torch.zeros(1, 16, 3, 2, 2),
                                                                           torch.zeros(1, 4, 8))]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        loss, _, _ = loop.train_step(model, [model.p], optimizer, schedule, StepData(0, 0, batches, samples=3),
                                     spec, torch.zeros(4, 8), torch.device("cpu"))
    finally:
        dist.destroy_process_group()
    assert abs(float(loss) - (3 * 2 + 2 * 1) / 3) < 1e-6  # not (3 + 2) / 2, the mean of the micro-batch means
    assert abs(float(model.p) - (1 - 8 / 3)) < 1e-6  # and the gradient is that mean's
