"""The advisor: the eight conclusions, availability, confidence, --data, errors, --json, --write-recipe."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from sslrecipe.cli import main
from sslrecipe.errors import SSLRecipeError
from sslrecipe.guide import advise
from sslrecipe.guide.rules import decision_table_markdown, load_rules, matches
from sslrecipe.guide.write import recipe_yaml, write_recipe
from sslrecipe.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]
TIMM_NAMES = {"resnet50", "resnet200", "vit_small_patch16_224", "vit_base_patch16_224"}


def cli(*args: str):
    return CliRunner().invoke(main, ["advise", *args], catch_exceptions=False)


def ranked(advice) -> list[tuple[str, str]]:
    return [(o.method, o.backbone) for o in advice.options]


def test_resnet_25_shots_is_resim_with_public_weights_citing_table_vii():
    result = cli("--backbone", "resnet", "--shots", "25")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    # the first screen: a ranked table with the deciding number beside the alternatives' and the baseline's
    assert "Decided by Table VII 25-shot AP x4" in result.output
    row = next(line for line in lines if line.lstrip().startswith("1 "))
    assert row.split()[1:] == ["ReSim", "R50", "resim-fpn-resnet50-400ep", "50.4", "high", "CC-BY-NC-4.0"]
    assert next(line for line in lines if line.lstrip().startswith("2 ")).split()[1:5] == ["DINO", "R50", "dino-resnet50", "38.2"]
    assert next(line for line in lines if "Scratch R50" in line).split()[-1] == "30.1"
    assert "Why 1: ReSim R50 has the highest Table VII 25-shot AP of the options" in " ".join(result.output.split())
    assert "Caveats of 1: non-commercial licence." in result.output
    # each number once (the table), and the full reasoning only with --verbose
    assert result.output.count("50.4") == 1 and result.output.count("30.1") == 1
    assert len(lines) <= 16
    verbose = cli("--backbone", "resnet", "--shots", "25", "--verbose").output
    assert "Table VII, ReSim R50, 25-shot F1 52.0" in " ".join(verbose.split())
    assert "For few labels with a ResNet, local instance discrimination wins" in " ".join(verbose.split())
    assert "Baseline to beat: Scratch R50" in verbose

    data = json.loads(cli("--backbone", "resnet", "--shots", "25", "--json").output)
    top = data["recommendations"][0]
    assert (top["method"], top["backbone"], top["init"]) == ("resim", "resnet50", "public")
    assert {"table": "Table VII", "row": "ReSim R50", "metric": "25-shot AP", "value": 50.4} in top["evidence"]
    assert top["confidence"]["level"] == "high" and top["confidence"]["extrapolated"] == []


def test_json_carries_everything_the_text_shows():
    data = json.loads(cli("--domain", "ir", "--object-size", "small", "--json", "--top", "4").output)
    assert set(data) == {"constraints", "decided_by", "evidence_weighed", "headline", "recommendations", "baseline",
                         "recipe"}
    assert len(data["recommendations"]) == 4
    assert data["decided_by"] == {"table": "Table III", "metric": "AP_S (no cls)", "weight": 3.0, "criteria": ["E3"]}
    assert data["headline"].startswith("SparK R200 has the highest Table III AP_S (no cls)")
    c = data["constraints"]
    assert c["domain"] == "ir" and c["domain_shift"] == "moderate" and c["origin"]["domain_shift"] == "derived"
    assert c["shots"] is None and c["backbone"] == "any"
    for rec in data["recommendations"]:
        assert set(rec) == {"label", "method", "backbone", "init", "weights", "licence", "score", "decided_by",
                            "evidence", "rationale", "departures", "caveats", "caveat_titles", "confidence"}
        assert rec["method"] in {"dino", "resim", "leopart", "spark", "mae", "hybrid", "none"}
        assert rec["backbone"] in TIMM_NAMES
        assert rec["init"] in {"public", "custom-pretrain", "public+custom-pretrain"}
        assert rec["evidence"] and all(set(e) == {"table", "row", "metric", "value"} for e in rec["evidence"])
        assert rec["rationale"] and isinstance(rec["caveats"], list)
        assert len(rec["caveat_titles"]) == len(rec["caveats"])
        assert set(rec["confidence"]) == {"score", "level", "extrapolated"}
        assert 0 < rec["confidence"]["score"] <= 1
        assert any(c.startswith("Small objects:") for c in rec["caveats"])
        assert set(rec["decided_by"]) == {"table", "metric", "weight", "value", "row", "borrowed"}
        if rec["init"] == "public":  # the weights id and its licence, as the table shows them
            assert rec["weights"] and rec["licence"]
    top = data["recommendations"][0]
    assert (top["label"], top["weights"], top["licence"]) == ("SparK R200", "spark-resnet200", "MIT")
    assert top["decided_by"]["value"] == 35.2 and top["decided_by"]["borrowed"] is None
    assert isinstance(top["score"], float)
    b = data["baseline"]
    assert set(b) == {"label", "method", "backbone", "init", "decided_by", "evidence", "rationale"}
    assert b["method"] == "none" and b["init"] == "scratch"
    assert b["backbone"] == data["recommendations"][0]["backbone"]


# --------------------------------------------------------------------------- the eight conclusions


def test_conclusion_1_vits_lead_with_enough_data_and_strategy_matters_little():
    a = advise()  # plenty of labels, RGB, COCO-size objects
    assert [o.family for o in a.options[:2]] == ["vit", "vit"]
    assert a.best.method == "mae" and a.best.backbone == "vit_base_patch16_224"
    assert "encoder matters more than the strategy" in a.best.rationale
    small = advise(model_size="small")
    assert small.best.family == "vit" and small.best.backbone == "vit_small_patch16_224"
    # the encoder matters more than the strategy: every ViT-B option beats every ResNet-50 option
    order = ranked(a)
    assert max(order.index(("mae", "vit_base_patch16_224")), order.index(("dino", "vit_base_patch16_224"))) < min(
        order.index((m, "resnet50")) for m in ("resim", "spark", "dino")
    )
    resnet = next(o for o in a.options if o.family == "resnet")
    assert any("ViTs lead" in c for c in resnet.caveats)


def test_conclusion_2_vits_are_poor_few_shot_and_then_need_mim():
    a = advise(backbone="vit", shots=25)
    assert a.best.method == "mae"
    assert a.options[1].method == "mae"  # both MAE options before any instance-discrimination ViT
    assert any("ViTs do poorly with few labels" in c for c in a.best.caveats)
    anyb = advise(shots=25)
    assert anyb.best.family == "resnet"
    best_vit = next(o for o in anyb.options if o.family == "vit")
    assert best_vit.method == "mae"
    assert advise(backbone="vit", shots=50).best.method == "mae"


def test_conclusion_3_resnets_need_local_ssl_and_mim_is_poor_few_shot():
    few = advise(backbone="resnet", shots=25)
    order = ranked(few)
    assert order[0] == ("resim", "resnet50")
    assert order.index(("dino", "resnet50")) < order.index(("spark", "resnet50"))  # 38.2 vs 34.4
    assert "50.4" in few.best.rationale and "34.4" in few.best.rationale and "30.1" in few.best.rationale
    spark = next(o for o in few.options if o.method == "spark")
    assert any("MIM on ResNets is poor with few labels" in c for c in spark.caveats)
    plenty = advise(backbone="resnet")
    assert {o.method for o in plenty.options[:2]} == {"spark", "resim"}
    assert advise(backbone="resnet", model_size="small").best.method == "resim"


def test_conclusion_4_small_objects_strict_resnets_tolerant_vits():
    strict = advise(object_size="small")
    assert (strict.best.method, strict.best.backbone) == ("spark", "resnet200")
    small = advise(object_size="small", model_size="small")
    assert ranked(small)[:2] == [("resim", "resnet50"), ("spark", "resnet50")]
    vit = next(o for o in small.options if o.family == "vit")
    assert any("localize them worse" in c for c in vit.caveats)
    tolerant = advise(object_size="small", localization="tolerant")
    assert (tolerant.best.method, tolerant.best.backbone) == ("dino", "vit_base_patch16_224")
    assert "68.1" in tolerant.best.rationale


def test_conclusion_5_dino_is_the_weakest_resnet_pretraining():
    for kwargs in ({}, {"object_size": "small"}, {"object_size": "small", "localization": "tolerant"}):
        a = advise(backbone="resnet", model_size="small", **kwargs)
        assert ranked(a)[-1] == ("dino", "resnet50"), kwargs
        assert any("weakest ResNet pre-training" in c for c in a.options[-1].caveats)


def test_conclusion_6_rgb_to_ir_with_imagenet_weights():
    vit = advise(domain="ir", backbone="vit")
    assert vit.best.method == "mae" and vit.best.init == "public"
    assert "92.1" in vit.best.rationale
    dino = next(o for o in vit.options if o.method in ("dino", "leopart") and o.backbone == "vit_small_patch16_224")
    assert any("about 5 AP" in c for c in dino.caveats)
    res = advise(domain="ir", backbone="resnet", model_size="small")
    assert ranked(res)[0] == ("resim", "resnet50")
    assert ranked(res)[-1] == ("spark", "resnet50")  # SparK drops most
    assert any("drops most" in c for c in res.options[-1].caveats)
    assert advise(domain="ir", model_size="small").best.method == "mae"


def test_conclusion_7_in_domain_pretraining_only_when_needed_and_then_mim():
    ir = advise(domain="ir")
    assert all(o.init == "public" for o in ir.options if o.candidate.public)
    resim = next(o for o in ir.options if o.method == "resim")
    assert "not expected to beat these ImageNet weights" in resim.rationale
    req = advise(custom_pretrain="required", backbone="resnet", unlabeled=500_000)
    assert req.best.method == "spark" and req.best.init == "custom-pretrain"
    assert all(o.init == "custom-pretrain" for o in req.options)
    cited = [r.cite() for r in req.best.evidence]
    assert "Table VI, SparK-IR R50, delta AP -3.7" in cited
    assert "-8.5" in req.best.rationale  # vs ReSim-IR
    assert advise(custom_pretrain="required", backbone="vit").best.method == "mae"
    med = advise(domain="medical", backbone="resnet", unlabeled=100_000)
    assert med.best.method == "spark" and med.best.init == "public+custom-pretrain"
    assert med.best.confidence < advise(backbone="resnet").best.confidence
    assert any("medical" in x for x in med.best.extrapolated)
    # a large shift with nothing to pre-train on: public weights, said to be unmeasured
    none = advise(domain="astronomy", unlabeled=0)
    assert none.best.init == "public" and any("no unlabeled images" in c for c in none.best.caveats)


def test_conclusion_8_hybrid_for_custom_pretraining_with_few_labels_on_resnets():
    a = advise(custom_pretrain="required", backbone="resnet", shots=25, unlabeled=300_000)
    assert a.best.method == "hybrid" and a.best.init == "custom-pretrain"
    assert a.best.level == "low"
    assert any("not measured by the survey" in x for x in a.best.extrapolated)
    assert any("no public tool offers it" in c for c in a.best.caveats)
    assert ranked(a)[1] == ("resim", "resnet50")  # the best measured option follows
    # hybrid is only an option where conclusion 8 applies
    assert "hybrid" not in {o.method for o in advise(custom_pretrain="required", backbone="resnet").options}
    assert "hybrid" not in {o.method for o in advise(backbone="resnet", shots=25).options}
    assert "hybrid" not in {o.method for o in advise(custom_pretrain="required", shots=25).options if o.family == "vit"}


def test_every_conclusion_has_rules():
    rules = load_rules()
    covered = set()
    for c in rules.criteria:
        covered |= set(c.conclusions)
    for group in (rules.notes, rules.init):
        for row in group:
            covered |= set(row.get("conclusions") or ())
    assert covered == set(range(1, 9))


# --------------------------------------------------------------------------- rankings consistent with their reasons


def test_ir_small_objects_strict_ranks_by_ap_s_where_resnets_with_local_pretraining_lead():
    a = advise(domain="ir", object_size="small")
    assert a.decided_by.column == "AP_S (no cls)"
    assert (a.best.method, a.best.backbone) == ("spark", "resnet200")  # AP_S 35.2, the best measured
    assert a.headline.startswith("SparK R200 has the highest Table III AP_S (no cls) of the options")
    # the shown ranking follows AP_S: 35.2, then MAE ViT/B-16 33.4, then ReSim R50 33.3
    assert [o.decided.value.rows[0].value for o in a.recommendations] == [35.2, 33.4, 33.3]
    vit = next(o for o in a.options if o.family == "vit")
    assert any("localize them worse" in c for c in vit.caveats)


def test_custom_pretraining_with_25_shots_does_not_put_a_vit_first_under_its_own_caveat():
    a = advise(shots=25, custom_pretrain="required")
    assert a.best.family == "resnet" and (a.best.method, a.best.init) == ("hybrid", "custom-pretrain")
    assert ranked(a)[1] == ("resim", "resnet50")
    assert "conclusion 8" in a.headline
    # the low-confidence hybrid above the high-confidence ReSim says why, in one printed line
    assert a.best.level == "low" and a.options[1].level == "high"
    assert any(d.startswith("Hybrid R50 ranks above ReSim R50 although ReSim R50 has high confidence: Table VI delta AP")
               for d in a.best.departures)
    out = " ".join(cli("--shots", "25", "--custom-pretrain", "required").output.split())
    assert "Note: Hybrid R50 ranks above ReSim R50 although ReSim R50 has high confidence" in out


def test_vit_with_few_shots_is_still_mae_with_the_caveat_that_vits_do_poorly():
    a = advise(backbone="vit", shots=25)
    assert a.best.method == "mae" and any("ViTs do poorly with few labels" in c for c in a.best.caveats)
    out = cli("--backbone", "vit", "--shots", "25").output
    assert "ViTs do poorly with few labels" in out.split("Caveats of 1:")[1]


_GRID = [
    {"backbone": b, "model_size": m, "shots": n, "object_size": o, "localization": loc, "domain": d,
     "custom_pretrain": c}
    for b in ("any", "resnet", "vit") for m in ("any", "small", "large") for n in (None, 10, 25, 50, 300)
    for o in ("mixed", "small") for loc in ("strict", "tolerant") for d in ("rgb", "ir", "medical")
    for c in ("auto", "required", "no")
]


def test_every_ranking_explains_itself_where_it_departs_from_confidence_or_the_deciding_number():
    levels = {"low": 0, "medium": 1, "high": 2}
    for kwargs in _GRID:
        a = advise(unlabeled=100_000, **kwargs)
        assert a.headline.count(". ") == 0 and a.headline.endswith("."), kwargs  # one sentence
        shown = a.recommendations
        for k, i in enumerate(shown):
            for j in shown[k + 1:]:
                if levels[j.level] > levels[i.level]:  # a more confident option ranked lower
                    assert any(f"ranks above {j.label}" in d for d in i.departures) or any(
                        f"ranks above {x.label}" in d and levels[x.level] > levels[i.level]
                        for x in shown[k + 1:] for d in i.departures), (kwargs, i.label, j.label)
                    break
        # the top pick never carries a caveat favouring an admissible option below it without saying why
        for title, favours in a.best.favoured:
            if any(matches(favours, {"method": o.method, "family": o.family}) for o in a.options[1:]):
                assert any(title in d for d in a.best.departures), (kwargs, title)


def test_no_top_pick_is_a_vit_under_few_labels_when_a_resnet_with_local_pretraining_is_admissible():
    for kwargs in _GRID:
        if kwargs["shots"] not in (10, 25, 50) or kwargs["backbone"] == "vit" or kwargs["model_size"] == "large":
            continue
        a = advise(unlabeled=100_000, **kwargs)
        assert a.best.family == "resnet", kwargs


# --------------------------------------------------------------------------- inputs taken as given


def test_aliases_are_listed_in_help_read_as_said_and_unknown_ones_rejected_with_the_valid_values():
    help_text = " ".join(CliRunner().invoke(main, ["advise", "--help"]).output.split())
    assert "vit (transformer, vits)" in help_text and "ir (infrared, thermal, tir)" in help_text
    out = " ".join(cli("--backbone", "transformer", "--domain", "thermal").output.split())
    assert "backbone vit (from 'transformer')" in out and "domain ir (from 'thermal')" in out
    data = json.loads(cli("--backbone", "transformer", "--domain", "thermal", "--json").output)
    assert data["constraints"]["typed"] == {"backbone": "transformer", "domain": "thermal"}
    bad = CliRunner().invoke(main, ["advise", "--domain", "thermic"])
    assert bad.exit_code == 2 and "use one of rgb, ir," in bad.output and "thermal, tir = ir" in bad.output


def test_a_survey_backbone_name_fixes_the_size_and_a_contradicting_size_is_an_error():
    a = advise(backbone="vit_small_patch16_224")
    assert a.constraints.model_size == "small" and a.constraints.origin["model_size"] == "backbone"
    assert {o.backbone for o in a.options} == {"vit_small_patch16_224"}
    bad = CliRunner().invoke(main, ["advise", "--backbone", "vit_small_patch16_224", "--model-size", "large"])
    assert bad.exit_code == 2 and "Traceback" not in bad.output
    assert "vit_small_patch16_224 is a small model, but --model-size is large" in bad.output
    assert "vit_base_patch16_224" in bad.output  # the large one to name instead


def test_shots_beyond_the_dataset_and_a_pool_count_contradicting_unlabeled_are_errors(tmp_path):
    path = _coco(tmp_path, 10, box=6, side=(100, 80))
    with pytest.raises(SSLRecipeError, match="has only 10 labeled images"):
        advise(data=str(path), shots=25)
    pool = tmp_path / "pool"
    pool.mkdir()
    from PIL import Image

    for i in range(3):
        Image.new("L", (16, 16)).save(pool / f"{i}.png")
    assert advise(pool=str(pool)).constraints.unlabeled == 3
    with pytest.raises(SSLRecipeError, match="holds 3 images"):
        advise(pool=str(pool), unlabeled=500)


# --------------------------------------------------------------------------- availability, confidence


def test_mae_vit_small_is_not_public_so_init_is_what_the_user_can_do():
    a = advise(domain="ir", model_size="small")
    top = a.best
    assert (top.method, top.backbone, top.init) == ("mae", "vit_small_patch16_224", "custom-pretrain")
    assert "not public" in top.caveats[0] and "MAE ViT/B-16" in top.caveats[0]
    no = advise(domain="ir", model_size="small", custom_pretrain="no")
    assert ("mae", "vit_small_patch16_224") not in ranked(no)
    assert all(o.init == "public" for o in no.options)
    # never offered as public weights
    assert all(o.init != "public" for o in advise().options if o.backbone == "vit_small_patch16_224" and o.method == "mae")


def test_confidence_drops_outside_the_measured_regime_and_says_why():
    measured = advise(backbone="resnet", shots=25).best
    below = advise(backbone="resnet", shots=5).best
    between = advise(backbone="resnet", shots=300).best
    assert below.confidence < measured.confidence and between.confidence < measured.confidence
    assert any("below the survey's smallest few-shot setting" in x for x in below.extrapolated)
    assert any("between the survey's 50-shot" in x for x in between.extrapolated)
    large = advise(backbone="resnet", model_size="large", shots=25).best
    assert large.backbone == "resnet200" and any("no SparK R200 row" in x for x in large.extrapolated)
    hyper = advise(domain="hyperspectral", channels=8, unlabeled=1000).best
    assert hyper.level == "low"
    assert any("hyperspectral" in x for x in hyper.extrapolated) and any("channels: 8" in x for x in hyper.extrapolated)


def test_small_objects_get_resolution_and_tiling_advice():
    a = advise(object_size="small", backbone="vit")
    text = a.best.resolution.text
    assert "224-px" in text and "native resolution" in text and "tile" in text and "16 px" in text
    assert advise(object_size="large").best.resolution is None


# --------------------------------------------------------------------------- --data


def _coco(tmp_path: Path, n_images: int, box: int, side: tuple[int, int], boxes_per_image: int = 3) -> Path:
    from PIL import Image

    images, anns = [], []
    for i in range(n_images):
        images.append({"id": i + 1, "file_name": f"img{i}.png", "width": side[0], "height": side[1]})
        for j in range(boxes_per_image):
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": 1,
                         "bbox": [10 + 3 * j, 10, box, box], "area": box * box, "iscrowd": 0})
    Image.new("L", side).save(tmp_path / "img0.png")  # one real image: its channel count is read
    path = tmp_path / "train.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "car"}]}))
    return path


def test_data_infers_shots_object_size_and_channels(tmp_path):
    path = _coco(tmp_path, 40, box=6, side=(2000, 1500), boxes_per_image=120)
    data = json.loads(cli("--data", str(path), "--backbone", "vit", "--json").output)
    c = data["constraints"]
    assert (c["shots"], c["object_size"], c["channels"]) == (40, "small", 1)
    assert c["origin"]["shots"] == "data" and c["origin"]["object_size"] == "data"
    assert "40 images" in c["data_summary"]
    a = advise(data=str(path), backbone="vit")
    res = a.best.resolution
    assert res.upscale == 4 and res.tile is True and res.finetune_img_size == 640 * 4
    assert res.max_dets is not None and res.max_dets >= 120
    # a flag given explicitly wins over the data
    again = json.loads(cli("--data", str(path), "--shots", "25", "--object-size", "medium", "--json").output)
    assert again["constraints"]["shots"] == 25 and again["constraints"]["object_size"] == "medium"
    assert again["constraints"]["origin"]["shots"] == "given"


def test_coco_fallback_reads_hit_uav_style_json(tmp_path):
    """The reader used when the data package's statistics are absent (HIT-UAV: `annotation`, `filename`)."""
    from sslrecipe.guide.infer import coco_facts

    anns = [{"image_id": 1, "bbox": [0, 0, 4, 5]}, {"image_id": 1, "bbox": [0, 0, 50, 50]},
            {"image_id": 2, "bbox": [0, 0, 120, 100], "area": 12000.0}, {"image_id": 2, "bbox": [0, 0, 9, 9]},
            {"image_id": 2, "bbox": [0, 0, 9, 9], "iscrowd": 1}]
    path = tmp_path / "hit.json"
    path.write_text(json.dumps({"images": [{"id": 1, "filename": "a.png", "width": 640, "height": 512},
                                           {"id": 2, "filename": "b.png", "width": 640, "height": 512}],
                                "annotation": anns}))
    facts = coco_facts(path)
    assert (facts.images, facts.boxes, facts.sizes) == (2, 4, {"small": 2, "medium": 1, "large": 1})
    assert facts.object_size == "small" and facts.max_side == 640 and facts.max_boxes_per_image == 2
    assert facts.median_small_side == pytest.approx((20 ** 0.5 + 9) / 2)
    assert facts.channels is None and "channels unknown" in facts.notes[0]


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "args, message",
    [
        (["--shots", "-3"], "at least 1"),
        (["--shots", "0"], "at least 1"),
        (["--backbone", "efficientnet"], "not a backbone family"),
        (["--domain", "infared"], "Did you mean ir"),
        (["--model-size", "huge"], "--model-size"),
        (["--unlabeled", "-1"], "cannot be negative"),
        (["--custom-pretrain", "required", "--unlabeled", "0"], "needs unlabeled images"),
        (["--data", "/nonexistent/train.json"], "not found"),
        (["--top", "0"], "at least 1"),
    ],
)
def test_bad_input_is_a_clear_error(args, message):
    result = CliRunner().invoke(main, ["advise", *args])
    assert result.exit_code == 2
    assert "error:" in result.output and message in result.output and "Traceback" not in result.output


def test_library_errors_are_sslrecipe_errors(tmp_path):
    with pytest.raises(SSLRecipeError, match="at least 1"):
        advise(shots=-1)
    with pytest.raises(SSLRecipeError, match="not a backbone family"):
        advise(backbone="swin")
    bad = tmp_path / "x.json"
    bad.write_text("[1, 2]")
    with pytest.raises(SSLRecipeError, match="not a COCO"):
        advise(data=str(bad))
    assert advise(backbone="ResNet50").constraints.backbone == "resnet"  # a timm name names its family


# --------------------------------------------------------------------------- --write-recipe


@pytest.mark.parametrize(
    "kwargs, source, method",
    [
        ({"backbone": "resnet", "shots": 25}, "fetch", "resim"),
        ({"domain": "ir", "model_size": "small", "backbone": "vit"}, "pretrain", "mae"),
        ({"domain": "medical", "backbone": "vit", "unlabeled": 50_000}, "pretrain", "mae"),
        ({"custom_pretrain": "required", "backbone": "resnet", "shots": 25, "unlabeled": 10_000}, "pretrain", "hybrid"),
    ],
)
def test_written_recipe_validates_with_advised_and_baseline_arms(tmp_path, kwargs, source, method):
    advice = advise(**kwargs)
    path = write_recipe(advice, tmp_path / "advised.yaml")
    recipe = load_recipe(path)
    o = advice.best
    assert o.method == method and recipe.backbone.name == o.backbone
    assert recipe.weights.source == source
    if source == "fetch":
        assert recipe.weights.id == o.candidate.weights
    else:
        assert recipe.pretrain.method == method
        if o.init == "public+custom-pretrain":
            assert recipe.pretrain.init.source == "fetch" and recipe.pretrain.init.id == o.candidate.continue_from
    assert recipe.data.synthetic is not None and recipe.data.train is None  # runs as written
    arms = {arm.name: arm.set for arm in recipe.matrix.arms}
    assert arms == {f"advised-{method}": {"weights.source": source}, "baseline-scratch": {"weights.source": "scratch"}}
    text = path.read_text()
    assert "# Advice:" in text and "train: {annotations:" in text  # where the user's own data goes


def test_written_recipe_cites_the_evidence_and_keeps_the_shots(tmp_path):
    advice = advise(backbone="resnet", shots=25)
    text = recipe_yaml(advice)
    assert "Table VII, ReSim R50, 25-shot AP 50.4" in " ".join(line.lstrip("# ") for line in text.splitlines())
    path = tmp_path / "r.yaml"
    result = cli("--backbone", "resnet", "--shots", "25", "--write-recipe", str(path))
    assert result.exit_code == 0 and path.is_file()
    assert load_recipe(path).data.shots == 25


def _labeled_set(root: Path, n: int = 10) -> Path:
    """A tiny COCO set whose images exist (one 1-channel PNG each, next to the file)."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    for i in range(n):
        Image.new("L", (80, 64), color=10 * i).save(root / f"im{i}.png")
        images.append({"id": i + 1, "file_name": f"im{i}.png", "width": 80, "height": 64})
        anns.append({"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": [10, 10, 8, 8], "area": 64, "iscrowd": 0})
    path = root / "train.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "car"}]}))
    return path


def test_written_recipe_trains_on_the_users_data_and_pool(tmp_path):
    data = _labeled_set(tmp_path / "data")
    pool = tmp_path / "pool"
    pool.mkdir()
    from PIL import Image

    for i in range(4):
        Image.new("L", (80, 64)).save(pool / f"u{i}.png")
    out = tmp_path / "recipes" / "advised.yaml"
    out.parent.mkdir()
    advice = advise(data=str(data), pool=str(pool), backbone="vit", custom_pretrain="required")
    assert advice.constraints.unlabeled == 4 and advice.constraints.origin["unlabeled"] == "pool"
    write_recipe(advice, out)
    text = out.read_text()
    assert "annotations: ../data/train.json" in text and "unlabeled: ../pool" in text  # relative to the recipe
    recipe = load_recipe(out)
    assert recipe.data.synthetic is None and recipe.data.train.annotations == str(data.resolve())
    assert recipe.data.unlabeled == str(pool.resolve()) and tuple(recipe.data.split) == (0.6, 0.2, 0.2)
    assert recipe.data.shots is None  # all the images the user has (shots came from the data, not a flag)
    assert recipe.backbone.in_chans == 1 and recipe.weights.source == "pretrain"
    assert recipe.finetune.img_size == advice.best.resolution.finetune_img_size
    assert "carved from it by `split`" in " ".join(line.lstrip("# ") for line in text.splitlines())
    assert "synthetic" not in text


def test_written_recipe_uses_a_given_val_set_and_evaluates_on_it(tmp_path):
    data = _labeled_set(tmp_path / "train")
    val = _labeled_set(tmp_path / "val", 4)
    advice = advise(data=str(data), val=str(val), backbone="resnet", shots=5)
    recipe = load_recipe(write_recipe(advice, tmp_path / "r.yaml"))
    assert recipe.data.val.annotations == str(val.resolve()) and recipe.evaluate.split == "val"
    assert recipe.data.shots == 5  # asked for explicitly
    with pytest.raises(SSLRecipeError, match="goes with a training set"):
        advise(val=str(val))


def test_without_data_the_recipe_says_it_runs_on_synthetic_data(tmp_path):
    text = recipe_yaml(advise(backbone="resnet", shots=25))
    flat = " ".join(line.lstrip("# ") for line in text.splitlines())
    assert "Built-in synthetic IR scenes (no --data was given)" in flat
    assert "It runs on built-in synthetic data" in flat


def test_docs_show_the_current_decision_table():
    doc = (REPO / "docs" / "advisor.md").read_text(encoding="utf-8")
    start, end = "<!-- decision-table:start -->\n", "<!-- decision-table:end -->"
    assert start in doc and end in doc
    embedded = doc.split(start, 1)[1].split(end, 1)[0]
    assert embedded == decision_table_markdown(), "docs/advisor.md is stale: regenerate its decision table"


def test_a_leopart_recipe_on_own_images_pre_trains_dino_first(tmp_path):
    """Leopart refines DINO features: pre-trained on the user's images, the written recipe chains DINO before it."""
    import dataclasses

    a = advise(backbone="vit", domain="ir", unlabeled=50000)
    base = next(o for o in a.options if o.method == "dino" and o.backbone == "vit_small_patch16_224")
    leopart = dataclasses.replace(base, init="custom-pretrain",
                                  candidate=dataclasses.replace(base.candidate, method="leopart"))
    path = tmp_path / "leopart.yaml"
    path.write_text(recipe_yaml(a, leopart))
    recipe = load_recipe(path)
    assert recipe.pretrain.method == "leopart" and recipe.pretrain.first.method == "dino"
    assert recipe.pretrain.init is None and "`first` pre-trains DINO" in path.read_text()
