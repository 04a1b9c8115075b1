"""Recipe schema and loading: what a user sees when a recipe is wrong, extends and --set."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from sslrecipe.cli import main
from sslrecipe.errors import RecipeError
from sslrecipe.recipe import load_recipe, recipe_to_yaml

REPO = Path(__file__).resolve().parents[1]


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_every_shipped_recipe_validates():
    for recipe in sorted((REPO / "recipes").glob("**/*.yaml")):
        load_recipe(recipe)


def test_unknown_key_names_file_line_and_suggests(tmp_path):
    f = write(tmp_path / "r.yaml", "name: x\ndata:\n  synthetic: {}\nfinetun:\n  epochs: 2\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(f)
    msg = str(e.value)
    assert f"{f}:4:1" in msg
    assert "unknown key 'finetun'" in msg
    assert "Did you mean 'finetune'?" in msg


def test_nested_unknown_key_suggests_dotted(tmp_path):
    f = write(tmp_path / "r.yaml", "data:\n  synthetic: {}\nfinetune:\n  batch_sise: 2\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(f)
    assert f"{f}:4:3" in str(e.value) and "'finetune.batch_size'" in str(e.value)


def test_wrong_type_names_dotted_key_and_line(tmp_path):
    f = write(tmp_path / "r.yaml", "data:\n  synthetic:\n    images: many\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(f)
    msg = str(e.value)
    assert f"{f}:3:5" in msg and "data.synthetic.images" in msg and "integer" in msg


def test_invalid_yaml_points_at_line(tmp_path):
    f = write(tmp_path / "r.yaml", "name: x\ndata: [unclosed\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(f)
    assert str(f) in str(e.value) and "invalid YAML" in str(e.value)


def test_cross_field_rules(tmp_path):
    f = write(tmp_path / "r.yaml", "data:\n  synthetic: {}\nweights:\n  source: pretrain\n")
    with pytest.raises(RecipeError, match="pretrain.method"):
        load_recipe(f)
    f = write(tmp_path / "r2.yaml", "name: nodata\n")
    with pytest.raises(RecipeError, match="no labeled data"):
        load_recipe(f)


def test_extends_deep_merges_relative_base(tmp_path):
    (tmp_path / "base").mkdir()
    write(tmp_path / "base" / "b.yaml", "name: base\ndata:\n  synthetic: {images: 40}\nfinetune:\n  epochs: 5\n  batch_size: 2\n")
    f = write(tmp_path / "child.yaml", "extends: base/b.yaml\nname: child\nfinetune:\n  epochs: 1\n")
    r = load_recipe(f)
    assert r.name == "child"
    assert r.finetune.epochs == 1 and r.finetune.batch_size == 2  # merged, not replaced
    assert r.data.synthetic.images == 40


def test_extends_cycle_is_an_error(tmp_path):
    write(tmp_path / "a.yaml", "extends: b.yaml\n")
    write(tmp_path / "b.yaml", "extends: a.yaml\n")
    with pytest.raises(RecipeError, match="cycle"):
        load_recipe(tmp_path / "a.yaml")


def test_set_overrides_parse_yaml_values(tmp_path):
    f = write(tmp_path / "r.yaml", "data:\n  synthetic: {}\n")
    r = load_recipe(f, ["finetune.epochs=3", "finetune.anchor_sizes=[4, 8, 16, 32, 64]", "data.shots=25", "runtime.device=cpu"])
    assert r.finetune.epochs == 3 and r.finetune.anchor_sizes == (4, 8, 16, 32, 64) and r.data.shots == 25
    with pytest.raises(RecipeError, match="--set finetune.epochs=x"):
        load_recipe(f, ["finetune.epochs=x"])
    with pytest.raises(RecipeError, match="KEY=VALUE"):
        load_recipe(f, ["finetune.epochs"])


def test_resolved_recipe_is_itself_a_valid_recipe(tmp_path):
    r = load_recipe(REPO / "recipes" / "quickstart.yaml", ["finetune.epochs=2"])
    out = write(tmp_path / "resolved.yaml", recipe_to_yaml(r))
    again = load_recipe(out)
    assert again == r
    data = yaml.safe_load(out.read_text())
    assert set(data) >= {"name", "seed", "data", "backbone", "weights", "pretrain", "finetune", "evaluate", "report", "runtime", "matrix"}


def test_relative_data_paths_are_relative_to_the_recipe(tmp_path):
    (tmp_path / "sub").mkdir()
    f = write(tmp_path / "sub" / "r.yaml", "data:\n  train: ../ann.json\n  unlabeled: pool\n")
    r = load_recipe(f)
    assert r.data.train == str((tmp_path / "ann.json").resolve())
    assert r.data.unlabeled == str((tmp_path / "sub" / "pool").resolve())


def test_cli_validate_print_and_errors(tmp_path):
    runner = CliRunner()
    res = runner.invoke(main, ["validate", str(REPO / "recipes" / "quickstart.yaml"), "--set", "finetune.epochs=2", "--print"])
    assert res.exit_code == 0, res.output
    assert yaml.safe_load(res.output)["finetune"]["epochs"] == 2
    bad = write(tmp_path / "bad.yaml", "data:\n  synthetic: {}\nbackbone:\n  in_chans: two\n")
    res = runner.invoke(main, ["validate", str(bad)])
    assert res.exit_code == 2
    assert "backbone.in_chans" in res.output and "Traceback" not in res.output
    res = runner.invoke(main, ["validate", str(tmp_path / "missing.yaml")])
    assert res.exit_code == 2 and "not found" in res.output


def test_string_keys_keep_the_text_the_user_typed(tmp_path):
    """YAML reads 000...0 as the integer 0 and 2024 as a number: a key whose type is a string keeps the text."""
    zeros = "0" * 64
    base = write(tmp_path / "base.yaml", "name: 2024\ndata:\n  synthetic: {}\nweights: {source: fetch, id: x, sha256: 12}\n")
    f = write(tmp_path / "r.yaml", "extends: base.yaml\nweights:\n  sha256: 'abc'\n")
    r = load_recipe(f)
    assert r.name == "2024" and r.weights.sha256 == "abc"  # the child's quoted string wins over the base's text
    r = load_recipe(base, [f"weights.sha256={zeros}", "weights.id=1e3", "seed=5", "finetune.lr=1e-3"])
    assert r.weights.sha256 == zeros and r.weights.id == "1e3"
    assert r.seed == 5 and r.finetune.lr == 1e-3  # numbers stay numbers where the key is a number
    res = CliRunner().invoke(main, ["validate", str(base), "--set", f"weights.sha256={zeros}", "--print"])
    assert res.exit_code == 0, res.output
    assert yaml.safe_load(res.output)["weights"]["sha256"] == zeros


def test_a_matrix_value_for_a_string_key_keeps_its_text(tmp_path):
    f = write(tmp_path / "r.yaml", "data: {synthetic: {}}\nweights: {source: fetch, id: x}\n"
                                   "matrix:\n  axes: {weights.sha256: [0000, 1111]}\n")
    assert load_recipe(f).matrix.axes["weights.sha256"] == ["0000", "1111"]


def test_a_mapping_with_an_unknown_key_reports_only_that_key(tmp_path):
    f = write(tmp_path / "r.yaml", "data:\n  train: {annotations: a.json, Images: img}\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(f)
    msg = str(e.value)
    assert "unknown key 'data.train.Images'. Did you mean 'data.train.images'?" in msg and f"{f}:2:32" in msg
    assert "valid string" not in msg  # not the other member of the path-or-mapping union


def test_a_valid_matrix_and_the_shipped_recipes_pass_the_registry_and_timm_checks(tmp_path):
    f = write(tmp_path / "m.yaml", "data: {synthetic: {}}\nmatrix:\n  arms:\n    - {name: scratch}\n"
                                   "    - {name: dino, set: {weights.source: pretrain, pretrain.method: dino, pretrain.img_size: 64}}\n"
                                   "  axes: {backbone.name: [resnet18, resnet34]}\n")
    for recipe in [f, *sorted((REPO / "recipes").glob("**/*.yaml"))]:
        res = CliRunner().invoke(main, ["validate", str(recipe)])
        assert res.exit_code == 0 and res.output.endswith(": valid\n"), res.output


def test_reading_a_recipe_imports_neither_torch_nor_timm():
    """`load_recipe` (the TUI, the advisor, `validate`'s first step) and the CLI's start stay light: the checks
    that need the registry and timm import them only when they run."""
    code = (
        "import sys\n"
        "import sslrecipe.cli, sslrecipe.recipe.checks\n"
        "from sslrecipe.recipe import load_recipe\n"
        f"load_recipe({str(REPO / 'recipes' / 'quickstart.yaml')!r}, ['finetune.epochs=2'])\n"
        "heavy = [m for m in ('torch', 'timm', 'torchvision') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
