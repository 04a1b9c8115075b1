"""Stage names in pipeline order (a light module: the CLI imports it without importing torch)."""

STAGE_ORDER = ("data", "pretrain", "weights", "finetune", "evaluate", "report")
