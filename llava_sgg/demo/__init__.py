"""An offline demo: a small LLaVA fine-tuned and evaluated on scenes of real handwritten digits
(scikit-learn's ``load_digits``), written in LLaVA-v1.5's training and benchmark file formats."""

from .data import DemoData, DemoDataConfig, EvalFiles, Scene, build_demo_data, render_scene

__all__ = ["DemoData", "DemoDataConfig", "EvalFiles", "Scene", "build_demo_data", "render_scene"]
