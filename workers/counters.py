"""Per-worker packet counters: outcomes by verdict (drops by reason), packets and batches.

Counting is one ``np.bincount`` per batch over the verdict column; the controller later
collects snapshots of these for its metrics. Reason names are the lower-case ``Verdict``
names, the vocabulary of Linux ``xfrm_stat`` and VPP error counters.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from pipeline.batch import Batch, Verdict

__all__ = ["Counters"]


class Counters:
    """Running totals for one worker (or one direction of one)."""

    __slots__ = ("by_verdict", "batches", "_passed_alone")

    def __init__(self) -> None:
        self.by_verdict: npt.NDArray[np.int64] = np.zeros(len(Verdict), dtype=np.int64)
        self.batches = 0
        self._passed_alone = 0  # add_passed's, kept out of numpy (folded in when read)

    def add(self, batch: Batch) -> None:
        """Count every packet of a processed batch by its verdict."""
        self.by_verdict += np.bincount(batch.meta["verdict"][: batch.count],
                                       minlength=len(Verdict))[: len(Verdict)]
        self.batches += 1

    def add_passed(self) -> None:
        """Count a batch of one packet that passed (pipeline/onepacket.py)."""
        self._passed_alone += 1
        self.batches += 1

    @property
    def passed(self) -> int:
        return int(self.by_verdict[Verdict.PASS]) + self._passed_alone

    @property
    def parked(self) -> int:
        """Packets held for a later look (Verdict.PARKED; each time one was held)."""
        return int(self.by_verdict[Verdict.PARKED])

    def drops(self) -> dict[str, int]:
        """Non-zero drop counts by reason."""
        return {Verdict(v).label: int(c) for v, c in enumerate(self.by_verdict)
                if c and Verdict(v).is_drop}

    def snapshot(self) -> dict[str, object]:
        out: dict[str, object] = {"batches": self.batches, "passed": self.passed,
                                  "drops": self.drops()}
        if self.parked:
            out["parked"] = self.parked
        return out
