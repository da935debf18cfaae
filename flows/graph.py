"""The stage graph, read from DVC at run time so Prefect never re-declares it.

Primary source: DVC's repo index (`dvc.repo.Repo(root).index.graph`, an internal API whose edge
u -> v means "u depends on v"); fallback: `dvc dag --dot` (edge u -> v means "v depends on u").
Stage addresses are relative to the repo root (`name` for the root dvc.yaml, `sub/dvc.yaml:name`
otherwise), which is what `dvc repro --single-item` expects when run from the root.

    python -m flows.graph [ROOT]      # print the stages in run order with their upstreams
"""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def lookup(params: Any, dotted: str, default: Any = None) -> Any:
    """The value at a dotted key of loaded YAML (`""` = the whole document), or default when any part is missing."""
    node = params
    for key in filter(None, dotted.split(".")):
        if not isinstance(node, Mapping) or key not in node:
            return default
        node = node[key]
    return node


class GraphError(ValueError):
    """The DVC graph could not be read, or a target names no stage in it."""


@dataclass(frozen=True)
class StageGraph:
    """Stages (repo-relative addresses) with their direct upstream stages and declared outputs.

    From DVC's index (not from `dvc dag --dot`) also each stage's file deps, its params (file, key) and,
    for a stage DVC's run-cache cannot carry to another machine, the reason.
    """

    upstream: Mapping[str, frozenset[str]]
    outs: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    deps: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    params: Mapping[str, tuple[tuple[str, str], ...]] = field(default_factory=dict)
    no_run_cache: Mapping[str, str] = field(default_factory=dict)

    @property
    def stages(self) -> list[str]:
        """Stages in a run order: every stage after its upstreams, ties in name order."""
        order: list[str] = []
        done: set[str] = set()
        pending = sorted(self.upstream)
        while pending:
            ready = [s for s in pending if self.upstream[s] <= done]
            if not ready:
                raise GraphError(f"cycle among stages: {', '.join(pending)}")
            order.extend(ready)
            done.update(ready)
            pending = [s for s in pending if s not in done]
        return order

    def resolve(self, target: str) -> str:
        """Map a user target (`sft`, `dvc.yaml:sft`, `sub/dvc.yaml:x`) to a stage address."""
        if target in self.upstream:
            return target
        if target.startswith("dvc.yaml:") and target.removeprefix("dvc.yaml:") in self.upstream:
            return target.removeprefix("dvc.yaml:")
        known = ", ".join(self.stages) or "(none)"
        raise GraphError(f"unknown stage {target!r}; dvc.yaml defines: {known}")

    def ancestors(self, stage: str) -> set[str]:
        seen: set[str] = set()
        stack = list(self.upstream[stage])
        while stack:
            s = stack.pop()
            if s not in seen:
                seen.add(s)
                stack.extend(self.upstream[s])
        return seen

    def descendants(self, stage: str) -> set[str]:
        return {s for s in self.upstream if stage in self.ancestors(s)}

    def subgraph(self, targets: Iterable[str] | None) -> StageGraph:
        """The targets and everything they depend on; the whole graph when targets is empty."""
        targets = list(targets or [])
        if not targets:
            return self
        keep: set[str] = set()
        for target in targets:
            stage = self.resolve(target)
            keep |= {stage} | self.ancestors(stage)
        return StageGraph(
            upstream={s: self.upstream[s] & keep for s in keep},
            outs={s: o for s, o in self.outs.items() if s in keep},
            deps={s: d for s, d in self.deps.items() if s in keep},
            params={s: p for s, p in self.params.items() if s in keep},
            no_run_cache={s: r for s, r in self.no_run_cache.items() if s in keep},
        )

    def producer(self, path: str) -> str | None:
        """The stage whose declared output is path or contains it; None for a file git tracks."""
        found = self.output(path)
        return found[0] if found else None

    def output(self, path: str) -> tuple[str, str] | None:
        """(stage, declared output) for the output that is path or contains it; None for a file git tracks."""
        for stage, outs in self.outs.items():
            for out in outs:
                if path == out or path.startswith(out.rstrip("/") + "/"):
                    return stage, out
        return None


def _address(stage, root: Path) -> str:
    relpath = Path(stage.path).resolve().relative_to(root.resolve()).as_posix()
    name = getattr(stage, "name", None)
    if not name:  # a .dvc file stage (e.g. an import) is addressed by its path
        return relpath
    return name if relpath == "dvc.yaml" else f"{relpath}:{name}"


def _no_run_cache(stage) -> str | None:
    """Why DVC's run-cache cannot restore this stage elsewhere (dvc/stage/cache.py `_can_hash`), or None."""
    if stage.always_changed:
        return "always_changed: true"
    if not (stage.cmd and stage.deps and stage.outs):
        return "no " + ("cmd" if not stage.cmd else "deps" if not stage.deps else "outs")
    for out in stage.outs:
        if out.persist:
            return f"output {out.def_path} is persist: true"
        if not out.use_cache:
            return f"output {out.def_path} is cache: false (not restorable in another clone)"
    return None


def graph_from_index(root: Path) -> StageGraph:
    """Read the graph from DVC's repo index; plain data sources (`dvc add` files) are left out."""
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    root = Path(root)

    def rel(path: str) -> str:
        return Path(path).resolve().relative_to(root.resolve()).as_posix()

    with Repo(str(root)) as repo:
        graph = repo.index.graph
        stages = [s for s in graph.nodes if not s.is_data_source]
        address = {s: _address(s, root) for s in stages}
        upstream = {
            address[s]: frozenset(address[d] for d in graph.successors(s) if d in address) for s in stages
        }
        outs = {address[s]: tuple(rel(o.fs_path) for o in s.outs) for s in stages}
        deps = {address[s]: tuple(rel(d.fs_path) for d in s.deps if not isinstance(d, ParamsDependency))
                for s in stages}
        params = {address[s]: tuple((rel(d.fs_path), key) for d in s.deps if isinstance(d, ParamsDependency)
                                    for key in d.params or [""])
                  for s in stages}
        no_run_cache = {address[s]: why for s in stages if (why := _no_run_cache(s))}
    return StageGraph(upstream=upstream, outs=outs, deps=deps, params=params, no_run_cache=no_run_cache)


_NODE = re.compile(r'^\s*"(?P<a>[^"]+)"\s*;\s*$')
_EDGE = re.compile(r'^\s*"(?P<a>[^"]+)"\s*->\s*"(?P<b>[^"]+)"\s*;\s*$')


def parse_dot(text: str) -> StageGraph:
    """Parse `dvc dag --dot` output (edge a -> b: b depends on a)."""
    upstream: dict[str, set[str]] = {}
    for line in text.splitlines():
        if m := _EDGE.match(line):
            upstream.setdefault(m["a"], set())
            upstream.setdefault(m["b"], set()).add(m["a"])
        elif m := _NODE.match(line):
            upstream.setdefault(m["a"], set())
    return StageGraph(upstream={s: frozenset(u) for s, u in upstream.items()})


def dvc_command(*args: str) -> list[str]:
    """`dvc ARGS` run by this interpreter, so it works without an activated venv."""
    return [sys.executable, "-m", "dvc", *args]


def graph_from_dot(root: Path) -> StageGraph:
    proc = subprocess.run(dvc_command("dag", "--dot"), cwd=root, capture_output=True, text=True)
    if proc.returncode:
        raise GraphError(f"`dvc dag --dot` failed in {root}: {proc.stderr.strip() or proc.stdout.strip()}")
    return parse_dot(proc.stdout)


def read_graph(root: Path | str = ".") -> StageGraph:
    """The stage graph of the DVC repo at root: the index first, `dvc dag --dot` if that fails."""
    root = Path(root)
    try:
        return graph_from_index(root)
    except Exception as err:  # internal API: any breakage falls back to the CLI
        log.warning("reading DVC's index graph failed (%s); falling back to `dvc dag --dot`", err)
        return graph_from_dot(root)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    graph = read_graph(sys.argv[1] if len(sys.argv) > 1 else ".")
    for stage in graph.stages:
        log.info("%s <- %s", stage, ", ".join(sorted(graph.upstream[stage])) or "-")


if __name__ == "__main__":
    main()
