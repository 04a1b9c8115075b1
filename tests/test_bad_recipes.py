"""Bad recipes and overrides, one case a row: `sslrecipe validate` and `sslrecipe run` both refuse each with one
message naming the file:line:column (or the --set) and the key, exit status 2, no traceback, and `run` refuses
before any stage: no run directory, nothing written anywhere."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from sslrecipe.cli import main

BASE = (
    "name: bad\n"  # line 1
    "data:\n"  # line 2
    "  synthetic: {images: 8, width: 64, height: 64}\n"  # line 3
)
PRETRAIN = BASE + "weights: {source: pretrain}\n"  # the case's own lines start at line 5
VIT = BASE + "backbone: {name: vit_tiny_patch16_224}\nweights: {source: pretrain}\n"  # from line 6


def _bomb(levels: int = 9) -> str:
    lines = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    return BASE + "\n".join(lines) + "\n"


# id, recipe (text or bytes), extra CLI args, substrings the message must hold, "line:column" (None: --set or none)
CASES = [
    # recipes that validated but must not
    ("unknown-method", PRETRAIN + "pretrain: {method: nope}\n", [],
     ["pretrain.method: unknown method 'nope'", "Methods: dino, hybrid, leopart, mae, resim, spark"], "5:12"),
    ("method-typo", PRETRAIN + "pretrain: {method: dinno}\n", [], ["unknown method 'dinno'. Did you mean 'dino'?"], "5:12"),
    ("unknown-first-method", PRETRAIN + "pretrain:\n  method: dino\n  first: {method: nope}\n", [],
     ["pretrain.first.method: unknown method 'nope'"], "7:11"),
    ("unknown-backbone", BASE + "backbone: {name: resnet_nope}\n", [],
     ["backbone.name: unknown timm backbone 'resnet_nope'"], "4:12"),
    ("unknown-method-option", PRETRAIN + "pretrain:\n  method: dino\n  options:\n    dino: {nonsense: 1}\n", [],
     ["pretrain.options.dino.nonsense: unknown option"], "8:12"),
    ("options-for-no-method", PRETRAIN + "pretrain:\n  method: dino\n  options:\n    dinno: {teacher_temp: 0.04}\n", [],
     ["pretrain.options.dinno", "'dinno' is not a method", "Did you mean 'pretrain.options.dino'?"], "8:5"),
    ("unknown-timm-kwarg", BASE + "backbone:\n  name: resnet18\n  kwargs: {nonsense: 1}\n", [],
     ["backbone.kwargs", "unexpected keyword argument 'nonsense'"], "6:3"),
    ("img-size-not-patch-multiple", VIT + "pretrain: {method: mae, img_size: 100}\n", [],
     ["pretrain.img_size 100 is not divisible by the ViT's patch size 16"], "6:25"),
    ("img-size-not-stride-multiple", PRETRAIN + "pretrain: {method: spark, img_size: 100}\n", [],
     ["pretrain.img_size 100 is not a multiple of 32"], "5:27"),
    ("first-img-size-not-patch-multiple", VIT + "pretrain:\n  method: leopart\n  first: {method: dino, img_size: 50}\n", [],
     ["pretrain.first.img_size 50 is not divisible by the ViT's patch size 16"], "8:25"),
    ("method-for-another-family", PRETRAIN + "pretrain: {method: leopart}\n", [],
     ["pretrain.method 'leopart' supports vit backbones", "'resnet18' is a cnn"], "5:12"),
    ("spark-without-sparse-layers", VIT.replace("vit_tiny_patch16_224", "convnextv2_atto") + "pretrain: {method: spark}\n", [],
     ["SparK cannot sparsify backbone 'convnextv2_atto'", "GlobalResponseNorm"], None),
    ("beta-one", BASE + "finetune: {betas: [0.9, 1.0]}\n", [], ["finetune.betas: each beta must be in [0, 1)"], "4:12"),
    ("beta-negative", BASE, ["--set", "pretrain.betas=[-0.1, 0.9]"], ["pretrain.betas: each beta must be in [0, 1)"], None),
    ("lr-inf", BASE + "finetune: {lr: .inf}\n", [], ["finetune.lr: Input should be a finite number"], "4:12"),
    ("lr-nan-set", BASE, ["--set", "finetune.lr=.nan"], ["finetune.lr: Input should be a finite number"], None),
    ("weight-decay-inf", BASE + "pretrain:\n  weight_decay: .inf\n", [], ["pretrain.weight_decay", "finite"], "5:3"),
    ("option-inf", PRETRAIN + "pretrain:\n  method: dino\n  options: {dino: {teacher_temp: .inf}}\n", [],
     ["pretrain.options", "dino.teacher_temp must be a finite number"], "7:3"),
    ("duplicate-section", BASE + "finetune: {epochs: 1}\nfinetune: {batch_size: 2}\n", [],
     ["duplicate key 'finetune' (also on line 4)", "merge them"], "5:1"),
    ("duplicate-nested-key", BASE + "finetune:\n  epochs: 1\n  epochs: 2\n", [],
     ["duplicate key 'finetune.epochs' (also on line 5)"], "6:3"),
    # matrix
    ("axis-unknown-key", BASE + "matrix:\n  axes: {finetune.epoch: [1, 2]}\n", [],
     ["unknown key 'finetune.epoch'. Did you mean 'finetune.epochs'?", "matrix.axes"], "5:10"),
    ("axis-invalid-values", BASE + "matrix:\n  axes: {finetune.epochs: [0, -1]}\n", [],
     ["finetune.epochs: Input should be greater than or equal to 1 (got 0)", "r.yaml:5:31: finetune.epochs", "(got -1)"], "5:28"),
    ("axis-unknown-backbone", BASE + "matrix:\n  axes:\n    backbone.name: [resnet18, nope]\n", [],
     ["backbone.name: unknown timm backbone 'nope'", "matrix cell backbone.name='nope'"], "6:31"),
    ("axis-no-values", BASE + "matrix:\n  axes: {finetune.epochs: []}\n", [], ["'finetune.epochs' has no values"], "5:10"),
    ("axis-sets-name", BASE + "matrix:\n  axes: {name: [a, b]}\n", [], ["matrix.axes cannot set 'name'"], "5:10"),
    ("duplicate-arm-names", BASE + "matrix:\n  arms:\n    - {name: a}\n    - {name: a}\n", [],
     ["two matrix arms are named 'a'", ":6:7)"], "7:7"),
    ("arm-unknown-key", BASE + "matrix:\n  arms:\n    - {name: a, set: {finetune.Epochs: 2}}\n", [],
     ["unknown key 'finetune.Epochs'. Did you mean 'finetune.epochs'?"], "6:23"),
    ("arm-sets-extends", BASE + "matrix:\n  arms:\n    - {name: a, set: {extends: other.yaml}}\n", [],
     ["cannot set 'extends'"], "6:23"),
    ("arm-name-path", BASE + "matrix:\n  arms:\n    - {name: ../a}\n", [], ["matrix.arms.0.name", "not a plain name"], "6:8"),
    ("arm-unknown-method", BASE + "matrix:\n  arms:\n    - {name: ssl, set: {weights.source: pretrain, pretrain.method: nope}}\n", [],
     ["pretrain.method: unknown method 'nope'", "matrix cell arm 'ssl'"], "6:51"),
    ("set-extends", BASE, ["--set", "extends=base.yaml"], ["--set extends=base.yaml", "can only be written in a recipe file"], None),
    # keys the loader misread
    ("set-capital-key", BASE, ["--set", "Name=x"], ["--set Name=x", "unknown key 'Name'. Did you mean 'name'?"], None),
    ("capital-nested-key", BASE + "finetune: {Epochs: 1}\n", [], ["unknown key 'finetune.Epochs'. Did you mean 'finetune.epochs'?"], "4:12"),
    ("set-capital-nested-key", BASE, ["--set", "finetune.Epochs=1"], ["unknown key 'finetune.Epochs'. Did you mean 'finetune.epochs'?"], None),
    ("capital-data-key", BASE.replace("images: 8,", "Images: 8,"), [],
     ["unknown key 'data.synthetic.Images'. Did you mean 'data.synthetic.images'?"], "3:15"),
    ("tilde-key", BASE + "finetune: {~: 1}\n", [], ["unknown key 'finetune.~'"], "4:12"),
    ("set-tilde-key", BASE, ["--set", "~=1"], ["--set ~=1", "unknown key '~'"], None),
    ("null-key", BASE + "null: 1\n", [], ["unknown key 'null'"], "4:1"),
    ("list-as-key", BASE + "? [a, b]\n: 1\n", [], ["a key must be a name"], "4:3"),
    # tracebacks before
    ("latin-1", (BASE + "report: {images: 2}  # caf\xe9\n").encode("latin-1"), [], ["not UTF-8 text (byte 0xe9)", "iconv"], "4:27"),
    ("binary", bytes(range(256)) * 4, [], ["not UTF-8 text (byte 0x80)"], "2:118"),
    ("nul-bytes", BASE.encode() + b"\x00\x00\x00\n", [], ["invalid YAML", "#x0000"], "4:1"),
    ("recursive-alias", BASE + "finetune:\n  anchor_sizes: &a [8, *a]\n", [], ["finetune.anchor_sizes.1", "recursive YAML anchor"], "5:17"),
    ("seed-negative", BASE + "seed: -1\n", [], ["seed: Input should be greater than or equal to 0"], "4:1"),
    ("seed-over-32-bits", BASE + "seed: 4294967296\n", [], ["seed: Input should be less than or equal to 4294967295"], "4:1"),
    ("synthetic-seed-over-32-bits", BASE, ["--set", "data.synthetic.seed=99999999999"], ["data.synthetic.seed", "4294967295"], None),
    ("threads-huge", BASE + "runtime: {threads: 100000}\n", [], ["runtime.threads: Input should be less than or equal to 1024"], "4:11"),
    ("yaml-bomb", _bomb(), [], ["more than 100000 YAML values", "YAML bomb"], None),
    # a run name that would leave runs/
    ("name-parent-path", BASE.replace("name: bad", "name: ../../x"), [], ["name: '../../x' is not a plain name", "--run-dir"], "1:1"),
    ("set-name-with-slash", BASE, ["--set", "name=a/b"], ["--set name=a/b", "'a/b' is not a plain name"], None),
]


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch) -> Path:
    """An empty working directory (where `run` would make runs/), the recipe in its own folder below."""
    work = tmp_path / "work"
    (work / "recipes").mkdir(parents=True)
    monkeypatch.chdir(work)
    return work


def _snapshot(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("command", ["validate", "run"])
@pytest.mark.parametrize(("text", "args", "expected", "where"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_recipe_is_refused_with_one_message(workdir: Path, command, text, args, expected, where):
    recipe = workdir / "recipes" / "r.yaml"
    if isinstance(text, bytes):
        recipe.write_bytes(text)
    else:
        recipe.write_text(text, encoding="utf-8")
    before = _snapshot(workdir.parent)
    res = CliRunner().invoke(main, [command, str(recipe), *args])
    out = res.output
    assert res.exit_code == 2, out
    assert "Traceback" not in out and not isinstance(res.exception, Exception), (res.exception, out)
    assert out.startswith("error: "), out
    for text_expected in expected:
        assert text_expected in out, out
    if where is not None:
        assert f"{recipe}:{where}:" in out, out
    # nothing made: no runs/ under the working directory, no directory anywhere else (name: ../../x)
    assert _snapshot(workdir.parent) == before


def test_recipe_error_on_resume_leaves_the_run_directory_as_it_was(workdir: Path):
    """`sslrecipe run RUN --set ...` with a bad value refuses before touching the run it would resume."""
    run_dir = workdir / "runs" / "old"
    run_dir.mkdir(parents=True)
    (run_dir / "resolved.yaml").write_text(BASE)
    (run_dir / "events.jsonl").write_text('{"event": "run_start"}\n')
    (run_dir / "data-0123").mkdir()
    (run_dir / "data-0123" / "done.json").write_text("{}")
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    res = CliRunner().invoke(main, ["run", str(run_dir), "--set", "backbone.name=resnet_nope"])
    assert res.exit_code == 2 and "backbone.name: unknown timm backbone 'resnet_nope'" in res.output, res.output
    assert "Traceback" not in res.output
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


def test_run_directory_without_resolved_recipe_is_a_recipe_error(workdir: Path):
    (workdir / "notarun").mkdir()
    res = CliRunner().invoke(main, ["run", str(workdir / "notarun")])
    assert res.exit_code == 2 and "directory without resolved.yaml" in res.output, res.output
    assert os.listdir(workdir / "notarun") == []
