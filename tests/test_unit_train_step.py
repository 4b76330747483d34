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
    monkeypatch.setattr(
        loop,
        "draw_for",
        lambda batch, spec: FlowDraw(
            torch.zeros(batch.latents.shape[0]), torch.zeros(1), torch.zeros(1, dtype=bool), torch.zeros(1, dtype=bool)
        ),
    )
    spec = SimpleNamespace(
        cfg=tiny_config(tmp_path, "train.clip_grad=0"),
        empty_prompt=torch.zeros(4, 8),
        contract=SimpleNamespace(text_tokens=4),
    )
    model = Toy()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 if step == 0 else 0.5)
    batches = [
        Batch(torch.zeros(2, 16, 1, 2, 2), torch.zeros(2, 4, 8)),
        Batch(torch.zeros(1, 16, 3, 2, 2), torch.zeros(1, 4, 8)),
    ]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        trainer = loop.ExpertTrainer(spec, torch.device("cpu"), model, [model.p], optimizer, schedule)
        result = trainer.step(StepData(0, 0, batches, samples=3))
    finally:
        dist.destroy_process_group()
    loss = result.loss
    assert result.lr == 1.0 and schedule.get_last_lr() == [0.5]  # the step's own rate, not the next step's
    assert abs(float(loss) - (3 * 2 + 2 * 1) / 3) < 1e-6  # not (3 + 2) / 2, the mean of the micro-batch means
    assert abs(float(model.p) - (1 - 8 / 3)) < 1e-6  # and the gradient is that mean's


def test_ti2v_clips_trained_as_image_to_video_keep_their_first_frame_clean_at_timestep_0_and_out_of_the_loss(tmp_path):
    """As WanImageToVideoPipeline(expand_timesteps=True) samples a given image: x_t's first latent frame is
    the clean latent, its tokens get timestep 0 (the others t), and the loss covers the noised frames only."""
    from wanray.model_files import write_tiny_checkpoint
    from wanray.models import read_contract
    from wanray.sections import ModelConfig
    from wanray.train.flow import draw_flow

    contract = read_contract(write_tiny_checkpoint(tmp_path / "ti2v", kind="ti2v-5b"), ModelConfig())
    seen = {}

    def model(hidden_states, timestep, encoder_hidden_states, return_dict):
        seen.update(x=hidden_states, t=timestep)
        return (torch.zeros_like(hidden_states),)

    x0 = torch.randn(2, 48, 3, 4, 6)  # (F=3) x (4/2) x (6/2) = 18 tokens per clip
    draw = draw_flow(tuple(x0.shape), "high", contract, 5.0, 0.0, seed=3)
    draw.first_frame = torch.tensor([True, False])
    spec = SimpleNamespace(cfg=tiny_config(tmp_path), contract=contract)
    loss = loop.flow_loss(model, Batch(x0, torch.zeros(2, 4, 32)), draw, torch.zeros(4, 32), spec, torch.device("cpu"))
    s = (draw.timesteps / 1000).view(-1, 1, 1, 1, 1)
    xt, target = (1 - s) * x0 + s * draw.noise, draw.noise - x0
    assert torch.equal(seen["x"][0, :, 0], x0[0, :, 0]) and torch.allclose(seen["x"][0, :, 1:], xt[0, :, 1:])
    assert torch.allclose(seen["x"][1], xt[1])  # the other clip trains text to video
    assert seen["t"].shape == (2, 18) and torch.equal(seen["t"][0, :6], torch.zeros(6))
    assert torch.equal(seen["t"][0, 6:], draw.timesteps[0].expand(12)) and torch.equal(
        seen["t"][1], draw.timesteps[1].expand(18)
    )
    expected = ((target[0, :, 1:] ** 2).mean() + (target[1] ** 2).mean()) / 2
    assert torch.allclose(loss, expected)
    # the draw decides which clips: train.image_condition 1 and 0 give all and none
    assert draw_flow(tuple(x0.shape), "high", contract, 5.0, 0.0, 3, image_condition=1.0).first_frame.all()
    assert not draw_flow(tuple(x0.shape), "high", contract, 5.0, 0.0, 3, image_condition=0.0).first_frame.any()


def test_compiled_blocks_train_the_eager_step_and_compile_once_per_shape(tiny_model, tmp_path):
    """train.compile: each block compiled before FSDP2 shards it (one rank, gloo). Two steps of the same shape give
    the eager run's losses and updated weights (1e-4) and compile the blocks' graph once; a new shape once more.
    Backend aot_eager (dynamo's capture and guards, AOTAutograd's joint forward and backward; no code generation)."""
    from torch._dynamo.utils import counters

    from wanray.models import read_contract

    def run(*sets: str):
        cfg = tiny_config(tiny_model, "train.lr=1e-3", *sets)
        spec = loop.LoopSpec(
            cfg, "high", str(tiny_model), read_contract(tiny_model, cfg.model), None, "native", torch.zeros(3, 32), ""
        )
        trainer = loop.ExpertTrainer.build(spec, torch.device("cpu"), fresh=True)
        gen = torch.Generator().manual_seed(0)
        losses, graphs = [], []
        for k, frames in enumerate((3, 3, 2)):
            batch = Batch(torch.randn(1, 16, frames, 8, 8, generator=gen), torch.randn(1, 512, 32, generator=gen))
            batch.index = k
            losses.append(float(trainer.step(StepData(0, k, [batch], samples=1)).loss))
            graphs.append(counters["stats"]["unique_graphs"])
        return losses, graphs, {n: p.full_tensor().clone() for n, p in trainer.model.named_parameters()}

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        eager, _, weights = run()
        torch._dynamo.reset()
        counters.clear()
        compiled, graphs, compiled_weights = run("train.compile=true", "train.compile_backend=aot_eager")
    finally:
        torch._dynamo.reset()
        dist.destroy_process_group()
    assert all(abs(a - b) <= 1e-4 for a, b in zip(eager, compiled)) and len(set(eager)) == 3
    assert all(torch.allclose(weights[n], compiled_weights[n], atol=1e-4) for n in weights)
    assert graphs[0] == graphs[1] >= 1 and graphs[2] == graphs[1] + 1


def test_float8_training_swaps_the_block_linears_on_meta_and_is_refused_off_cuda(monkeypatch, tmp_path):
    """train.float8: the blocks' Linear layers become torchao Float8Linear with FSDP2's float8 all-gather (a module
    swap, here on the meta device at the A14B's dimensions: no float8 GPU here), the rest as it was; off CUDA, in
    float32 or with LoRA it is a one-line ConfigError naming what to change."""
    import pytest
    from conftest import ROOT

    from wanray import model_files
    from wanray.errors import ConfigError
    from wanray.models import block_linear
    from wanray.train.parallel import build_on_meta, convert_float8

    monkeypatch.syspath_prepend(str(ROOT / ".venv" / "extras"))  # the fp8 extra (scripts/setup.sh --with-test-deps)
    model_dir = model_files.write_config_dir(tmp_path / "a14b", {**model_files.A14B_TRANSFORMER, "num_layers": 2})
    model = build_on_meta(model_dir, "high")
    chosen = {n for n, m in model.named_modules() if block_linear(m, n)}
    assert convert_float8(model) == len(chosen) == 20
    swapped = {n for n, m in model.named_modules() if type(m).__name__ == "Float8Linear"}
    assert swapped == chosen and model.blocks[0].attn1.to_q.config.enable_fsdp_float8_all_gather
    assert type(model.proj_out).__name__ == "Linear"
    for sets, message in (
        ([], "train.worker is cpu in float32"),
        (["train.worker.device=cuda"], "train.worker is cuda in float32"),
        (["train.worker.device=npu", "train.worker.dtype=bfloat16"], r"NPU: torch_npu has no float8 training"),
        (["train.worker.device=cuda", "train.worker.dtype=bfloat16", "train.lora.enabled=true"], "with train.lora"),
    ):
        with pytest.raises(ConfigError, match=message):
            tiny_config(tmp_path, "train.float8=true", *sets)
    tiny_config(tmp_path, "train.float8=true", "train.worker.device=cuda", "train.worker.dtype=bfloat16")
