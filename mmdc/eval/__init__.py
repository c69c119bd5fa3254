"""Evaluation harness (ScienceQA, SEED-Bench, LLaVA-Bench) and report tables.

One module per benchmark (``scienceqa``, ``seed``, ``llavabench``), each pure:
``load`` reads the benchmark's own files into items with a prompt and an image,
``evaluate`` scores raw model replies the way the reference harness does (LLaVA's
eval scripts), so numbers compare with the paper's Tables 1-3. ``report`` writes
``results.json`` / ``samples.jsonl`` / ``results.md``; ``cli`` (``python -m mmdc.eval``)
runs a checkpoint through ``mmdc.actors.engines.HFGenerator`` with the paper's
test temperatures and per-row seeds.
"""
