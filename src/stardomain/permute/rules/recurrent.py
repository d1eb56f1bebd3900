"""Op rules for recurrent layers (nn.LSTM, nn.GRU, nn.RNN): each layer and direction's hidden units are a
group, tied across its gates. A hidden unit's gate rows (i, f, g, o of an LSTM; r, z, n of a GRU) move
together (Member.rep = the number of gates), the recurrent matrix is permuted on both sides, and the
next layer (or whatever reads the output) reads the directions' units side by side."""

from __future__ import annotations

from typing import Any

import torch.fx as fx
import torch.nn as nn

from ..layouts import Lay
from ..spec import Member
from .common import Pin

GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}
STATE_USED = "a recurrent layer's final state (h_n, c_n) is read: its rows mix layers and directions"


def _state_read(node: fx.Node) -> bool:
    """Is anything but the output sequence (the call's item 0) read?"""
    return any(not (u.op == "call_function" and len(u.args) > 1 and u.args[1] == 0) and u.users
               for u in node.users)


def _layer(t: Any, name: str, sfx: str, h: int, gates: int) -> int:
    """One layer and direction's hidden units: the gate rows of both input matrices and biases, and the
    recurrent matrix's columns."""
    g = t.b.new(h, f"{name}.{sfx}")
    for w in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
        if f"{name}.{w}_{sfx}" in t.sd_keys:
            t.b.add(g, Member(f"{name}.{w}_{sfx}", 0, 0, 1, gates))
    t.b.add(g, Member(f"{name}.weight_hh_{sfx}", 1))
    return g


def recurrent(t: Any, c: Any) -> Any:
    mod: nn.RNNBase = c.mod
    if c.shape_in is None or getattr(mod, "proj_size", 0) or mod.mode not in GATES:
        raise Pin(f"{type(mod).__name__} with projections or packed sequences")
    if c.lay is not None and (not isinstance(c.lay, Lay) or c.lay.axis != len(c.shape_in) - 1):
        raise Pin("a recurrent layer over units on an axis other than the features")
    if len(c.node.all_input_nodes) > 1:
        raise Pin("a recurrent layer given an initial state")
    dirs = ["", "_reverse"] if mod.bidirectional else [""]
    h, gates, name = mod.hidden_size, GATES[mod.mode], c.name
    if c.lay is not None:
        t.add_members(c.lay, [(f"{name}.weight_ih_l0{d}", 1) for d in dirs], need_block1=False)
    every = []
    for layer in range(mod.num_layers):
        groups = [_layer(t, name, f"l{layer}{d}", h, gates) for d in dirs]
        every += groups
        if layer + 1 < mod.num_layers:
            for k, g in enumerate(groups):
                for d in dirs:
                    t.b.add(g, Member(f"{name}.weight_ih_l{layer + 1}{d}", 1, k * h))
    if _state_read(c.node):
        for g in every:
            t.b.fix(g, STATE_USED)
    return (Lay(len(c.shape_in) - 1, tuple((g, h, 1) for g in groups)), None)
