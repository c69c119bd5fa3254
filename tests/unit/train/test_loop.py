"""mmdc/train/loop.py without Ray: the progress line, and the decisions around resumable training state."""

from __future__ import annotations

import json

import pytest

from mmdc.config import TrainConfig
from mmdc.train import loop
from mmdc.train.loop import (
    eta_seconds,
    format_duration,
    progress_line,
    read_train_state,
    resume_fingerprint,
    resume_mismatch,
    train_state_dir,
)


def test_format_duration():
    assert format_duration(7.4) == "7s"
    assert format_duration(125) == "2m05s"
    assert format_duration(3723) == "1h02m03s"
    assert format_duration(-3) == "0s"


def test_eta_uses_this_attempts_pace():
    assert eta_seconds(0, 10.0, 5) is None  # no step yet: no pace
    assert eta_seconds(4, 20.0, 6) == pytest.approx(30.0)
    assert eta_seconds(4, 20.0, 0) == 0.0


def test_progress_line_reads_like_a_bar():
    line = progress_line("tune-1", 5, 20, 65.0, 195.0, 0, 1.23456, 2e-5, 3.21, 456.7)
    assert line.startswith("[tune-1] [#####---------------] step 5/20  25.0%")
    assert "1m05s elapsed, ETA 3m15s" in line
    assert "loss 1.2346 lr 2.00e-05" in line and "3.2 samples/s 457 tok/s" in line
    assert "ETA ?" in progress_line("r", 1, 4, 1.0, None, 0, 1.0, 1e-3, 1.0, 1.0)
    assert "[####################] step 4/4 100.0%" in progress_line("r", 4, 4, 1.0, 0.0, 0, 1.0, 1e-3, 1.0, 1.0)


def test_train_state_lives_beside_the_output_dir(tmp_path):
    assert train_state_dir(tmp_path / "checkpoints" / "student" / "iter_1") == (
        tmp_path / "checkpoints" / "student" / "iter_1.train_state").resolve()
    assert read_train_state(tmp_path / "out") is None


def _fingerprint(**train) -> dict:
    return resume_fingerprint("tune", "/ckpt/iter_0", 1, 64, 4, TrainConfig(**train))


def test_fingerprint_ignores_what_does_not_change_the_saved_state():
    base = _fingerprint()
    assert resume_mismatch(base, _fingerprint(checkpoint_every_steps=7, cpus_per_worker=2.0, gpus_per_worker=1.0)) == []
    assert resume_mismatch(base, _fingerprint(num_workers=4)) == ["train.num_workers: 2 -> 4"]
    lora = _fingerprint()
    lora["train.lora"]["target_modules"] = ("q_proj", "k_proj", "v_proj", "o_proj")  # tuple vs saved JSON list
    assert resume_mismatch(json.loads(json.dumps(base)), lora) == []


def _write_state(root, fingerprint: dict, step: int = 3) -> None:
    (root / "step_00000003").mkdir(parents=True)
    (root / loop.STATE_MARKER).write_text(json.dumps({"tag": "step_00000003", "step": step, "fingerprint": fingerprint}))


def test_prepare_state_resumes_refuses_or_starts_over(tmp_path):
    root = tmp_path / "out.train_state"
    fp = _fingerprint()
    assert loop._prepare_state(root, fp, resume=True) == 0  # nothing saved: fresh start
    _write_state(root, fp)
    assert loop._prepare_state(root, fp, resume=True) == 3
    with pytest.raises(ValueError, match=r"different setup \(train.zero_stage: 2 -> 3\)"):
        loop._prepare_state(root, _fingerprint(zero_stage=3), resume=True)
    assert loop._prepare_state(root, _fingerprint(zero_stage=3), resume=False) == 0
    assert not root.exists()  # resume=False drops the old state


def test_prepare_state_drops_a_state_without_marker(tmp_path):
    root = tmp_path / "out.train_state"
    (root / "step_00000002").mkdir(parents=True)  # crashed during its first save: never completed
    assert loop._prepare_state(root, _fingerprint(), resume=True) == 0
    assert not root.exists()


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


def _process_group(backend: str):
    """A one-process group (world size 1) on a free local port."""
    import socket

    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


@pytest.fixture
def gloo_group():
    import torch.distributed as dist

    _process_group("gloo")
    yield
    dist.destroy_process_group()


def test_ddp_state_round_trip_continues_like_an_uninterrupted_run(gloo_group, tmp_path):
    import torch

    cfg = TrainConfig(strategy="ddp", lr=0.05, warmup_ratio=0.25, lr_schedule="cosine", num_workers=1,
                      micro_batch_size=1, global_batch_size=2)
    batches = [{"x": torch.randn(2, 4, generator=torch.Generator().manual_seed(i)), "y": torch.ones(2, 1)}
               for i in range(8)]

    def engine():
        model = _TinyLM.make(seed=0)
        optimizer, scheduler = loop._optimizer_and_schedule(model, cfg, total_steps=4)
        return loop._DDPEngine(model, optimizer, scheduler, cfg, accum=2, device=torch.device("cpu"))

    def train(e, part):
        for b in part:
            e.micro_step(b, 1.0)
            e.step()

    straight = engine()
    train(straight, batches)
    first = engine()
    train(first, batches[:4])  # 2 optimizer steps
    first.save_state(tmp_path, "step_00000002", rank=0)
    resumed = engine()  # fresh weights, optimizer and schedule, as after a crash
    resumed.load_state(tmp_path, "step_00000002")
    assert resumed.lr() == pytest.approx(first.lr())
    train(resumed, batches[4:])
    for a, b in zip(straight.module.state_dict().values(), resumed.module.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-7)
    saved = torch.load(tmp_path / "step_00000002" / "ddp.pt", weights_only=False)
    assert set(saved["model"]) == {"head.weight", "head.bias"}  # frozen weights come from init_checkpoint


class _ArrowShard:
    """What ``ray.train.get_dataset_shard`` gives a worker, reduced to the one call the loop makes."""

    def __init__(self, rows: list[dict]) -> None:
        self.rows = rows

    def iter_batches(self, batch_size: int, batch_format: str):
        import pyarrow as pa

        assert batch_format == "pyarrow"
        for i in range(0, len(self.rows), batch_size):
            yield pa.Table.from_pylist(self.rows[i:i + batch_size])


class _TokenFeeder:
    """Rows -> a token batch; no processor or images (the loop's collectives are under test, not formatting)."""

    def batch(self, rows: list[dict], epoch: int):
        import torch

        ids = torch.tensor([[r["token"], r["token"] + 1, 1] for r in rows])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, []


def _token_model():
    import torch

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.embed = torch.nn.Embedding(16, 4)
            self.head = torch.nn.Linear(4, 1)

        def forward(self, input_ids, attention_mask):
            out = type("Out", (), {})()
            out.loss = (self.head(self.embed(input_ids)).squeeze(-1) * attention_mask).pow(2).mean()
            return out

    return Model()


@pytest.mark.parametrize("backend", [
    "gloo",
    pytest.param("nccl", marks=pytest.mark.gpu),  # NCCL has no CPU tensors: the collectives must follow the device
])
def test_loop_runs_its_collectives_on_the_workers_device(backend, monkeypatch, tmp_path):
    import ray.train
    import torch
    import torch.distributed as dist

    if backend == "nccl" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    device = torch.device("cuda", 0) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    rows = [{"token": t} for t in range(7)]  # micro batches of 2: 4 per epoch, the last one short
    reports: list[dict] = []
    monkeypatch.setattr(ray.train, "get_dataset_shard", lambda name: _ArrowShard(rows))
    monkeypatch.setattr(ray.train, "report", reports.append)
    cfg = TrainConfig(strategy="ddp", lr=0.05, num_workers=1, micro_batch_size=2, global_batch_size=2, epochs=2,
                      checkpoint_every_steps=0)
    config = {"stage": "tune", "run_name": "t", "total_steps": 8, "metrics_path": None, "stop_after_steps": 0}
    _process_group(backend)
    try:
        model = _token_model().to(device)
        optimizer, scheduler = loop._optimizer_and_schedule(model, cfg, total_steps=8)
        engine = loop._DDPEngine(model, optimizer, scheduler, cfg, accum=1, device=device)
        state = loop._TrainState(tmp_path / "state", {})
        metrics = loop._Loop(engine, _TokenFeeder(), cfg, config, 0, device, state, loop._Progress()).run()
    finally:
        dist.destroy_process_group()
    assert (metrics["steps"], metrics["samples"], metrics["tokens"]) == (8, 14, 42)
    assert metrics["dropped_samples"] == 0 and metrics["empty_micro_batches"] == 0
    assert metrics["final_loss"] < metrics["first_loss"]
    assert reports[-1]["step"] == 8  # the last step is always reported
