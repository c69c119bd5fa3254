"""mmdc: Multimodal Distillation Calibration on Ray.

A frozen vision-language teacher trains a smaller student; after every round the
student's weak spots are measured and turned into new, harder training questions
(Li et al., SIGIR '24). Entry point: ``python -m mmdc.run``.
"""

__version__ = "0.1.0"
