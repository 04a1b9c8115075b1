"""`Problem`: one thing wrong with a dataset, what the checks (check.py) and the format readers (formats.py) report."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a dataset: the file it concerns, a short kind, and what to do."""

    file: str
    kind: str
    message: str

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.file}: {self.kind}: {self.message}"
