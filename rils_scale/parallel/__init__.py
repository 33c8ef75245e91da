"""Everything distributed: process groups, DeepSpeed mpu, collectives, TP layers, TP RNG."""
from . import comm
from .state import (DeepSpeedMPU, ParallelDims, ParallelState, current_state,
                    init_parallel_state, single_process_state)
from .mappings import (all_gather_batch, all_reduce_no_grad, copy_to_tensor_parallel_region,
                       gather_from_sequence_parallel_region, gather_from_tensor_parallel_region,
                       reduce_from_tensor_parallel_region, reduce_scatter_to_sequence_parallel_region,
                       scatter_rows_to_tensor_parallel_region, scatter_to_sequence_parallel_region,
                       scatter_to_tensor_parallel_region)
from .layers import (ColumnParallelLinear, RowParallelLinear, SequenceParallelLayerNorm,
                     VocabParallelEmbedding, is_tensor_parallel_shard, sharded_parameter)
from .random import checkpoint, get_rng_tracker, model_parallel_seed
from .sharding import (ShardSpec, gather_full_tensor, gather_full_tensors, merge_shards, shard_spec,
                       split_full_tensor, tensor_parallel_layout)
from .validate import validate_parallel_config
# deepspeed_utils (zero_init_context, check_zero_tensor_parallel_setup, tensor_parallel_grad_norm)
# imports deepspeed lazily; import it from rils_scale.parallel.deepspeed_utils.
