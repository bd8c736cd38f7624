"""Tracing a model into groups of coupled channels: what must be cut together.

Removing output channel ``c`` of a convolution also removes input channel ``c`` of every
layer that reads it, entry ``c`` of the batch norm after it, and — through a residual
addition — channel ``c`` of every other layer feeding the same sum; through a concatenation
it becomes channel ``offset + c`` of the next layer's input; through a flatten it becomes
``H·W`` input features of a linear layer. A `ChannelGroup` is one such set: a root layer's
output channels and, for each coupled layer (a `Member`), which of its own indices each root
channel is. Cutting the same root channels from every member keeps the model consistent.

The coupling is found by Torch-Pruning's dependency graph, behind `spiralkit.graph.tp`.
Everything else is spiralkit's own: the graph is read into plain-data groups keyed by module
*names* (so a plan replays on a fresh copy of the model), each group is accepted only when
the op-safety rules of `spiralkit.graph.rules` find nothing on its path (otherwise it is left
whole and reported), importance is computed by `spiralkit.prune.structured_importance`, and
layers are cut or masked by `spiralkit.graph.slicing` — never by Torch-Pruning's pruners, so
that the masked and the physically pruned model are guaranteed to agree.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import nn

from spiralkit.graph.attention import HeadGroup, find_attention, known_layouts, unknown_attention
from spiralkit.graph.forward import Example, call_model, detach_cached
from spiralkit.graph.layers import COUPLED, RNN_TYPES, Role, channel_size, is_conv1d, is_depthwise
from spiralkit.graph.rules import check_op, layer_problem
from spiralkit.graph.tp import Graph, Handler, Node, op_kind, trace

__all__ = [
    "ChannelGroup",
    "Member",
    "ModelGroups",
    "Role",
    "Skipped",
    "call_model",
    "channel_size",
    "trace_groups",
]

_ROOT_TYPES = (nn.modules.conv._ConvNd, nn.Linear, nn.Embedding, *RNN_TYPES)
_MAX_INDICES = 4_000_000


def _is_root(module: nn.Module) -> bool:
    """Whether ``module``'s output channels may root a group (Hugging Face ``Conv1D`` included)."""
    return isinstance(module, _ROOT_TYPES) or is_conv1d(module)


@dataclass(frozen=True)
class Member:
    """One layer's share of a channel group.

    Attributes:
        module: Dotted module name.
        role: ``"out"`` for the layer's output channels (for norms, embeddings and
            depthwise convolutions: their only channel axis), ``"in"`` for its inputs.
        size: The layer's size along that axis (e.g. ``in_features``).
        local: The layer's indices in the group, aligned with ``roots``.
        roots: For each entry of ``local``, the root channel it belongs to.
    """

    module: str
    role: Role
    size: int
    local: tuple[int, ...]
    roots: tuple[int, ...]


@dataclass(frozen=True)
class ChannelGroup:
    """Channels that must be removed together (see the module docstring).

    Attributes:
        id: The root: the module whose output channels define the group (its name).
        size: Number of root channels.
        members: Every coupled layer, the root first.
        blocks: For each root channel, the block it belongs to; grouped convolutions need
            every block to lose the same number of channels. All zeros when unconstrained.
    """

    id: str
    size: int
    members: tuple[Member, ...]
    blocks: tuple[int, ...] = ()

    @property
    def num_blocks(self) -> int:
        """How many equal blocks the channels come in (1 when unconstrained)."""
        return max(self.blocks) + 1 if self.blocks else 1

    def producers(self) -> tuple[Member, ...]:
        """Members that compute the channels (``out`` role of convolutions, linears, RNNs, embeddings)."""
        return tuple(m for m in self.members if m.role == "out")

    def consumers(self) -> tuple[Member, ...]:
        """Members that read the channels (``in`` role)."""
        return tuple(m for m in self.members if m.role == "in")


@dataclass(frozen=True)
class Skipped:
    """Something left unpruned, and why.

    Attributes:
        name: The group (its root module), layer or attention module.
        reason: A sentence naming the layer or operation responsible.
    """

    name: str
    reason: str


@dataclass(frozen=True)
class ModelGroups:
    """Everything of a model that structured pruning can cut, and what it cannot.

    Attributes:
        channels: Prunable channel groups, in model order.
        heads: Attention layers whose heads can be pruned.
        skipped: Groups and layers left whole, with the reason.
    """

    channels: tuple[ChannelGroup, ...]
    heads: tuple[HeadGroup, ...]
    skipped: tuple[Skipped, ...] = field(default=())

    def summary(self) -> str:
        """A short human-readable table of groups and skipped items."""
        lines = [f"{len(self.channels)} channel groups, {len(self.heads)} attention layers"]
        lines += [f"  group {g.id}: {g.size} channels, {len(g.members)} layers" for g in self.channels]
        lines += [f"  heads {h.module}: {h.num_heads} x {h.head_dim}" for h in self.heads]
        lines += [f"  skipped {s.name}: {s.reason}" for s in self.skipped]
        return "\n".join(lines)


# --------------------------------------------------------------------------- groups


@dataclass
class _Draft:
    """A group under construction: members and the reasons it cannot be pruned."""

    root: str
    size: int
    slots: dict[tuple[str, Role], dict[int, int]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    reached: set[tuple[str, Role]] = field(default_factory=set)
    concat: bool = False


def _role(graph: Graph, module: nn.Module, handler: Handler) -> Role:
    if isinstance(module, COUPLED) or is_depthwise(module):
        return "out"
    return "out" if graph.cuts_outputs(module, handler) else "in"


def _near(graph: Graph, node: Node, depth: int = 6) -> str:
    """The name of a layer next to an operation node, for messages."""
    frontier, seen = [node], set()
    for _ in range(depth):
        nxt = []
        for current in frontier:
            for other in (*current.inputs, *current.outputs):
                if other in seen:
                    continue
                seen.add(other)
                if graph.is_layer(other):
                    return graph.name(other.module)
                nxt.append(other)
        frontier = nxt
    return "?"


def _draft(graph: Graph, root: nn.Module, opaque: set[int]) -> _Draft:
    """Follow ``root``'s output channels through the graph, collecting members and problems."""
    root_name = graph.name(root)
    size = channel_size(root, "out") or 0
    draft = _Draft(root=root_name, size=size)
    for node, handler, idxs in graph.walk(root, size):
        if draft.problems:  # one reason is enough; stop before the index lists explode
            break
        module = node.module
        if idxs is None:
            draft.problems.append(f"Torch-Pruning cannot map the channel indices near {_near(graph, node)!r}")
            continue
        if len(idxs) > _MAX_INDICES:
            draft.problems.append(f"the channel indices multiply beyond {_MAX_INDICES} near {_near(graph, node)!r}")
            continue
        if node in graph.unmapped:
            draft.problems.append(f"Torch-Pruning cannot map indices near {_near(graph, node)!r}: {graph.unmapped[node]}")
        if op_kind(node) == "output" or (
            node.grad_fn in graph.outputs and not (graph.is_layer(node) and _role(graph, module, handler) == "in")
        ):
            draft.problems.append("reaches the model output")
        elif op_kind(node) == "parameter":
            name = graph.parameter_name(module)
            owner = graph.model.get_submodule(name.rpartition(".")[0]) if "." in name else graph.model
            draft.problems.append(
                f"touches parameter {name!r} of {type(owner).__name__}, a layer type spiralkit cannot slice")
        elif graph.is_layer(node):
            name = graph.name(module)
            role = _role(graph, module, handler)
            draft.reached.add((name, role))
            problem = layer_problem(module, name, role, graph, opaque)
            if problem:
                draft.problems.append(problem)
                continue
            if isinstance(module, nn.PReLU) and module.num_parameters == 1:
                continue
            slot = draft.slots.setdefault((name, role), {})
            for i in idxs:
                if slot.setdefault(i.idx, i.root_idx) != i.root_idx:
                    draft.problems.append(f"index {i.idx} of {name!r} maps to two root channels")
                    break
        else:
            draft.concat = draft.concat or op_kind(node) == "concat"
            problem = check_op(graph, node, idxs)
            if problem:
                draft.problems.append(f"{problem} near {_near(graph, node)!r}")
    return draft


def _finish(graph: Graph, draft: _Draft) -> ChannelGroup | str:
    """Turn a draft into a group, or return why it cannot be one."""
    if draft.problems:
        return draft.problems[0]
    members = []
    for (name, role), slot in draft.slots.items():
        module = graph.model.get_submodule(name)
        size = channel_size(module, role) or 0
        local = tuple(sorted(slot))
        if local and (local[0] < 0 or local[-1] >= size):
            return f"indices of {name!r} fall outside its {size} channels"
        if len(local) != size and not draft.concat:
            return f"{name!r} would lose {len(local)} of {size} channels per {draft.size} root channels (unexpected shape)"
        members.append(Member(module=name, role=role, size=size, local=local, roots=tuple(slot[i] for i in local)))
    blocks = _blocks(graph, draft.size, members)
    if isinstance(blocks, str):
        return blocks
    return ChannelGroup(id=draft.root, size=draft.size, members=tuple(members), blocks=blocks)


def _blocks(graph: Graph, size: int, members: Sequence[Member]) -> tuple[int, ...] | str:
    """Root channel → block, from the grouped convolutions among the members."""
    assignment: tuple[int, ...] | None = None
    for member in members:
        module = graph.model.get_submodule(member.module)
        if not isinstance(module, nn.modules.conv._ConvNd) or module.groups == 1 or is_depthwise(module):
            continue
        per_group = member.size // module.groups
        block = [0] * size
        for local, root in zip(member.local, member.roots):
            block[root] = local // per_group
        candidate = tuple(block)
        if assignment is not None and candidate != assignment:
            return f"grouped convolutions split the channels of {member.module!r} differently from each other"
        if len(member.local) != member.size:
            return f"grouped convolution {member.module!r} sees only part of the group"
        assignment = candidate
    return assignment if assignment is not None else ()


def _untie(graph: Graph, groups: list[ChannelGroup]) -> tuple[list[ChannelGroup], list[Skipped]]:
    """Refuse groups that would cut a parameter shared (tied) with a layer outside the same slot."""
    users: dict[int, set[tuple[str, Role, str]]] = defaultdict(set)
    owners: dict[int, set[str]] = defaultdict(set)
    for name, module in graph.model.named_modules(remove_duplicate=False):
        for pname, param in module.named_parameters(recurse=False):
            owners[id(param)].add(name)
    shared = {pid for pid, names in owners.items() if len(names) > 1}
    if not shared:
        return groups, []
    for group in groups:
        for member in group.members:
            module = graph.model.get_submodule(member.module)
            for param in module.parameters(recurse=False):
                if id(param) in shared:
                    users[id(param)].add((group.id, member.role, member.module))
    bad: dict[str, str] = {}
    for group in groups:
        for member in group.members:
            module = graph.model.get_submodule(member.module)
            for param in module.parameters(recurse=False):
                pid = id(param)
                if pid not in shared:
                    continue
                cut_by = {g for g, _, _ in users[pid]}
                if len(cut_by) > 1 or len(users[pid]) < len(owners[pid]):
                    others = ", ".join(sorted(owners[pid] - {member.module}))
                    bad[group.id] = f"a weight of {member.module!r} is shared with {others} (tied), which this group would not cut alike"
    return [g for g in groups if g.id not in bad], [Skipped(g, r) for g, r in bad.items()]


def _name_unknown_attention(model: nn.Module, skipped: list[Skipped]) -> list[Skipped]:
    """Report attention layers no head adapter understands, and say so for the layers inside them.

    Without an adapter the projections inside such a layer are traced as plain layers and
    stopped by the head reshape ("passes through View …"), which names the symptom, not
    the cause; the reason given is the missing adapter, with the traced one after it.
    """
    unknown = unknown_attention(model)
    if not unknown:
        return skipped
    layouts = known_layouts()
    result = [Skipped(name, f"{kind} {name!r}: this attention layout has no head adapter (known layouts: {layouts}); "
                            "its heads are kept") for name, kind in unknown.items()]
    for item in skipped:
        owner = next((name for name in unknown if item.name.startswith(name + ".")), None)
        if owner is None:
            result.append(item)
        else:
            result.append(Skipped(item.name, (
                f"is inside {unknown[owner]} {owner!r}, an attention layout with no head adapter, so it is kept whole "
                f"(traced: {item.reason})")))
    return result


def trace_groups(model: nn.Module, example: Example, *, heads: bool = True) -> ModelGroups:
    """Trace ``model`` on ``example`` into coupled channel groups and attention heads.

    The model is run once with gradients enabled (nothing is learned; its train/eval modes
    are restored). Groups are rooted at convolutions, linear layers, embeddings and RNNs,
    in model order; each layer's output channels belong to one group.

    Args:
        model: The model.
        example: An input batch: a tensor, a tuple of positional inputs or a dict of
            keyword inputs (e.g. ``{"input_ids": ...}``).
        heads: Whether attention layers are reported as prunable head groups.

    Returns:
        The prunable groups and everything left whole, with reasons.
    """
    head_groups, unsupported, opaque = find_attention(model)
    graph = trace(model, example, opaque=opaque)
    detach_cached(model)  # the traced pass ran with gradients (see detach_cached)
    opaque_ids = {id(m) for m in opaque}
    covered: set[tuple[str, Role]] = set()
    groups: list[ChannelGroup] = []
    skipped: list[Skipped] = [Skipped(name, reason) for name, reason in unsupported.items()]
    for name, module in model.named_modules():
        if not _is_root(module) or module not in graph.module2node or (name, "out") in covered:
            continue
        covered.add((name, "out"))
        problem = layer_problem(module, name, "out", graph, opaque_ids)
        if problem:
            skipped.append(Skipped(name, problem))
            continue
        draft = _draft(graph, module, opaque_ids)
        covered.update(draft.reached)
        result = _finish(graph, draft)
        if isinstance(result, str):
            skipped.append(Skipped(name, result))
        else:
            groups.append(result)
    groups, untied = _untie(graph, groups)
    skipped.extend(untied)
    skipped = _name_unknown_attention(model, skipped)
    for name, module in model.named_modules():
        if _is_root(module) and module not in graph.module2node and not any(
            id(module) in {id(s) for s in o.modules()} for o in opaque
        ):
            skipped.append(Skipped(name, (
                f"{type(module).__name__} {name!r} did not run on the example (the model is traced in eval mode); "
                "it is left whole, and if it runs in another mode (e.g. a training-only auxiliary head) "
                "its inputs may no longer fit: remove it before pruning")))
    if not heads:
        skipped.extend(Skipped(h.module, "attention heads are not pruned (heads=False)") for h in head_groups)
        head_groups = []
    return ModelGroups(channels=tuple(groups), heads=tuple(head_groups), skipped=tuple(skipped))
