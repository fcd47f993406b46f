"""The pass infrastructure: passes are small named callables over an FX GraphModule, run by a manager that
checks ordering constraints, counts each pass's rewrites and can dump the graph after each pass.

A pass returns `PassResult(graph_module, modified, count)`; `count` is the number of rewrites it made, added to
`counters["moe_compile"][pass name]`. Set `MOE_COMPILE_DUMP=DIR` (or `PassManager(dump_dir=...)`) to write the
readable graph after every pass as `DIR/NN_passname.py`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from moe_compile.counters import counters


@dataclass
class PassResult:
    graph_module: torch.fx.GraphModule
    modified: bool
    count: int = 0


@dataclass
class GraphPass:
    name: str
    run: Callable[[torch.fx.GraphModule, dict[str, Any]], PassResult]
    requires: tuple[str, ...] = ()  # passes that must run before this one
    description: str = ""


class PassOrderError(RuntimeError):
    pass


@dataclass
class PassManager:
    passes: list[GraphPass]
    options: dict[str, Any] = field(default_factory=dict)
    dump_dir: Optional[str] = None
    history: list[tuple[str, int]] = field(default_factory=list)  # (pass, rewrites) in run order

    def __post_init__(self) -> None:
        self.dump_dir = self.dump_dir or os.environ.get("MOE_COMPILE_DUMP")
        self.check_order()

    def check_order(self) -> None:
        seen: list[str] = []
        order = [p.name for p in self.passes]
        for p in self.passes:
            missing = [r for r in p.requires if r not in seen]
            if missing:
                raise PassOrderError(f"pass {p.name!r} requires {missing} to run before it; passes before it: "
                                     f"{seen}; pipeline order: {order}")
            seen.append(p.name)

    def __call__(self, gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
        self._dump(gm, 0, "input")
        for index, graph_pass in enumerate(self.passes, start=1):
            result = graph_pass.run(gm, self.options)
            gm = result.graph_module
            counters["moe_compile"][graph_pass.name] += result.count
            self.history.append((graph_pass.name, result.count))
            if result.modified:
                gm.graph.lint()
                gm.recompile()
            self._dump(gm, index, graph_pass.name)
        return gm

    def _dump(self, gm: torch.fx.GraphModule, index: int, name: str) -> None:
        if not self.dump_dir:
            return
        path = Path(self.dump_dir)
        path.mkdir(parents=True, exist_ok=True)
        (path / f"{index:02d}_{name}.py").write_text(gm.print_readable(print_output=False))
