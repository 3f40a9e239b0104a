"""One process of a multi-process run on the shared loop (``accelerate launch``); driven by tests/test_multiprocess.py.

``python mp_worker.py OUT BATCH MAX_STEPS [RESUME]``: a deterministic regression (no noise), so that 2 processes at
batch B and 1 process at batch 2B see the same global batches and, with synchronised gradients, take the same steps.
Each rank records the data indices it trained on in OUT-seen/rank-R.json (outside the run folder).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from kill_child import Task


def main() -> None:
    from accelerate import PartialState

    from lcm.config import LoopConfig, OptimConfig
    from lcm.data.base import collate_skip_none
    from lcm.data.loader import batch_stream
    from lcm.training.loop import train

    out, batch, steps = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    state = PartialState(cpu=True)
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64).float()
    data = [{"pixel_values": x[i], "caption": str(i)} for i in range(64)]
    seen: list[int] = []

    class Exact(Task):
        def loss(self, b, generator):
            seen.extend(int(c) for c in b["caption"])
            return ((self.net(b["pixel_values"]) - b["pixel_values"].flip(1)) ** 2).mean(1)

    def batches(start):
        return batch_stream(
            data, batch, collate_skip_none, start=start, rank=state.process_index, world=state.num_processes
        )

    loop = LoopConfig(max_steps=steps, checkpoint_every=2, validate_every=0, log_every=1, cpu=True)
    train(Exact(), batches, out, loop, OptimConfig(learning_rate=1e-2), sys.argv[4] if len(sys.argv) > 4 else None)
    folder = Path(f"{out}-seen")
    folder.mkdir(exist_ok=True)
    (folder / f"rank-{state.process_index}-{len(list(folder.iterdir()))}.json").write_text(json.dumps(seen))


if __name__ == "__main__":
    main()
