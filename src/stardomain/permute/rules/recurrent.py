"""Op rules for recurrent layers (nn.LSTM, nn.GRU, nn.RNN): each layer and direction's hidden units are a
group, tied across its gates. A hidden unit's gate rows (i, f, g, o of an LSTM; r, z, n of a GRU) move
together (Member.rep = the number of gates), the recurrent matrix is permuted on both sides, and the
next layer (or whatever reads the output) reads the directions' units side by side. The cells
(nn.LSTMCell, nn.GRUCell, nn.RNNCell) called step by step in a loop the graph unrolls: one group per cell,
shared by all its calls, each step's state the units of the last step's output."""

from __future__ import annotations

from typing import Any

import torch.fx as fx
import torch.nn as nn

from ..layouts import Lay
from ..spec import Member
from .common import Pin, arg, shape_of

GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}
STATE_USED = "a recurrent layer's final state (h_n, c_n) is read: its rows mix layers and directions"


def _state_read(node: fx.Node) -> bool:
    """Is anything but the output sequence (the call's item 0) read?"""
    return any(not (u.op == "call_function" and len(u.args) > 1 and u.args[1] == 0) and u.users
               for u in node.users)


def _layer(t: Any, names: list, h: int, gates: int, label: str) -> int:
    """One layer and direction's hidden units (names: w_ih, w_hh, b_ih, b_hh, None where absent): the gate
    rows of both input matrices and biases, and the recurrent matrix's columns."""
    g = t.b.new(h, label)
    for w in names:
        if w and w in t.sd_keys:
            t.b.add(g, Member(w, 0, 0, 1, gates))
    t.b.add(g, Member(names[1], 1))
    return g


def _stack(t: Any, node: fx.Node, x: Any, params: list[list], h: int, gates: int, dirs: int) -> tuple:
    """A stacked recurrent layer: params[layer * dirs + d] its weights' names; the input's units index the
    first layer's input matrices, each layer's directions side by side the next one's."""
    si, lay = shape_of(x), t.lay(x)
    if si is None or lay is not None and (not isinstance(lay, Lay) or lay.axis != len(si) - 1):
        raise Pin("a recurrent layer over units on an axis other than the features")
    if lay is not None:
        t.add_members(lay, [(params[d][0], 1) for d in range(dirs)], need_block1=False)
    every, layers = [], len(params) // dirs
    for layer in range(layers):
        here = params[layer * dirs:(layer + 1) * dirs]
        groups = [_layer(t, names, h, gates, names[1].replace(".weight_hh_", ".")) for names in here]
        every += groups
        if layer + 1 < layers:
            for k, g in enumerate(groups):
                for d in range(dirs):
                    t.b.add(g, Member(params[(layer + 1) * dirs + d][0], 1, k * h))
    if _state_read(node):
        for g in every:
            t.b.fix(g, STATE_USED)
    return Lay(len(si) - 1, tuple((g, h, 1) for g in groups))


def cell_step(t: Any, x: Any, state: Any, names: list, gates: int, hidden: int) -> Lay:
    """One step of a recurrent cell (weights `names`: w_ih, w_hh, b_ih, b_hh; None where absent): its hidden
    units are one group for every call (t.cells, by the recurrent matrix's name), the given state (h, or
    [h, c]) must carry those units or none (zeros), and the input's units index w_ih's columns."""
    w_ih, w_hh = names[:2]
    si = shape_of(x)
    if si is None or not w_ih or not w_hh:
        raise Pin("a recurrent cell on an input of unknown shape or with computed weights")
    lay = t.lay(x)
    if lay is not None:
        if not isinstance(lay, Lay) or lay.axis != len(si) - 1:
            raise Pin("a recurrent cell over units on an axis other than the features")
        t.add_members(lay, [(w_ih, 1)], need_block1=False)
    if w_hh not in t.cells:
        t.cells[w_hh] = _layer(t, names, hidden, gates, w_hh.removesuffix(".weight_hh"))
    g = t.cells[w_hh]
    for s in state if isinstance(state, (tuple, list)) else [state]:
        sl = t.lay(s)
        if sl is None:
            continue
        if not isinstance(sl, Lay) or sl.axis != len(shape_of(s)) - 1 or [x[1:] for x in sl.segs] != [(hidden, 1)]:
            raise Pin("a recurrent cell's state laid out otherwise than its hidden units")
        t.b.union(sl.segs[0][0], g)
    return Lay(len(si) - 1, ((g, hidden, 1),))


def recurrent_cell(t: Any, c: Any) -> Any:
    """nn.LSTMCell, nn.GRUCell, nn.RNNCell (fx keeps them whole): one step (cell_step)."""
    mod, name = c.mod, c.name
    gates = 4 if isinstance(mod, nn.LSTMCell) else 3 if isinstance(mod, nn.GRUCell) else 1
    names = [f"{name}.{w}" if f"{name}.{w}" in t.sd_keys else None
             for w in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
    out = cell_step(t, c.x, arg(c.node, 1, "hx"), names, gates, mod.hidden_size)
    return (out, out) if gates == 4 else out


def aten_cell(t: Any, node: fx.Node) -> Any:
    """aten.lstm_cell / gru_cell / rnn_tanh_cell / rnn_relu_cell (x, hx, w_ih, w_hh, b_ih, b_hh), as
    torch.export writes a cell's call: one step (cell_step)."""
    w_hh = node.args[3]
    names = [t.pname(a) or None for a in list(node.args[2:6]) + [None] * (6 - len(node.args))]
    hidden = shape_of(w_hh)[1]
    gates = shape_of(node.args[2])[0] // hidden
    out = cell_step(t, node.args[0], node.args[1], names, gates, hidden)
    return (out, out) if gates == 4 else out


def recurrent(t: Any, c: Any) -> Any:
    mod: nn.RNNBase = c.mod
    if c.shape_in is None or getattr(mod, "proj_size", 0) or mod.mode not in GATES:
        raise Pin(f"{type(mod).__name__} with projections or packed sequences")
    if len(c.node.all_input_nodes) > 1:
        raise Pin("a recurrent layer given an initial state")
    dirs = ["", "_reverse"] if mod.bidirectional else [""]
    params = [[f"{c.name}.{w}_l{layer}{d}" for w in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
              for layer in range(mod.num_layers) for d in dirs]
    return (_stack(t, c.node, c.x, params, mod.hidden_size, GATES[mod.mode], len(dirs)), None)


def aten_stack(t: Any, node: fx.Node) -> Any:
    """aten.lstm / gru / rnn_tanh / rnn_relu (x, hx, params, has_biases, num_layers, dropout, train,
    bidirectional, batch_first), as torch.export writes nn.LSTM, nn.GRU and nn.RNN: their weights listed
    layer by layer and direction by direction."""
    x, hx, flat, biases, layers, _, _, bidirectional = node.args[:8]
    if any(t.lay(s) is not None for s in (hx if isinstance(hx, (list, tuple)) else [hx])):
        raise Pin("a recurrent layer given an initial state")
    names = [t.pname(p) for p in flat]
    per = 4 if biases else 2
    dirs = 2 if bidirectional else 1
    if len(names) != per * layers * dirs or not all(names):
        raise Pin("a recurrent layer with projections or computed weights")
    params = [names[i:i + per] + [None] * (4 - per) for i in range(0, len(names), per)]
    h = shape_of(flat[1])[1]
    out = _stack(t, node, x, params, h, shape_of(flat[0])[0] // h, dirs)
    return (out, None, None) if isinstance(hx, (list, tuple)) else (out, None)
