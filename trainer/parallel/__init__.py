"""Parallelism applied to the plain decoder from outside it, one idea per module:

plan.py         layout checks, rank placement (megatron order), memory per rank, stage balance
mesh.py         the process groups of tp, cp, dp, pp (megatron-core parallel_state), passed explicitly
tensor.py       tensor parallel: a `Linears` factory of megatron-core layers, dense-shard loading, vocab-parallel loss
zigzag.py       the zigzag split of a sequence over the cp ranks
ring.py         attention over a zigzag-split sequence: ring attention, or a sliding window's keys fetched
context.py      context parallel on a model: the attention and Mamba hooks, Mamba conv history and scan state
pipeline.py     pipeline parallel: DeepSpeed PipelineModule from the layer list, cost-cut stages, tied head
parallelize.py  all of them on one model inside a DeepSpeed engine (ZeRO over dp x cp); what the loop calls
"""
