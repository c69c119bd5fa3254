"""Evaluation harness (ScienceQA, SEED-Bench, LLaVA-Bench, the synthetic world) and report tables.

One module per benchmark (``scienceqa``, ``seed``, ``llavabench``; the world's in
``mmdc.world.grading``), each pure: ``load`` reads the benchmark's own files into
items with a prompt and an image, ``evaluate`` scores raw model replies the way the
reference harness does (LLaVA's eval scripts), so numbers compare with the paper's
Tables 1-3. ``harness`` turns any of them into a ``Task`` and runs it on a
``Generator`` with per-sample seeds; ``report`` writes the result files. Two
callers share that path: ``cli`` (``python -m mmdc.eval``, a checkpoint through
``HFGenerator``) and ``iteration`` (the Driver, after every iteration, through the
deployed engine with ``serve.ServeGenerator``).
"""
