"""Run ``minformer`` with a fault injected, for the resume tests: ``python fault_injection.py MODE ARGS...``.

Modes:

- ``kill-during-second-checkpoint``: SIGKILL the process while it writes the second checkpoint,
  after ``model.safetensors`` is complete in the temporary folder and half of
  ``optimizer.safetensors`` is written.
- ``kill-before-second-latest-link``: SIGKILL the process after the second checkpoint folder is
  in place and its temporary ``.latest-PID.tmp`` link exists, but before that link replaces ``latest``.
- ``slow-steps``: sleep 0.15 s after each metrics record, so that a test can kill the run from outside.
"""

from __future__ import annotations

import os
import signal
import sys
import time


def kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def kill_during_second_checkpoint() -> None:
    from minformer.training import checkpoint

    real_save_file = checkpoint.save_file
    calls = []

    def save_file(tensors, path):
        calls.append(path)
        # Each checkpoint saves two files: calls 1-2 are the first checkpoint, 3-4 the second.
        if len(calls) == 4:
            real_save_file(tensors, path)
            with open(path, "r+b") as file:
                file.truncate(os.path.getsize(path) // 2)
            kill_self()
        real_save_file(tensors, path)

    checkpoint.save_file = save_file


def kill_before_second_latest_link() -> None:
    from minformer.training import checkpoint

    real_point_latest = checkpoint.point_latest
    calls = []

    def point_latest(run_dir, checkpoint_dir):
        calls.append(checkpoint_dir)
        if len(calls) == 2:
            link_temp = run_dir / f".latest-{os.getpid()}.tmp"
            os.symlink(os.path.relpath(checkpoint_dir, run_dir), link_temp)
            kill_self()
        real_point_latest(run_dir, checkpoint_dir)

    checkpoint.point_latest = point_latest


def slow_steps() -> None:
    from minformer.training.trainer import Trainer

    real_append_metrics = Trainer.append_metrics

    def append_metrics(self, record):
        real_append_metrics(self, record)
        time.sleep(0.15)

    Trainer.append_metrics = append_metrics


MODES = {
    "kill-during-second-checkpoint": kill_during_second_checkpoint,
    "kill-before-second-latest-link": kill_before_second_latest_link,
    "slow-steps": slow_steps,
}


if __name__ == "__main__":
    from minformer.cli import main

    MODES[sys.argv[1]]()
    sys.exit(main(sys.argv[2:]))
