"""Keep logs readable: silence megatron-core's import-time notices about optional libraries.

megatron-core warns once per module that Transformer Engine / apex are missing (expected on CPU and
on our TE-free GPU path) and touches ``.grad`` of the distributed optimizer's shard views, which makes
torch warn on every step. Neither is actionable for a user; real warnings still show.
"""

from __future__ import annotations

import logging
import warnings


def quiet_known_warnings() -> None:
    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex|apex) (is|are) not installed.*")
    warnings.filterwarnings("ignore", message=".*full scope is deprecated.*")
    warnings.filterwarnings("ignore", message=".*\\.grad attribute of a Tensor that is not a leaf.*")
    # torch deprecation notices raised inside megatron-core's own calls (ShardedTensor, all_gather)
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    warnings.filterwarnings("ignore", category=FutureWarning, module="megatron")
    warnings.filterwarnings("ignore", message=".*(ShardedTensor|all_gather_into_tensor).*")
    logging.getLogger("megatron").setLevel(logging.WARNING)
