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

import json
import logging
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from mmdc import metrics
from mmdc.actors.cleanup import remove_orphaned_placement_groups
from mmdc.actors.handover import await_trainer_resources, deploy_engine, release_engines, remove_stale_apps
from mmdc.actors.resources import clear_resource_request, wait_for_resources
from mmdc.config import Config, ConfigError, config_from_dict, dump_config, eval_benchmarks, to_dict
from mmdc.data.answers import AnswerStore, model_fingerprint
from mmdc.data.augment import candidate_rows, validate_candidates
from mmdc.data.calibration import assess_table, random_selection
from mmdc.data.images import resolve_image
from mmdc.data.llava import load_caption_pairs
from mmdc.data.pools import fold_conversations, update_pools
from mmdc.data.prepare import prepare_seed_pool
from mmdc.data.schema import POOL_COLUMNS, pool_from_frame
from mmdc.engines.backends import deployment_name
from mmdc.engines.processors import (
    AugmentorProcessor,
    ProcessorSpec,
    RefereeProcessor,
    StudentProcessor,
    TeacherProcessor,
    run_processors,
)
from mmdc.eval.iteration import evaluate_iteration, headline_metrics, needs_judge
from mmdc.eval.serve import ServeGenerator
from mmdc.report import write_report
from mmdc.rundir import RunDir, atomic_write_table
from mmdc.train.checkpoints import SUMMARY_FILE, stale_training_keys
from mmdc.train.launcher import conversations_dataset, planned_steps, train_student
from mmdc.world import models
from mmdc.world.scenes import generate_world

log = logging.getLogger("mmdc.driver")


def announce(message: str) -> None:
    """A progress line in the job log (Ray forwards actor stdout to the driver process)."""
    print(f"[mmdc] {message}", flush=True)


@ray.remote(num_cpus=0)
class Driver:
    """Runs one MmDC job end to end inside the cluster (verl habit: the loop lives in an actor)."""

    def __init__(self, cfg: dict, run_dir: str, resume: bool = False, forced: list[str] | None = None):
        import torch

        torch.set_num_threads(1)
        self.cfg: Config = config_from_dict(cfg)
        self.run_dir = RunDir(run_dir)
        self.run_dir.root.mkdir(parents=True, exist_ok=True)
        self.state = self.run_dir.load_state() if resume else {"status": "new", "completed": []}
        self.forced = list(forced or [])
        if not resume or forced:
            dump_config(self.cfg, self.run_dir.config)
            # Rows a crashed attempt wrote were made under another config (or another run): never reuse them.
            for tmp in self.run_dir.root.glob("answers/iter_*/*.tmp"):
                shutil.rmtree(tmp, ignore_errors=True)
        if forced:
            self.state.setdefault("forced_changes", []).append({"time": time.time(), "keys": forced})
        data = self.state.get("data", {})
        self.image_root: str | None = data.get("image_root")
        self.captions: str | None = data.get("captions")
        self.teacher = ""  # the teacher's local path (prepare_models)
        self.initial_student = ""  # the student before any training, when state.json names none yet
        self.answers: AnswerStore | None = None  # the teacher's answer store (prepare_models)
        self.deployed: dict[str, str] = {}  # engine name -> model path it serves now
        self.processor_scope = f"run-{uuid.uuid4().hex}"  # this run's Ray Data worker processes (ProcessorSpec)
        self.resource_request = False  # True while an autoscaler request placed by check_resources stands
        self.dashboard = metrics.dashboard_url()  # shown in every phase line, for the operator following the log

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
            self.release()
            self.tune(k)
            self.evaluate(k)  # deploys the new student, which assess needs anyway
            self.assess(k)
            self.augment(k)
        self.release()
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

    # ----------------------------------------------------------------------------- phases
    def done(self, iteration: int, name: str) -> bool:
        """True when an earlier attempt completed this phase (then the caller skips it)."""
        finished = any(c["iteration"] == iteration and c["phase"] == name for c in self.state["completed"])
        if finished:
            announce(f"iteration {iteration} · {name}: completed by an earlier attempt, skipped")
        return finished

    @contextmanager
    def phase(self, iteration: int, name: str, **extra: Any) -> Iterator[dict]:
        """Time a phase, log its metrics line and record it in state.json when it completes."""
        announce(f"iteration {iteration} · {name} …")
        if removed := remove_orphaned_placement_groups():  # a crashed attempt's trainer would hold its resources
            announce(f"removed {removed} placement group(s) left by a crashed attempt")
        self.state["current"] = {"iteration": iteration, "phase": name, "started": round(time.time(), 3)}
        self.state["status"] = "running"
        self.run_dir.save_state(self.state)
        metrics.publish_state(iteration, name, run=self.run_dir.root.name)
        record: dict = {"iteration": iteration, "phase": name, **extra}
        start = time.perf_counter()
        yield record
        record["wall_s"] = round(time.perf_counter() - start, 3)
        if record.get("rows") and record["wall_s"] > 0:
            record["rows_per_s"] = round(record["rows"] / record["wall_s"], 3)
        if record.get("generated_tokens") and record["wall_s"] > 0:
            record["gen_tokens_per_s"] = round(record["generated_tokens"] / record["wall_s"], 3)
        self.run_dir.log_metrics(record)
        metrics.publish_phase(record, run=self.run_dir.root.name)  # Ray dashboard / Prometheus
        self.state["completed"].append(
            {"iteration": iteration, "phase": name, "wall_s": record["wall_s"], "rows": record.get("rows")}
        )
        self.state.pop("current", None)
        self.run_dir.save_state(self.state)
        summary = ", ".join(f"{k}={v}" for k, v in record.items() if k not in ("iteration", "phase"))
        where = f" · dashboard {self.dashboard}" if self.dashboard else ""
        announce(f"iteration {iteration} · {name} done: {summary}{where}")

    def prepare_data(self) -> None:
        """Build or read the instruction set, unfold it to D_sin, and write pools/iter_0."""
        if self.done(0, "prepare"):
            return
        with self.phase(0, "prepare") as record:
            data = self.cfg.data
            if data.source == "world":
                world = data.world
                files = generate_world(
                    self.run_dir.data / "world",
                    num_images=world.num_images,
                    questions_per_image=world.questions_per_image,
                    seed=world.seed,
                    image_size=world.image_size,
                    test_images=world.test_images,
                )
                instructions, self.image_root, self.captions = (
                    str(files.instructions),
                    str(files.images),
                    str(files.captions),
                )
            else:
                instructions, self.image_root, self.captions = data.instructions, data.image_folder, data.captions
            seed_pool = prepare_seed_pool(
                instructions,
                self.image_root,
                max_instructions=data.max_instructions,
                max_image_pixels=data.max_image_pixels,
            )
            self.run_dir.log_skips(seed_pool.skipped)
            if seed_pool.table.num_rows == 0:
                raise ValueError(f"no usable instruction in {instructions} (see {self.run_dir.skipped})")
            atomic_write_table(self.run_dir.pool(0, "tuning"), seed_pool.table)
            atomic_write_table(self.run_dir.pool(0, "cache"), seed_pool.table)
            self.state["data"] = {"image_root": self.image_root, "captions": self.captions}
            record.update(seed_pool.stats)

    def prepare_models(self) -> None:
        """Resolve the teacher and (unless a resumed run has trained one) the initial student to local checkpoints."""
        self.teacher = models.resolve(self.cfg.models.teacher, self.cfg.models, log=announce)
        self.answers = AnswerStore(
            self.run_dir.answer_store,
            model_fingerprint(self.teacher),
            to_dict(self.cfg.roles.teacher),
            self.cfg.run.seed,
            self.image_root,
        )
        if not self.state.get("student"):
            self.initial_student = models.resolve(
                self.cfg.models.student_init,
                self.cfg.models,
                teacher=self.teacher,
                assemble_into=self.run_dir.checkpoint_init(),
                log=announce,
            )

    def align(self) -> None:
        """Stage 1: train only the projector on caption pairs (skipped when align.enabled is false)."""
        if not self.cfg.align.enabled or self.done(0, "align"):
            return
        if not self.captions:
            raise ConfigError("align.enabled needs caption pairs: set data.captions (or align.enabled=false)")
        with self.phase(0, "align") as record:
            rows = [
                {**pair, "image": resolve_image(pair["image"], self.image_root)}
                for pair in load_caption_pairs(self.captions)
            ]
            if self.cfg.data.clip_filter.enabled:
                from mmdc.data.clipscore import filter_by_clip_score  # needs the optional clip extra

                clip = filter_by_clip_score(rows, self.cfg.data.clip_filter, self.cfg.data.max_image_pixels)
                self.run_dir.log_skips([{"stage": "clip_filter", **skip} for skip in clip.skipped])
                rows = clip.kept
                record.update({f"clip_{k}": v for k, v in clip.stats.items()})
            caption_filter = self.cfg.data.caption_filter
            if caption_filter.enabled:
                from mmdc.data.nounphrase import filter_caption_pairs  # loads spaCy

                rows, stats = filter_caption_pairs(
                    rows,
                    caption_filter.spacy_pipeline,
                    seed=self.cfg.run.seed,
                    n_process=caption_filter.n_process,
                    min_count=caption_filter.min_count,
                    max_per_phrase=caption_filter.max_per_phrase,
                )
                record.update({f"filter_{k}": v for k, v in stats.items()})
            if planned_steps(len(rows), self.cfg.align) < 1:
                record.update(skipped=f"{len(rows)} caption pairs make no optimizer step", rows=len(rows))
                return
            output = self.run_dir.checkpoint(None)
            summary = self.train(
                "align",
                output,
                lambda: ray.data.from_items(rows),
                seed=self.cfg.run.seed,
                run_name=f"{self.run_dir.root.name}-align",
            )
            record.update(rows=len(rows), **{f"train_{k}": v for k, v in summary.items()})
            self.state["student"] = str(output)

    def teach(self, k: int) -> None:
        """Phase A: the teacher answers the tuning pool (each instruction once, ever); fold per image (Eq. 1)."""
        if self.done(k, "teach"):
            return
        with self.phase(k, "teach") as record:
            tuning = pd.read_parquet(self.run_dir.pool(k - 1, "tuning"))
            answered, stats = self.teacher_answers(tuning, k, "teach")
            conversations = fold_conversations(answered, answer_column="teacher_answer")
            atomic_write_table(self.run_dir.conversations(k), pa.Table.from_pandas(conversations, preserve_index=False))
            record.update(rows=len(tuning), conversations=len(conversations), **stats)

    def tune(self, k: int) -> None:
        """Phase B: Ray Train tunes the student on this iteration's conversations, from its last checkpoint."""
        if self.done(k, "tune"):
            return
        with self.phase(k, "tune") as record:
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
                lambda: conversations_dataset(self.run_dir.conversations(k), self.image_root, blocks),
                seed=self.cfg.run.seed + k,
                run_name=f"{self.run_dir.root.name}-tune-{k}",
            )
            record.update(**{f"train_{key}": value for key, value in summary.items()})
            self.state["student"] = str(output)

    def assess(self, k: int) -> None:
        """Phase C: teacher and student answer the cache pool; the referee scores both orders; Eq. 6."""
        if self.done(k, "assess"):
            return
        with self.phase(k, "assess") as record:
            cache = pd.read_parquet(self.run_dir.pool(k - 1, "cache"))
            calibration = self.cfg.calibration
            if calibration.selection == "random":  # plain distillation (ablation): no student, no referee
                picked = random_selection(cache, calibration.random_fraction, seed=self.cfg.run.seed, iteration=k)
                atomic_write_table(self.run_dir.assessment(k), pa.Table.from_pandas(picked, preserve_index=False))
                hard = int(picked["hard"].sum())
                record.update(rows=len(picked), selection="random", hard=hard, easy=len(picked) - hard)
                return
            with_teacher, stats = self.teacher_answers(cache, k, "assess")
            scored = run_processors(
                pa.Table.from_pandas(with_teacher, preserve_index=False),
                [
                    self.processor(StudentProcessor, "student", self.cfg.roles.student),
                    self.processor(
                        RefereeProcessor, "teacher", self.cfg.roles.referee, scoring=calibration.referee_scoring
                    ),
                ],
                self.run_dir.phase_output(k, "assess"),
                self.cfg.pipeline,
            ).to_pandas()
            scored = scored.sort_values("instruction_id", kind="stable").reset_index(drop=True)
            assessment = assess_table(scored, calibration.tau)
            atomic_write_table(self.run_dir.assessment(k), pa.Table.from_pandas(assessment, preserve_index=False))
            hard_flags = assessment["hard"].astype("boolean")  # nullable: <NA> = unscored
            hard, easy = int(hard_flags.eq(True).sum()), int(hard_flags.eq(False).sum())
            record.update(
                rows=len(assessment),
                hard=hard,
                easy=easy,
                unscored=len(assessment) - hard - easy,
                hard_ratio=round(hard / (hard + easy), 4) if hard + easy else None,
                generated_tokens=int(scored["student_tokens"].sum()),
                **stats,
            )

    def augment(self, k: int) -> None:
        """Phase D: one new question per hard instruction, ROUGE-L-filtered; balance with easy; new pools."""
        if self.done(k, "augment"):
            return
        with self.phase(k, "augment") as record:
            tuning = pd.read_parquet(self.run_dir.pool(k - 1, "tuning"))
            cache = pd.read_parquet(self.run_dir.pool(k - 1, "cache"))
            assessment = pd.read_parquet(self.run_dir.assessment(k))
            hard_flags = assessment["hard"].astype("boolean").eq(True).fillna(False)
            hard_rows = cache[cache["instruction_id"].isin(set(assessment.loc[hard_flags, "instruction_id"]))]
            hard_rows = hard_rows.sort_values("instruction_id")
            replies = run_processors(
                pa.Table.from_pandas(hard_rows, preserve_index=False),
                [self.processor(AugmentorProcessor, "teacher", self.cfg.roles.augmentor)],
                self.run_dir.phase_output(k, "augment"),
                self.cfg.pipeline,
            ).to_pandas()
            existing = pd.concat([tuning, cache])[["instruction_id", "image_id", "question"]]
            checked = validate_candidates(
                candidate_rows(replies, k),
                existing.drop_duplicates("instruction_id"),
                threshold=self.cfg.calibration.rouge_l_threshold,
            )
            atomic_write_table(self.run_dir.generated(k), pa.Table.from_pandas(checked, preserve_index=False))
            accepted = checked[checked["accepted"]][list(POOL_COLUMNS)]
            next_tuning, next_cache, counts = update_pools(
                self.cfg.calibration.pool_update,
                pool_from_frame(tuning, "tuning pool"),
                pool_from_frame(cache, "cache pool"),
                assessment,
                pool_from_frame(accepted, "accepted questions"),
                seed=self.cfg.run.seed,
                iteration=k,
            )
            atomic_write_table(self.run_dir.pool(k, "tuning"), next_tuning)
            atomic_write_table(self.run_dir.pool(k, "cache"), next_cache)
            reasons = checked.loc[~checked["accepted"], "reject_reason"].value_counts().to_dict()
            record.update({key: v for key, v in counts.items() if key not in ("iteration", "hard", "easy", "unscored")})
            record.update(
                rows=len(hard_rows),
                generated=len(checked),
                acceptance_ratio=round(float(checked["accepted"].mean()), 4) if len(checked) else None,
                rejected=reasons,
            )

    def evaluate(self, k: int, engine: str = "student") -> None:
        """The configured benchmarks on ``engine``'s current model -> eval/<benchmark>/ (k 0: after stage 1)."""
        if not eval_benchmarks(self.cfg) or (engine == "teacher" and not self.cfg.eval.teacher):
            return
        name = "eval" if engine == "student" else "eval_teacher"
        if self.done(k, name):
            return
        with self.phase(k, name) as record:
            generator = self.generator(engine, role=engine)
            judge = self.generator("teacher", role="judge") if needs_judge(self.cfg) else None  # the teacher judges
            world = self.run_dir.data / "world" if self.cfg.data.source == "world" else None
            results = evaluate_iteration(
                self.cfg, self.run_dir.root, k, engine, generator, world, judge=judge, model=self.model_of(engine)
            )
            record.update(rows=sum(r["metrics"].get("n", 0) for r in results.values()), **headline_metrics(results))

    # ----------------------------------------------------------------------------- helpers
    def train(
        self, stage: str, output: Path, dataset: Callable[[], ray.data.Dataset], *, seed: int, run_name: str
    ) -> dict:
        """One Ray Train job from the current student into ``output``; its summary. Resumes after a crash.

        A checkpoint an earlier attempt finished (it crashed before committing the phase) is reused; an
        interrupted one resumes from its last saved state. A ``--force``d change to what training depends on
        starts over instead. ``dataset`` is a thunk: nothing is read when the checkpoint is reused.
        """
        train_cfg = self.cfg.align if stage == "align" else self.cfg.tune
        changed = stale_training_keys(self.forced)
        if changed and output.exists():
            announce(f"{stage}: discarding {output.name} from before the forced change of {', '.join(changed)}")
            shutil.rmtree(output)
        if (output / SUMMARY_FILE).exists():
            announce(f"{stage}: reusing {output.name}, finished by an earlier attempt")
            return json.loads((output / SUMMARY_FILE).read_text())
        shutil.rmtree(output, ignore_errors=True)  # an empty folder left behind would be refused
        rows = dataset()
        await_trainer_resources(train_cfg, announce)
        result = train_student(
            stage=stage,
            init_checkpoint=self.student,
            output_dir=str(output),
            dataset=rows,
            train_cfg=train_cfg,
            seed=seed,
            metrics_path=str(self.run_dir.metrics),
            run_name=run_name,
            resume=not changed,
        )
        return result.metrics

    def teacher_answers(self, rows: pd.DataFrame, k: int, phase: str) -> tuple[pd.DataFrame, dict]:
        """Teacher answers for ``rows``, asking the engine only for answers never stored before."""
        keyed = self.answers.with_keys(rows)
        stored = self.answers.load()
        misses = keyed[~keyed["cache_key"].isin(stored.index)]
        stats = {"cache_hits": len(keyed) - len(misses), "cache_misses": len(misses)}
        if len(misses):
            answered = run_processors(
                pa.Table.from_pandas(misses, preserve_index=False),
                [self.processor(TeacherProcessor, "teacher", self.cfg.roles.teacher)],
                self.run_dir.phase_output(k, f"{phase}_teacher"),
                self.cfg.pipeline,
            ).to_pandas()
            new = self.answers.add(answered, f"iter_{k}_{phase}")
            stats["generated_tokens"] = int(new["teacher_tokens"].sum())
            stored = pd.concat([stored, new])  # misses are new keys: no re-read of the store
        keyed["teacher_answer"] = keyed["cache_key"].map(stored["teacher_answer"])
        return keyed, stats

    def processor(self, cls: type, engine: str, sampling: Any, **extra: Any) -> ProcessorSpec:
        """A Ray Data processor bound to ``engine`` (``extra``: the processor's own kwargs), deploying it first."""
        self.deploy(engine)
        return ProcessorSpec(
            cls,
            {
                "app_name": engine,
                "deployment": deployment_name(self.deployed[engine]),
                "sampling": to_dict(sampling),
                "run_seed": self.cfg.run.seed,
                "image_root": self.image_root,
                "timeout_s": self.cfg.engines[engine].request_timeout_s,
                "engine": to_dict(self.cfg.engines[engine]),
                **extra,
            },
            scope=self.processor_scope,
        )

    def generator(self, engine: str, role: str) -> ServeGenerator:
        """An evaluation generator over ``engine``'s current model, deploying it first."""
        self.deploy(engine)
        return ServeGenerator(engine, deployment_name(self.deployed[engine]), self.cfg.engines[engine], role=role)

    def deploy(self, engine: str) -> None:
        """Make ``engine`` serve its current model (no-op when it already does)."""
        model_path = self.model_of(engine)
        if self.deployed.get(engine) == model_path:
            return
        wall_s = deploy_engine(engine, self.cfg.engines[engine], model_path)
        self.deployed[engine] = model_path
        self.run_dir.log_metrics({"event": "deploy", "engine": engine, "model": model_path, "wall_s": round(wall_s, 3)})
        announce(f"deployed {engine}: {model_path}")

    def release(self) -> None:
        """Delete every deployed engine and wait until the cluster has its resources back."""
        if not self.deployed:
            return
        wall_s = release_engines({name: self.cfg.engines[name] for name in self.deployed})
        self.deployed.clear()
        self.run_dir.log_metrics({"event": "release", "wall_s": round(wall_s, 3)})
