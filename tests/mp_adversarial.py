"""One process of ``lcm distill`` with the adversarial term (``accelerate launch``); driven by
tests/test_multiprocess.py.

``python mp_adversarial.py HEADS DISTILL-ARGS...``: runs ``lcm distill`` and then writes this rank's discriminator
(heads and AdamW moments) to HEADS-rank-R.safetensors, so that the test can compare the ranks' copies.
"""

from __future__ import annotations

import sys

import lcm.training.runs as runs


def main() -> int:
    from accelerate import PartialState
    from safetensors.torch import save_file

    from lcm.cli import main as lcm_main

    tasks = []
    train = runs.train

    def capture(task, *args, **kwargs):
        tasks.append(task)
        return train(task, *args, **kwargs)

    runs.train = capture
    code = lcm_main(sys.argv[2:])
    state = tasks[0].method.adversarial.state_dict()
    rank = PartialState().process_index
    save_file({k: v.contiguous() for k, v in state.items()}, f"{sys.argv[1]}-rank-{rank}.safetensors")
    return code


if __name__ == "__main__":
    sys.exit(main())
