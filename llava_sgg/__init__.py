"""llava-sgg: LLaVA-v1.5 supervised fine-tuning with SGG-wrapped optimizers."""

import logging
import warnings

__version__ = "0.1.0"


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


# Two messages of this project's dependencies that contradict its documentation, each silenced where it
# comes from and nothing else with it; here because peft, which imports bitsandbytes, is imported by
# several modules, and this runs before any of them.
#
# bitsandbytes (>= 0.49, on CPUs with AVX512-BF16) tries at import to fetch an optional CPU 4-bit kernel from
# the Hub, is refused as remote code, and logs "Failed to load CPU gemm_4bit_forward from kernels-community:
# ... Set trust_remote_code=True ...". It then uses its own CPU kernel; this project never runs remote code
# and its QLoRA runs on GPUs, so the hint is only noise. Other messages of that logger still show.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    _DropMessage("Failed to load CPU gemm_4bit_forward from kernels-community"))
# peft's get_peft_model reads `model.is_gradient_checkpointing`, which transformers 5 deprecates with a
# FutureWarning; the property still answers, and nothing in this project reads it.
warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning,
                        module=r"transformers\.modeling_utils")
