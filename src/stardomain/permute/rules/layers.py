"""Op rules for layers: linear and convolution (their outputs are new groups), normalisation and other
per-unit parameters, embeddings, and the nn.Module types the tracer does not enter (BUILTIN module
rules here, users' rules through register_leaf_module)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..layouts import Fused, HLay, Lay, Param
from ..spec import Member, Probe
from .attention import head_norm, matmul
from .common import EMBEDDING_ROWS, TOKEN_AXIS, Pin, arg, shape_of
from .pointwise import is_unary
from .shapes import pad, reshape

POOL_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.LPPool1d, nn.LPPool2d,
)


def leaf(t, node: fx.Node, name: str, rule: Any) -> Any:
    """A user-registered leaf module (register_leaf_module)."""
    x = node.args[0] if node.args else None
    lay = t.lay(x)
    if rule.kind == "opaque":
        raise Pin(rule.reason or f"{rule.cls.__name__} is registered as opaque")
    if isinstance(lay, (HLay, Fused)):
        raise Pin(f"{rule.cls.__name__} on per-head tensors")
    if rule.kind == "elementwise":
        return lay
    if rule.kind == "per_unit":
        if lay is not None:
            t.add_members(lay, [(f"{name}.{p}", ax) for p, ax in rule.params.items()])
        return lay
    # linear: every weight (out, in) along rule.axes, biases along out
    out_ax, in_ax = rule.axes
    if lay is not None:
        if lay.axis != len(shape_of(x)) - 1:
            raise Pin(f"{rule.cls.__name__} applied across a non-feature axis")
        t.add_members(lay, [(f"{name}.{w}", in_ax) for w in rule.weights], need_block1=False)
    so = shape_of(node)
    return t.fresh(so[-1], name, len(so) - 1,
                      [(f"{name}.{w}", out_ax) for w in rule.weights] + [(f"{name}.{b}", 0) for b in rule.biases])


def linear(t, node: fx.Node, x: Any, w: str | None, b: str | None, out_features: int, label: str) -> Lay:
    """y = x W^T + b: x's units index W's columns, the outputs are a new group (W's rows, b)."""
    lay, si, so = t.lay(x), shape_of(x), shape_of(node)
    if lay is not None:
        if not isinstance(lay, Lay):
            raise Pin("a linear layer on per-head tensors")
        if lay.axis != len(si) - 1:  # applied over another axis (token mixing): units ride along
            if w and node in t.token_out:
                t.pin_axis(w, 0, TOKEN_AXIS)
            elif w and not token_hidden(t, node, w, b, out_features, label):
                t.pin_axis(w, 0, "a linear layer over an axis other than the features (token "
                                    "mixing): its units are on an axis the spec does not follow")
            return lay
        if w:
            t.add_members(lay, [(w, 1)], need_block1=False)
    return t.fresh(out_features, label, len(so) - 1, [(w, 0), (b, 0)] if b else [(w, 0)])


def token_hidden(t, node: fx.Node, w: str, b: str | None, n: int, label: str) -> bool:
    """A token-mixing MLP (MLP-Mixer): a linear layer over the tokens, elementwise ops, and a linear
    layer back, nothing else reading what lies between. Its hidden units (this layer's outputs, the
    next one's inputs) are a group of their own, though the tensors' feature axis is the channels
    (the token axis itself stays pinned). False: not that pattern."""
    chain, cur = [node], node
    while len(cur.users) == 1:
        (nxt,) = cur.users
        if is_unary(t, nxt):
            chain.append(nxt)
            cur = nxt
            continue
        w2 = linear_weight(t, nxt)
        if w2 is None or nxt.args[0] is not cur or t.sd_shape(w2)[1:] != (n,):
            return False
        g = t.b.new(n, label)
        for name, ax in [(w, 0), (b, 0), (w2, 1)]:
            if name in t.sd_keys:
                t.b.add(g, Member(name, ax))
        ax = len(shape_of(node)) - 1
        t.b.probes[g] += [Probe(c.name, ax) for c in chain]
        t.token_out.add(nxt)
        return True
    return False


def linear_weight(t, node: fx.Node) -> str | None:
    """The weight's state-dict name if node is a linear layer (module, F.linear, aten.linear)."""
    if node.op == "call_module" and type(t.modules.get(node.target)) is nn.Linear:
        return f"{node.target}.weight"
    fn = node.target
    is_linear = fn is F.linear or (isinstance(fn, torch._ops.OpOverload)
                                   and fn._schema.name.split("::")[-1] == "linear")
    if node.op != "call_function" or not is_linear or len(node.args) < 2 or not isinstance(node.args[1], fx.Node):
        return None
    wn = node.args[1]
    name = wn.target if wn.op == "get_attr" else t.params.get(wn.name)
    return name if name in t.sd_keys else None


def norm_last(t, node: fx.Node, x: Any, k: int, params: list) -> Any:
    """LayerNorm / RMSNorm over the last k axes, affine parameters shaped like them."""
    lay, si = t.lay(x), shape_of(x)
    if lay is None:
        return None
    if isinstance(lay, HLay):
        return head_norm(t, lay, len(si), k, params, "normalisation")
    if not isinstance(lay, Lay):
        raise Pin(f"normalisation of {lay.what}")
    if lay.axis < len(si) - k:  # normalised over other axes: the feature axis rides along
        return lay
    if k != 1:
        raise Pin("normalisation over several axes including the feature axis")
    t.add_members(lay, [(p, 0) for p in params if p])
    return lay


def channel_op(t, node: fx.Node, x: Any, params: list, what: str, min_rank: int = 2) -> Any:
    """Per-channel ops on axis 1 (BatchNorm, pooling, upsampling): parameters indexed by channel."""
    lay, si = t.lay(x), shape_of(x)
    if lay is None:
        return None
    if not isinstance(lay, Lay) or lay.axis != 1 or len(si) < min_rank or any(len(s) > 3 and s[3] != 1
                                                                              for s in lay.segs):
        raise Pin(f"{what} over a non-channel axis")
    t.add_members(lay, [(p, 0) for p in params if p], need_block1=False)
    return lay


def group_norm(t, node: fx.Node, x: Any, groups: int, params: list) -> Any:
    lay = channel_op(t, node, x, [], "GroupNorm")
    if lay is None:
        return None
    if groups not in (1, shape_of(x)[1]):
        if len(lay.segs) != 1:
            raise Pin(f"GroupNorm with {groups} groups over concatenated channels")
        t.b.set_heads(lay.segs[0][0], groups)
    t.add_members(lay, [(p, 0) for p in params if p])
    return lay


def spanned_weight_axis(lay: Any, si: tuple, kernel: tuple, padding: Any, dilation: Any) -> int | None:
    """The weight axis along which a convolution reads `lay`'s units, where they lie on a spatial axis the
    kernel spans whole, unpadded and undilated (TextCNN: a kernel as wide as the embedding): its one
    output position sees every unit through its own kernel tap, so permuting the units and the taps
    alike keeps the function. None: any other convolution over a non-channel axis."""
    nd = len(kernel)
    j = lay.axis - (len(si) - nd) if isinstance(lay, Lay) else -1
    if not 0 <= j < nd or any(len(s) != 3 or s[2] != 1 for s in lay.segs):
        return None
    pad = (0,) * nd if padding == "valid" else padding
    if isinstance(pad, str):
        return None
    pad = tuple(pad) if isinstance(pad, (tuple, list)) else (pad,) * nd
    dil = tuple(dilation) if isinstance(dilation, (tuple, list)) else (dilation,) * nd
    pad, dil = pad * nd if len(pad) == 1 else pad, dil * nd if len(dil) == 1 else dil
    if kernel[j] != si[lay.axis] or pad[j] != 0 or dil[j] != 1:
        return None
    return 2 + j


def grouped_conv(t, lay: Any, w: str, b: str | None, groups: int, out_ch: int, label: str) -> Lay:
    """A grouped convolution: output group i reads only input group i. Whole groups move as blocks, the
    inputs' and the outputs' alike (coupled groups with `groups` heads), and units move within their
    group on both sides: the weight's input axis holds one group's units, reordered for each block of
    rows by the order of the input group those rows read (Member.by)."""
    if lay is None:
        raise Pin(f"grouped convolution (groups={groups}) of unpermuted inputs: its groups cannot move")
    if any(sg[2] != 1 for sg in lay.segs):
        raise Pin(f"grouped convolution (groups={groups}) of channels owned in blocks (after a channel shuffle)")
    if sum(sg[1] for sg in lay.segs) == groups:
        return separable(t, lay, w, b, out_ch // groups, label)
    if len(lay.segs) != 1:
        raise Pin(f"grouped convolution (groups={groups}) over concatenated channels")
    gin = lay.segs[0][0]
    t.b.set_heads(gin, groups)
    if lay.segs[0][1] > groups and w in t.sd_keys:  # several units per group: their order inside it
        t.b.add(gin, Member(w, 1, by=0))
    out = t.fresh(out_ch, label, 1, [(w, 0)] + ([(b, 0)] if b else []))
    t.b.set_heads(out.segs[0][0], groups)
    t.b.tie_blocks(gin, out.segs[0][0], "convolution groups")
    return out


def separable(t, lay: Lay, w: str, b: str | None, r: int, label: str) -> Lay:
    """A convolution with one input channel per group (a depthwise convolution with channel multiplier r):
    the r outputs of block i read input channel i alone, so each input segment's group gets a child group
    whose blocks move as its units do, the r units of a block free among themselves (hierarchy.py)."""
    segs = []
    for gid, n, _, off, _ in lay.seg_offsets():
        c = t.b.new(n * r, f"{label}[{off * r}:{(off + n) * r}]" if len(lay.segs) > 1 else label)
        for name in (w, b):
            if name and name in t.sd_keys:
                t.b.add(c, Member(name, 0, off * r))
        t.b.nest(c, gid)
        segs.append((c, n * r, 1))
    return Lay(1, tuple(segs))


def conv(t, node: fx.Node, x: Any, w: str | None, b: str | None, groups: int, transposed: bool) -> Any:
    lay, so = t.lay(x), shape_of(node)
    if not isinstance(t.env.get(node.args[1]), Param):
        raise Pin("a convolution whose weight is computed")
    out_ch = so[1]
    if lay is not None and (not isinstance(lay, Lay) or lay.axis != 1):
        wax = None if transposed or groups != 1 or not w else spanned_weight_axis(
            lay, shape_of(x), shape_of(node.args[1])[2:], arg(node, 4, "padding", 0), arg(node, 5, "dilation", 1))
        if wax is None:
            raise Pin("convolution over a non-channel axis")
        t.add_members(lay, [(w, wax)])
        return t.fresh(out_ch, w.removesuffix(".weight"), 1, [(w, 0)] + ([(b, 0)] if b else []))
    if lay is not None and any(len(sg) > 3 and sg[3] != 1 for sg in lay.segs):
        raise Pin("a convolution over repeated heads")
    if groups == 1:
        if lay is not None and w:
            t.add_members(lay, [(w, 0 if transposed else 1)], need_block1=False)
        return t.fresh(out_ch, w.removesuffix(".weight") if w else "conv", 1,
                          [(w, 1 if transposed else 0)] + ([(b, 0)] if b else []))
    if not transposed and groups == shape_of(x)[1] == out_ch:  # depthwise: a per-channel op
        if lay is None:
            return None
        t.add_members(lay, [(w, 0)] + ([(b, 0)] if b else []), need_block1=False)
        return lay
    if transposed or not w:
        raise Pin(f"grouped convolution (groups={groups}) ties channels to groups")
    return grouped_conv(t, lay, w, b, groups, out_ch, w.removesuffix(".weight"))


def addmm(t, node: fx.Node, bias: Any, x: Any, w: Any) -> Any:
    """bias + x @ W with W a (in, out) parameter (GPT-2's Conv1D)."""
    wn = t.pname(w)
    if not wn:
        raise Pin("a matrix product with a computed or constant matrix")
    bn = t.pname(bias)
    lay = t.lay(x)
    if lay is not None:
        if not isinstance(lay, Lay) or lay.axis != len(shape_of(x)) - 1:
            raise Pin("a matrix product over a non-feature axis")
        t.add_members(lay, [(wn, 0)], need_block1=False)
    return t.fresh(shape_of(node)[-1], wn.removesuffix(".weight"), len(shape_of(node)) - 1,
                      [(wn, 1)] + ([(bn, 0)] if bn else []))


def _addmm(t, node):
    return addmm(t, node, node.args[0], node.args[1], node.args[2])


def _matmul(t, node):
    x, y = node.args[:2]
    if isinstance(t.env.get(y), Param) and len(t.env[y].shape) == 2 and not isinstance(t.lay(x), HLay):  # x @ W
        return addmm(t, node, None, x, y)
    return matmul(t, node)


def _linear(t, node):
    w, b = arg(node, 1, "weight"), arg(node, 2, "bias")
    wn, bn = t.pname(w), t.pname(b)
    return linear(t, node, node.args[0], wn, bn, shape_of(w)[0], (wn or "linear").removesuffix(".weight"))


def _embedding(t, node, aten=False):
    w = node.args[0] if aten else arg(node, 1, "weight")
    wn = t.pname(w)
    if not wn:
        raise Pin("an embedding whose table is computed")
    ids = node.args[1] if aten else node.args[0]
    if t.lay(ids) is not None:
        raise Pin("embedding lookup by permuted values")
    so = shape_of(node)
    t.pin_axis(wn, 0, EMBEDDING_ROWS)
    return t.fresh(so[-1], wn.removesuffix(".weight"), len(so) - 1, [(wn, 1)])


def _layer_norm(t, node):
    shape = arg(node, 1, "normalized_shape")
    k = 1 if isinstance(shape, int) else len(shape)
    return norm_last(t, node, node.args[0], k, [t.pname(arg(node, 2, "weight")), t.pname(arg(node, 3, "bias"))])


def _rms_norm(t, node):
    shape = arg(node, 1, "normalized_shape")
    k = 1 if isinstance(shape, int) else len(shape)
    return norm_last(t, node, node.args[0], k, [t.pname(arg(node, 2, "weight"))])


def _native_layer_norm(t, node):
    return (_layer_norm(t, node), None, None)


def _group_norm(t, node):
    return group_norm(t, node, node.args[0], arg(node, 1, "num_groups"),
                        [t.pname(arg(node, 2, "weight")), t.pname(arg(node, 3, "bias"))])


def _batch_norm_f(t, node):  # F.batch_norm(x, running_mean, running_var, weight, bias, ...)
    names = [t.pname(arg(node, i, k))
             for i, k in ((1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias"))]
    return channel_op(t, node, node.args[0], names, "BatchNorm")


def _batch_norm_aten(t, node):  # aten.batch_norm(x, weight, bias, running_mean, running_var, ...)
    names = [t.pname(a) for a in node.args[1:5]]
    return channel_op(t, node, node.args[0], names, "BatchNorm")


def _batch_norm_aten_tuple(t, node):
    return (_batch_norm_aten(t, node), None, None)


def _conv_f(t, node):  # F.conv2d(x, w, b, stride, padding, dilation, groups) and aten.conv2d
    return conv(t, node, node.args[0], t.pname(node.args[1]), t.pname(arg(node, 2, "bias")),
                  arg(node, 6, "groups", 1), False)


def _conv_transpose_f(t, node):  # (x, w, b, stride, padding, output_padding, groups, dilation)
    return conv(t, node, node.args[0], t.pname(node.args[1]), t.pname(arg(node, 2, "bias")),
                  arg(node, 6, "groups", 1), True)


def _convolution(t, node):  # aten.convolution(x, w, b, stride, padding, dilation, transposed, out_pad, groups)
    return conv(t, node, node.args[0], t.pname(node.args[1]), t.pname(node.args[2]), node.args[8], node.args[6])


def _spatial(t, node):  # pooling and upsampling: channels on axis 1, spatial axes after it
    return channel_op(t, node, node.args[0], [], "pooling or upsampling", min_rank=3)


def _spatial_tuple(t, node):
    return (_spatial(t, node), None)


@dataclass(frozen=True)
class ModuleCall:
    """What a module rule sees of one call: the node, the module, its name, its input, the input's unit
    layout (None: no permuted axis reaches it) and the input and output shapes."""

    node: fx.Node
    mod: nn.Module
    name: str
    x: Any
    lay: Any
    shape_in: Any
    shape_out: Any


def _m_linear(t, c: ModuleCall) -> Any:
    return linear(t, c.node, c.x, f"{c.name}.weight", f"{c.name}.bias", c.mod.out_features, c.name)


def _m_rms_norm(t, c: ModuleCall) -> Any:
    return norm_last(t, c.node, c.x, len(c.mod.normalized_shape), [f"{c.name}.weight"])


def _m_upsample(t, c: ModuleCall) -> Any:
    return channel_op(t, c.node, c.x, [], "upsampling", min_rank=3)


def _m_pad(t, c: ModuleCall) -> Any:
    return pad(t, c.node, c.x, c.mod.padding)


def _m_reshape(t, c: ModuleCall) -> Any:
    return reshape(t, c.lay, c.shape_in, c.shape_out)


def _m_conv(t, c: ModuleCall) -> Any:
    lay, name, mod = c.lay, c.name, c.mod
    if lay is not None and any(len(s) > 3 and s[3] != 1 for s in lay.segs):
        raise Pin("a convolution over repeated heads")
    if lay is not None and lay.axis != 1:
        wax = None if mod.groups != 1 else spanned_weight_axis(lay, c.shape_in, mod.kernel_size, mod.padding,
                                                                 mod.dilation)
        if wax is None:
            raise Pin("convolution over a non-channel axis")
        t.add_members(lay, [(f"{name}.weight", wax)])
        return t.fresh(mod.out_channels, name, 1, [(f"{name}.weight", 0), (f"{name}.bias", 0)])
    if mod.groups == 1:
        if lay is not None:
            t.add_members(lay, [(f"{name}.weight", 1)], need_block1=False)
        return t.fresh(mod.out_channels, name, 1, [(f"{name}.weight", 0), (f"{name}.bias", 0)])
    if mod.groups == mod.in_channels == mod.out_channels:  # depthwise: a per-channel op
        if lay is None:
            return None
        t.add_members(lay, [(f"{name}.weight", 0), (f"{name}.bias", 0)], need_block1=False)
        return lay
    return grouped_conv(t, lay, f"{name}.weight", f"{name}.bias", mod.groups, mod.out_channels, name)


def _m_conv_transpose(t, c: ModuleCall) -> Any:
    lay, name, mod = c.lay, c.name, c.mod
    if mod.groups != 1:
        raise Pin(f"unsupported module {type(mod).__name__}")
    if lay is not None:
        if lay.axis != 1 or any(s[2] != 1 for s in lay.segs):
            raise Pin("transposed convolution over a non-channel axis")
        t.add_members(lay, [(f"{name}.weight", 0)])
    return t.fresh(mod.out_channels, name, 1, [(f"{name}.weight", 1), (f"{name}.bias", 0)])


def _m_batch_norm(t, c: ModuleCall) -> Any:
    if c.lay is None:
        return None
    if not isinstance(c.lay, Lay) or c.lay.axis != 1 or any(len(s) > 3 and s[3] != 1 for s in c.lay.segs):
        raise Pin("BatchNorm over a non-channel axis")
    t.add_members(c.lay, [(f"{c.name}.{t}", 0) for t in ("weight", "bias", "running_mean", "running_var")],
                  need_block1=False)  # (a unit owning a block of channels: its block of statistics)
    return c.lay


def _m_group_norm(t, c: ModuleCall) -> Any:
    lay, mod = c.lay, c.mod
    if lay is None:
        return None
    if lay.axis != 1:
        raise Pin("GroupNorm over a non-channel axis")
    if mod.num_groups not in (1, mod.num_channels):
        # legal permutations move whole groups and reorder channels within each: the same block structure
        # as attention heads
        if len(lay.segs) != 1:
            raise Pin(f"GroupNorm with {mod.num_groups} groups over concatenated channels")
        t.b.set_heads(lay.segs[0][0], mod.num_groups)
    t.add_members(lay, [(f"{c.name}.weight", 0), (f"{c.name}.bias", 0)])
    return lay


def _m_layer_norm(t, c: ModuleCall) -> Any:
    if c.lay is None:
        return None
    k = len(c.mod.normalized_shape)
    if isinstance(c.lay, HLay):
        return head_norm(t, c.lay, len(c.shape_in), k, [f"{c.name}.weight", f"{c.name}.bias"], "LayerNorm")
    if c.lay.axis < len(c.shape_in) - k:  # normalised over other axes: the feature axis just rides along
        return c.lay
    if k == 1:
        t.add_members(c.lay, [(f"{c.name}.weight", 0), (f"{c.name}.bias", 0)])
        return c.lay
    raise Pin("LayerNorm over several axes including the feature axis")


def _m_pool(t, c: ModuleCall) -> Any:
    if getattr(c.mod, "return_indices", False):
        raise Pin("pooling that returns indices")
    if c.lay is not None and (c.lay.axis != 1 or len(c.shape_in) < 3):
        raise Pin("pooling over the feature axis")
    return c.lay


def _m_embedding(t, c: ModuleCall) -> Any:
    t.pin_axis(f"{c.name}.weight", 0, EMBEDDING_ROWS)
    return t.fresh(c.mod.embedding_dim, c.name, len(c.shape_out) - 1, [(f"{c.name}.weight", 1)])


def _m_sequential(t, c: ModuleCall) -> Any:
    if len(c.mod) == 0:
        return c.lay
    raise Pin(f"unsupported module {type(c.mod).__name__}")


def _m_pinned(reason: str):
    def visit(t, c: ModuleCall) -> Any:
        raise Pin(reason)
    return visit

