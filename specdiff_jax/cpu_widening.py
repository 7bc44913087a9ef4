"""What a CPU compile of a bf16 program holds that a TPU would not, read from XLA's own dumps of that compile.

XLA's CPU backend computes bf16 matmuls in f32: it converts bf16 operands to f32 (a bf16 weight gets an f32 copy,
converted once and, in a decode loop, hoisted out of the loop and kept for all of it) and keeps results in f32
where the program computes bf16. A TPU multiplies bf16 natively. So a CPU figure of a bf16 program is an upper
bound of an accelerator's, and this module measures by how much.

`widening(dump_dir)` reads one compile's dump (`compile(compiler_options={"xla_dump_to": dir})`: the optimized
HLO, its buffer assignment and buffer live ranges) and counts every buffer the way a TPU would size it:
- an f32 value that only converts a bf16 entry parameter (plus layout ops: bitcasts, copies, all-gathers): 0
  bytes (the TPU reads the bf16 parameter, which is counted already);
- an f32 value that only converts another bf16 value, only moves such a copy (an all-gather, a copy, a pad), or
  that the program holds in bf16 (the CPU rounds it to bf16 and back: its fusion holds that round trip, or every
  user of it does): half its bytes;
- everything else: its bytes (f32 values whose bf16 rounding XLA dropped as excess precision stay counted in
  full, so the TPU figure this gives is still an upper bound).
It returns the peak of live bytes over the schedule counted both ways (values at one buffer offset whose live
ranges overlap are one buffer). `compiled_memory` reports the second as "XLA's buffers at TPU sizes" and the
difference as the CPU's widening. Heap fragmentation and a TPU's own scheduling are not modelled: the result
estimates the accelerator's figure from XLA's own buffers, it is not a TPU compile.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

# ops that move or reshape data without computing: a fusion of these plus a convert only widens its input
LAYOUT_OPS = {"parameter", "convert", "bitcast", "copy", "transpose", "reshape", "broadcast", "slice",
              "dynamic-slice", "concatenate", "tuple", "get-tuple-element"}
# ops that move, write or reduce data across devices without other arithmetic
MOVE_OPS = LAYOUT_OPS | {"scatter", "dynamic-update-slice", "select", "pad", "all-reduce", "all-gather",
                         "reduce-scatter", "all-to-all", "collective-permute"}
_INSTR = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.+?) ([a-z][\w\-]*)\((.*)$")
_COMP = re.compile(r"^(ENTRY )?%([\w.\-]+) .*\{\s*$")
_VALUE = re.compile(r"^ value: <\d+ ([\w.\-]+)(\{[\d,]*\})?(?: \(phi\))? @\d+> \(size=(\d+),offset=\d+\): (\S+)")
_RANGE = re.compile(r"^\s+([\w.\-]+)(\{[\d,]*\}):(\d+)-(\d+)$")


def _dtype(type_str: str) -> str:
    return type_str.split("[", 1)[0]


def _parse_hlo(text: str) -> tuple[dict, dict, set]:
    """(instructions by name, computations: name -> list of instruction names, entry parameter names); each
    instruction: type, op, operands, calls (fused computation), users."""
    ins, comps, params = {}, {}, set()
    comp, entry = None, False
    for line in text.splitlines():
        m = _COMP.match(line)
        if m:
            comp, entry = m.group(2), bool(m.group(1))
            comps[comp] = []
            continue
        m = _INSTR.match(line)
        if not m or comp is None:
            continue
        name, typ, op, rest = m.groups()
        called = re.search(r"calls=%([\w.\-]+)", rest)
        ins[name] = dict(type=typ, op=op, operands=re.findall(r"%([\w.\-]+)", rest.split(")", 1)[0]),
                         calls=called.group(1) if called else None, users=[])
        comps[comp].append(name)
        if entry and op == "parameter":
            params.add(name)
    for name, i in ins.items():
        for o in i["operands"]:
            if o in ins:
                ins[o]["users"].append(name)
    return ins, comps, params


def _widens(name: str, ins: dict, comps: dict) -> bool:
    """The instruction only converts a bf16 value to f32 (a convert, or a fusion of a convert and layout ops)."""
    i = ins[name]
    if i["op"] == "convert":
        src = ins.get(i["operands"][0]) if i["operands"] else None
        return src is not None and _dtype(src["type"]) == "bf16"
    if i["op"] != "fusion" or i["calls"] not in comps:
        return False
    body = [ins[n] for n in comps[i["calls"]]]
    return (all(b["op"] in LAYOUT_OPS for b in body) and any(b["op"] == "convert" for b in body)
            and any(b["op"] == "parameter" and _dtype(b["type"]) == "bf16" for b in body))


def _from_parameter(name: str, ins: dict, params: set) -> bool:
    """The instruction's input is an entry parameter, through bitcasts / copies / all-gathers."""
    seen = 0
    while seen < 32:
        ops = ins[name]["operands"]
        if not ops:
            return False
        name = ops[0]
        if name in params:
            return True
        if ins.get(name, {}).get("op") not in ("bitcast", "copy", "all-gather", "reshape", "transpose"):
            return False
        seen += 1
    return False


def _rounds(name: str, ins: dict, comps: dict) -> bool:
    """A fusion that rounds a value to bf16 and converts it back to f32: the program holds that value in bf16."""
    i = ins[name]
    if i["op"] != "fusion" or i["calls"] not in comps:
        return False
    body = [ins[n] for n in comps[i["calls"]]]
    return any(b["op"] == "convert" and _dtype(b["type"]) == "f32" and b["operands"]
               and ins[b["operands"][0]]["op"] == "convert" and _dtype(ins[b["operands"][0]]["type"]) == "bf16"
               for b in body)


def _moves(name: str, ins: dict, comps: dict) -> bool:
    """The instruction only moves, reduces across devices or writes data (a fusion of such ops included)."""
    i = ins[name]
    if i["op"] != "fusion":
        return i["op"] in MOVE_OPS
    return i["calls"] in comps and all(ins[n]["op"] in MOVE_OPS for n in comps[i["calls"]])


def _narrows(name: str, ins: dict, comps: dict) -> bool:
    """The instruction only converts its input to bf16 (a convert, or a fusion of a convert and layout ops)."""
    i = ins[name]
    if _dtype(i["type"]) != "bf16":
        return False
    if i["op"] == "convert":
        return True
    body = [ins[n]["op"] for n in comps.get(i["calls"], [])] if i["op"] == "fusion" else []
    return "convert" in body and all(op in LAYOUT_OPS for op in body)


def _held_in_bf16(name: str, ins: dict, comps: dict, depth: int = 8) -> bool:
    """The program holds this f32 value in bf16: it rounds to bf16 itself, or every user rounds it, converts it
    to bf16, or only moves it into another value held in bf16 (a cache write, a copy, a collective)."""
    if _rounds(name, ins, comps):
        return True
    users = ins[name]["users"]
    if not users or depth == 0:
        return False
    return all(_rounds(u, ins, comps) or _narrows(u, ins, comps)
               or (_dtype(ins[u]["type"]) == "f32" and _moves(u, ins, comps)
                   and _held_in_bf16(u, ins, comps, depth - 1)) for u in users)


def tpu_bytes(name: str, index: str, size: int, type_str: str, ins: dict, comps: dict, params: set) -> int:
    """The bytes a TPU would hold for the value `name{index}` of `size` bytes (see the module docstring)."""
    if _dtype(type_str) != "f32" or name not in ins:
        return size
    if index != "{}":  # an element k of a tuple-shaped collective: as its operand k
        i, k = ins[name], int(index.strip("{}").split(",")[0]) if index.strip("{}") else 0
        held = i["op"] in MOVE_OPS and k < len(i["operands"]) and i["operands"][k] in ins and _held_in_bf16(
            i["operands"][k], ins, comps)
        return size // 2 if held else size
    if _widens(name, ins, comps):
        return 0 if _from_parameter(name, ins, params) else size // 2
    return size // 2 if _moves_widened(name, ins, comps) or _held_in_bf16(name, ins, comps) else size


def _moves_widened(name: str, ins: dict, comps: dict, depth: int = 8) -> bool:
    """The instruction moves (gathers, copies, pads, transposes) a widened copy of a bf16 value: a TPU moves the
    bf16 value instead."""
    ops = ins[name]["operands"]
    if depth == 0 or not ops or ops[0] not in ins or not _moves(name, ins, comps):
        return False
    return _widens(ops[0], ins, comps) or _moves_widened(ops[0], ins, comps, depth - 1)


def _file(dump_dir: Path, suffix: str) -> Path:
    found = sorted(dump_dir.glob(f"*{suffix}"))
    if len(found) != 1:
        raise ValueError(f"{dump_dir} must hold one compile's dump with one *{suffix} (found {len(found)}); "
                         "compile with compiler_options={'xla_dump_to': a fresh directory}")
    return found[0]


def _buffers(ba_text: str, ranges: dict, size_of) -> list[tuple[int, int, int, int]]:
    """(start, end, bytes, TPU bytes) of every buffer: values at one allocation offset whose live ranges overlap
    share it (aliases: bitcasts, tuple elements, in-place updates), so they are merged and counted once."""
    groups: dict = {}
    alloc = None
    for line in ba_text.splitlines():
        if line.startswith("allocation "):
            alloc = line.split(":", 1)[0]
            continue
        m = _VALUE.match(line)
        key = (m.group(1), m.group(2) or "{}") if m else None
        if key in ranges:
            offset = int(re.search(r"offset=(\d+)", line).group(1))
            size = int(m.group(3))
            groups.setdefault((alloc, offset), []).append((*ranges[key], size, size_of(*key, size, m.group(4))))
    out = []
    for members in groups.values():
        members.sort()
        a, b, big, small = members[0]
        for s, e, z, t in members[1:]:
            if s <= b:  # overlapping: the same buffer
                b, big, small = max(b, e), max(big, z), max(small, t)
            else:
                out.append((a, b, big, small))
                a, b, big, small = s, e, z, t
        out.append((a, b, big, small))
    return out


def widening(dump_dir) -> dict[str, int]:
    """{"peak": live bytes at the peak of the schedule, "peak_tpu": the peak with every value at its TPU size,
    "excess": peak - peak_tpu} of the one compile dumped in `dump_dir`."""
    d = Path(dump_dir)
    ins, comps, params = _parse_hlo(_file(d, "cpu_after_optimizations.txt").read_text())
    text = _file(d, "cpu_after_optimizations-live-range.txt").read_text()
    ranges = {(m.group(1), m.group(2)): (int(m.group(3)), int(m.group(4)))
              for m in map(_RANGE.match, text.split("BufferLiveRange:", 1)[-1].split("Live ranges at", 1)[0]
                           .splitlines()) if m}

    def size_of(name, index, size, typ):
        return tpu_bytes(name, index, size, typ, ins, comps, params)

    bufs = _buffers(_file(d, "cpu_after_optimizations-buffer-assignment.txt").read_text(), ranges, size_of)
    end = max((b[1] for b in bufs), default=0) + 2
    cpu, tpu = np.zeros(end, np.int64), np.zeros(end, np.int64)
    for a, b, size, small in bufs:  # live over [a, b]: an instruction's operands and results coexist
        cpu[a] += size
        cpu[b + 1] -= size
        tpu[a] += small
        tpu[b + 1] -= small
    peak, peak_tpu = int(np.cumsum(cpu).max(initial=0)), int(np.cumsum(tpu).max(initial=0))
    return {"peak": peak, "peak_tpu": peak_tpu, "excess": peak - peak_tpu}
