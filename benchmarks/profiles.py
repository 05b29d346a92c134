"""Reading a jax.profiler trace of one XLA:CPU step: time per thunk, joined with the compiled HLO.

Each XLA:CPU thunk (a YNNPACK/oneDNN/Eigen fusion, a copy, a loop fusion) is one trace event named
after its HLO instruction. The HLO tells what the instruction computes: the convolutions inside it
(FLOPs from their shapes, the layer from the op_name metadata, the pass: forward, or backward
w.r.t. input `dgrad` or kernel `wgrad`), or no convolution at all (copies/transposes for layouts,
pooling and ReLU backward, Adam's elementwise update). That is enough to say where a step's time
goes and at what GFLOP/s each convolution runs.
"""
from __future__ import annotations

import collections
import glob
import gzip
import json
import math
import re

_INSTR = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (\w+)\[([\d,]*)\][^ ]* (\w[\w\-]*)\((.*)$")
_COMP = re.compile(r"^(?:ENTRY )?%([\w.\-]+) \(.*\{$")
_OPNAME = re.compile(r'op_name="([^"]+)"')
_LAYER = re.compile(r"(block\d_conv\d|predictions|fc\d)")


def _dims(s: str) -> list[int]:
  return [int(d) for d in s.split(",") if d]


def parse_hlo(text: str) -> tuple[dict, dict]:
  """({computation: [conv/dot records]}, {entry instruction: (calls, op_name, out dims)})."""
  comps, entry, current, is_entry = collections.defaultdict(list), {}, None, False
  shapes: dict[str, list[int]] = {}
  for line in text.splitlines():
    m = _COMP.match(line)
    if m:
      current, is_entry, shapes = m.group(1), line.startswith("ENTRY"), {}
      for p, d in re.findall(r"([\w.\-]+): \w+\[([\d,]*)\]", line):
        shapes[p] = _dims(d)
      continue
    m = _INSTR.match(line)
    if not m or current is None:
      continue
    name, _, dims, op, rest = m.groups()
    dims = _dims(dims)
    shapes[name] = dims
    op_name = (_OPNAME.search(rest) or [None, ""])[1]
    if op in ("convolution", "dot"):
      args = re.findall(r"%([\w.\-]+)", rest.split(")")[0])
      kernel = shapes.get(args[1], []) if len(args) > 1 else []
      if op == "convolution":
        labels = re.search(r"dim_labels=\w+_(\w+)->", rest).group(1)
        o = kernel[labels.index("o")] if kernel and "o" in labels else 1
        flops = 2 * math.prod(dims) * math.prod(kernel) / max(o, 1) if kernel else 0
        backward = "transpose(" in op_name
        kernel_like = any(dims[i:i + 2] == [3, 3] for i in range(len(dims) - 1))
        pass_ = ("wgrad" if kernel_like else "dgrad") if backward else "fwd"
      else:
        contract = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", rest)
        lhs = shapes.get(args[0], [])
        k = math.prod(lhs[i] for i in _dims(contract.group(1))) if contract and lhs else 1
        flops, pass_ = 2 * math.prod(dims) * k, "dense"
      layer = (_LAYER.search(op_name) or [None, "?"])[1]
      comps[current].append({"op": op, "flops": flops, "pass": pass_, "layer": layer})
    if is_entry:
      calls = re.search(r"calls=%([\w.\-]+)", rest)
      entry[name] = (calls.group(1) if calls else None, op_name, dims, op)
  return comps, entry


def _events(logdir: str) -> list[dict]:
  path = sorted(glob.glob(f"{logdir}/**/perfetto_trace.json.gz", recursive=True))[-1]
  doc = json.load(gzip.open(path))
  return [e for e in (doc["traceEvents"] if isinstance(doc, dict) else doc) if e.get("ph") == "X"]


def describe(name: str, calls: str | None, comps: dict, op: str) -> tuple[str, float]:
  """(what the instruction is, its FLOPs) for a table row."""
  convs = comps.get(calls, []) if calls else []
  if not convs:
    kind = ("layout copy/transpose" if "copy" in name or "transpose" in name
            else "pool backward (scatter)" if "scatter" in name or "select" in name
            else "pooling" if "reduce-window" in name or "reduce_window" in name
            else "elementwise (ReLU grad, Adam, loss)")
    return kind, 0.0
  flops = sum(c["flops"] for c in convs)
  layers = sorted({c["layer"] for c in convs})
  passes = sorted({c["pass"] for c in convs})
  if len(convs) > 1:
    return f"{len(convs)} convs fused ({layers[0]}..{layers[-1]}, {'/'.join(passes)})", flops
  return f"{layers[0]} {passes[0]}", flops


def summarise(logdir: str, hlo_text: str, steps: int, wall_s: float, top: int = 14) -> dict:
  """Per-step time by thunk (top rows) and by category, with each row's GFLOP/s. XLA's own
  (Eigen) convolution and dot thunks emit no trace event: their time is the wall time the traced
  thunks leave over ('untraced')."""
  comps, entry = parse_hlo(hlo_text)
  per = collections.defaultdict(float)
  for e in _events(logdir):
    if e["name"] in entry:
      per[e["name"]] += e.get("dur", 0) / 1e6 / steps
  rows, cats = [], collections.defaultdict(float)
  for name, secs in sorted(per.items(), key=lambda kv: -kv[1]):
    calls, _, _, op = entry[name]
    what, flops = describe(name, calls, comps, op)
    passes = {c["pass"] for c in comps.get(calls, [])} if calls else set()
    cat = ("conv " + "+".join(sorted(passes)) if passes - {"dense"} else
           "dense" if passes else what)
    cats[cat] += secs
    rows.append({"thunk": name, "what": what, "ms": secs * 1e3,
                 "gflops": flops / secs / 1e9 if flops and secs else None})
  total = sum(per.values())
  if wall_s > total:
    cats["untraced (Eigen conv/dot thunks)"] = wall_s - total
  return {"thunk_s_per_step": total, "by_category_ms": {k: v * 1e3 for k, v in cats.items()},
          "top": rows[:top]}


def format_summary(res: dict) -> str:
  lines = [f"  wall {res['wall_s_per_step'] * 1e3:.0f} ms/step, thunks {res['thunk_s_per_step'] * 1e3:.0f}"
           f" ms/step (load {res['load_before']}->{res['load_after']})"]
  lines += [f"    {k:<40s} {v:8.1f} ms" for k, v in
            sorted(res["by_category_ms"].items(), key=lambda kv: -kv[1])]
  lines.append("    top thunks:")
  for r in res["top"]:
    g = f"{r['gflops']:6.1f} GFLOP/s" if r["gflops"] else ""
    lines.append(f"    {r['thunk']:<28s} {r['what']:<44s} {r['ms']:8.1f} ms {g}")
  return "\n".join(lines)
