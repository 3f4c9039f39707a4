"""`model.init_from`: a run starts from another run's weights, with a fresh optimizer, schedule, step count and
data position (context extension; trainer/init_from.py).

The oracle is the source run's own files: its one-process rank file holds the dense model, and every
parameter the new run starts with (under its own layout) must equal its slice of that, bit for bit. Refusals
come before any process group or model exists and name the field with both values.
"""
import shutil
from pathlib import Path

import pytest
import torch

from longtrain.trainer import checkpoint as ckpt
from longtrain.trainer.errors import LongtrainError
from parallel_harness import run_ranks

SOURCE_STEPS = 2


pytestmark = pytest.mark.usefixtures("restore_environment")  # conftest.py


def _recipe(run_dir, init_from=None, seq_len=32, model=None, train=None, parallel=None, checkpoint=None):
    from longtrain.trainer.config import recipe_from_dict

    return recipe_from_dict({
        "name": "init", "run": {"dir": str(run_dir), "seed": 0},
        "model": {"pattern": "AMOF", "d_model": 32, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 32, "d_state": 4,
                  "ode": {"solver": "rk4", "steps": 1}, **({"init_from": str(init_from)} if init_from else {}),
                  **(model or {})},
        "data": {"task": "passkey", "seq_len": seq_len, "passkey": {"digits": 3, "loss": "full"}},
        "train": {"steps": SOURCE_STEPS, "micro_batch_size": 4, "lr": 3e-3, "warmup_steps": 2, "eval_interval": 100,
                  "eval_batches": 1, "log_interval": 1, "sample_tokens": 0, "threads": 1, **(train or {})},
        "checkpoint": {"interval": SOURCE_STEPS, "keep_last": 2, **(checkpoint or {})},
        "parallel": parallel or {}})


def _snapshot(run_dir: Path) -> dict:
    return {str(p.relative_to(run_dir)): ckpt.sha256(p) for p in sorted(Path(run_dir).rglob("*")) if p.is_file()}


def _dense(source: Path) -> dict:
    """The source's weights from its one-process rank file (the oracle)."""
    step = ckpt.step_dirs(source / "checkpoints")[-1]
    return torch.load(step / "rank00000.pt", weights_only=True)["model"]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    from longtrain.trainer.loop import train

    run_dir = tmp_path_factory.mktemp("source") / "passkey"
    train(_recipe(run_dir))
    return run_dir


@pytest.fixture(scope="module")
def plain_source(tmp_path_factory):
    """A source saved without the layout-free section (checkpoint.reshardable=false)."""
    from longtrain.trainer.loop import train

    run_dir = tmp_path_factory.mktemp("plain") / "passkey"
    train(_recipe(run_dir, checkpoint={"reshardable": False}))
    return run_dir


def _started(recipe):
    """The loop's stages up to the loaded weights: (run, resume_from)."""
    from longtrain.trainer import loop

    resume_from = loop.claim_run_dir(recipe, None, False)
    run = loop.start_processes(recipe)
    run.train_set, run.eval_set, run.loader, run.shards = loop.build_data(recipe, run.dp_rank, run.dp_size)
    loop.build_model(run)
    loop.load_init_weights(run, resume_from)
    return run


def _assert_fresh(run):
    base = getattr(run.optimizer, "optimizer", run.optimizer)
    assert all(not state for state in base.state.values()), "Adam state carried over"
    assert run.scheduler.last_epoch == 0 and run.engine.global_steps == 0 and run.loader.consumed_samples == 0
    # the schedule restarts at its first warmup value, not the source's last lr
    fresh = _started_lr(run.recipe)
    assert run.scheduler.get_last_lr() == fresh


def _started_lr(recipe):
    from longtrain.trainer.engine import build_engine
    from longtrain.trainer.model.init import build_decoder

    module = build_decoder(recipe.model, torch.device("cpu"), recipe.run.seed)
    _, _, scheduler = build_engine(module, recipe.train, recipe.parallel, dp_size=1)
    return scheduler.get_last_lr()


@pytest.mark.parametrize("rope", [{"type": "yarn", "factor": 2.0, "original_max_position": 32},
                                  {"type": "linear", "factor": 2.0}])
def test_weights_equal_the_source_with_a_fresh_optimizer(source, tmp_path, rope):
    before = _snapshot(source)
    recipe = _recipe(tmp_path / "extended", init_from=source, seq_len=64, model={"rope_scaling": rope})
    run = _started(recipe)
    dense = _dense(source)
    got = dict(run.named_parameters())
    assert got.keys() == dense.keys()
    for name, tensor in dense.items():
        assert torch.equal(got[name], tensor), name
    # and they are not what the new run's own initialisation would have drawn
    assert not all(torch.equal(got[n], t) for n, t in _fresh_weights(recipe).items())
    _assert_fresh(run)
    assert run.init_source == ckpt.step_dirs(source / "checkpoints")[-1]
    assert _snapshot(source) == before


def _fresh_weights(recipe):
    from longtrain.trainer.model.init import build_decoder

    return dict(build_decoder(recipe.model, torch.device("cpu"), recipe.run.seed).named_parameters())


def test_a_step_directory_and_a_plain_source_at_the_same_layout(plain_source, tmp_path):
    step = ckpt.step_dirs(plain_source / "checkpoints")[-1]
    assert not any(p.name.startswith("universal") for p in step.iterdir())
    run = _started(_recipe(tmp_path / "extended", init_from=step, seq_len=64))
    dense = _dense(plain_source)
    for name, tensor in run.named_parameters():
        assert torch.equal(tensor, dense[name]), name
    _assert_fresh(run)


def test_training_from_the_source_then_resuming_its_own_checkpoints(source, tmp_path):
    """The extended run logs from step 1 with a fresh data position; `--resume auto` later continues its own
    checkpoints and no longer reads init_from (the source may be gone)."""
    import json

    from longtrain.trainer.loop import train

    copy = tmp_path / "source"
    shutil.copytree(source, copy)
    before = _snapshot(copy)
    extended = tmp_path / "extended"
    train(_recipe(extended, init_from=copy, seq_len=64, model={"rope_scaling": {"type": "ntk", "factor": 2.0}}))
    assert _snapshot(copy) == before
    records = [json.loads(line) for line in (extended / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2] and steps[0]["consumed_samples"] == 4
    shutil.rmtree(copy)
    train(_recipe(extended, init_from=copy, seq_len=64, model={"rope_scaling": {"type": "ntk", "factor": 2.0}},
                  train={"steps": 2 * SOURCE_STEPS}), resume="auto")
    records = [json.loads(line) for line in (extended / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]


@pytest.mark.parametrize("field, value, name", [("pattern", "AMF", "model.pattern"), ("d_model", 64, "model.d_model"),
                                                ("n_kv_heads", 4, "model.n_kv_heads")])
def test_another_architecture_is_refused_naming_the_field(source, tmp_path, field, value, name):
    from longtrain.trainer.loop import preflight

    before = _snapshot(source)
    with pytest.raises(LongtrainError) as e:
        preflight(_recipe(tmp_path / "new", init_from=source, model={field: value}), None)
    message = str(e.value)
    assert "\n" not in message and f"{name}={value!r}" in message and f"{name}=" in message.split("differs from")[1]
    old = {"pattern": "'AMOF'", "d_model": "32", "n_kv_heads": "2"}[field]
    assert f"{name}={old}" in message
    assert not (tmp_path / "new").exists() and _snapshot(source) == before


def test_missing_and_own_paths_are_refused(source, tmp_path):
    from longtrain.trainer.loop import preflight

    for init_from, words in [(tmp_path / "nowhere", "does not exist"),
                             (tmp_path / "new", "own run.dir"),
                             (tmp_path / "new" / "checkpoints" / "step_00000002", "own run.dir")]:
        with pytest.raises(LongtrainError) as e:
            preflight(_recipe(tmp_path / "new", init_from=init_from), None)
        assert "\n" not in str(e.value) and "model.init_from=" in str(e.value) and words in str(e.value), e.value
        assert str(init_from) in str(e.value)
    empty = tmp_path / "empty"
    (empty / "checkpoints").mkdir(parents=True)
    with pytest.raises(LongtrainError, match=r"model.init_from=.*holds no checkpoint"):
        preflight(_recipe(tmp_path / "new", init_from=empty), None)
    with pytest.raises(LongtrainError, match="lies inside the source run"):  # writing into the source is refused
        preflight(_recipe(source / "extended", init_from=source), None)


def test_plain_source_under_another_layout_is_refused(plain_source, tmp_path):
    from longtrain.trainer.loop import preflight

    with pytest.raises(LongtrainError) as e:
        preflight(_recipe(tmp_path / "new", init_from=plain_source, parallel={"tp": 2}), None, world=2)
    assert "\n" not in str(e.value) and "checkpoint.reshardable=false" in str(e.value) and "tp=2" in str(e.value)


def _start_at(rank, world, run_dir, init_from, parallel, train):
    recipe = _recipe(run_dir, init_from=init_from, seq_len=64, parallel=parallel, train=train,
                     model={"rope_scaling": {"type": "yarn", "factor": 2.0, "original_max_position": 32}})
    run = _started(recipe)
    base = getattr(run.optimizer, "optimizer", run.optimizer)
    weights, masters = {}, {}
    for name, param in run.named_parameters():
        if parallel.get("zero_stage"):  # the fp32 copy Adam steps on (collective)
            from deepspeed.utils import safe_get_full_fp32_param
            masters[name] = safe_get_full_fp32_param(param).clone()
        if parallel.get("zero_stage", 0) < 3:  # ZeRO-3 holds a placeholder in the module
            weights[name] = param.detach().clone()
    if parallel.get("zero_stage") == 3:  # the module's own partitions, gathered
        import deepspeed
        with deepspeed.zero.GatheredParameters(list(run.module.parameters())):
            weights = {name: param.detach().clone() for name, param in run.module.named_parameters()}
    return {"weights": weights, "masters": masters, "tp": run.tp, "adam_states": sum(bool(s) for s in base.state.values()),
            "last_epoch": run.scheduler.last_epoch, "consumed": run.loader.consumed_samples}


@pytest.mark.parametrize("parallel", [pytest.param({"tp": 2}, marks=pytest.mark.slow), {"zero_stage": 1},
                                      pytest.param({"zero_stage": 3}, marks=pytest.mark.slow)],
                         ids=["tp2", "dp2-zero1", "dp2-zero3"])
def test_another_layout_on_two_processes(source, tmp_path, parallel):
    """A one-process source starts a tp=2 (or ZeRO-1 dp=2) run: every rank's slice equals the source's."""
    from longtrain.trainer.parallel.tensor import shard_dim

    before = _snapshot(source)
    train = {"micro_batch_size": 2} if "zero_stage" in parallel else {}
    results = run_ranks(_start_at, 2, args=(tmp_path / "extended", source, parallel, train), deepspeed=True)
    dense = _dense(source)
    for result in results:
        tp, tp_rank = result["tp"]
        assert result["weights"].keys() == dense.keys()
        assert result["adam_states"] == 0 and result["last_epoch"] == 0 and result["consumed"] == 0
        assert result["masters"].keys() == (dense.keys() if "zero_stage" in parallel else set())
        for name, tensor in dense.items():
            for mine in (result["weights"][name], result["masters"].get(name, result["weights"][name])):
                dim = shard_dim(mine.shape, tensor.shape, tp)
                want = tensor if dim is None else tensor.narrow(dim, tp_rank * mine.shape[dim], mine.shape[dim])
                assert torch.equal(mine, want), (name, tp_rank)
    if "tp" in parallel:
        assert {r["tp"] for r in results} == {(2, 0), (2, 1)}
    assert _snapshot(source) == before


def test_text_runs_need_the_source_tokenizer(tmp_path):
    """A text run's token ids mean its tokenizer's pieces: another tokenizer file is refused by its sha256, the
    source's own file (data.tokenizer.path) is taken, with a longer data.seq_len."""
    from conftest import tiny_recipe
    from longtrain.trainer import loop
    from longtrain.trainer.config import recipe_from_dict

    def recipe(run_dir, **data):
        raw = tiny_recipe(run_dir, checkpoint={"interval": 2, "keep_last": 1})
        raw["model"]["pattern"] = "AF"
        raw["train"].update(steps=2, eval_interval=2, sample_tokens=0)
        raw["data"].update(max_bytes=100_000, **data)
        return raw

    source = tmp_path / "source"
    run = _started(recipe_from_dict(recipe(source)))  # a checkpoint of the initial weights: no step needed
    loop.announce(run, None, 0)
    loop.save_checkpoint(run, 1)
    run.log.close()
    before = _snapshot(source)
    other = recipe_from_dict({**recipe(tmp_path / "other", tokenizer={"vocab_size": 400}),
                              "model": {**recipe(None)["model"], "init_from": str(source)}})
    with pytest.raises(LongtrainError) as e:  # refused after its data are prepared, before any process group
        loop.claim_run_dir(other, None, False)
    message = str(e.value)
    assert "\n" not in message and "is not the tokenizer checkpoint" in message
    assert f"data.tokenizer.path='{source / 'data' / 'tokenizer.model'}'" in message
    assert not (tmp_path / "other" / "recipe.yaml").exists()
    with pytest.raises(LongtrainError, match="is not the tokenizer checkpoint"):  # a given file: in preflight
        loop.preflight(recipe_from_dict({**recipe(tmp_path / "third", tokenizer={
            "vocab_size": 400, "path": str(tmp_path / "other" / "data" / "tokenizer.model")}),
            "model": {**recipe(None)["model"], "init_from": str(source)}}), None)
    same = recipe_from_dict({**recipe(tmp_path / "longer", seq_len=64, tokenizer={
        "path": str(source / "data" / "tokenizer.model")}), "model": {**recipe(None)["model"], "init_from": str(source)}})
    assert loop.claim_run_dir(same, None, False) is None
    assert _snapshot(source) == before


def test_the_shipped_extension_recipe_matches_the_passkey_architecture():
    """recipes/passkey-extend.yaml starts from recipes/passkey.yaml's run: every architecture field agrees."""
    from longtrain.trainer.config import load_recipe
    from longtrain.trainer.run_dir import ARCHITECTURE, _field

    recipes = Path(__file__).resolve().parents[1] / "recipes"
    source, extended = load_recipe(recipes / "passkey.yaml"), load_recipe(recipes / "passkey-extend.yaml")
    assert Path(extended.model.init_from) == source.run_dir
    for name in ARCHITECTURE:
        assert _field(source.model_dump(mode="json"), name) == _field(extended.model_dump(mode="json"), name), name
    scaling = extended.model.rope_scaling
    assert scaling.factor * scaling.original_max_position == extended.data.seq_len == 8 * source.data.seq_len
