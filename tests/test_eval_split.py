"""Eval batches are split across data-parallel ranks: at dp=2 each rank runs its share of the held-out
batches (batch i on rank i % 2), and every rank gets the mean over all of them, equal to the one-process
evaluation of the same batches (float64 sums: to 1e-12). Every rank runs as many forwards (ZeRO-3's
forward is collective): a rank with a batch fewer repeats one that is not counted."""
import pytest

from parallel_harness import run_ranks


def _evaluate(rank, world, eval_batches):
    import torch

    from longtrain.trainer.config import DataConfig, ModelConfig, TrainConfig
    from longtrain.trainer.data.tasks import TaskDataset, make_task
    from longtrain.trainer.loop import evaluate
    from longtrain.trainer.model.decoder import Decoder

    data = DataConfig(task="passkey", seq_len=32, passkey={"digits": 3})
    dataset = TaskDataset(make_task(data), data.seq_len, "eval", seed=0)
    train = TrainConfig(micro_batch_size=2, eval_batches=eval_batches)
    torch.manual_seed(0)
    engine = type("Engine", (), {"module": Decoder(ModelConfig(pattern="AF", d_model=32, n_heads=2, n_kv_heads=1,
                                                                  vocab_size=32))})()
    calls = []
    engine.module.register_forward_hook(lambda *_: calls.append(1))
    loss = evaluate(engine, dataset, train, torch.device("cpu"), dp_rank=rank, dp_size=world)
    return loss, len(calls)


@pytest.mark.distributed
@pytest.mark.parametrize("eval_batches, forwards", [(3, 2), (1, 1)])
def test_eval_batches_are_split_over_data_parallel_ranks(eval_batches, forwards):
    (alone, all_batches), = run_ranks(_evaluate, 1, args=(eval_batches,))
    assert all_batches == eval_batches
    results = run_ranks(_evaluate, 2, args=(eval_batches,))
    assert [calls for _, calls in results] == [forwards, forwards]
    for loss, _ in results:
        assert abs(loss - alone) <= 1e-12 * abs(alone), (loss, alone)
