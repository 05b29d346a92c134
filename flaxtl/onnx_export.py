"""The exported model (preprocessing + network + softmax) as an ONNX graph, translated from its jaxpr.

Why not a converter package: jax2tf's SavedModel holds StableHLO (an XlaCallModule op), which
tf2onnx cannot read, and jax2onnx pins an orbax-checkpoint older than the one flaxtl needs. flaxtl's
models use a handful of JAX primitives, so the jaxpr is translated here: params become initializers,
each equation one or a few ONNX nodes (convolutions and pooling run in NCHW between transposes,
which onnxruntime's optimizer folds away), parameter-only arithmetic is computed once at export, and
the batch dimension stays symbolic ('N'). A primitive it does not know is an error that names it.
Needs the `onnx` package: `pip install -e ".[onnx]"`.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np

OPSET = 17
BATCH = "N"
ELEMENTWISE = {"add": "Add", "sub": "Sub", "mul": "Mul", "div": "Div", "max": "Max", "min": "Min",
               "pow": "Pow"}
UNARY = {"exp": "Exp", "log": "Log", "neg": "Neg", "tanh": "Tanh", "logistic": "Sigmoid",
         "sqrt": "Sqrt", "abs": "Abs", "erf": "Erf", "copy": "Identity", "copy_p": "Identity",
         "stop_gradient": "Identity", "floor": "Floor", "ceil": "Ceil", "sign": "Sign"}
CALLS = {"jit": "jaxpr", "pjit": "jaxpr", "closed_call": "call_jaxpr",
         "custom_jvp_call": "call_jaxpr", "custom_vjp_call": "call_jaxpr",
         "custom_vjp_call_jaxpr": "fun_jaxpr", "remat": "jaxpr", "checkpoint": "jaxpr"}


class UnsupportedError(NotImplementedError):
  """The jaxpr uses something this translator does not handle (named in the message)."""


@dataclasses.dataclass
class Value:
  """A jaxpr value: an ONNX tensor name, or a constant known at export. `lazy`: the name holds
  the value before a broadcast_in_dim (1s for the new dims), which ONNX's elementwise ops
  broadcast themselves; anything else gets it expanded first."""
  name: str | None = None
  const: np.ndarray | None = None
  lazy: bool = False


class Graph:
  def __init__(self):
    from onnx import helper
    self.helper = helper
    self.nodes, self.inits, self.count = [], [], 0
    self.batch = self.batch_dim = None  # N as a tensor (read from the input); as a JAX dimension

  def fresh(self, hint: str) -> str:
    self.count += 1
    return f"{hint}_{self.count}"

  def const(self, array, hint: str = "c") -> str:
    from onnx import numpy_helper
    name = self.fresh(hint)
    self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
    return name

  def node(self, op: str, inputs: list[str], hint: str | None = None, **attrs) -> str:
    out = self.fresh(hint or op.lower())
    self.nodes.append(self.helper.make_node(op, inputs, [out], **attrs))
    return out

  def shape(self, dims) -> str:
    """An int64 shape vector for `dims`, where the symbolic batch is read from the input; a
    multiple k*N of it (test-time augmentation's views, batched together) is computed."""
    if all(isinstance(d, (int, np.integer)) for d in dims):
      return self.const(np.asarray(dims, np.int64), "shape")
    parts = []
    for d in dims:
      if isinstance(d, (int, np.integer)):
        parts.append(self.const(np.asarray([d], np.int64), "dim"))
        continue
      k = d // self.batch_dim
      if not isinstance(k, int) or k < 1 or k * self.batch_dim != d:
        raise UnsupportedError(f"a dimension {d} other than a multiple of the batch {BATCH}")
      parts.append(self.batch if k == 1 else
                   self.node("Mul", [self.batch, self.const(np.asarray([k], np.int64), "dim")]))
    return self.node("Concat", parts, "shape", axis=0)


def _dtype(dtype) -> int:
  from onnx import helper
  return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


def to_onnx(fn, params, image_size: int, metadata: dict[str, Any]):
  """`fn(params, images uint8 [N, S, S, 3]) -> probabilities [N, classes]` as an ONNX ModelProto
  with input 'images' and output 'probabilities' (`metadata`: the model's string properties)."""
  import jax
  import jax.numpy as jnp
  import onnx
  from jax import export
  from onnx import TensorProto, helper
  b, = export.symbolic_shape(BATCH)
  closed = jax.make_jaxpr(fn)(params, jax.ShapeDtypeStruct((b, image_size, image_size, 3),
                                                           jnp.uint8))
  g = Graph()
  g.batch_dim = b
  leaves = jax.tree.leaves(params)
  g.batch = g.node("Shape", ["images"], "batch", start=0, end=1)
  env_in = [Value(const=np.asarray(leaf)) for leaf in leaves] + [Value(name="images")]
  out, = _run(g, closed.jaxpr, [Value(const=np.asarray(c)) for c in closed.consts], env_in)
  g.nodes.append(helper.make_node("Identity", [_name(g, out, closed.jaxpr.outvars[0].aval)],
                                  ["probabilities"]))
  used = {i for n in g.nodes for i in n.input}  # constants a later step folded further
  g.inits = [t for t in g.inits if t.name in used]
  num_classes = closed.jaxpr.outvars[0].aval.shape[-1]
  graph = helper.make_graph(
      g.nodes, "flaxtl",
      [helper.make_tensor_value_info("images", TensorProto.UINT8,
                                     [BATCH, image_size, image_size, 3])],
      [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [BATCH, num_classes])],
      g.inits)
  model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                            producer_name="flaxtl")
  model.ir_version = min(model.ir_version, 10)  # what current onnxruntime releases read
  for k, v in metadata.items():
    entry = model.metadata_props.add()
    entry.key, entry.value = k, v if isinstance(v, str) else json.dumps(v)
  onnx.checker.check_model(model)
  return model


def _name(g: Graph, v: Value, aval) -> str:
  """An ONNX tensor name holding `v` at its full shape."""
  if v.const is not None:
    return g.const(np.asarray(v.const, aval.dtype))
  if v.lazy:
    return g.node("Expand", [v.name, g.shape(aval.shape)], "expand")
  return v.name


def _operand(g: Graph, v: Value, aval) -> str:
  """A name for an elementwise op's operand: a lazy broadcast stays unexpanded."""
  if v.const is not None:
    return g.const(np.asarray(v.const, aval.dtype))
  return v.name


def _run(g: Graph, jaxpr, consts: list[Value], args: list[Value]) -> list[Value]:
  from jax.extend import core as jcore
  env = {}

  def read(var) -> Value:
    if isinstance(var, jcore.Literal):
      return Value(const=np.asarray(var.val, var.aval.dtype))
    return env[var]

  for var, v in zip(jaxpr.constvars, consts):
    env[var] = v
  for var, v in zip(jaxpr.invars, args):
    env[var] = v
  for eqn in jaxpr.eqns:
    ins = [read(v) for v in eqn.invars]
    outs = _eqn(g, eqn, ins)
    for var, v in zip(eqn.outvars, outs):
      env[var] = v
  return [read(v) for v in jaxpr.outvars]


def _fold(eqn, ins: list[Value]) -> list[Value] | None:
  """Parameter-only arithmetic, computed once here (with JAX, exactly as it would run)."""
  if eqn.primitive.name in CALLS or not all(v.const is not None for v in ins):
    return None
  if any(not all(isinstance(d, int) for d in v.aval.shape) for v in eqn.outvars):
    return None
  out = eqn.primitive.bind(*[v.const for v in ins], **eqn.params)
  outs = out if eqn.primitive.multiple_results else [out]
  return [Value(const=np.asarray(o)) for o in outs]


def _eqn(g: Graph, eqn, ins: list[Value]) -> list[Value]:
  name, p = eqn.primitive.name, eqn.params
  avals = [v.aval for v in eqn.invars]
  out_aval = eqn.outvars[0].aval
  if name in CALLS:
    closed = p[CALLS[name]]
    inner = closed.jaxpr if hasattr(closed, "jaxpr") else closed
    consts = [Value(const=np.asarray(c)) for c in getattr(closed, "consts", [])]
    return _run(g, inner, consts, ins)
  folded = _fold(eqn, ins)
  if folded is not None:
    return folded
  if name == "broadcast_in_dim":
    x, a = ins[0], avals[0]
    keep = [1] * len(p["shape"])
    for src, dst in enumerate(p["broadcast_dimensions"]):
      keep[dst] = a.shape[src]
    if x.const is not None:
      return [Value(name=g.const(np.asarray(x.const, a.dtype).reshape(keep)), lazy=True)]
    return [Value(name=g.node("Reshape", [_name(g, x, a), g.shape(keep)]), lazy=True)]
  if name in ELEMENTWISE:
    names = [_operand(g, v, a) for v, a in zip(ins, avals)]
    lazy = all(v.lazy or v.const is not None for v in ins)
    return [Value(name=g.node(ELEMENTWISE[name], names), lazy=lazy)]
  x = [_name(g, v, a) for v, a in zip(ins, avals)]  # full-shape inputs from here on
  if name in UNARY:
    return [Value(name=g.node(UNARY[name], x[:1]))]
  if name == "rsqrt":
    return [Value(name=g.node("Reciprocal", [g.node("Sqrt", x)]))]
  if name == "square":
    return [Value(name=g.node("Mul", [x[0], x[0]]))]
  if name == "integer_pow":
    return [Value(name=g.node("Pow", [x[0], g.const(np.asarray(p["y"], avals[0].dtype))]))]
  if name == "convert_element_type":
    return [Value(name=g.node("Cast", x, to=_dtype(p["new_dtype"])))]
  if name == "reshape":
    if p.get("dimensions"):
      raise UnsupportedError("reshape with dimensions")
    return [Value(name=g.node("Reshape", [x[0], g.shape(p["new_sizes"])]))]
  if name == "squeeze":
    return [Value(name=g.node("Squeeze", [x[0], g.const(np.asarray(p["dimensions"], np.int64))]))]
  if name == "transpose":
    return [Value(name=g.node("Transpose", x, perm=list(p["permutation"])))]
  if name == "concatenate":
    return [Value(name=g.node("Concat", x, axis=int(p["dimension"])))]
  if name == "rev":
    dims = list(p["dimensions"])
    return [Value(name=g.node("Slice", [x[0], g.const(np.full(len(dims), -1, np.int64)),
                                        g.const(np.full(len(dims), np.iinfo(np.int64).min,
                                                        np.int64)),
                                        g.const(np.asarray(dims, np.int64)),
                                        g.const(np.full(len(dims), -1, np.int64))]))]
  if name == "slice":
    n = len(p["start_indices"])
    return [Value(name=g.node("Slice", [x[0], g.const(np.asarray(p["start_indices"], np.int64)),
                                        g.shape(p["limit_indices"]),
                                        g.const(np.arange(n, dtype=np.int64)),
                                        g.const(np.asarray(p["strides"] or [1] * n, np.int64))]))]
  if name == "clamp":  # clamp(lo, x, hi)
    return [Value(name=g.node("Max", [g.node("Min", [x[1], x[2]]), x[0]]))]
  if name in ("reduce_sum", "reduce_max", "reduce_min"):
    axes = [int(a) for a in p["axes"]]
    if name == "reduce_sum":
      return [Value(name=g.node("ReduceSum", [x[0], g.const(np.asarray(axes, np.int64))],
                                keepdims=0))]
    op = "ReduceMax" if name == "reduce_max" else "ReduceMin"
    return [Value(name=g.node(op, x, axes=axes, keepdims=0))]
  if name == "dot_general":
    return [_dot(g, x, avals, p, out_aval)]
  if name == "conv_general_dilated":
    return [_conv(g, x, ins, avals, p, out_aval)]
  if name in ("reduce_window_max", "reduce_window_sum"):
    return [_pool(g, name, x[0], avals[0], p)]
  if name == "gather":
    return [_gather(g, x[0], ins[1], avals, p, out_aval)]
  if name == "pad":
    lo, hi, interior = zip(*p["padding_config"])
    if any(interior) or min(lo + hi) < 0:
      raise UnsupportedError("pad with interior or negative padding")
    return [Value(name=g.node("Pad", [x[0], g.const(np.asarray(lo + hi, np.int64)), x[1]]))]
  raise UnsupportedError(f"JAX primitive {name!r}")


def _gather(g: Graph, x: str, indices: Value, avals, p, out_aval) -> Value:
  """A gather of whole slices along one axis at constant indices (what `x[..., ::-1]` on a
  symbolic batch becomes) -> ONNX Gather."""
  dn = p["dimension_numbers"]
  axis = dn.collapsed_slice_dims[0] if len(dn.collapsed_slice_dims) == 1 else None
  rest = [i for i in range(out_aval.ndim) if i not in dn.offset_dims]
  if (indices.const is None or axis is None or tuple(dn.start_index_map) != (axis,)
      or dn.operand_batching_dims or rest != [axis] or indices.const.shape[-1:] != (1,)
      or indices.const.ndim != 2 or p["slice_sizes"][axis] != 1):
    raise UnsupportedError("gather other than whole slices along one axis at constant indices")
  idx = g.const(np.asarray(indices.const[:, 0], np.int64), "indices")
  return Value(name=g.node("Gather", [x, idx], axis=int(axis)))


def _cast_to(g: Graph, name: str, dtype, out_aval) -> str:
  return name if np.dtype(dtype) == np.dtype(out_aval.dtype) else g.node(
      "Cast", [name], to=_dtype(out_aval.dtype))


def _dot(g: Graph, x, avals, p, out_aval) -> Value:
  (lc, rc), (lb, rb) = p["dimension_numbers"]
  la, ra = avals
  if not lb and not rb and tuple(lc) == (la.ndim - 1,) and tuple(rc) == (0,) and ra.ndim == 2:
    return Value(name=_cast_to(g, g.node("MatMul", x), la.dtype, out_aval))
  letters = iter("abcdefghijklmnopqrstuvwxyz")
  left = [next(letters) for _ in range(la.ndim)]
  right = [None] * ra.ndim
  for i, j in zip(lb, rb):
    right[j] = left[i]
  for i, j in zip(lc, rc):
    right[j] = left[i]
  right = [r or next(letters) for r in right]
  out = ([left[i] for i in lb] + [l for i, l in enumerate(left) if i not in lb and i not in lc] +
         [r for j, r in enumerate(right) if j not in rb and j not in rc])
  eq = f"{''.join(left)},{''.join(right)}->{''.join(out)}"
  return Value(name=_cast_to(g, g.node("Einsum", x, equation=eq), la.dtype, out_aval))


def _conv(g: Graph, x, ins, avals, p, out_aval) -> Value:
  dn = p["dimension_numbers"]
  if any(d != 1 for d in p["lhs_dilation"]) or p["batch_group_count"] != 1:
    raise UnsupportedError("transposed or batch-grouped convolution")
  lhs = g.node("Transpose", [x[0]], perm=list(dn.lhs_spec))
  if ins[1].const is not None:
    w = g.const(np.transpose(np.asarray(ins[1].const, avals[1].dtype), dn.rhs_spec), "kernel")
  else:
    w = g.node("Transpose", [x[1]], perm=list(dn.rhs_spec))
  pads = [lo for lo, _ in p["padding"]] + [hi for _, hi in p["padding"]]
  kernel = [avals[1].shape[i] for i in dn.rhs_spec[2:]]
  y = g.node("Conv", [lhs, w], kernel_shape=kernel, strides=list(p["window_strides"]), pads=pads,
             dilations=list(p["rhs_dilation"]), group=int(p["feature_group_count"]))
  y = g.node("Transpose", [y], perm=[int(i) for i in np.argsort(dn.out_spec)])
  return Value(name=_cast_to(g, y, avals[0].dtype, out_aval))


def _pool(g: Graph, name: str, x: str, aval, p) -> Value:
  window, strides, padding = p["window_dimensions"], p["window_strides"], p["padding"]
  if (aval.ndim != 4 or window[0] != 1 or window[3] != 1 or strides[0] != 1 or strides[3] != 1
      or any(d != 1 for d in p["base_dilation"]) or any(d != 1 for d in p["window_dilation"])):
    raise UnsupportedError(f"{name} other than a 2-D NHWC pooling")
  nchw = g.node("Transpose", [x], perm=[0, 3, 1, 2])
  attrs = dict(kernel_shape=list(window[1:3]), strides=list(strides[1:3]),
               pads=[padding[1][0], padding[2][0], padding[1][1], padding[2][1]])
  if name == "reduce_window_max":
    y = g.node("MaxPool", [nchw], **attrs)
  else:  # a sum = the mean over the whole window (padding counted as zeros) x its size
    y = g.node("Mul", [g.node("AveragePool", [nchw], count_include_pad=1, **attrs),
                       g.const(np.asarray(window[1] * window[2], aval.dtype))])
  return Value(name=g.node("Transpose", [y], perm=[0, 2, 3, 1]))
