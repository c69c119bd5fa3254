"""Ray Data processors: push pool rows through one role's engine, whatever its backend.

A processor is a callable class per role (Ray's LLM-library habit): the engine client is made once
in ``__init__`` (``mmdc.engines.backends.make_client``), ``__call__`` turns a pandas batch into
requests, parses the replies and adds columns. Processors run as Ray Data tasks that ask for no CPU
(the engine replicas hold the cores), and each worker process keeps its processor objects between
tasks and phases (``run_processor``), so a warm phase sends its first batch at once
(benchmarks/results/engine_throughput.md).

Rows whose request failed transiently are sent again with the same seeds until ``max_retries`` is
spent; a batch's output is built only when every row has its reply, so a phase output never loses
or repeats a row.

    table = run_processors(rows, [ProcessorSpec(TeacherProcessor, {...})], out_dir, pipeline_cfg)
"""

from __future__ import annotations

import json
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from mmdc import roles
from mmdc.config import EngineConfig, PipelineConfig, SamplingConfig, to_dict
from mmdc.data.augment import contains_answer, is_one_sentence
from mmdc.data.blocks import dataset_from_table, read_folder, resume_partial, write_blocks
from mmdc.data.calibration import likelihood_reply, likelihood_score
from mmdc.data.images import resolve_image, to_data_url
from mmdc.engines.backends import deployment_name, make_client, retry_policy
from mmdc.engines.protocol import call_with_retries


def image_url(path: str, image_root: str | None) -> str:
    """Images travel to engines as data URLs, so an engine on any node can read them."""
    return to_data_url(resolve_image(path, image_root))


class RoleProcessor:
    """Base class: a Ray Data ``map_batches`` callable that asks one engine for one role.

    ``engine`` is the engine's config as a dict (``to_dict(cfg.engines[name])``): it picks the
    client (backend, request mode) and the retry policy.
    """

    role: roles.Role

    def __init__(
        self,
        app_name: str,
        deployment: str,
        sampling: dict,
        run_seed: int,
        image_root: str | None = None,
        timeout_s: float = 600.0,
        engine: dict | None = None,
    ):
        engine_cfg = EngineConfig(**(engine or {}))  # absent: the default hf engine, one request per batch
        self.client = make_client(engine_cfg, app_name, deployment, timeout_s)
        self.retry = retry_policy(engine_cfg)
        self.sampling = SamplingConfig(**sampling)
        self.run_seed = run_seed
        self.image_root = image_root
        self.timeout_s = timeout_s
        self._urls: dict[str, str] = {}

    def url(self, path: str) -> str:
        if path not in self._urls:
            if len(self._urls) > 4096:
                self._urls.clear()
            self._urls[path] = image_url(path, self.image_root)
        return self._urls[path]

    def request(
        self, messages: list[dict], instruction_id: str, attempt: int = 0, iteration: int | None = None
    ) -> dict:
        """One engine request; its seed comes from (run seed, role, row, attempt[, iteration]) (``roles.row_seed``)."""
        return {
            "messages": messages,
            "temperature": self.sampling.temperature,
            "max_new_tokens": self.sampling.max_new_tokens,
            "seed": roles.row_seed(self.run_seed, self.role.value, instruction_id, attempt, iteration),
        }

    def call(self, requests: list[dict], ids: list[str]) -> list[dict]:
        """One reply per request, in order; transient failures retried; errors name the role and rows."""
        if not requests:
            return []
        return call_with_retries(self.client, requests, ids, self.role.value, self.retry)


class _AnswerProcessor(RoleProcessor):
    """question -> ``<role>_answer`` and ``<role>_tokens``: one answer per row from one role's prompt."""

    @staticmethod
    def messages(question: str, image_url: str) -> list[dict]:
        raise NotImplementedError

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        ids = batch["instruction_id"].tolist()
        reqs = [
            self.request(self.messages(q, self.url(img)), i)
            for q, img, i in zip(batch["question"], batch["image"], ids)
        ]
        outs = self.call(reqs, ids)
        batch = batch.copy()
        batch[f"{self.role.value}_answer"] = [o["text"] for o in outs]
        batch[f"{self.role.value}_tokens"] = [o["completion_tokens"] for o in outs]
        return batch


class TeacherProcessor(_AnswerProcessor):
    """question -> teacher_answer (Table 6 teacher prompt)."""

    role = roles.Role.TEACHER
    messages = staticmethod(roles.teacher_messages)


class StudentProcessor(_AnswerProcessor):
    """question -> student_answer (the student's own template, no Table 6 system prompt)."""

    role = roles.Role.STUDENT
    messages = staticmethod(roles.student_messages)


class RefereeProcessor(RoleProcessor):
    """(question, teacher_answer, student_answer) -> referee replies in both orders, retried when unparseable.

    Order A puts the teacher as Assistant 1, order B the student. Every raw reply is kept in
    ``referee_replies``; ``reply_teacher_first`` / ``reply_student_first`` hold the last reply of
    each order (a parseable one if any attempt parsed). Scoring itself is the pure
    ``mmdc.data.calibration.combine_orders``.

    ``scoring="likelihood"`` (``calibration.referee_scoring``) asks the engine for each answer's
    log-likelihood under the Table 6 teacher prompt instead of a reply to the referee prompt, and
    writes both orders as replies in the paper's format (``calibration.likelihood_reply``), so
    everything downstream reads them as it reads a referee's.
    """

    role = roles.Role.REFEREE

    def __init__(self, *args: Any, scoring: str = "reply", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if scoring not in ("reply", "likelihood"):
            raise ValueError(f"referee scoring must be 'reply' or 'likelihood', got {scoring!r}")
        self.scoring = scoring

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        if self.scoring == "likelihood":
            return self._by_likelihood(batch)
        n = len(batch)
        ids = batch["instruction_id"].tolist()
        questions, teach, stud = (
            batch["question"].tolist(),
            batch["teacher_answer"].tolist(),
            batch["student_answer"].tolist(),
        )
        urls = [self.url(p) for p in batch["image"]]
        all_replies: list[list[str]] = [[] for _ in range(n)]
        final = {"A": [""] * n, "B": [""] * n}
        pending = [(row, order) for row in range(n) for order in ("A", "B")]
        for attempt in range(self.sampling.retries + 1):
            if not pending:
                break
            reqs = []
            for row, order in pending:
                a1, a2 = (teach[row], stud[row]) if order == "A" else (stud[row], teach[row])
                msgs = roles.referee_messages(questions[row], a1, a2, urls[row])
                reqs.append(self.request(msgs, f"{ids[row]}:{order}", attempt))
            outs = self.call(reqs, [f"{ids[row]}:{order}" for row, order in pending])
            still = []
            for (row, order), out in zip(pending, outs):
                text = out["text"]
                all_replies[row].append(f"[{order}{attempt}] {text}")
                final[order][row] = text
                try:
                    roles.parse_referee(text)
                except roles.RefereeParseError:
                    still.append((row, order))
            pending = still
        batch = batch.copy()
        batch["referee_replies"] = all_replies
        batch["reply_teacher_first"] = final["A"]
        batch["reply_student_first"] = final["B"]
        return batch

    def _by_likelihood(self, batch: pd.DataFrame) -> pd.DataFrame:
        ids = batch["instruction_id"].tolist()
        reqs, req_ids = [], []
        for iid, q, img, t, s in zip(
            ids, batch["question"], batch["image"], batch["teacher_answer"], batch["student_answer"]
        ):
            messages = roles.teacher_messages(q, self.url(img))
            for who, answer in (("teacher", t), ("student", s)):
                reqs.append({"messages": messages, "score_reply": answer})
                req_ids.append(f"{iid}:{who}")
        outs = self.call(reqs, req_ids)
        scores = [likelihood_score(o["logprob"], o["scored_tokens"]) for o in outs]
        teacher, student = scores[0::2], scores[1::2]
        batch = batch.copy()
        batch["reply_teacher_first"] = [likelihood_reply(t, s) for t, s in zip(teacher, student)]
        batch["reply_student_first"] = [likelihood_reply(s, t) for t, s in zip(teacher, student)]
        batch["referee_replies"] = [
            [f"[A0] {a}", f"[B0] {b}"] for a, b in zip(batch["reply_teacher_first"], batch["reply_student_first"])
        ]
        return batch


class AugmentorProcessor(RoleProcessor):
    """hard question -> one candidate new question about the same image (Table 6 augmentor prompt).

    A reply that is empty or fails the local shape checks (one sentence, no answer) is retried up
    to ``retries`` times; the ROUGE-L check against the image's other questions happens later,
    centrally, because it needs every pool. ``iteration`` goes into every sampling seed, so a parent
    that is still hard in a later iteration gets a fresh candidate, not the one it got before.
    """

    role = roles.Role.AUGMENTOR

    def __init__(self, *args: Any, iteration: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.iteration = iteration

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        n = len(batch)
        ids = batch["instruction_id"].tolist()
        questions = batch["question"].tolist()
        urls = [self.url(p) for p in batch["image"]]
        candidates, raws, attempts = [""] * n, [""] * n, [0] * n
        pending = list(range(n))
        for attempt in range(self.sampling.retries + 1):
            if not pending:
                break
            reqs = [
                self.request(roles.augmentor_messages(questions[r], urls[r]), ids[r], attempt, self.iteration)
                for r in pending
            ]
            outs = self.call(reqs, [ids[r] for r in pending])
            still = []
            for r, out in zip(pending, outs):
                raws[r] = out["text"]
                attempts[r] = attempt
                cand = roles.parse_augmentor(out["text"])
                candidates[r] = cand
                if not cand or not is_one_sentence(cand) or contains_answer(cand):
                    still.append(r)
            pending = still
        batch = batch.copy()
        batch["candidate"] = candidates
        batch["augmentor_reply"] = raws
        batch["attempt"] = attempts
        return batch


@dataclass
class ProcessorSpec:
    """One ``map_batches`` step: the processor class, its constructor kwargs, and the scope of its worker processes.

    Processor objects are kept in Ray's worker processes between tasks (``run_processor``), and a scope
    gives its tasks worker processes of their own (an environment variable in their runtime
    env, so Ray never hands them a worker of another scope). Serve clients cached in a process
    stay valid while Serve runs (a handle survives its app being deleted and deployed again) but
    not across a Serve restart, so a scope must not outlive the Serve instance it talks to. By
    default every spec has its own scope (safe, but its first phase starts worker processes);
    the driver passes one scope per run, so all of a run's phases share warm workers.
    """

    cls: type
    kwargs: dict[str, Any] = field(default_factory=dict)
    scope: str = field(default_factory=lambda: f"processors-{uuid.uuid4().hex}")


def processor_spec(
    cls: type,
    app_name: str,
    engine: EngineConfig,
    model_path: str,
    sampling: Any,
    *,
    run_seed: int,
    image_root: str | None,
    scope: str,
    **extra: Any,
) -> ProcessorSpec:
    """The spec of a ``cls`` processor that asks the engine ``app_name`` (serving ``model_path``) for one role.

    ``sampling`` is the role's ``SamplingConfig``; ``extra`` are the processor's own keyword arguments.
    """
    kwargs = {
        "app_name": app_name,
        "deployment": deployment_name(model_path),
        "sampling": to_dict(sampling),
        "run_seed": run_seed,
        "image_root": image_root,
        "timeout_s": engine.request_timeout_s,
        "engine": to_dict(engine),
        **extra,
    }
    return ProcessorSpec(cls, kwargs, scope=scope)


# Processor objects made in this worker process, by (class, constructor kwargs, scope); see ``run_processor``.
_PROCESSORS: dict[tuple[str, str, str, str], Any] = {}
_MAX_PROCESSORS = 32  # a run makes a handful per deployment; the bound only keeps a long-lived worker from growing


def _processor_key(cls: type, kwargs: dict[str, Any], scope: str) -> tuple[str, str, str, str]:
    return cls.__module__, cls.__qualname__, json.dumps(kwargs, sort_keys=True, default=str), scope


def run_processor(batch: pd.DataFrame, cls: type, kwargs: dict[str, Any], scope: str) -> pd.DataFrame:
    """A Ray Data task's body: one batch through this worker process's ``cls(**kwargs)`` processor.

    Ray reuses worker processes between tasks, so a processor object, with its engine client (a Serve
    handle, an HTTP session) and its image cache, outlives one block and one phase: it is made
    once per process and key (the class, its kwargs as canonical JSON, and the scope; see
    ``ProcessorSpec``). A processor whose call raises is dropped, so the next task makes a new one.
    """
    key = _processor_key(cls, kwargs, scope)
    processor = _PROCESSORS.pop(key, None)
    if processor is None:
        processor = cls(**kwargs)
    out = processor(batch)  # raises: the processor is not kept
    if len(_PROCESSORS) >= _MAX_PROCESSORS:
        _PROCESSORS.clear()
    _PROCESSORS[key] = processor
    return out


def run_processors(
    table: pa.Table,
    processors: list[ProcessorSpec],
    out_dir: str | Path,
    cfg: PipelineConfig,
    id_column: str = "instruction_id",
) -> pa.Table:
    """Run ``table`` through ``processors`` with Ray Data and write the result as Parquet into ``out_dir``.

    The output is written into ``<out_dir>.tmp`` and renamed into place only when complete, so a
    crash never leaves a half-written phase output that looks finished. Row-level resume: each
    finished block lands in ``<out_dir>.tmp`` as its own Parquet file (``write_blocks``), so when a
    phase is run again after a crash, the rows of every complete file there are kept and only the
    others are sent to the engines (``resume_partial``). Ray Data's own ``ray.data.checkpoint``
    does the same, but only for pipelines that start from a datasource read, and its filter actors
    want CPUs that the engine replicas hold on a small machine; our pools start from ``from_blocks``.
    """
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    done, table = resume_partial(tmp, table, id_column)
    if table.num_rows == 0:
        tmp.mkdir(parents=True, exist_ok=True)
        if not done:
            pq.write_table(table, tmp / "empty.parquet")
    else:
        ds = dataset_from_table(table, cfg.concurrency * cfg.blocks_per_client)
        for spec in processors:
            ds = ds.map_batches(
                run_processor,
                fn_kwargs={"cls": spec.cls, "kwargs": spec.kwargs, "scope": spec.scope},
                batch_size=cfg.batch_size,
                batch_format="pandas",
                compute=ray.data.TaskPoolStrategy(size=cfg.concurrency),
                num_cpus=0,
                runtime_env={"env_vars": {"MMDC_PROCESSOR_SCOPE": spec.scope}},
            )
        write_blocks(ds, tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return read_folder(out_dir)
