"""`dhf-cache compare`: the paired difference of two evaluations, and its refusals; eval's
headline, matrix and protocols end to end on the shared training cache (raw maps: read-only)."""

from __future__ import annotations

import json

import pytest

from conftest import eval_args, invoke

MAP_A, MAP_B = "up_blocks.3.resnets.1@-1", "up_blocks.1.resnets.0@800"


@pytest.fixture(scope="module")
def evals(tmp_path_factory, train_cache, train_data):
    root = tmp_path_factory.mktemp("compare")
    out = {}
    for name, extra in {"a": ("--raw", MAP_A), "b": ("--raw", MAP_B),
                        "a64": ("--raw", MAP_A, "--load-size", "48"),
                        "a-one": ("--raw", MAP_A, "--limit-per-category", "1"),
                        "a-dift": ("--raw", MAP_A, "--protocol", "dift")}.items():
        result = invoke(*eval_args(train_cache, train_data, root / name, "--drawings", "0", "--bootstrap", "200", *extra))
        assert result.exit_code == 0, result.output
        out[name] = root / name
    return out


def metrics(folder):
    return json.loads((folder / "metrics.json").read_text())


def test_eval_reports_the_headline_with_its_interval_and_the_matrix(evals):
    m = metrics(evals["a"])
    head = m["headline"][0]
    assert head["name"] == "bbox<=0.1 per_point" and head["value"] == m["pck"]["bbox@0.1"]["per_point"]
    lo, hi = head["ci95"]
    assert lo <= head["value"] <= hi
    assert m["bootstrap"] == {"resamples": 200, "seed": 0, "level": 0.95, "unit": "pairs"}
    rows = {r["name"]: r["value"] for r in m["conventions"]}
    assert len(rows) == 3 * 2 * 5 * 3  # bases x inequalities x averagings x the three alphas
    assert rows["img<=0.1 per_image"] == m["pck"]["img@0.1"]["per_image"]  # the old keys, kept
    assert rows["bbox<=0.1 per_category_per_point"] == m["pck"]["bbox@0.1"]["per_category_mean"]
    assert set(m["breakdowns"]["flags"]) == {"viewpoint_variation", "scale_variation", "truncation", "occlusion"}
    # the test cache is built at load 64 and matched at 64: not one of the paper's protocols, said so
    assert m["matching"]["cache_load_size"] == 64 and m["matching"]["reproduces"] is None
    assert m["protocol"]["matching_differs"] and any("differs from protocol dhf" in n for n in m["notes"])
    report = (evals["a"] / "report.md").read_text()
    assert "## Headline" in report and "## Every convention (%)" in report and "By difficulty" in report
    # another protocol: DIFT's headline (mean over pairs, then per point), matched at each image's size
    d = metrics(evals["a-dift"])
    assert [r["name"] for r in d["headline"]] == ["bbox<=0.1 per_image", "bbox<=0.1 per_point"]
    assert d["matching"]["match_at"] == "original" and d["options"]["match_at"] == "original"


def test_compare_reports_the_paired_difference(evals, tmp_path):
    result = invoke("compare", str(evals["a"]), str(evals["b"]), "--json", "--bootstrap", "300", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    c = json.loads(result.stdout)
    a, b = metrics(evals["a"])["headline"][0]["value"], metrics(evals["b"])["headline"][0]["value"]
    assert (c["overall"]["a"], c["overall"]["b"]) == (pytest.approx(a), pytest.approx(b))
    assert c["overall"]["difference"] == pytest.approx(a - b)
    lo, hi = c["overall"]["ci95"]
    assert lo <= a - b <= hi
    assert set(c["categories"]) == {"cat", "person"} and c["rule"] == "bbox<=0.1 per_point"
    assert {p.name for p in tmp_path.iterdir()} == {"compare.json", "compare.md", "compare.png"}
    same = json.loads(invoke("compare", str(evals["a"]), str(evals["a"]), "--json").stdout)
    assert same["overall"]["difference"] == 0 and same["overall"]["ci95"] == [0.0, 0.0]
    text = invoke("compare", str(evals["a"]), str(evals["b"])).output
    assert "A - B" in text and "all" in text


@pytest.mark.parametrize("other, why", [("a64", "matching.load_size: 64 vs 48"),
                                        ("a-one", "pairs: 2 only in A"),
                                        ("a-dift", "protocol.name: 'dhf' vs 'dift'")])
def test_compare_refuses_other_pairs_or_conventions(evals, other, why):
    result = invoke("compare", str(evals["a"]), str(evals[other]))
    assert result.exit_code == 2 and why in result.output and "\n" not in result.output.strip()


def test_compare_refuses_a_folder_that_is_no_evaluation(tmp_path, evals):
    result = invoke("compare", str(evals["a"]), str(tmp_path))
    assert result.exit_code == 2 and "no metrics.json" in result.output


def test_the_reference_subset_is_a_named_subset(tmp_path, train_cache, train_data):
    result = invoke(*eval_args(train_cache, train_data, tmp_path / "r", "--raw", MAP_A, "--subset", "ref360",
                               "--drawings", "0", "--bootstrap", "0"))
    assert result.exit_code == 0, result.output
    options = metrics(tmp_path / "r")["options"]
    assert (options["subset"], options["split"], options["limit_per_category"]) == ("ref360", "val", 20)
    assert metrics(tmp_path / "r")["headline"][0].get("ci95") is None  # --bootstrap 0: no interval
    clash = invoke(*eval_args(train_cache, train_data, tmp_path / "c", "--raw", MAP_A, "--subset", "ref360",
                              "--split", "trn"))
    assert clash.exit_code == 2 and "--subset ref360 sets --split val" in clash.output


def test_the_matrix_of_other_matchings_comes_from_the_same_descriptors(evals, tmp_path, train_cache, train_data):
    result = invoke(*eval_args(train_cache, train_data, tmp_path / "all", "--raw", MAP_A, "--drawings", "0",
                               "--bootstrap", "0", "--matrix-matchings", "all"))
    assert result.exit_code == 0, result.output
    rows = metrics(tmp_path / "all")["conventions"]
    by = {}
    for row in rows:
        by.setdefault(row["matching"], {})[row["name"]] = row["value"]
    assert list(by)[0] == "load/none" and len(by) == 6 and all(len(v) == 90 for v in by.values())
    assert by["load/none"] == {r["name"]: r["value"] for r in metrics(evals["a"])["conventions"]}
    # DIFT's matching, added here, is what a --protocol dift run predicts
    assert by["original/none"] == {r["name"]: r["value"] for r in metrics(evals["a-dift"])["conventions"]}
    assert "Matched at `original/none`" in (tmp_path / "all" / "report.md").read_text()
    bad = invoke(*eval_args(train_cache, train_data, tmp_path / "bad", "--raw", MAP_A, "--matrix-matchings", "nowhere"))
    assert bad.exit_code == 2 and "--matrix-matchings nowhere: unknown" in bad.output
    assert not (tmp_path / "bad").exists()
