"""Select: targets and ignores → groups (one layer each, or one single-exit block each).

A target or ignore is a layer type (`"Linear"`), a glob on the qualified name
(`"encoder.layer.*"`) or a regular expression (`"re:.*attn.*"`). By default every compressible
layer (Linear, Conv1d/2d/3d, ConvTranspose1d/2d/3d, Embedding, LSTM/GRU/RNN) is matched except
the model's first weight layer (stem, patch or token embedding: the first reached from the
inputs) and its last (classifier or LM head: the last before the outputs), as in the paper.
Both are found by graph position among every weight-holding op, compressible or not: a model
whose first weights sit in a layer vcon-fx does not compress has no stem to leave dense.
Everything left out keeps its reason.
"""

# long module: the selection rules (layer types, targets / ignores, stem and head by graph position,
# block regions) are read and changed together; split apart they would pass half-decided state around.

from __future__ import annotations

import contextlib
import fnmatch
import re
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from ..errors import SelectionError, UsageError
from ..methods.base import COMPRESSIBLE, LayerSite
from . import contracts
from .ends import stem_and_head

__all__ = ["Group", "Selection", "SelectionConfig", "find_sites", "select", "matches", "module_paths", "DEFAULT_TARGETS", "GRANULARITIES"]

DEFAULT_TARGETS = tuple(t.__name__ for t in COMPRESSIBLE)
GRANULARITIES = ("layer", "block")
ALLOCATE_UNITS = ("params", "flops")  # what --allocate keeps within the budget (graph/allocate.py)


@dataclass
class Group:
    """One blend group: a single layer, or a block whose compressible layers are compressed."""

    name: str
    kind: str  # "layer" | "block"
    path: str  # where the Blend module lives
    layers: list[str]  # compressible layers compressed inside the group
    members: list[str] = field(default_factory=list)  # block: the module paths it spans

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "path": self.path, "layers": list(self.layers),
                "members": list(self.members)}

    @staticmethod
    def from_dict(data: dict) -> "Group":
        return Group(data["name"], data["kind"], data["path"], list(data["layers"]), list(data.get("members", [])))


@dataclass(frozen=True)
class SelectionConfig:
    """Which layers to compress: the one object `plan`, `transform` and the CLI pass along.

    targets / ignore: type names, name globs or `re:` regexes (default targets: every
    compressible type, `DEFAULT_TARGETS`). granularity "block" blends whole single-exit regions
    named by `blocks`. include_stem / include_head also compress the first / last weight layer.
    allocate: "params" (or True) / "flops" makes the method's ratio, sparsity or bits one budget for
    all the selected layers, spread by measured sensitivity (graph/allocate.py); None: every layer alike.
    """

    targets: tuple[str, ...] | None = None
    ignore: tuple[str, ...] = ()
    granularity: str = "layer"
    blocks: tuple[str, ...] = ()
    include_stem: bool = False
    include_head: bool = False
    allocate: str | None = None

    def __post_init__(self):
        # frozen: normalise through object.__setattr__ (lists and bare strings become tuples)
        if self.targets is not None:
            object.__setattr__(self, "targets", _patterns(self.targets, "targets") or None)
        object.__setattr__(self, "ignore", _patterns(self.ignore, "ignore"))
        object.__setattr__(self, "blocks", _patterns(self.blocks, "blocks"))
        if self.granularity not in GRANULARITIES:
            raise UsageError(f"--granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if self.allocate is True:
            object.__setattr__(self, "allocate", "params")
        if self.allocate not in (None, False, *ALLOCATE_UNITS):
            raise UsageError(f"allocate must be one of {ALLOCATE_UNITS} (or None), got {self.allocate!r}")
        object.__setattr__(self, "allocate", self.allocate or None)

    @staticmethod
    def of(selection: "SelectionConfig | None" = None, **options) -> "SelectionConfig":
        """`selection`, or one built from keyword options (targets=…, ignore=…); not both."""
        unknown = set(options) - {f for f in SelectionConfig.__dataclass_fields__}
        if unknown:
            raise UsageError(f"unknown selection option(s) {sorted(unknown)}; "
                             f"known: {sorted(SelectionConfig.__dataclass_fields__)}")
        if selection is not None and options:
            raise UsageError(f"give either selection= or the options {sorted(options)}, not both")
        return selection if selection is not None else SelectionConfig(**options)

    def to_dict(self) -> dict:
        """The recipe's form (lists, None for the default targets)."""
        return {"targets": list(self.targets) if self.targets else None, "ignore": list(self.ignore),
                "granularity": self.granularity, "blocks": list(self.blocks), "include_stem": self.include_stem,
                "include_head": self.include_head, **({"allocate": self.allocate} if self.allocate else {})}


@dataclass
class Selection:
    """The groups to compress, every candidate layer, what was left out (path → reason), and the
    tied embedding / head pairs compressed together."""

    groups: list[Group]
    sites: dict[str, LayerSite]
    excluded: dict[str, str]
    granularity: str
    ties: dict[str, str] = field(default_factory=dict)  # output head → the embedding whose table it shares


def find_sites(gm: fx.GraphModule, example_args: tuple = (), example_kwargs: dict | None = None) -> dict[str, LayerSite]:
    """Every compressible layer called in the graph, in topological order, with output shapes.

    The shapes come from capture's own check run when it recorded every layer (torch.fx path),
    else from one forward pass over the example inputs (hooks, no graph change); without inputs
    the shapes are unknown and FLOPs are per position.
    """
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), COMPRESSIBLE):
            calls[node.target] = calls.get(node.target, 0) + 1
    shapes: dict[str, tuple[int, ...]] = {}
    recorded = gm.meta.get("vcon_shapes") or {}  # by capture's check run (torch.fx path)
    known = recorded.get("layers", {}) if recorded.get("inputs") == input_signature(example_args, example_kwargs) else {}
    if calls and all(p in known for p in calls):
        shapes = {p: known[p] for p in calls}
    elif example_args or example_kwargs:
        try:
            with torch.no_grad(), recording_layer_shapes(gm, shapes):
                gm(*example_args, **(example_kwargs or {}))
        except Exception as exc:
            raise UsageError(
                f"the model does not run on the example inputs ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
                "give a fitting --input-shape / --seq-len"
            ) from exc
    return {p: LayerSite(p, gm.get_submodule(p), shapes.get(p), n) for p, n in calls.items()}


@contextlib.contextmanager
def recording_layer_shapes(gm: fx.GraphModule, shapes: dict[str, tuple[int, ...]]):
    """While active, record the first output shape of every compressible layer the graph calls
    (of a recurrent layer: its output sequence's)."""
    handles = []
    for path in {n.target for n in gm.graph.nodes if n.op == "call_module"}:
        module = gm.get_submodule(path)
        if isinstance(module, COMPRESSIBLE):
            def hook(_m, _i, out, path=path):
                if isinstance(out, tuple) and out:  # a recurrent layer: (output, state)
                    out = out[0]
                if isinstance(out, torch.Tensor):
                    shapes.setdefault(path, tuple(out.shape))
            handles.append(module.register_forward_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def input_signature(args: tuple, kwargs: dict | None) -> tuple:
    """The shapes and dtypes of the tensor inputs: recorded layer shapes hold only for the same ones."""
    def sig(value):
        return (tuple(value.shape), str(value.dtype)) if isinstance(value, torch.Tensor) else repr(type(value))

    return tuple(sig(a) for a in args) + tuple((k, sig(v)) for k, v in sorted((kwargs or {}).items()))


def matches(pattern: str, path: str, module: nn.Module) -> bool:
    """True when `pattern` (type name, glob or `re:` regex) names this layer."""
    if pattern.startswith("re:"):
        try:
            return re.fullmatch(pattern[3:], path) is not None
        except re.error as exc:
            raise UsageError(f"bad regular expression {pattern!r}: {exc}") from None
    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", pattern) and pattern[0].isupper():
        return any(cls.__name__ == pattern for cls in type(module).__mro__)
    return fnmatch.fnmatchcase(path, pattern) or fnmatch.fnmatchcase(path, pattern + ".*")


def select(gm: fx.GraphModule, sites: dict[str, LayerSite], selection: SelectionConfig | None = None) -> Selection:
    """Decide which layers and blocks to compress (pure).

    Raises:
        SelectionError: nothing matched, or a block is not a single-exit region.
        UsageError: block granularity without --blocks.
    """
    selection = selection or SelectionConfig()
    targets, ignore, blocks = selection.targets or DEFAULT_TARGETS, selection.ignore, selection.blocks
    granularity, include_stem, include_head = selection.granularity, selection.include_stem, selection.include_head
    excluded: dict[str, str] = {}
    chosen: list[str] = []
    tied = gm.meta.get("vcon_tied", {}) if hasattr(gm, "meta") else {}
    shared = _shared_weight_layers(gm, sites)
    ties = _embedding_ties(sites) if granularity == "layer" else {}
    pairs = {p for pair in ties.items() for p in pair}
    stem, head = stem_and_head(gm, sites)
    for path, site in sites.items():
        if not any(matches(t, path, site.module) for t in targets):
            excluded[path] = f"not matched by targets {list(targets)}"
        elif any(matches(i, path, site.module) for i in ignore):
            excluded[path] = "ignored (--ignore)"
        elif path == stem and not include_stem:
            excluded[path] = "first layer (stem / embedding) stays dense; --include-stem compresses it"
        elif path == head and not include_head:
            excluded[path] = "last layer (classifier / head) stays dense; --include-head compresses it"
        elif path in tied or (path in shared and path not in pairs):
            excluded[path] = f"refused: {tied.get(path) or shared[path]}; compressing it would untie the weights"
        else:
            chosen.append(path)
    ties = _keep_whole_ties(ties, chosen, excluded)
    if granularity == "layer":
        groups = [Group(p, "layer", p, [p], [p]) for p in chosen]
    else:
        groups = _block_groups(gm, blocks, chosen)
    reasons = list(excluded.values())
    if not groups and not chosen and not any(r.startswith("ignored") for r in reasons) and any(
            r.startswith(("first layer", "last layer", "refused")) for r in reasons):
        left_out = "; ".join(f"{p}: {r}" for p, r in excluded.items() if not r.startswith(("not matched", "ignored")))
        raise SelectionError(f"every layer matched by targets {list(targets)} is left dense ({left_out[:300]})")
    if not groups:
        raise SelectionError(
            f"no layer matched targets {list(targets)}"
            + (f" ignoring {list(ignore)}" if ignore else "")
            + f" among {len(sites)} compressible layers"
            + (f" (e.g. {list(sites)[:3]})" if sites else "")
            + "; check --targets / --ignore / --blocks with `vcon-fx inspect`"
        )
    if contracts.active():
        contracts.require_group_layers(gm, groups)
    return Selection(groups, sites, excluded, granularity, ties)


def _patterns(value, what: str) -> tuple[str, ...]:
    """Patterns as a tuple; a bare string is one pattern (never split into characters)."""
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if not all(isinstance(v, str) for v in value):
        raise UsageError(f"{what} must be strings (type names, globs or re: patterns), got {list(value)!r}")
    return tuple(value)


def _shared_weight_layers(gm: fx.GraphModule, sites: dict[str, LayerSite]) -> dict[str, str]:
    """Layers whose weight is also held by another module (tied weights)."""
    owners: dict[int, list[str]] = {}
    for name, param in gm.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(name)
    out = {}
    for path, site in sites.items():
        for own, param in site.module.named_parameters(recurse=False):
            others = [n for n in owners.get(id(param), []) if n != f"{path}.{own}"]
            if param.dim() >= 2 and others:
                out[path] = f"its weight is tied to {others[0]}"
                break
    return out


def _embedding_ties(sites: dict[str, LayerSite]) -> dict[str, str]:
    """Output heads whose weight IS an embedding's table: head path → embedding path (pure)."""
    tables = {id(s.module.weight): p for p, s in sites.items() if isinstance(s.module, nn.Embedding)}
    return {p: tables[id(s.module.weight)] for p, s in sites.items()
            if isinstance(s.module, nn.Linear) and id(s.module.weight) in tables}


def _keep_whole_ties(ties: dict[str, str], chosen: list[str], excluded: dict[str, str]) -> dict[str, str]:
    """The ties whose two layers are both chosen; a layer whose partner stays dense is refused with the
    partner's reason (in place on `chosen` / `excluded`): compressing one would untie them."""
    kept = {}
    for head, embedding in ties.items():
        if head in chosen and embedding in chosen:
            kept[head] = embedding
            continue
        for path, other in ((head, embedding), (embedding, head)):
            if path in chosen:
                chosen.remove(path)
                excluded[path] = (f"refused: its weight is tied to {other}, which stays dense ({excluded[other]}); "
                                  "compressing only one would untie them: select both (e.g. --include-stem "
                                  "--include-head) and they share one compressed table")
    return kept


def module_paths(gm: fx.GraphModule) -> list[str]:
    """Every module path the graph's nodes came from, in first-use order."""
    seen: dict[str, None] = {}
    for node in gm.graph.nodes:
        for path, _cls in (node.meta.get("nn_module_stack") or {}).values():
            if path:
                seen.setdefault(path, None)
        if node.op == "call_module":
            seen.setdefault(node.target, None)
    return list(seen)


def _block_groups(gm: fx.GraphModule, patterns: tuple[str, ...], chosen: list[str]) -> list[Group]:
    if not patterns:
        raise UsageError(
            "--granularity block needs --blocks naming the regions, e.g. --blocks 'layer*.*' "
            "(ResNet blocks) or --blocks 'encoder.layer.*.intermediate+output' (transformer MLPs); "
            "`vcon-fx inspect --graph` lists module paths"
        )
    paths = module_paths(gm)
    groups: list[Group] = []
    taken: set[str] = set()
    for pattern in patterns:
        head, *siblings = pattern.split("+")
        for path in paths:
            if not _glob(head, path) or any(path == t or path.startswith(t + ".") for t in taken):
                continue
            parent = path.rpartition(".")[0]
            members = [path] + [f"{parent}.{s}" if parent else s for s in siblings]
            missing = [m for m in members if m not in paths]
            if missing:
                raise SelectionError(f"block {pattern!r} at {path}: module {missing[0]} does not exist in the graph")
            layers = [p for p in chosen if any(p == m or p.startswith(m + ".") for m in members)]
            if not layers:
                continue
            taken.update(members)
            name = members[0] if len(members) == 1 else members[0] + "".join("__" + s for s in siblings)
            groups.append(Group(name, "block", name, layers, members))
    if not groups:
        raise SelectionError(
            f"--blocks {list(patterns)} matched no module holding a selected layer; "
            f"module paths look like {paths[:6]}"
        )
    return groups


def _glob(pattern: str, path: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], path) is not None
    # '*' must not cross a dot here: 'layer*.*' names blocks, not every layer inside them.
    regex = "".join("[^.]*" if c == "*" else "[^.]" if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(regex, path) is not None
