"""The run-directory vocabulary (a light module: the CLI and the TUI import it without importing torch)."""

STAGE_ORDER = ("data", "pretrain_first", "pretrain", "weights", "finetune", "evaluate", "report")
DONE_NAME = "done.json"  # a stage directory holding this file is finished
CELL_FILE = "cell.json"  # a matrix cell's directory holds it: its arm, axes, seed, where its stages live
STAGES_DIR = "stages"  # RUN/stages/: the stage cache a matrix's cells share
