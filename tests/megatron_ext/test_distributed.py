"""megatron_ext.distributed.initialize: a single process needs no free port."""

import os
import socket
import subprocess
import sys

SCRIPT = """
from launch.config import load_config
from megatron_ext import distributed
from megatron.core import parallel_state
env = distributed.initialize(load_config([]).parallel, 0)
print("ok", env.dp, parallel_state.get_data_parallel_world_size())
"""


def test_one_process_starts_while_its_master_port_is_taken():
    # The launcher picks MASTER_PORT before the stage binds it; another job may take it meanwhile
    # (seen as EADDRINUSE under the parallel test suite). One process uses an in-memory store instead.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(taken.getsockname()[1])}
        proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "ok 1 1" in proc.stdout, proc.stderr[-2000:]
