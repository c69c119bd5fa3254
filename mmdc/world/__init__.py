"""The embedded default: a synthetic world with exact ground truth, and tiny models that learn it on a CPU.

    scenes.py   scenes of coloured shapes, their questions, answers and grading; the generated data set
    grading.py  the world's held-out test split as a benchmark (free-form and multiple choice)
    tiny.py     tiny LLaVA-architecture models and their locally trained tokenizer
    teacher.py  the world teacher: the tiny teacher trained on the world for its three Table 6 jobs
    models.py   ``resolve``: a ``models.*`` spec (``tiny:<name>``, ``assemble``, a path or hub id) -> a local path

Nothing below this package knows the world exists; the driver asks ``models.resolve`` for a path.
"""
