"""The stage graph comes from DVC (index, or `dvc dag --dot`), never from Python."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from dvc_toy import TOY_STAGES, dvc, make_toy_repo, write_dvc_yaml

from flows import graph as graph_mod
from flows.graph import GraphError, StageGraph, graph_from_dot, graph_from_index, parse_dot, read_graph

DIAMOND = {"a": set(), "b": set(), "c": {"a", "b"}, "d": {"c"}}


def _upstream(g: StageGraph) -> dict[str, set[str]]:
    return {s: set(u) for s, u in g.upstream.items()}


def test_index_graph_of_toy_repo(toy_repo: Path) -> None:
    g = graph_from_index(toy_repo)
    assert _upstream(g) == DIAMOND
    assert g.stages == ["a", "b", "c", "d"]
    assert g.outs["c"] == ("c.txt",)


def test_dot_fallback_matches_index(toy_repo: Path) -> None:
    assert _upstream(graph_from_dot(toy_repo)) == _upstream(graph_from_index(toy_repo))


def test_read_graph_falls_back_to_dot_when_index_breaks(toy_repo: Path, monkeypatch) -> None:
    def broken(root):
        raise AttributeError("index has no graph")

    monkeypatch.setattr(graph_mod, "graph_from_index", broken)
    assert _upstream(read_graph(toy_repo)) == DIAMOND


def test_adding_a_stage_to_dvc_yaml_adds_it_to_the_graph(toy_repo: Path) -> None:
    write_dvc_yaml(
        toy_repo, {**TOY_STAGES, "e": {"cmd": "cat d.txt > e.txt", "deps": ["d.txt"], "outs": ["e.txt"]}}
    )
    g = read_graph(toy_repo)
    assert g.stages[-1] == "e" and g.upstream["e"] == {"d"}


def test_stages_in_a_subdirectory_are_addressed_from_the_root(toy_repo: Path) -> None:
    sub = toy_repo / "sub"
    sub.mkdir()
    (sub / "dvc.yaml").write_text(
        yaml.safe_dump(
            {"stages": {"x": {"cmd": "cat ../d.txt > x.txt", "deps": ["../d.txt"], "outs": ["x.txt"]}}}
        )
    )
    g = graph_from_index(toy_repo)
    assert g.upstream["sub/dvc.yaml:x"] == {"d"}
    assert g.outs["sub/dvc.yaml:x"] == ("sub/x.txt",)


def test_dvc_add_data_sources_are_not_stages(tmp_path: Path) -> None:
    root = make_toy_repo(
        tmp_path / "r",
        stages={"use": {"cmd": "cat raw.txt > out.txt", "deps": ["raw.txt"], "outs": ["out.txt"]}},
    )
    (root / "raw.txt").write_text("x\n")
    assert dvc(root, "add", "-q", "raw.txt").returncode == 0
    assert _upstream(read_graph(root)) == {"use": set()}


def test_the_real_dvc_yaml_parses_with_base_and_generate_independent() -> None:
    g = read_graph(Path(__file__).resolve().parents[2])
    assert {"base", "generate", "evaluate"} <= set(g.upstream)
    assert not g.upstream["base"] and not g.upstream["generate"]
    assert g.stages.index("validate") > max(g.stages.index("base"), g.stages.index("generate"))


def test_subgraph_keeps_targets_and_their_ancestors_only() -> None:
    g = parse_dot('strict digraph {\n"a";\n"b";\n"c";\n"d";\n"a" -> "c";\n"b" -> "c";\n"c" -> "d";\n}\n')
    assert _upstream(g) == DIAMOND
    assert g.subgraph(["c"]).stages == ["a", "b", "c"]
    assert g.subgraph(["dvc.yaml:a"]).stages == ["a"]
    assert g.subgraph(None) is g
    assert g.descendants("a") == {"c", "d"}


def test_unknown_target_names_it_and_the_known_stages() -> None:
    g = StageGraph(upstream={"a": frozenset(), "b": frozenset({"a"})})
    with pytest.raises(GraphError, match=r"unknown stage 'sftt'.*a, b"):
        g.subgraph(["sftt"])


def test_cycle_is_an_error() -> None:
    g = StageGraph(upstream={"a": frozenset({"b"}), "b": frozenset({"a"})})
    with pytest.raises(GraphError, match="cycle"):
        _ = g.stages


def test_dvc_dag_failure_is_reported(tmp_path: Path) -> None:
    with pytest.raises(GraphError, match="dvc dag --dot"):
        graph_from_dot(tmp_path)  # not a DVC repo
