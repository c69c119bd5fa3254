"""The worker's training loop without Ray Train: its collectives run on the worker's device, every step counts."""

from __future__ import annotations

import pytest

from mmdc.config import TrainConfig
from mmdc.train.checkpoints import Progress, TrainState
from mmdc.train.strategies import DDPStrategy
from mmdc.train.worker import TrainingLoop, TrainJob, optimizer_and_schedule


class _ArrowShard:
    """What ``ray.train.get_dataset_shard`` gives a worker, reduced to the one call the loop makes."""

    def __init__(self, rows: list[dict]) -> None:
        self.rows = rows

    def iter_batches(self, batch_size: int, batch_format: str):
        import pyarrow as pa

        assert batch_format == "pyarrow"
        for i in range(0, len(self.rows), batch_size):
            yield pa.Table.from_pylist(self.rows[i : i + batch_size])


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


@pytest.mark.parametrize(
    "backend",
    [
        "gloo",
        pytest.param("nccl", marks=pytest.mark.gpu),  # NCCL has no CPU tensors: the collectives must follow the device
    ],
)
def test_loop_runs_its_collectives_on_the_workers_device(backend, process_group, monkeypatch, tmp_path):
    import ray.train
    import torch

    if backend == "nccl" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    device = torch.device("cuda", 0) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    rows = [{"token": t} for t in range(7)]  # micro batches of 2: 4 per epoch, the last one short
    reports: list[dict] = []
    monkeypatch.setattr(ray.train, "get_dataset_shard", lambda name: _ArrowShard(rows))
    monkeypatch.setattr(ray.train, "report", reports.append)
    cfg = TrainConfig(
        strategy="ddp",
        lr=0.05,
        num_workers=1,
        micro_batch_size=2,
        global_batch_size=2,
        epochs=2,
        checkpoint_every_steps=0,
    )
    stepped: list[int] = []
    job = TrainJob(
        stage="tune",
        init_checkpoint="unused",
        output_dir=str(tmp_path / "out"),
        train=cfg,
        seed=0,
        total_steps=8,
        grad_accum=1,
        state_dir=str(tmp_path / "state"),
        fingerprint={},
        run_name="t",
        on_step=stepped.append,
    )
    process_group(backend)
    model = _token_model().to(device)
    optimizer, scheduler = optimizer_and_schedule(model, cfg, total_steps=8)
    strategy = DDPStrategy(model, optimizer, scheduler, cfg, accum=1, device=device)
    state = TrainState(tmp_path / "state", {})
    metrics = TrainingLoop(strategy, _TokenFeeder(), job, 0, device, state, Progress()).run()
    assert (metrics["steps"], metrics["samples"], metrics["tokens"]) == (8, 14, 42)
    assert metrics["dropped_samples"] == 0 and metrics["empty_micro_batches"] == 0
    assert metrics["final_loss"] < metrics["first_loss"]
    assert reports[-1]["step"] == 8  # the last step is always reported
    assert stepped == list(range(1, 9))  # the step callback sees every optimizer step


def test_supervised_counts_leave_out_samples_without_labels():
    import torch

    from mmdc.train.worker import supervised_counts

    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    labels = torch.tensor([[5, -100, -100], [-100, -100, -100]])  # the second: an image anchor
    assert supervised_counts({"attention_mask": mask, "labels": labels}) == (1, 2)
    assert supervised_counts({"attention_mask": mask}) == (2, 5)


def test_text_only_rows_train_without_an_image_and_keep_the_projector_in_the_graph(tiny_student, tmp_path):
    """ScienceQA's text-only questions: no image ids, no pixels; a batch of only such rows gets an image anchor whose
    projector gradient is zero and which leaves the loss exactly as it was."""
    import torch
    from PIL import Image

    from mmdc.train import formatting as fmt
    from mmdc.train.worker import BatchFeeder, load_student

    torch.set_num_threads(1)
    Image.new("RGB", (16, 16), (200, 0, 0)).save(tmp_path / "red.png")
    model, processor = load_student(tiny_student, "tune", TrainConfig())
    feeder = BatchFeeder(processor, "tune", 256, seed=0, image_root=str(tmp_path))
    pictured = {"conversation_id": "a", "image": "red.png", "questions": ["what colour?"], "answers": ["red."]}
    text = {"conversation_id": "b", "image": None, "questions": ["which is north?"], "answers": ["The answer is A."]}

    mixed, _ = feeder.batch([pictured, text], epoch=0)
    assert mixed["input_ids"].shape[0] == 2 and mixed["pixel_values"].shape[0] == 1  # one image, for row a
    assert model(**mixed).loss.isfinite()

    only_text, _ = feeder.batch([text], epoch=0)
    assert only_text["input_ids"].shape[0] == 2 and only_text["pixel_values"].shape[0] == 1  # + the anchor
    alone = fmt.collate(
        [
            fmt.encode_conversation(
                processor.tokenizer, text, fmt.TEXT_ONLY, 256, image_seq_length=feeder.image_seq_length
            )
        ],
        feeder.pad_id,
    )
    assert "pixel_values" not in alone
    loss = model(**only_text).loss
    assert torch.allclose(loss, model(**alone).loss)
    loss.backward()
    projector = [p for n, p in model.named_parameters() if "multi_modal_projector" in n and p.requires_grad]
    assert projector and all(p.grad is not None and not p.grad.any() for p in projector)  # in the graph, zero
