"""Run under `mpirun -n N`: train in memory on the config argv[2:] and record, per
rank, every call that reads rows of a memory-mapped file (data.Rows.read): the file
rows it read, in order, written as JSON to argv[1]/rank<r>.json. Used by
tests/test_shard.py to check that a rank reads only its rows."""

import json
import os
import sys

from gpubp import data as D
from gpubp import distributed
from gpubp.config import load_config
from gpubp.trainer import Trainer

calls = []
_read = D.Rows.read


def recording_read(self, positions):
    calls.append(self.index[positions].tolist())  # the rows of the file this call reads
    return _read(self, positions)


D.Rows.read = recording_read
dist = distributed.from_environment()
try:
    cfg = load_config(sys.argv[2], sys.argv[3:])
    trainer = dist.agree(lambda: Trainer(cfg, None, quiet=True, dist=dist))
    dist.start(trainer)
    trainer.train()
    with open(os.path.join(sys.argv[1], f"rank{dist.rank}.json"), "w") as f:
        json.dump({"calls": calls, "steps": trainer.step, "mapped": type(trainer.run.splits["train"]).__name__}, f)
finally:
    dist.close()
