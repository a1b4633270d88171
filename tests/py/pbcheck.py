#!/usr/bin/env python3
"""Independent check of lorastream's ChirpStack JSON with ChirpStack's own protobuf classes.

Needs `pip install -r tests/py/requirements.txt` (generated `chirpstack_api.integration` classes and
Google's `protobuf` runtime). Run by tests/formats.rs and tests/chirpstack.rs; usable by hand too.

  pbcheck.py check     stdin: JSON lines {"type": "UplinkEvent", "json": "<event text>"}
                       (optional "name"; "input": true for bodies consumers write, which
                       skips the emission rules below).
                       Each text is parsed with json_format.Parse(..., ignore_unknown_fields=False)
                       (an unknown field, a wrong type or a bad enum name fails), re-serialized,
                       and compared with the original value by value. The emission rules of
                       ChirpStack's pbjson build are checked from the descriptors:
                       `integration.*` messages carry every non-message field (emit_fields),
                       `gw.*`/`common.*` messages carry no field holding its default.
                       Exit 0 and "N passed, 0 failed" when all pass.
  pbcheck.py commands  stdout: DownlinkCommand JSON made by protobuf's own serializer, in both
                       field-name styles, for the Rust parser to read.
"""
import base64
import json
import math
import sys

from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.timestamp_pb2 import Timestamp
from google.protobuf.duration_pb2 import Duration

from chirpstack_api import integration

WELL_KNOWN = {"google.protobuf.Timestamp", "google.protobuf.Duration", "google.protobuf.Struct"}


def is_map(f):
    return (f.message_type is not None and f.message_type.GetOptions().map_entry)


def is_repeated(f):
    # protobuf >= 5 has is_repeated; older runtimes only `label`.
    rep = getattr(f, "is_repeated", None)
    if rep is not None:
        return rep
    return f.label == FieldDescriptor.LABEL_REPEATED


def default_json(f, v):
    """True if JSON value v is the proto3 default of scalar field f."""
    if f.enum_type is not None:
        return v == f.enum_type.values_by_number[0].name or v == 0
    if f.type == FieldDescriptor.TYPE_BOOL:
        return v is False
    if f.type in (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES):
        return v == ""
    return v in (0, "0", 0.0)


def check_rules(desc, obj, path, problems):
    """ChirpStack's pbjson emission rules, message by message."""
    package = desc.file.package
    for f in desc.fields:
        present = f.json_name in obj
        sub = f.message_type is not None and not is_map(f)
        if package == "integration" and not sub and not present:
            problems.append(f"{path}.{f.json_name}: missing (ChirpStack emits every field of integration.*)")
        if package != "integration" and present and not sub and f.containing_oneof is None:
            v = obj[f.json_name]
            if (is_repeated(f) or is_map(f)) and len(v) == 0:
                problems.append(f"{path}.{f.json_name}: empty, but pbjson leaves it out in {package}.*")
            elif not (is_repeated(f) or is_map(f)) and default_json(f, v):
                problems.append(f"{path}.{f.json_name}: default {v!r}, but pbjson leaves it out in {package}.*")
        if sub and present and f.message_type.full_name not in WELL_KNOWN:
            v = obj[f.json_name]
            items = v if is_repeated(f) else [v]
            for i, item in enumerate(items):
                check_rules(f.message_type, item, f"{path}.{f.json_name}[{i}]" if is_repeated(f) else f"{path}.{f.json_name}", problems)


def same_instant(a, b, cls):
    try:
        x, y = cls(), cls()
        x.FromJsonString(a)
        y.FromJsonString(b)
        return x == y
    except Exception:
        return False


def compare(desc, orig, back, path, problems):
    """Every value of orig survives in back (the re-serialized message)."""
    for key, v in orig.items():
        f = desc.fields_by_camelcase_name.get(key) or desc.fields_by_name.get(key)
        if f is None:
            problems.append(f"{path}.{key}: no such field")
            continue
        if f.json_name not in back:
            if v in (None, "", 0, False, [], {}) or (f.enum_type is not None and default_json(f, v)):
                continue  # a default the re-serializer also treats as unset
            problems.append(f"{path}.{key}: lost ({v!r})")
            continue
        compare_value(f, v, back[f.json_name], f"{path}.{key}", problems)


def compare_value(f, v, w, path, problems):
    if is_map(f):
        if {str(k): str(x) for k, x in v.items()} != {str(k): str(x) for k, x in w.items()}:
            problems.append(f"{path}: map {v!r} became {w!r}")
        return
    if is_repeated(f):
        if len(v) != len(w):
            problems.append(f"{path}: {len(v)} items became {len(w)}")
            return
        for i, (a, b) in enumerate(zip(v, w)):
            compare_single(f, a, b, f"{path}[{i}]", problems)
        return
    compare_single(f, v, w, path, problems)


def compare_single(f, v, w, path, problems):
    mt = f.message_type
    if mt is not None:
        name = mt.full_name
        if name == "google.protobuf.Timestamp":
            if not same_instant(v, w, Timestamp):
                problems.append(f"{path}: time {v!r} became {w!r}")
        elif name == "google.protobuf.Duration":
            if not same_instant(v, w, Duration):
                problems.append(f"{path}: duration {v!r} became {w!r}")
        elif name == "google.protobuf.Struct":
            if not same_json(v, w):
                problems.append(f"{path}: object {v!r} became {w!r}")
        else:
            compare(mt, v, w, path, problems)
        return
    if f.type == FieldDescriptor.TYPE_BYTES:
        # Our base64 must be canonical (standard alphabet, padded): the re-encoding is equal.
        if v != w:
            problems.append(f"{path}: bytes {v!r} became {w!r}")
        return
    if f.type in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        if not math.isclose(float(v), float(w), rel_tol=1e-6, abs_tol=1e-6):
            problems.append(f"{path}: {v!r} became {w!r}")
        return
    if f.enum_type is not None:
        if v != w:
            problems.append(f"{path}: enum {v!r} became {w!r}")
        return
    if isinstance(v, str) or isinstance(w, str):
        if str(v) != str(w):
            problems.append(f"{path}: {v!r} became {w!r}")
        return
    if v != w:
        problems.append(f"{path}: {v!r} became {w!r}")


def same_json(a, b):
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-15)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_json(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same_json(x, y) for x, y in zip(a, b))
    return a == b


def to_dict(msg):
    try:
        return json_format.MessageToDict(msg, always_print_fields_with_no_presence=True)
    except TypeError:  # protobuf < 5.26
        return json_format.MessageToDict(msg, including_default_value_fields=True)


def check():
    passed = failed = 0
    for n, line in enumerate(sys.stdin, 1):
        if not line.strip():
            continue
        case = json.loads(line)
        typ, text = case["type"], case["json"]
        label = case.get("name", f"line {n}")
        msg = getattr(integration, typ)()
        problems = []
        try:
            json_format.Parse(text, msg, ignore_unknown_fields=False)
        except json_format.ParseError as e:
            problems.append(f"Parse: {e}")
        if not problems:
            orig = json.loads(text)
            if not case.get("input"):  # bodies consumers write need not follow pbjson's rules
                check_rules(msg.DESCRIPTOR, orig, typ, problems)
            compare(msg.DESCRIPTOR, orig, to_dict(msg), typ, problems)
        if problems:
            failed += 1
            print(f"FAIL {label} ({typ}):", file=sys.stderr)
            for p in problems:
                print(f"  {p}", file=sys.stderr)
        else:
            passed += 1
            print(f"ok {label} ({typ})")
    print(f"{passed} passed, {failed} failed")
    return 0 if failed == 0 and passed > 0 else 1


def commands():
    c = integration.DownlinkCommand(
        id="0193a5b2-0000-4000-8000-00000000abcd",
        dev_eui="70b3d57ed0000001",
        confirmed=True,
        f_port=10,
        data=bytes([0x01, 0xFB, 0xFF]),
    )
    print(json_format.MessageToJson(c, indent=None))
    print(json_format.MessageToJson(c, indent=None, preserving_proto_field_name=True))
    o = integration.DownlinkCommand(dev_eui="70B3D57ED0000001", f_port=2)
    o.object.update({"led": True, "level": 3})
    print(json_format.MessageToJson(o, indent=None))
    return 0


if __name__ == "__main__":
    mode = sys.argv[1] if len(sys.argv) > 1 else "check"
    sys.exit({"check": check, "commands": commands}[mode]())
