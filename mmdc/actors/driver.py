"""The Driver actor: owns the MmDC loop, the run directory and the hand-over of resources.

    prepare -> align (stage 1) -> for k in 1..K: teach -> release -> tune -> deploy student -> assess -> augment

One method per phase, each only orchestration: the work is in pure functions (``mmdc.data``), engines and
processors (``mmdc.engines``), training (``mmdc.train``) and evaluation (``mmdc.eval``). ``state.json`` is the
commit record: a phase counts as done only once its outputs are in place and it is listed in
``state["completed"]``; a resumed driver skips completed phases, reruns the interrupted one (an inference
phase keeps the rows its crashed attempt wrote, a training phase its last saved state) and goes on.
``state["student"]`` is the one record of the current student checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch

from mmdc.actors.assembly import remote_assembler
from mmdc.actors.deployments import Deployments
from mmdc.actors.handover import await_trainer_resources, remove_stale_apps
from mmdc.actors.phases import PhaseLog
from mmdc.actors.resources import clear_resource_request, wait_for_resources
from mmdc.config import Config, ConfigError, assemble_dtype, config_from_dict, eval_benchmarks
from mmdc.data.answers import AnswerStore
from mmdc.data.augment import accept_candidates, round_record
from mmdc.data.calibration import assess_table, hard_counts, hard_parents, random_selection
from mmdc.data.captions import stage1_pairs
from mmdc.data.pools import advance_pools, fold_conversations
from mmdc.data.prepare import prepare_seed_pool
from mmdc.engines.processors import (
    AugmentorProcessor,
    ProcessorSpec,
    RefereeProcessor,
    StudentProcessor,
    TeacherProcessor,
    run_processors,
)
from mmdc.eval import finetune as scienceqa_finetune
from mmdc.eval.iteration import evaluate_iteration, headline_metrics, needs_judge
from mmdc.eval.serve import ServeGenerator
from mmdc.report import write_report
from mmdc.rundir import RunDir, atomic_write_table, attach_log, verify_lock
from mmdc.train.checkpoints import stale_training_keys
from mmdc.train.launcher import conversations_dataset, planned_steps, train_or_reuse
from mmdc.world import models
from mmdc.world.sources import Sources, resolve_data

log = logging.getLogger("mmdc.driver")


def announce(message: str) -> None:
    """A progress line in the job log (Ray forwards actor stdout to the driver process) and in driver.log."""
    print(f"[mmdc] {message}", flush=True)
    log.info(message)


@ray.remote(num_cpus=0)
class Driver:
    """Runs one MmDC job end to end inside the cluster (verl habit: the loop lives in an actor)."""

    def __init__(
        self, cfg: dict, run_dir: str, resume: bool = False, forced: list[str] | None = None, lock_token: str = ""
    ):
        torch.set_num_threads(1)
        self.cfg: Config = config_from_dict(cfg)
        self.run_dir = RunDir(run_dir)
        self.lock_token = lock_token  # mmdc.run holds the run directory's lock (RunLock) for the life of the run
        self.check_lock()
        attach_log(self.run_dir.log_file)
        self.forced = list(forced or [])
        self.state = self.run_dir.begin_attempt(self.cfg, resume, self.forced)
        self.sources = Sources(**self.state.get("data", {}))  # set by prepare_data
        self.teacher = ""  # the teacher's local path (prepare_models)
        self.initial_student = ""  # the student before any training, when state.json names none yet
        self.answers: AnswerStore | None = None  # the teacher's answer store (prepare_models)
        self.deployments = Deployments(self.cfg.engines, self.cfg.run.seed, self.run_dir.log_metrics, announce)
        self.resource_request = False  # True while an autoscaler request placed by check_resources stands
        self.phases = PhaseLog(self.run_dir, self.state, announce, guard=self.check_lock)

    # ----------------------------------------------------------------------------- the loop
    def run(self) -> str:
        if self.state.get("status") == "finished":
            announce(f"nothing to resume: the run in {self.run_dir.root} has finished")
            return str(self.run_dir.root)
        if self.state["completed"]:
            last = self.state["completed"][-1]
            announce(f"resuming after iteration {last['iteration']} · {last['phase']}")
        self.resource_request = wait_for_resources(self.cfg, self.cfg.run.resource_wait_s, say=announce)
        try:
            return self._loop()
        finally:
            if self.resource_request:
                clear_resource_request()  # let idle nodes scale down

    def _loop(self) -> str:
        remove_stale_apps(list(self.cfg.engines), announce)
        self.prepare_data()
        self.prepare_models()
        self.align()
        self.evaluate(0)  # the student after stage 1: the first point of the per-iteration curve
        self.evaluate(0, "teacher")  # the reference line, once
        for k in range(1, self.cfg.run.iterations + 1):
            self.teach(k)
            self.deployments.release()
            self.tune(k)
            self.evaluate(k)  # deploys the new student, which assess needs anyway
            self.assess(k)
            self.augment(k)
        self.finetune()  # Table 1 (eval.scienceqa.finetune): the final student fine-tuned on ScienceQA's train split
        self.deployments.release()
        write_report(self.run_dir)
        self.state["status"] = "finished"
        self.run_dir.save_state(self.state)
        announce(f"finished: {self.run_dir.root}")
        return str(self.run_dir.root)

    @property
    def student(self) -> str:
        """The current student checkpoint: the last one trained, else the initial one."""
        return self.state.get("student") or self.initial_student

    def model_of(self, engine: str) -> str:
        return self.teacher if engine == "teacher" else self.student

    def check_lock(self) -> None:
        """LockLost unless the run directory's lock is still this run's: before every phase and every deletion."""
        verify_lock(self.run_dir.root, self.lock_token)

    # ----------------------------------------------------------------------------- phases
    def prepare_data(self) -> None:
        """Build or read the instruction set, unfold it to D_sin, and write pools/iter_0."""
        if self.phases.done(0, "prepare"):
            return
        with self.phases.run(0, "prepare") as record:
            self.sources = sources = resolve_data(self.cfg.data, self.run_dir.data / "world")
            seed_pool = prepare_seed_pool(
                sources.instructions,
                sources.image_root,
                max_instructions=self.cfg.data.max_instructions,
                max_image_pixels=self.cfg.data.max_image_pixels,
                parallel=True,
            )
            self.run_dir.log_skips(seed_pool.skipped)
            seed_pool.check_skip_ratio(self.cfg.data.max_skip_ratio)
            if seed_pool.table.num_rows == 0:
                raise ValueError(f"no usable instruction in {sources.instructions} (see {self.run_dir.skipped})")
            atomic_write_table(self.run_dir.pool(0, "tuning"), seed_pool.table)
            atomic_write_table(self.run_dir.pool(0, "cache"), seed_pool.table)
            self.state["data"] = dataclasses.asdict(sources)
            record.update(seed_pool.stats)

    def prepare_models(self) -> None:
        """Resolve the teacher and (unless a resumed run has trained one) the initial student to local checkpoints."""
        self.teacher = models.resolve(self.cfg.models.teacher, self.cfg.models, log=announce)
        self.answers = AnswerStore.of_run(self.run_dir.answer_store, self.teacher, self.cfg, self.sources.image_root)
        if not self.state.get("student"):
            self.initial_student = models.resolve(
                self.cfg.models.student_init,
                self.cfg.models,
                teacher=self.teacher,
                assemble_into=self.run_dir.checkpoint_init(),
                assemble_dtype=assemble_dtype(self.cfg),
                assembler=remote_assembler(self.cfg.models, announce),  # a Ray task sized for it, not this process
                log=announce,
            )

    def align(self) -> None:
        """Stage 1: train only the projector on caption pairs (skipped when align.enabled is false)."""
        if not self.cfg.align.enabled or self.phases.done(0, "align"):
            return
        if not self.sources.captions:
            raise ConfigError("align.enabled needs caption pairs: set data.captions (or align.enabled=false)")
        with self.phases.run(0, "align") as record:
            pairs = stage1_pairs(
                self.sources.captions, self.sources.caption_root, self.cfg.data, self.cfg.run.seed, parallel=True
            )
            self.run_dir.log_skips(pairs.skipped)
            pairs.check_skip_ratio(self.cfg.data.max_skip_ratio)
            record.update(pairs.stats)
            rows = pairs.rows
            if planned_steps(len(rows), self.cfg.align) < 1:
                record.update(skipped=f"{len(rows)} caption pairs make no optimizer step", rows=len(rows))
                return
            output = self.run_dir.checkpoint(None)
            summary = self.train(
                "align",
                output,
                lambda: ray.data.from_items(rows),
                seed=self.cfg.run.seed,
                run="align",
            )
            record.update(rows=len(rows), **{f"train_{k}": v for k, v in summary.items()})
            self.state["student"] = str(output)

    def teach(self, k: int) -> None:
        """Phase A: the teacher answers the tuning pool (each instruction once, ever); fold per image (Eq. 1)."""
        if self.phases.done(k, "teach"):
            return
        with self.phases.run(k, "teach") as record:
            tuning = pd.read_parquet(self.run_dir.pool(k - 1, "tuning"))
            answered, stats = self.teacher_answers(tuning, k, "teach")
            conversations = fold_conversations(answered, answer_column="teacher_answer")
            atomic_write_table(self.run_dir.conversations(k), pa.Table.from_pandas(conversations, preserve_index=False))
            record.update(rows=len(tuning), conversations=len(conversations), **stats)

    def tune(self, k: int) -> None:
        """Phase B: Ray Train tunes the student on this iteration's conversations, from its last checkpoint."""
        if self.phases.done(k, "tune"):
            return
        with self.phases.run(k, "tune") as record:
            conversations = pq.read_metadata(self.run_dir.conversations(k)).num_rows
            if planned_steps(conversations, self.cfg.tune) < 1:
                # Nothing to learn from (e.g. no accepted question and no easy sample): keep the checkpoint.
                record.update(skipped=f"{conversations} conversations make no optimizer step", rows=conversations)
                self.state["student"] = self.student
                return
            output = self.run_dir.checkpoint(k)
            blocks = max(1, self.cfg.tune.num_workers) * 2
            summary = self.train(
                "tune",
                output,
                lambda: conversations_dataset(self.run_dir.conversations(k), self.sources.image_root, blocks),
                seed=self.cfg.run.seed + k,
                run=f"tune-{k}",
            )
            record.update(**{f"train_{key}": value for key, value in summary.items()})
            self.state["student"] = str(output)

    def assess(self, k: int) -> None:
        """Phase C: teacher and student answer the cache pool; the referee scores both orders; Eq. 6."""
        if self.phases.done(k, "assess"):
            return
        with self.phases.run(k, "assess") as record:
            cache = pd.read_parquet(self.run_dir.pool(k - 1, "cache"))
            calibration = self.cfg.calibration
            if calibration.selection == "random":  # plain distillation (ablation): no student, no referee
                picked = random_selection(cache, calibration.parent_share(k), seed=self.cfg.run.seed, iteration=k)
                atomic_write_table(self.run_dir.assessment(k), pa.Table.from_pandas(picked, preserve_index=False))
                record.update(hard_counts(picked), selection="random")
                return
            with_teacher, stats = self.teacher_answers(cache, k, "assess")
            student = self.processor(StudentProcessor, "student", self.cfg.roles.student)
            referee = self.processor(
                RefereeProcessor, "teacher", self.cfg.roles.referee, scoring=calibration.referee_scoring
            )
            scored = self.ask(with_teacher, [student, referee], k, "assess")
            scored = scored.sort_values("instruction_id", kind="stable").reset_index(drop=True)
            assessment = assess_table(scored, calibration.tau)
            atomic_write_table(self.run_dir.assessment(k), pa.Table.from_pandas(assessment, preserve_index=False))
            record.update(hard_counts(assessment), generated_tokens=int(scored["student_tokens"].sum()), **stats)

    def augment(self, k: int) -> None:
        """Phase D: one new question per hard instruction, ROUGE-L-filtered; balance with easy; new pools."""
        if self.phases.done(k, "augment"):
            return
        with self.phases.run(k, "augment") as record:
            tuning = pd.read_parquet(self.run_dir.pool(k - 1, "tuning"))
            cache = pd.read_parquet(self.run_dir.pool(k - 1, "cache"))
            assessment = pd.read_parquet(self.run_dir.assessment(k))
            hard_rows = hard_parents(cache, assessment)
            augmentor = self.processor(AugmentorProcessor, "teacher", self.cfg.roles.augmentor, iteration=k)
            replies = self.ask(hard_rows, [augmentor], k, "augment")
            checked = accept_candidates(replies, tuning, cache, k, self.cfg.calibration.rouge_l_threshold)
            atomic_write_table(self.run_dir.generated(k), pa.Table.from_pandas(checked, preserve_index=False))
            policy, seed = self.cfg.calibration.pool_update, self.cfg.run.seed
            next_tuning, next_cache, counts = advance_pools(policy, tuning, cache, assessment, checked, seed, k)
            atomic_write_table(self.run_dir.pool(k, "tuning"), next_tuning)
            atomic_write_table(self.run_dir.pool(k, "cache"), next_cache)
            record.update({key: v for key, v in counts.items() if key not in ("iteration", "hard", "easy", "unscored")})
            record.update(round_record(checked, len(hard_rows)))

    def evaluate(self, k: int, engine: str = "student") -> None:
        """The configured benchmarks on ``engine``'s current model -> eval/<benchmark>/ (k 0: after stage 1)."""
        if not eval_benchmarks(self.cfg) or (engine == "teacher" and not self.cfg.eval.teacher):
            return
        name = "eval" if engine == "student" else "eval_teacher"
        if self.phases.done(k, name):
            return
        with self.phases.run(k, name) as record:
            generator = self.generator(engine, role=engine)
            judge = self.generator("teacher", role="judge") if needs_judge(self.cfg) else None  # the teacher judges
            world = self.run_dir.data / "world" if self.cfg.data.source == "world" else None
            results = evaluate_iteration(
                self.cfg, self.run_dir.root, k, engine, generator, world, judge=judge, model=self.model_of(engine)
            )
            record.update(rows=sum(r["metrics"].get("n", 0) for r in results.values()), **headline_metrics(results))

    def finetune(self) -> None:
        """Paper Table 1: the final student fine-tuned on ScienceQA's train split, then scored on its test split."""
        k = self.cfg.run.iterations
        if not (self.cfg.eval.enabled and self.cfg.eval.scienceqa.finetune.enabled) or self.phases.done(k, "finetune"):
            return
        with self.phases.run(k, "finetune") as record:
            self.deployments.release()
            scores = scienceqa_finetune.finetune_run(
                self.run_dir,
                self.student,
                self.cfg,
                lambda model: self.generator("student", role="student", model=model),
                forced=self.forced,
                announce=announce,
                before_start=lambda: await_trainer_resources(self.cfg.tune, announce),
            )
            record.update(scores)

    # ----------------------------------------------------------------------------- helpers
    def train(self, stage: str, output: Path, dataset: Callable[[], ray.data.Dataset], *, seed: int, run: str) -> dict:
        """One Ray Train job from the current student into ``output`` (reused or resumed after a crash); its summary."""
        self.check_lock()  # train_or_reuse may delete checkpoint folders: only while this run holds the directory
        train_cfg = self.cfg.align if stage == "align" else self.cfg.tune
        return train_or_reuse(
            output,
            dataset,
            restart=bool(stale_training_keys(self.forced)),
            announce=announce,
            before_start=lambda: await_trainer_resources(train_cfg, announce),
            stage=stage,
            init_checkpoint=self.student,
            train_cfg=train_cfg,
            seed=seed,
            metrics_path=str(self.run_dir.metrics),
            run_name=f"{self.run_dir.root.name}-{run}",
        )

    def teacher_answers(self, rows: pd.DataFrame, k: int, phase: str) -> tuple[pd.DataFrame, dict]:
        """Teacher answers for ``rows``, asking the engine only for answers never stored before."""

        def ask_teacher(misses: pd.DataFrame) -> pd.DataFrame:  # deploys the teacher only when an answer is missing
            teacher = self.processor(TeacherProcessor, "teacher", self.cfg.roles.teacher)
            return self.ask(misses, [teacher], k, f"{phase}_teacher")

        return self.answers.answer(rows, ask_teacher, f"iter_{k}_{phase}")

    def ask(self, rows: pd.DataFrame, processors: list[ProcessorSpec], k: int, phase: str) -> pd.DataFrame:
        """``rows`` through ``processors`` (Ray Data over the deployed engines) into answers/iter_<k>/<phase>/."""
        table = pa.Table.from_pandas(rows, preserve_index=False)
        return run_processors(table, processors, self.run_dir.phase_output(k, phase), self.cfg.pipeline).to_pandas()

    def processor(self, cls: type, engine: str, sampling: Any, **extra: Any) -> ProcessorSpec:
        """A Ray Data processor bound to ``engine``'s current model (``extra``: the processor's own kwargs)."""
        return self.deployments.processor(
            cls, engine, self.model_of(engine), sampling, self.sources.image_root, **extra
        )

    def generator(self, engine: str, role: str, model: str | None = None) -> ServeGenerator:
        """An evaluation generator over ``engine``'s current model (or ``model``)."""
        return self.deployments.generator(engine, model or self.model_of(engine), role)
