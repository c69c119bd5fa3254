"""The Driver actor: owns the MmDC loop, the run directory and the hand-over of resources.

One method per phase, each short; the loop in ``run`` reads on one screen:

    prepare -> align (stage 1) -> for k in 1..K: teach -> release -> tune -> deploy student -> assess -> augment

Inference phases keep the engines deployed (assess -> augment -> next teach); before training the
driver deletes every Serve app and waits until the resources are back, so the trainer's workers
can take the GPUs; after training it deploys the new student checkpoint.

Resume: ``state.json`` is the commit record. A phase counts as done only once its outputs are in
place and it is appended to ``state["completed"]``; a resumed driver skips completed phases
(restoring what they left in memory from ``state``), reruns the interrupted one (an inference
phase reuses the rows its crashed attempt already wrote, a training phase its last checkpoint),
and goes on.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from mmdc.config import Config, ConfigError, config_from_dict, dump_config, to_dict
from mmdc.rundir import RunDir, atomic_write_table

log = logging.getLogger("mmdc.driver")

TRAINING_SECTIONS = ("align", "tune", "models", "data")  # a forced change here invalidates saved training state
POOL_COLUMNS = ["instruction_id", "image_id", "image", "question", "origin", "parent_id", "iteration", "turn",
                "image_position", "source_id"]


def _say(msg: str) -> None:
    """Progress line in the job log (Ray forwards actor stdout to the driver process)."""
    print(f"[mmdc] {msg}", flush=True)


@ray.remote(num_cpus=0)
class Driver:
    """Runs one MmDC job end to end inside the cluster (verl habit: the loop lives in an actor)."""

    def __init__(self, cfg: dict, run_dir: str, resume: bool = False, forced: list[str] | None = None):
        import torch

        torch.set_num_threads(1)
        self.cfg: Config = config_from_dict(cfg)
        self.rd = RunDir(run_dir)
        self.rd.root.mkdir(parents=True, exist_ok=True)
        self.state = self.rd.load_state() if resume else {"status": "new", "completed": []}
        if not resume or forced:
            dump_config(self.cfg, self.rd.config)
        if not resume or forced:
            # Rows a crashed attempt wrote were made under another config (or another run): never reuse them.
            for tmp in self.rd.root.glob("answers/iter_*/*.tmp"):
                shutil.rmtree(tmp, ignore_errors=True)
        if forced:
            self.state.setdefault("forced_changes", []).append({"time": time.time(), "keys": forced})
        self.deployed: dict[str, str] = {}  # engine name -> model path it serves now
        self.stage_scope = f"run-{uuid.uuid4().hex}"  # this run's Ray Data stage workers (pipelines.StageSpec.scope)
        self.models: dict[str, str] = {}  # engine name -> model path it should serve (teacher, current student)
        data = self.state.get("data", {})
        self.image_root: str | None = data.get("image_root")
        self.captions: str | None = data.get("captions")
        self.teacher_fp = ""
        self._image_sha: dict[str, str] = {}
        self.forced = list(forced or [])
        self.resource_request = False  # True while an autoscaler request placed by check_resources stands
        from mmdc import metrics

        self.dashboard = metrics.dashboard_url()  # shown in every phase line, for the operator following the log

    # ----------------------------------------------------------------------------- the loop
    def run(self) -> str:
        if self.state.get("status") == "finished":
            _say(f"nothing to resume: the run in {self.rd.root} has finished")
            return str(self.rd.root)
        if self.state["completed"]:
            last = self.state["completed"][-1]
            _say(f"resuming after iteration {last['iteration']} · {last['phase']}")
        self.check_resources()
        try:
            return self._loop()
        finally:
            if self.resource_request:
                from mmdc.actors.resources import clear_resource_request

                clear_resource_request()  # let idle nodes scale down

    def _loop(self) -> str:
        self.release_stale_apps()
        self.prepare_data()
        student = self.prepare_models()
        student = self.align(student)
        self.models["student"] = student
        self.evaluate(0)  # the student after stage 1: the first point of the per-iteration curve
        self.evaluate(0, "teacher")  # the reference line, once
        for k in range(1, self.cfg.run.iterations + 1):
            self.teach(k)
            self.release_engines()
            student = self.tune(k, student)
            self.evaluate(k)  # deploys the new student, which assess needs anyway
            self.assess(k)
            self.augment(k)
        self.release_engines()
        self.write_report()
        self.state["status"] = "finished"
        self.rd.save_state(self.state)
        _say(f"finished: {self.rd.root}")
        return str(self.rd.root)

    # ----------------------------------------------------------------------------- phases
    def done(self, iteration: int, name: str) -> bool:
        """True when an earlier attempt completed this phase (then the caller skips it)."""
        finished = any(c["iteration"] == iteration and c["phase"] == name for c in self.state["completed"])
        if finished:
            _say(f"iteration {iteration} · {name}: completed by an earlier attempt, skipped")
        return finished

    @contextmanager
    def phase(self, iteration: int, name: str, **extra):
        """Time a phase, log its metrics line and record it in state.json when it completes."""
        from mmdc import metrics

        _say(f"iteration {iteration} · {name} …")
        from mmdc.actors.cleanup import remove_orphaned_placement_groups

        if n := remove_orphaned_placement_groups():  # a crashed attempt's trainer would hold its resources
            _say(f"removed {n} placement group(s) left by a crashed attempt")
        self.state["current"] = {"iteration": iteration, "phase": name, "started": round(time.time(), 3)}
        self.state["status"] = "running"
        self.rd.save_state(self.state)
        metrics.publish_state(iteration, name, run=self.rd.root.name)
        record: dict = {"iteration": iteration, "phase": name, **extra}
        start = time.perf_counter()
        yield record
        record["wall_s"] = round(time.perf_counter() - start, 3)
        if record.get("rows") and record["wall_s"] > 0:
            record["rows_per_s"] = round(record["rows"] / record["wall_s"], 3)
        if record.get("generated_tokens") and record["wall_s"] > 0:
            record["gen_tokens_per_s"] = round(record["generated_tokens"] / record["wall_s"], 3)
        self.rd.log_metrics(record)
        metrics.publish_phase(record, run=self.rd.root.name)  # Ray dashboard / Prometheus
        self.state["completed"].append({"iteration": iteration, "phase": name, "wall_s": record["wall_s"],
                                        "rows": record.get("rows")})
        self.state.pop("current", None)
        self.rd.save_state(self.state)
        summary = ", ".join(f"{k}={v}" for k, v in record.items() if k not in ("iteration", "phase"))
        where = f" · dashboard {self.dashboard}" if self.dashboard else ""
        _say(f"iteration {iteration} · {name} done: {summary}{where}")

    def check_resources(self) -> None:
        """Fail fast when a phase cannot fit; on an autoscaling cluster, first ask for nodes and wait."""
        from mmdc.actors.resources import wait_for_resources

        self.resource_request = wait_for_resources(self.cfg, self.cfg.run.resource_wait_s, say=_say)

    def prepare_data(self) -> None:
        """Build or read the instruction set, unfold it to D_sin, and write pools/iter_0."""
        from mmdc.data.images import ImageError, load_image
        from mmdc.data.llava import load_llava_records, unfold_single_turn

        if self.done(0, "prepare"):
            return
        with self.phase(0, "prepare") as rec:
            d = self.cfg.data
            if d.source == "world":
                from mmdc.data.world import generate_world

                w = d.world
                files = generate_world(self.rd.data / "world", num_images=w.num_images,
                                       questions_per_image=w.questions_per_image, seed=w.seed,
                                       image_size=w.image_size, test_images=w.test_images)
                instructions, self.image_root = str(files.instructions), str(files.images)
                self.captions = str(files.captions)
            else:
                instructions, self.image_root = d.instructions, d.image_folder
                self.captions = d.captions
            loaded = load_llava_records(instructions, strict=False)
            self.rd.log_skips([{"stage": "load", **s} for s in loaded.skipped])
            pool, skips = unfold_single_turn(loaded.records, None)  # images stay relative to image_root
            self.rd.log_skips([{"stage": "unfold", **s} for s in skips])
            df = pool.to_pandas()
            # Every image is opened once up front: a bad image is a recorded skip, not a crash mid-GPU-phase.
            bad: dict[str, str] = {}
            for img in df["image"].unique():
                try:
                    load_image(self.image_path(img), max_pixels=d.max_image_pixels)
                except ImageError as err:
                    bad[img] = str(err)
            if bad:
                dropped = df[df["image"].isin(bad)]
                self.rd.log_skips([{"stage": "image", "instruction_id": r.instruction_id, "image": r.image,
                                    "reason": bad[r.image]} for r in dropped.itertuples()])
                df = df[~df["image"].isin(bad)]
            df = df.sort_values("instruction_id", kind="stable")
            if d.max_instructions is not None:
                df = df.head(d.max_instructions)
            if df.empty:
                raise ValueError(f"no usable instruction in {instructions} (see {self.rd.skipped})")
            table = as_pool(df, "D_sin")
            atomic_write_table(self.rd.pool(0, "tuning"), table)
            atomic_write_table(self.rd.pool(0, "cache"), table)
            self.state["data"] = {"image_root": self.image_root, "captions": self.captions}
            rec.update(rows=len(df), images=int(df["image_id"].nunique()), skipped_images=len(bad),
                       skipped_rows=len(loaded.skipped) + len(skips))

    def prepare_models(self) -> str:
        """Resolve the teacher and the initial student to local HF checkpoints."""
        from mmdc.actors.engines import model_fingerprint

        self.models["teacher"] = self.resolve_model(self.cfg.models.teacher)
        self.teacher_fp = model_fingerprint(self.models["teacher"])
        if self.state.get("student"):  # a resumed run goes on from its last trained student
            self.models["student"] = self.state["student"]
            return self.state["student"]
        return self.resolve_model(self.cfg.models.student_init)

    def align(self, student: str) -> str:
        """Stage 1: train only the projector on caption pairs (skipped when align.enabled is false)."""
        if not self.cfg.align.enabled or self.done(0, "align"):
            return student
        if not self.captions:
            raise ConfigError("align.enabled needs caption pairs: set data.captions (or align.enabled=false)")
        from mmdc.data.llava import load_caption_pairs
        from mmdc.train.loop import planned_steps

        with self.phase(0, "align") as rec:
            rows = [{**p, "image": self.image_path(p["image"])} for p in load_caption_pairs(self.captions)]
            if self.cfg.data.clip_filter.enabled:
                from mmdc.data.clipscore import filter_by_clip_score

                clip = filter_by_clip_score(rows, self.cfg.data.clip_filter, self.cfg.data.max_image_pixels)
                self.rd.log_skips([{"stage": "clip_filter", **s} for s in clip.skipped])
                rows = clip.kept
                rec.update({f"clip_{k}": v for k, v in clip.stats.items()})
            f = self.cfg.data.caption_filter
            if f.enabled:
                from mmdc.data.nounphrase import filter_caption_pairs

                rows, stats = filter_caption_pairs(rows, f.spacy_pipeline, seed=self.cfg.run.seed, n_process=f.n_process,
                                                   min_count=f.min_count, max_per_phrase=f.max_per_phrase)
                rec.update({f"filter_{k}": v for k, v in stats.items()})
            if planned_steps(len(rows), self.cfg.align) < 1:
                rec.update(skipped=f"{len(rows)} caption pairs make no optimizer step", rows=len(rows))
                return student
            summary = self.train("align", student, self.rd.checkpoint(None), lambda: ray.data.from_items(rows),
                                 self.cfg.align, seed=self.cfg.run.seed, run_name=f"{self.rd.root.name}-align")
            rec.update(rows=len(rows), **{f"train_{k}": v for k, v in summary.items()})
            self.state["student"] = str(self.rd.checkpoint(None))
        return self.state["student"]

    def teach(self, k: int) -> None:
        """Phase A: the teacher answers the tuning pool (cached); fold answers into conversations (Eq. 1)."""
        from mmdc.data.pools import fold_conversations

        if self.done(k, "teach"):
            return
        with self.phase(k, "teach") as rec:
            tuning = pd.read_parquet(self.rd.pool(k - 1, "tuning"))
            answered, stats = self.teacher_answers(tuning, k, "teach")
            conv = fold_conversations(answered, answer_column="teacher_answer")
            atomic_write_table(self.rd.conversations(k), pa.Table.from_pandas(conv, preserve_index=False))
            rec.update(rows=len(tuning), conversations=len(conv), **stats)

    def tune(self, k: int, student: str) -> str:
        """Phase B: Ray Train tunes the student on this iteration's conversations, from its last checkpoint."""
        from mmdc.train.loop import planned_steps

        if self.done(k, "tune"):
            return student
        with self.phase(k, "tune") as rec:
            conversations = pq.read_metadata(self.rd.conversations(k)).num_rows
            if planned_steps(conversations, self.cfg.tune) < 1:
                # Nothing to learn from (e.g. no accepted question and no easy sample): keep the checkpoint.
                rec.update(skipped=f"{conversations} conversations make no optimizer step", rows=conversations)
                self.state["student"] = self.models["student"] = student
                return student
            summary = self.train("tune", student, self.rd.checkpoint(k),
                                 lambda: self.training_dataset(self.rd.conversations(k)), self.cfg.tune,
                                 seed=self.cfg.run.seed + k, run_name=f"{self.rd.root.name}-tune-{k}")
            rec.update(**{f"train_{key}": v for key, v in summary.items()})
            self.state["student"] = self.models["student"] = str(self.rd.checkpoint(k))
        return self.models["student"]

    def train(self, stage: str, init: str, output_dir: Path, dataset, train_cfg, *, seed: int, run_name: str) -> dict:
        """Run one Ray Train job into ``output_dir`` and return its summary metrics, picking up after a crash.

        A checkpoint an earlier attempt finished (it crashed before committing the phase) is reused; an
        interrupted one resumes from its last saved training state. A ``--force``d change to what
        training depends on starts over instead, since the saved state was made under the old values.
        ``dataset`` is a thunk: nothing is read when the checkpoint is reused.
        """
        import json

        from mmdc.train.loop import SUMMARY_FILE, train_student

        changed = training_keys(self.forced)
        if changed and output_dir.exists():
            _say(f"{stage}: discarding {output_dir.name} from before the forced change of {', '.join(changed)}")
            shutil.rmtree(output_dir)
        if (output_dir / SUMMARY_FILE).exists():
            _say(f"{stage}: reusing {output_dir.name}, finished by an earlier attempt")
            return json.loads((output_dir / SUMMARY_FILE).read_text())
        shutil.rmtree(output_dir, ignore_errors=True)  # an empty folder left behind would be refused
        ds = dataset()
        self.await_trainer_resources(train_cfg)
        result = train_student(stage=stage, init_checkpoint=init, output_dir=str(output_dir), dataset=ds,
                               train_cfg=train_cfg, seed=seed, metrics_path=str(self.rd.metrics), run_name=run_name,
                               resume=not changed)
        return result.metrics

    def assess(self, k: int) -> None:
        """Phase C: teacher and student answer the cache pool; the referee scores both orders; Eq. 6."""
        from mmdc.data.calibration import assess_table, random_selection
        from mmdc.data.pipelines import RefereeStage, StudentStage, run_stages

        if self.done(k, "assess"):
            return
        with self.phase(k, "assess") as rec:
            cache = pd.read_parquet(self.rd.pool(k - 1, "cache"))
            c = self.cfg.calibration
            if c.selection == "random":  # plain distillation (ablation): no student, no referee
                picked = random_selection(cache, c.random_fraction, seed=self.cfg.run.seed, iteration=k)
                atomic_write_table(self.rd.assessment(k), pa.Table.from_pandas(picked, preserve_index=False))
                n_hard = int(picked["hard"].sum())
                rec.update(rows=len(picked), selection="random", hard=n_hard, easy=len(picked) - n_hard)
                return
            with_teacher, stats = self.teacher_answers(cache, k, "assess")
            table = pa.Table.from_pandas(with_teacher, preserve_index=False)
            scored = run_stages(table, [self.stage(StudentStage, "student", self.cfg.roles.student),
                                        self.stage(RefereeStage, "teacher", self.cfg.roles.referee,
                                                   scoring=c.referee_scoring)],
                                self.rd.phase_output(k, "assess"), self.cfg.pipeline).to_pandas()
            scored = scored.sort_values("instruction_id", kind="stable").reset_index(drop=True)
            assessment = assess_table(scored, self.cfg.calibration.tau)
            atomic_write_table(self.rd.assessment(k), pa.Table.from_pandas(assessment, preserve_index=False))
            hard = assessment["hard"].astype("boolean")  # nullable: <NA> = unscored
            n_hard, n_easy = int(hard.eq(True).sum()), int(hard.eq(False).sum())
            rec.update(rows=len(assessment), hard=n_hard, easy=n_easy, unscored=len(assessment) - n_hard - n_easy,
                       hard_ratio=round(n_hard / (n_hard + n_easy), 4) if n_hard + n_easy else None,
                       generated_tokens=int(scored["student_tokens"].sum()), **stats)

    def augment(self, k: int) -> None:
        """Phase D: one new question per hard instruction, ROUGE-L-filtered; balance with easy; new pools."""
        from mmdc.data.augment import validate_candidates
        from mmdc.data.pipelines import AugmentorStage, run_stages
        from mmdc.data.pools import update_pools

        if self.done(k, "augment"):
            return
        with self.phase(k, "augment") as rec:
            tuning = pd.read_parquet(self.rd.pool(k - 1, "tuning"))
            cache = pd.read_parquet(self.rd.pool(k - 1, "cache"))
            assessment = pd.read_parquet(self.rd.assessment(k))
            hard_ids = set(assessment.loc[assessment["hard"].astype("boolean").eq(True).fillna(False), "instruction_id"])
            hard_rows = cache[cache["instruction_id"].isin(hard_ids)].sort_values("instruction_id")
            out = run_stages(pa.Table.from_pandas(hard_rows, preserve_index=False),
                             [self.stage(AugmentorStage, "teacher", self.cfg.roles.augmentor)],
                             self.rd.phase_output(k, "augment"), self.cfg.pipeline).to_pandas()
            cands = self.candidate_rows(out, k)
            existing = pd.concat([tuning, cache])[["instruction_id", "image_id", "question"]].drop_duplicates("instruction_id")
            checked = validate_candidates(cands, existing, threshold=self.cfg.calibration.rouge_l_threshold)
            atomic_write_table(self.rd.generated(k), pa.Table.from_pandas(checked, preserve_index=False))
            accepted = checked[checked["accepted"]][POOL_COLUMNS]
            nxt_tuning, nxt_cache, counts = update_pools(
                self.cfg.calibration.pool_update, as_pool(tuning, "tuning pool"), as_pool(cache, "cache pool"),
                assessment, as_pool(accepted, "accepted questions"),
                seed=self.cfg.run.seed, iteration=k)
            atomic_write_table(self.rd.pool(k, "tuning"), nxt_tuning)
            atomic_write_table(self.rd.pool(k, "cache"), nxt_cache)
            reasons = checked.loc[~checked["accepted"], "reject_reason"].value_counts().to_dict()
            counts = {k: v for k, v in counts.items() if k not in ("iteration", "hard", "easy", "unscored")}
            rec.update(counts)
            rec.update(rows=len(hard_rows), generated=len(checked),
                       acceptance_ratio=round(float(checked["accepted"].mean()), 4) if len(checked) else None,
                       rejected=reasons)

    def evaluate(self, k: int, engine: str = "student") -> None:
        """The configured benchmarks (``eval``) on ``engine``'s current model -> eval/<benchmark>/ (k 0: after stage 1)."""
        from mmdc.actors.engines import deployment_name
        from mmdc.config import eval_benchmarks
        from mmdc.eval.iteration import evaluate_iteration, headline_metrics, needs_judge
        from mmdc.eval.serve import ServeGenerator

        if not eval_benchmarks(self.cfg) or (engine == "teacher" and not self.cfg.eval.teacher):
            return
        name = "eval" if engine == "student" else "eval_teacher"
        if self.done(k, name):
            return
        with self.phase(k, name) as rec:
            self.deploy(engine)
            gen = ServeGenerator(engine, deployment_name(self.models[engine]), self.cfg.engines[engine], role=engine)
            judge = None
            if needs_judge(self.cfg):  # LLaVA-Bench without eval.llavabench.judge_url: the teacher judges
                self.deploy("teacher")
                judge = ServeGenerator("teacher", deployment_name(self.models["teacher"]), self.cfg.engines["teacher"],
                                       role="judge")
            world = self.rd.data / "world" if self.cfg.data.source == "world" else None
            results = evaluate_iteration(self.cfg, self.rd.root, k, engine, gen, world, judge=judge,
                                         model=self.models[engine])
            rec.update(rows=sum(r["metrics"].get("n", 0) for r in results.values()), **headline_metrics(results))

    # ----------------------------------------------------------------------------- helpers
    def candidate_rows(self, out: pd.DataFrame, k: int) -> pd.DataFrame:
        """Augmentor replies -> pool rows of origin 'generated' with lineage to their parent."""
        rows = []
        for r in out.sort_values("instruction_id").itertuples():
            new_id = hashlib.sha1(f"{r.instruction_id}:gen:{k}:{r.attempt}".encode()).hexdigest()[:16]
            rows.append({"instruction_id": new_id, "image_id": r.image_id, "image": r.image, "question": r.candidate,
                         "origin": "generated", "parent_id": r.instruction_id, "iteration": k, "turn": -1,
                         "image_position": "none", "source_id": r.source_id, "augmentor_reply": r.augmentor_reply})
        cols = POOL_COLUMNS + ["augmentor_reply"]
        return pd.DataFrame(rows, columns=cols)

    def training_dataset(self, path: Path) -> "ray.data.Dataset":
        """The conversations as a Ray Dataset whose rows carry absolute image paths (workers may run anywhere).

        Not ``read_parquet``: its listing task would wait for a CPU the trainer's workers (or a
        crashed attempt's, not yet reclaimed) hold; see ``dataset_from_table``.
        """
        from mmdc.data.pipelines import dataset_from_table

        df = pd.read_parquet(path)
        df["image"] = [self.image_path(img) if img else img for img in df["image"]]
        table = pa.Table.from_pandas(df, preserve_index=False)
        return dataset_from_table(table, max(1, self.cfg.tune.num_workers) * 2)

    def teacher_answers(self, rows: pd.DataFrame, k: int, phase: str) -> tuple[pd.DataFrame, dict]:
        """Teacher answers for ``rows``, asking the engine only for keys never answered before."""
        from mmdc.actors import roles
        from mmdc.data.pipelines import TeacherStage, row_seed, run_stages
        from mmdc.data.pools import answer_cache_key

        sampling = to_dict(self.cfg.roles.teacher)
        sampling.pop("retries", None)
        rows = rows.copy()
        rows["cache_key"] = [
            answer_cache_key(self.teacher_fp, roles.teacher_messages(q, "<image>"), self.image_sha(img), sampling,
                             row_seed(self.cfg.run.seed, roles.Role.TEACHER.value, iid))
            for q, img, iid in zip(rows["question"], rows["image"], rows["instruction_id"])]
        cache = self.load_answer_cache()
        misses = rows[~rows["cache_key"].isin(cache.index)]
        stats = {"cache_hits": len(rows) - len(misses), "cache_misses": len(misses)}
        if len(misses):
            out = run_stages(pa.Table.from_pandas(misses, preserve_index=False),
                             [self.stage(TeacherStage, "teacher", self.cfg.roles.teacher)],
                             self.rd.phase_output(k, f"{phase}_teacher"), self.cfg.pipeline).to_pandas()
            new = out[["cache_key", "teacher_answer", "teacher_tokens"]].drop_duplicates("cache_key")
            atomic_write_table(self.rd.answer_cache / f"iter_{k}_{phase}.parquet",
                               pa.Table.from_pandas(new.sort_values("cache_key"), preserve_index=False))
            stats["generated_tokens"] = int(new["teacher_tokens"].sum())
            cache = pd.concat([cache, new.set_index("cache_key")])  # misses are new keys: no re-read of the cache
        rows["teacher_answer"] = rows["cache_key"].map(cache["teacher_answer"])
        return rows, stats

    def load_answer_cache(self) -> pd.DataFrame:
        files = sorted(self.rd.answer_cache.glob("*.parquet"))
        if not files:
            return pd.DataFrame({"teacher_answer": pd.Series(dtype=str)}, index=pd.Index([], name="cache_key"))
        df = pd.concat([pd.read_parquet(f) for f in files]).drop_duplicates("cache_key")
        return df.set_index("cache_key")

    def stage(self, cls, engine: str, sampling, **extra: Any):
        """A Ray Data stage bound to ``engine`` (``extra``: the stage's own keyword arguments), deploying it first."""
        from mmdc.actors.engines import deployment_name
        from mmdc.data.pipelines import StageSpec

        self.deploy(engine)
        return StageSpec(cls, {"app_name": engine, "deployment": deployment_name(self.deployed[engine]),
                               "sampling": to_dict(sampling), "run_seed": self.cfg.run.seed,
                               "image_root": self.image_root,
                               "timeout_s": self.cfg.engines[engine].request_timeout_s,
                               "engine": to_dict(self.cfg.engines[engine]), **extra},
                         scope=self.stage_scope)

    def deploy(self, engine: str) -> None:
        """Make ``engine`` serve its current model (no-op when it already does)."""
        from ray import serve

        from mmdc.actors.engines import build_engine_app

        model_path = self.models[engine]
        if self.deployed.get(engine) == model_path:
            return
        start = time.perf_counter()
        app = build_engine_app(self.cfg.engines[engine], model_path)
        if app is not None:  # None: backend openai, an external endpoint, nothing to deploy
            serve.start(proxy_location="Disabled")
            serve.run(app, name=engine, route_prefix=None)
        self.deployed[engine] = model_path
        self.rd.log_metrics({"event": "deploy", "engine": engine, "model": model_path,
                             "wall_s": round(time.perf_counter() - start, 3)})
        _say(f"deployed {engine}: {model_path}")

    def release_stale_apps(self) -> None:
        """Delete this run's engine apps that a crashed earlier attempt left deployed (they hold resources)."""
        from ray import serve

        try:
            apps = set(serve.status().applications)
        except Exception:  # noqa: BLE001 - Serve not started on this cluster: nothing is stale
            return
        for engine in sorted(apps & set(self.cfg.engines)):
            serve.delete(engine)
            _say(f"removed the {engine} engine left by an earlier attempt")

    def release_engines(self) -> None:
        """Delete every Serve app and wait until the cluster has its resources back."""
        from ray import serve

        from mmdc.actors.engines import wait_for

        if not self.deployed:
            return
        start = time.perf_counter()
        for engine in list(self.deployed):
            if self.cfg.engines[engine].backend != "openai":
                serve.delete(engine)
            del self.deployed[engine]
        total = ray.cluster_resources()

        def back() -> bool:
            avail = ray.available_resources()
            return all(avail.get(r, 0) >= total.get(r, 0) - 1e-6 for r in ("CPU", "GPU") if r in total)

        wait_for(back, timeout_s=120, what="engine resources to be released")
        self.rd.log_metrics({"event": "release", "wall_s": round(time.perf_counter() - start, 3)})

    def await_trainer_resources(self, train_cfg, timeout_s: float = 180) -> None:
        """Wait until the trainer's workers fit in what is free now, or say in the log what holds it.

        After a crash, Ray reclaims the dead attempt's workers and placement groups asynchronously;
        starting the trainer before that only queues it behind them. Never fails: on a shared
        cluster something else may hold resources, and Ray Train then waits for them itself.
        """
        from mmdc.actors.engines import wait_for

        need = {"CPU": train_cfg.num_workers * train_cfg.cpus_per_worker,
                "GPU": train_cfg.num_workers * train_cfg.gpus_per_worker}

        def free() -> bool:
            avail = ray.available_resources()
            return all(avail.get(r, 0.0) >= n - 1e-6 for r, n in need.items() if n > 0)

        try:
            wait_for(free, timeout_s=timeout_s, what="the trainer's resources")
        except TimeoutError:
            _say(f"the trainer needs {need} but only {ray.available_resources()} is free; starting anyway")

    def resolve_model(self, spec: str) -> str:
        """``tiny:<name>`` builds (once, cached) an embedded tiny model; anything else is a path or hub id.

        tiny:teacher        the world teacher, trained locally on the synthetic world (full schedule)
        tiny:teacher-short  the same, short schedule (tests, CI)
        tiny:random-teacher an untrained teacher (plumbing only: its referee never parses)
        tiny:student        the untrained small student (with the world teacher's vision tower when the
                            teacher is tiny:teacher*, as the paper's student shares the teacher's CLIP)
        """
        if spec.startswith("tiny:"):
            import os

            from mmdc.data.world import world_corpus
            from mmdc.train.tiny import ensure_tiny_models
            from mmdc.train.world_teacher import ensure_world_teacher

            cache = Path(os.environ.get("MMDC_CACHE") or os.path.expanduser(self.cfg.models.cache_dir)) / "models"
            texts = world_corpus()  # + the Table 6 prompts, added by the tokenizer builder
            name = spec.split(":", 1)[1]
            if name in ("teacher", "teacher-short"):
                schedule = "short" if name == "teacher-short" else "full"
                _say(f"world teacher ({schedule} schedule): building once into {cache} if missing …")
                return ensure_world_teacher(cache, schedule=schedule, tokenizer_texts=texts,
                                            log=lambda m: _say(f"world teacher: {m}"))
            models = ensure_tiny_models(cache, texts, seed=0)
            tiny = {"random-teacher": models["teacher"], "student": models["student"]}
            if name == "student" and self.cfg.models.teacher in ("tiny:teacher", "tiny:teacher-short"):
                # As in the paper (one CLIP for both), the student sees through the teacher's vision tower.
                from mmdc.train.world_teacher import student_with_teacher_vision

                return student_with_teacher_vision(models["student"], self.models["teacher"], cache)
            if name not in tiny:
                known = ["tiny:teacher", "tiny:teacher-short"] + [f"tiny:{n}" for n in tiny]
                raise ConfigError(f"unknown tiny model '{spec}' (known: {', '.join(known)})")
            return str(tiny[name])
        if spec == "assemble":
            from mmdc.train.assembly import assemble_llava

            out = self.rd.root / "checkpoints" / "student" / "init"
            if not out.exists():
                assemble_llava(self.cfg.models.vision_tower, self.cfg.models.language_model, str(out),
                               projector=self.cfg.models.projector)
            return str(out)
        return spec

    def image_path(self, image: str) -> str:
        import os

        return image if os.path.isabs(image) or not self.image_root else os.path.join(self.image_root, image)

    def image_sha(self, image: str) -> str:
        from mmdc.data.images import image_sha256

        if image not in self._image_sha:
            self._image_sha[image] = image_sha256(self.image_path(image))
        return self._image_sha[image]

    def write_report(self) -> None:
        from mmdc.report import write_report

        write_report(self.rd)


def training_keys(changed: list[str]) -> list[str]:
    """The dotted config keys among ``changed`` that make a saved training state or checkpoint stale.

    Resources and the checkpoint cadence (``RESUME_FREE_KEYS``) may change between attempts.
    """
    from mmdc.train.loop import RESUME_FREE_KEYS

    def stale(key: str) -> bool:
        section, _, rest = key.partition(".")
        if section in ("align", "tune"):
            return rest.split(".")[0] not in RESUME_FREE_KEYS
        return section in TRAINING_SECTIONS or key == "run.seed"

    return [k for k in changed if stale(k)]


def as_pool(df: pd.DataFrame, where: str) -> pa.Table:
    """A pandas frame of pool rows back to a validated Arrow pool (None/NaN handled by Arrow, not pandas)."""
    from mmdc.data.schema import check_pool

    table = pa.Table.from_pandas(df[POOL_COLUMNS], preserve_index=False)
    return check_pool(table, where)
