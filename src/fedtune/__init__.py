"""fedtune: federated, privacy-preserving fine-tuning of large language models."""

import logging

__version__ = "0.1.0"

# bitsandbytes (model.quantization) is imported by peft in every process. On CPUs with AVX512-BF16
# it tries to fetch an optional 4-bit kernel from the hub at import and warns when it cannot; its
# own kernels serve instead, and fedtune runs offline. Real failures still log as errors.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
