"""llava-sgg: LLaVA-v1.5 supervised fine-tuning with SGG-wrapped optimizers."""

__version__ = "0.1.0"
