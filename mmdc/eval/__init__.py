"""Evaluation harness (ScienceQA, SEED-Bench, LLaVA-Bench) and report tables."""
