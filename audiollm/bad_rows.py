"""Bad rows during training: skipped, counted by kind, logged with examples, and a ceiling that stops the run.

One corrupt file must not kill a three-day run, and a manifest that is 30 % broken must not train for three days
either. Every skipped row is appended as one JSON line to ``bad_rows.jsonl`` in the output folder: an append of a
short line is atomic, so every rank and every dataloader worker can write to the same file, and nothing is lost
when the counters of a worker process die with it. ``read_bad_rows`` sums the file for the training summary.

The ceiling is one for the whole run. A training collator's log does not check it (``check=False``): each batch
carries what its rows added (``TALLY_KEY``: rows seen, rows skipped) from whichever worker made it to its rank's
trainer, which sums the tallies over all ranks every step (``audiollm.crash_safety``), so every rank stops at the
same step. A log that sees every row itself (a manifest's unparseable lines, the preflight sample) checks its own.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

BAD_ROWS_FILE = "bad_rows.jsonl"
EXAMPLES_PER_KIND = 3  # logged in full; after that, one summary line every LOG_EVERY rows of that kind
LOG_EVERY = 100
MIN_ROWS_FOR_CEILING = 50  # the bad fraction of fewer rows says little (one bad row in 10 is not 10 %)
TALLY_KEY = "row_tally"  # a training batch's [rows seen, rows skipped], for the run-wide ceiling


class TooManyBadRows(RuntimeError):
    """More than ``max_bad_fraction`` of the rows seen were bad: the data needs fixing before training on."""


@dataclass
class BadRowLog:
    """Counts rows seen and rows skipped by kind; appends each skip to ``path`` (None: count and log only).
    ``check=False``: the ceiling is left to the trainer, which sums every process's ``take_tally``."""

    path: str | None = None
    max_fraction: float = 0.01
    seen: int = 0
    counts: Counter = field(default_factory=Counter)
    check: bool = True
    tallied: tuple[int, int] = (0, 0)  # (seen, bad) at the last take_tally

    def good(self) -> None:
        self.seen += 1

    def bad(self, row_id: str, kind: str, message: str) -> None:
        """Record one skipped row; raises TooManyBadRows once the ceiling is passed."""
        self.seen += 1
        self.counts[kind] += 1
        n = self.counts[kind]
        if n <= EXAMPLES_PER_KIND:
            log.warning("skipped %s (%s): %s", row_id, kind, message)
        elif n % LOG_EVERY == 0:
            log.warning("skipped %d rows of kind %s so far (latest: %s)", n, kind, row_id)
        if self.path:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"id": row_id, "kind": kind, "message": message[:500]}) + "\n")
        if self.check:
            self.check_ceiling()

    @property
    def total_bad(self) -> int:
        return sum(self.counts.values())

    def take_tally(self) -> list[int]:
        """[rows seen, rows skipped] since the last call: what one batch adds to the run's counts."""
        seen, bad = self.seen - self.tallied[0], self.total_bad - self.tallied[1]
        self.tallied = (self.seen, self.total_bad)
        return [seen, bad]

    def check_ceiling(self, min_rows: int = MIN_ROWS_FOR_CEILING) -> None:
        check_ceiling(self.seen, self.total_bad, self.max_fraction, min_rows, dict(self.counts), self.path)


def check_ceiling(seen: int, bad: int, max_fraction: float, min_rows: int = MIN_ROWS_FOR_CEILING,
                  kinds: dict | None = None, path: str | None = None, where: str = "") -> None:
    """Raise TooManyBadRows when more than ``max_fraction`` of ``seen`` rows (at least ``min_rows``) were bad."""
    if seen >= min_rows and bad > max_fraction * seen:
        raise TooManyBadRows(
            f"{bad} of {seen} rows{where} ({bad / seen:.1%}) are bad, more than max_bad_fraction={max_fraction:g}"
            + (f": {kinds}" if kinds else "") + ". Find and drop them with "
            "`audiollm data check MANIFEST --fix-out CLEAN.jsonl`"
            + (f"; the rows skipped so far are in {path}" if path else "")
        )


def read_bad_rows(output_dir: str) -> dict[str, int]:
    """{kind: distinct rows skipped} over every rank and worker of a run, from its ``bad_rows.jsonl``.

    A row is counted once however often it was met (another epoch, a rank replaying it after a resume).
    """
    path = os.path.join(output_dir, BAD_ROWS_FILE)
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        entries = {(e["id"], e["kind"]) for e in map(json.loads, filter(str.strip, f))}
    return dict(Counter(kind for _, kind in entries))
