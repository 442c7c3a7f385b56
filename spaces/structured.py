"""Structured filter pruning: physically remove output channels (filters) of conv/linear layers.

Pruning a channel removes the producer's filter (and bias), the matching entry of every
BatchNorm and depthwise conv on the way, and the matching input channels of every consumer
(for a linear after a flatten, the ``H*W`` columns ``c*H*W .. (c+1)*H*W - 1``). The result is
a smaller, faster *dense* model of plain ``nn.Conv2d`` / ``nn.BatchNorm2d`` / ``nn.Linear``
modules at the same module paths (no masks), which the codec rebuilds from their specs.

Dependencies come from a ``torch.fx`` trace with shape propagation. Tensors whose channels
must stay index-aligned share one *channel space*: BN, depthwise convs, activations, pooling
and dropout pass a space through; ``a + b`` (residual connections) merges the spaces of
``a`` and ``b`` into one group with several producers (the convs of a ResNet stage and its
projection shortcut are pruned together, or not at all). A space is pruned only when every
producer is eligible under the layer policy and nothing the analysis does not understand
touches it (the model input and output, concatenation, reshapes, grouped convs, a module
called twice, ...): anything unknown is left alone, never broken.

Per group, ``ratio`` of the channels with the smallest summed filter norms (L1 or L2 over all
producers) go. The kept count is ``round((1 - ratio) * C)``, at least 1, rounded to a multiple
of :data:`ROUND_TO` where ``C >= ROUND_MIN`` (channel counts that are multiples of 8 suit GPU
kernels; so e.g. 64 channels at ratio 0.3 keep 48, not 45).

Layers the policy protects (by default the first and the last layer, see
:class:`spaces.policy.LayerPolicy`) never lose output channels; the model's input and output
channels never change (those spaces are blocked), so the first layer keeps its inputs and the
classifier its outputs. The classifier's *input* channels shrink with whatever feeds it.

No dependency beyond torch: torch-pruning (DepGraph) makes the same structural decisions on the
registered models but rounds channel counts differently, and a few hundred lines of fx analysis
keep the rules in our hands (anything unknown is left alone).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import optuna
import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn.utils import skip_init

from models.errors import UserError
from spaces.layers import CConv2d, CLinear, layer_type_of, replace_module
from spaces.registry import ApplyContext, Technique, TechniqueConfig, check, register_technique

CRITERIA = ("l1", "l2")
MAX_RATIO = 0.9
ROUND_TO = 8  # kept channels are a multiple of this ...
ROUND_MIN = 32  # ... where a group has at least this many channels

_PASS_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish,
    nn.Hardsigmoid, nn.Dropout, nn.Dropout2d, nn.Identity, nn.MaxPool2d, nn.AvgPool2d,
    nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
)
_PASS_FUNCTIONS = frozenset({
    F.relu, F.relu6, torch.relu, F.gelu, F.silu, F.leaky_relu, F.hardswish, torch.sigmoid,
    torch.tanh, F.dropout, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d,
})
_PASS_METHODS = frozenset({"relu", "relu_", "sigmoid", "tanh", "contiguous", "clone"})
_ELEMENTWISE = frozenset({operator.add, operator.iadd, operator.sub, operator.mul, torch.add, torch.sub, torch.mul})
_ELEMENTWISE_METHODS = frozenset({"add", "add_", "sub", "mul"})
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


@dataclass(frozen=True)
class StructuredConfig(TechniqueConfig):
    """Structured filter pruning.

    Attributes:
        ratio: Fraction of the channels of each prunable group removed, in [0, 0.9].
        criterion: ``"l1"`` or ``"l2"`` norm of a channel's filters (summed over the group's
            producers); the smallest go.
        coupled: Also prune channel groups tied by residual additions (the stage channels of a
            ResNet / MobileNetV2 / WRN, all their producers together); else only groups with a
            single producer (the internal channels of each block).
    """

    ratio: float = 0.3
    criterion: str = "l1"
    coupled: bool = True

    def validate(self) -> None:
        """Check ranges and names."""
        check(
            isinstance(self.ratio, int | float) and not isinstance(self.ratio, bool)
            and 0.0 <= self.ratio <= MAX_RATIO,
            f"structured.ratio must be a number in [0, {MAX_RATIO}], got {self.ratio!r}",
        )
        check(
            self.criterion in CRITERIA,
            f"structured.criterion must be one of {CRITERIA}, got {self.criterion!r}",
        )
        check(
            isinstance(self.coupled, bool),
            f"structured.coupled must be true or false, got {self.coupled!r}",
        )


def kept_channels(channels: int, ratio: float) -> int:
    """How many of ``channels`` survive ``ratio`` (see the module doc for the rounding)."""
    keep = max(1, math.floor((1.0 - ratio) * channels + 0.5))
    if channels >= ROUND_MIN:
        keep = max(ROUND_TO, ROUND_TO * math.floor(keep / ROUND_TO + 0.5))
    return min(channels, keep)


# --------------------------------------------------------------------------- channel analysis


@dataclass
class ChannelGroup:
    """Channels that must be pruned together, and every layer they touch.

    Attributes:
        channels: Channel count.
        producers: Paths of the conv/linear layers whose output channels these are.
        consumers: ``(path, factor)`` of the conv/linear layers that read them; channel ``c``
            is input columns ``c*factor .. (c+1)*factor - 1`` (``factor > 1`` after a flatten).
        passthrough: Paths of BatchNorms and depthwise convs that carry them.
        blocked: Something the analysis does not understand touches them: never pruned.
    """

    channels: int
    producers: list[str] = field(default_factory=list)
    consumers: list[tuple[str, int]] = field(default_factory=list)
    passthrough: list[str] = field(default_factory=list)
    blocked: bool = False


class _Spaces:
    """Union-find over channel spaces."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.groups: list[ChannelGroup] = []

    def new(self, channels: int, blocked: bool = False) -> int:
        self.parent.append(len(self.parent))
        self.groups.append(ChannelGroup(channels, blocked=blocked))
        return len(self.parent) - 1

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def group(self, i: int) -> ChannelGroup:
        return self.groups[self.find(i)]

    def union(self, a: int, b: int) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        ga, gb = self.groups[ra], self.groups[rb]
        ga.producers += gb.producers
        ga.consumers += gb.consumers
        ga.passthrough += gb.passthrough
        ga.blocked = ga.blocked or gb.blocked or ga.channels != gb.channels
        self.parent[rb] = ra
        return ra

    def block(self, i: int) -> None:
        self.group(i).blocked = True

    def roots(self) -> list[ChannelGroup]:
        return [g for i, g in enumerate(self.groups) if self.find(i) == i]


class _Tracer(fx.Tracer):
    """Treats every registered layer type (containers included) as a leaf."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return super().is_leaf_module(m, module_qualified_name) or layer_type_of(m) is not None


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _node_args(node: fx.Node) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), found.append)
    return found


class _Analysis:
    """Walks a shape-propagated fx graph and assigns every tensor a ``(space, factor)``."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.spaces = _Spaces()
        self.where: dict[fx.Node, tuple[int, int]] = {}
        self.calls: dict[str, list[tuple[int, int]]] = {}  # module path -> (input, output) per call

    def run(self) -> list[ChannelGroup]:
        for node in self.gm.graph.nodes:
            self._visit(node)
        for spaces in self.calls.values():
            if len(spaces) > 1:  # a module called twice: its weights serve two contexts
                for s in (s for pair in spaces for s in pair):
                    self.spaces.block(s)
        return self.spaces.roots()

    # -- helpers
    def _fresh(self, node: fx.Node, blocked: bool = False) -> int | None:
        shape = _shape(node)
        if shape is None or len(shape) < 2:
            return None
        s = self.spaces.new(shape[1], blocked=blocked)
        self.where[node] = (s, 1)
        return s

    def _block(self, node: fx.Node) -> None:
        for a in _node_args(node):
            if a in self.where:
                self.spaces.block(self.where[a][0])
        self._fresh(node, blocked=True)

    def _note_call(self, path: str, inp: int, out: int) -> None:
        self.calls.setdefault(path, []).append((inp, out))

    def _input(self, node: fx.Node) -> tuple[fx.Node, int, int] | None:
        """The single tensor argument of ``node`` with its space and factor (else None)."""
        tensors = [a for a in _node_args(node) if a in self.where]
        if len(tensors) != 1 or not node.args or node.args[0] is not tensors[0]:
            return None
        src = tensors[0]
        return src, *self.where[src]

    # -- dispatch
    def _visit(self, node: fx.Node) -> None:
        if node.op == "placeholder" or node.op == "get_attr":
            self._fresh(node, blocked=True)
        elif node.op == "output":
            self._block(node)
        elif node.op == "call_module":
            self._module(node, self.gm.get_submodule(str(node.target)))
        elif node.op == "call_function":
            self._function(node)
        elif node.op == "call_method":
            self._method(node)
        else:
            self._block(node)

    def _module(self, node: fx.Node, m: nn.Module) -> None:
        path = str(node.target)
        inp = self._input(node)
        if inp is None:
            self._block(node)
            return
        src, space, factor = inp
        in_shape = _shape(src)
        if type(m) is nn.Conv2d and factor == 1:
            if m.groups == 1:
                self.spaces.group(space).consumers.append((path, 1))
                out = self._fresh(node)
                if out is not None:
                    self.spaces.group(out).producers.append(path)
                    self._note_call(path, space, out)
                return
            if m.groups == m.in_channels == m.out_channels:
                self.spaces.group(space).passthrough.append(path)
                self.where[node] = (space, 1)
                self._note_call(path, space, space)
                return
        elif type(m) is nn.Linear and in_shape is not None and len(in_shape) == 2:
            self.spaces.group(space).consumers.append((path, factor))
            out = self._fresh(node)
            if out is not None:
                self.spaces.group(out).producers.append(path)
                self._note_call(path, space, out)
            return
        elif type(m) in _BATCHNORMS and factor == 1:
            self.spaces.group(space).passthrough.append(path)
            self.where[node] = (space, 1)
            self._note_call(path, space, space)
            return
        elif isinstance(m, _PASS_MODULES):
            self.where[node] = (space, factor)
            return
        elif isinstance(m, nn.Flatten) and m.start_dim == 1 and m.end_dim == -1:
            self._flatten(node, space, factor, in_shape)
            return
        self._block(node)

    def _flatten(self, node: fx.Node, space: int, factor: int, in_shape: tuple[int, ...] | None) -> None:
        if in_shape is None or len(in_shape) < 2:
            self._block(node)
            return
        self.where[node] = (space, factor * math.prod(in_shape[2:]))

    def _function(self, node: fx.Node) -> None:
        target = node.target
        if target in _ELEMENTWISE:
            self._elementwise(node)
        elif target in _PASS_FUNCTIONS:
            self._pass(node)
        elif target is torch.flatten:
            self._flatten_call(node, node.args[1:], node.kwargs)
        else:
            self._block(node)

    def _method(self, node: fx.Node) -> None:
        name = str(node.target)
        if name in ("size", "dim"):
            return  # no tensor output
        if name in _ELEMENTWISE_METHODS:
            self._elementwise(node)
        elif name in _PASS_METHODS:
            self._pass(node)
        elif name == "flatten":
            self._flatten_call(node, node.args[1:], node.kwargs)
        else:
            self._block(node)

    def _pass(self, node: fx.Node) -> None:
        inp = self._input(node)
        if inp is None:
            self._block(node)
        else:
            self.where[node] = (inp[1], inp[2])

    def _flatten_call(self, node: fx.Node, args: Iterable[object], kwargs: Mapping[str, object]) -> None:
        args = list(args)
        start = args[0] if args else kwargs.get("start_dim", 0)
        end = args[1] if len(args) > 1 else kwargs.get("end_dim", -1)
        inp = self._input(node)
        if inp is None or start != 1 or end != -1:
            self._block(node)
            return
        self._flatten(node, inp[1], inp[2], _shape(inp[0]))

    def _elementwise(self, node: fx.Node) -> None:
        tensors = [a for a in _node_args(node) if a in self.where]
        out_shape = _shape(node)
        if not tensors or out_shape is None or any(_shape(t) != out_shape for t in tensors):
            self._block(node)  # broadcasting (or no tensor): channels do not line up one to one
            return
        space, factor = self.where[tensors[0]]
        for t in tensors[1:]:
            s, f = self.where[t]
            if f != factor:
                self.spaces.block(s)
                self.spaces.block(space)
            space = self.spaces.union(space, s)
        self.where[node] = (space, factor)


def _example_input(model: nn.Module) -> Tensor:
    from models.registry import get_model_info

    arch = getattr(model, "pc_arch", None)
    if not isinstance(arch, dict):
        raise UserError(
            f"structured pruning needs an example input for {type(model).__name__}: build it with "
            "models.create_model or pass example_input"
        )
    spec = get_model_info(str(arch["name"])).data_spec
    device = next(model.parameters()).device
    return torch.zeros(1, int(arch["in_channels"]), spec.size, spec.size, device=device)


def channel_groups(model: nn.Module, example_input: Tensor | None = None) -> list[ChannelGroup]:
    """Every channel space of ``model`` (traced with ``torch.fx`` on ``example_input``)."""
    x = _example_input(model) if example_input is None else example_input
    try:
        graph = _Tracer().trace(model)
    except Exception as exc:  # fx raises many types for untraceable code
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise UserError(
            f"structured pruning needs an fx-traceable model; tracing {type(model).__name__} "
            f"failed: {reason}"
        ) from None
    gm = fx.GraphModule(model, graph)
    modes = {m: m.training for m in model.modules()}
    model.eval()  # no BN statistics update while propagating shapes
    try:
        _propagate_shapes(gm, x)
    finally:
        for m, mode in modes.items():
            m.training = mode
    return _Analysis(gm).run()


def _propagate_shapes(gm: fx.GraphModule, x: Tensor) -> None:
    # Fake tensors carry shapes without computing anything (ResNet-18: 0.2 s instead of 1.5 s
    # on a CPU); a real forward pass is the fallback for an op fake tensors do not support.
    with torch.no_grad():
        try:
            ShapeProp(gm, fake_mode=FakeTensorMode(allow_non_fake_inputs=True)).propagate(x)
        except Exception:  # any failure of the fast path falls back to the slow one
            ShapeProp(gm).propagate(x)


# ------------------------------------------------------------------------------------ pruning


def channel_scores(model: nn.Module, group: ChannelGroup, criterion: str) -> Tensor:
    """Importance of each channel of ``group``: its filters' norm summed over the producers."""
    total = torch.zeros(group.channels)
    for path in group.producers:
        producer = model.get_submodule(path)
        if not isinstance(producer, nn.Conv2d | nn.Linear):  # the analysis records only these
            raise TypeError(f"channel producer {path!r} is a {type(producer).__name__}, not a conv/linear")
        w = producer.weight.detach().float().cpu().reshape(group.channels, -1)
        total += w.abs().sum(1) if criterion == "l1" else w.norm(dim=1)
    return total


def _top(scores: Tensor, k: int) -> Tensor:
    """Sorted indices of the ``k`` highest scores (ties: lower index first)."""
    order = torch.argsort(scores, descending=True, stable=True)
    return order[:k].sort().values


@dataclass
class _Cut:
    """Indices kept of one module's output (``out``) and input (``inp``, with its factor)."""

    out: Tensor | None = None
    inp: Tensor | None = None
    factor: int = 1
    depthwise: bool = False


def _columns(keep: Tensor, factor: int) -> Tensor:
    return (keep[:, None] * factor + torch.arange(factor)[None, :]).reshape(-1)


def _take(t: Tensor | None, dim: int, idx: Tensor | None) -> Tensor | None:
    if t is None or idx is None:
        return t
    return t.detach().index_select(dim, idx.to(t.device))


def _rebuild(m: nn.Module, cut: _Cut) -> nn.Module:
    """A plain module like ``m`` with the cut applied (same device, dtype and train mode)."""
    # weight is None for a non-affine BN, running_mean for one without running stats
    ref = next(t for t in (m.weight, getattr(m, "running_mean", None)) if isinstance(t, Tensor))
    factory = {"device": ref.device, "dtype": ref.dtype}
    if isinstance(m, nn.Conv2d):
        weight = _take(_take(m.weight, 0, cut.out), 1, None if cut.depthwise else cut.inp)
        assert weight is not None
        out_ch = weight.shape[0]
        groups = out_ch if cut.depthwise else m.groups
        new: nn.Module = skip_init(
            nn.Conv2d, weight.shape[1] * groups, out_ch, m.kernel_size, m.stride,
            m.padding, m.dilation, groups, m.bias is not None, m.padding_mode, **factory,
        )
        tensors = {"weight": weight, "bias": _take(m.bias, 0, cut.out)}
    elif isinstance(m, nn.Linear):
        cols = None if cut.inp is None else _columns(cut.inp, cut.factor)
        weight = _take(_take(m.weight, 0, cut.out), 1, cols)
        assert weight is not None
        new = skip_init(nn.Linear, weight.shape[1], weight.shape[0], m.bias is not None, **factory)
        tensors = {"weight": weight, "bias": _take(m.bias, 0, cut.out)}
    else:
        assert isinstance(m, _BATCHNORMS)
        n = m.num_features if cut.out is None else len(cut.out)
        new = type(m)(n, m.eps, m.momentum, m.affine, m.track_running_stats,
                      device=ref.device, dtype=ref.dtype)
        names = ("weight", "bias", "running_mean", "running_var")
        tensors = {name: _take(getattr(m, name), 0, cut.out) for name in names}
        tensors["num_batches_tracked"] = m.num_batches_tracked
    with torch.no_grad():
        for name, t in tensors.items():
            if t is not None:
                getattr(new, name).copy_(t)
    new.train(m.training)
    return new


def prune_channels(
    model: nn.Module,
    ratio: float,
    criterion: str = "l1",
    eligible: set[str] | None = None,
    coupled: bool = True,
    example_input: Tensor | None = None,
) -> dict[str, tuple[int, int]]:
    """Remove ``ratio`` of the channels of every prunable group of ``model``, in place.

    Args:
        model: A model of plain conv/BN/linear modules (fx-traceable).
        ratio: Fraction of each group's channels removed (see :func:`kept_channels`).
        criterion: ``"l1"`` or ``"l2"`` filter norm.
        eligible: Paths of the layers whose output channels may shrink (None: all).
        coupled: Also prune groups with several producers (tied by residual additions).
        example_input: A batch for shape propagation (default: zeros from the model's DataSpec).

    Returns:
        ``{producer path: (channels before, channels after)}`` for every pruned group.
    """
    if criterion not in CRITERIA:
        raise UserError(f"structured.criterion must be one of {CRITERIA}, got {criterion!r}")
    compressed = [n for n, m in model.named_modules() if isinstance(m, CConv2d | CLinear)]
    if compressed:
        raise UserError(
            f"structured pruning must come first in a plan (stage 'structure'); "
            f"{compressed[0]!r} is already compressed"
        )
    cuts: dict[str, _Cut] = {}
    report: dict[str, tuple[int, int]] = {}
    for g in channel_groups(model, example_input):
        if g.blocked or not g.producers or (not coupled and len(g.producers) > 1):
            continue
        if eligible is not None and not all(p in eligible for p in g.producers):
            continue
        k = kept_channels(g.channels, ratio)
        if k >= g.channels:
            continue
        keep = _top(channel_scores(model, g, criterion), k)
        for p in g.producers:
            cuts.setdefault(p, _Cut()).out = keep
            report[p] = (g.channels, k)
        for p in g.passthrough:
            cut = cuts.setdefault(p, _Cut())
            cut.out, cut.depthwise = keep, isinstance(model.get_submodule(p), nn.Conv2d)
        for p, factor in g.consumers:
            cut = cuts.setdefault(p, _Cut())
            cut.inp, cut.factor = keep, factor
    for path, cut in cuts.items():
        replace_module(model, path, _rebuild(model.get_submodule(path), cut))
    return report


# ---------------------------------------------------------------------------------- technique


@register_technique
class Structured(Technique[StructuredConfig, None]):
    """Structured filter pruning: a smaller dense model, fine-tuned by the one training loop."""

    name = "structured"
    stage = "structure"
    family = "structured"
    config_cls = StructuredConfig
    combinable = True

    def suggest(self, trial: optuna.Trial, prefix: str) -> StructuredConfig:
        """ratio in [0.05, 0.8]; criterion and coupled categorical."""
        return StructuredConfig(
            ratio=trial.suggest_float(f"{prefix}.ratio", 0.05, 0.8),
            criterion=trial.suggest_categorical(f"{prefix}.criterion", list(CRITERIA)),
            coupled=trial.suggest_categorical(f"{prefix}.coupled", [True, False]),
        )

    def apply(self, model: nn.Module, config: StructuredConfig, ctx: ApplyContext) -> None:
        """Prune every group whose producers the policy lets shrink."""
        eligible = {p for p, _ in ctx.policy.eligible(model)}
        prune_channels(model, config.ratio, config.criterion, eligible, config.coupled)

    def settings(self) -> list[StructuredConfig]:
        """ratio 0.1, 0.3, 0.5, 0.7."""
        return [StructuredConfig(ratio=r) for r in (0.1, 0.3, 0.5, 0.7)]

    def moderate(self) -> StructuredConfig:
        """ratio 0.3, L1, coupled."""
        return StructuredConfig(ratio=0.3)
