"""The backend and precision names a user may give, importable without torch.

`models.backends` re-exports them; a run checks its settings against them before anything heavy
is imported or started (pipeline.runspec), so a wrong name fails in a moment.
"""

from __future__ import annotations

BACKENDS = ("torch", "onnxruntime", "tensorrt")
PRECISIONS = ("fp32", "bf16", "fp16", "int8", "fp8")
