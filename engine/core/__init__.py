"""Pure-Python engine core: requests, sampling params, block pool, scheduler.

Nothing here imports torch (tests/unit/test_core_no_torch.py enforces it), so the
router and the policy simulator can use it without a GPU stack.
"""

from pdserve.engine.core.block_pool import (
    BlockPool,
    BlockRemoved,
    BlockStored,
    hash_block_tokens,
    hash_prompt_blocks,
)
from pdserve.engine.core.kv_cache_manager import KVCacheManager
from pdserve.engine.core.outputs import RequestOutput
from pdserve.engine.core.request import FinishReason, Request, RequestStatus
from pdserve.engine.core.sampling_params import SamplingParams
from pdserve.engine.core.scheduler import ScheduledRequest, Scheduler, SchedulerConfig, SchedulerOutput

__all__ = [
    "BlockPool",
    "BlockRemoved",
    "BlockStored",
    "FinishReason",
    "KVCacheManager",
    "Request",
    "RequestOutput",
    "RequestStatus",
    "SamplingParams",
    "ScheduledRequest",
    "Scheduler",
    "SchedulerConfig",
    "SchedulerOutput",
    "hash_block_tokens",
    "hash_prompt_blocks",
]
