"""The choices an export takes, by name: its folder formats and on-disk dtypes.

The exporter (``audiollm.export``) checks them and the CLI (``audiollm.export_cli``) offers them; they live here,
below both, because the CLI must build its parser without importing torch, and the exporter imports torch at once.
"""

FORMATS = ("auto", "qwen2_audio", "native")
DTYPE_NAMES = ("bf16", "fp16", "fp32")  # audiollm.build.DTYPES' keys (build imports torch)
