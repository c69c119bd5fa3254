"""Training strategies without Ray: a DDP state saved mid-run resumes like an uninterrupted run."""

from __future__ import annotations

import pytest

from mmdc.config import TrainConfig
from mmdc.train.strategies import DDPStrategy
from mmdc.train.worker import optimizer_and_schedule


class _TinyLM:
    """Factory for a model whose forward(**batch) returns an object with .loss, as HF models do."""

    @staticmethod
    def make(seed: int):
        import torch

        class Model(torch.nn.Module):
            def __init__(self):
                super().__init__()
                torch.manual_seed(seed)
                self.frozen = torch.nn.Linear(4, 4)
                self.head = torch.nn.Linear(4, 1)
                self.frozen.requires_grad_(False)

            def forward(self, x, y):
                out = type("Out", (), {})()
                out.loss = ((self.head(self.frozen(x)) - y) ** 2).mean()
                return out

        return Model()


def test_ddp_state_round_trip_continues_like_an_uninterrupted_run(process_group, tmp_path):
    import torch

    process_group("gloo")
    cfg = TrainConfig(
        strategy="ddp",
        lr=0.05,
        warmup_ratio=0.25,
        lr_schedule="cosine",
        num_workers=1,
        micro_batch_size=1,
        global_batch_size=2,
    )
    batches = [
        {"x": torch.randn(2, 4, generator=torch.Generator().manual_seed(i)), "y": torch.ones(2, 1)} for i in range(8)
    ]

    def strategy():
        model = _TinyLM.make(seed=0)
        optimizer, scheduler = optimizer_and_schedule(model, cfg, total_steps=4)
        return DDPStrategy(model, optimizer, scheduler, cfg, accum=2, device=torch.device("cpu"))

    def train(e, part):
        for b in part:
            e.micro_step(b, 1.0)
            e.step()

    straight = strategy()
    train(straight, batches)
    first = strategy()
    train(first, batches[:4])  # 2 optimizer steps
    first.save_state(tmp_path, "step_00000002", rank=0)
    resumed = strategy()  # fresh weights, optimizer and schedule, as after a crash
    resumed.load_state(tmp_path, "step_00000002")
    assert resumed.lr() == pytest.approx(first.lr())
    train(resumed, batches[4:])
    for a, b in zip(straight.module.state_dict().values(), resumed.module.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-7)
    saved = torch.load(tmp_path / "step_00000002" / "ddp.pt", weights_only=False)
    assert set(saved["model"]) == {"head.weight", "head.bias"}  # frozen weights come from init_checkpoint
