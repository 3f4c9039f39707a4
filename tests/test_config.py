"""Recipe validation: unknown keys, types, sizes, cross-field checks, overrides; every shipped recipe loads."""
from pathlib import Path

import pytest

from longtrain.trainer.config import LAYER_LETTERS, load_recipe, parse_overrides, recipe_from_dict
from longtrain.trainer.errors import LongtrainError

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("raw, expected", [
    ({"modle": {}}, "unknown key 'modle' (did you mean 'model'?)"),
    ({"model": {"d_modle": 64}}, "unknown key 'model.d_modle' (did you mean 'd_model'?)"),
    ({"train": {"steps": "many"}}, "train.steps: Input should be a valid integer"),
    ({"train": {"steps": 0}}, "train.steps: Input should be greater than 0"),
    ({"model": {"d_model": -8}}, "model.d_model: Input should be greater than 0"),
    ({"data": {"seq_len": 0}}, "data.seq_len: Input should be greater than 0"),
    ({"model": {"pattern": "AMXF"}}, "model.pattern='AMXF' has unknown letter(s) X"),
    ({"model": {"pattern": ""}}, "unknown letter(s) (empty)"),
    ({"model": {"n_heads": 3}}, "model.n_heads=3 does not divide model.d_model=128"),
    ({"model": {"n_kv_heads": 3}}, "model.n_kv_heads=3 does not divide model.n_heads=4"),
    ({"model": {"ode": {"solver": "rk5"}}}, "model.ode.solver: Input should be"),
    ({"model": {"ode": {"rtol": -1e-3}}}, "model.ode.rtol: Input should be greater than 0"),
])
def test_bad_recipes_are_one_line_errors(raw, expected):
    with pytest.raises(LongtrainError) as err:
        recipe_from_dict(raw)
    message = str(err.value)
    assert expected in message
    assert "\n" not in message


def test_defaults_and_derived_sizes():
    r = recipe_from_dict({"model": {"d_model": 64, "n_heads": 4, "expand": 3}})
    assert r.model.head_dim == 16 and r.model.d_inner == 192
    assert r.run_dir == Path("runs/run")
    assert set(r.model.pattern) <= set(LAYER_LETTERS)


def test_overrides_are_parsed_as_yaml_scalars(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: r\ntrain: {steps: 10}\n")
    r = load_recipe(path, ["train.steps=7", "model.pattern=MMAF", "train.bf16=true", "data.corpus=[a.txt, b.txt]"])
    assert r.train.steps == 7 and r.model.pattern == "MMAF" and r.train.bf16 is True
    assert r.data.corpus == ["a.txt", "b.txt"]
    assert parse_overrides(["a.b.c=1.5"]) == {"a": {"b": {"c": 1.5}}}
    with pytest.raises(LongtrainError, match="not of the form"):
        load_recipe(path, ["train.steps"])


def test_yaml_errors_name_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("train: {steps: [1,\n")
    with pytest.raises(LongtrainError, match="broken.yaml"):
        load_recipe(path)
    with pytest.raises(LongtrainError, match="not found"):
        load_recipe(tmp_path / "missing.yaml")


def test_yaml_is_parsed_safely(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(LongtrainError, match="not valid YAML"):
        load_recipe(path)


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_shipped_recipe_validates(path):
    recipe = load_recipe(path)
    assert recipe.name == path.stem or recipe.name


def test_default_recipe_is_quickstart():
    recipe = load_recipe(None)
    assert recipe.name == "quickstart"
    assert set("AMOF") <= set(recipe.model.pattern)
