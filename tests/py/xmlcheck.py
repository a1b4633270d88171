#!/usr/bin/env python3
"""Reads lorastream's XML documents with Python's xml.etree.ElementTree (standard library only)
and compares each with the TTS JSON it was made from, through the inverse of the documented
mapping (docs/formats.md, src/streams/format/xml.rs):

  member "k": v      -> <k> (or <field name="k"> when k is not a plain XML name;
                        name_encoding="base64" when k has characters XML cannot carry)
  array "k": [a, b]  -> <k>a</k><k>b</k>; an array inside an array -> <k><item>..</item></k>
  null               -> xsi:nil="true"; "" and {} -> <k/>
  text               -> escaped, or base64 with encoding="base64"

stdin: JSON lines {"xml": "...", "json": "...", "root": "application_up"}.
Prints "N passed, M failed"; exit 0 only if all passed.
"""
import base64
import json
import sys
import xml.etree.ElementTree as ET

NIL = "{http://www.w3.org/2001/XMLSchema-instance}nil"


def text(s):
    return ("node", ()) if s == "" else ("text", s)


def node(kids):
    return ("node", tuple(sorted(kids, key=lambda kv: kv[0])))


def from_json(v):
    if v is None:
        return ("nil",)
    if v is True or v is False:
        return text("true" if v else "false")
    if isinstance(v, str):
        return text(v)
    if isinstance(v, dict):
        kids = []
        for k, x in v.items():
            push(kids, k, x)
        return node(kids)
    raise TypeError(v)


def push(kids, k, v):
    if isinstance(v, list):
        for it in v:
            if isinstance(it, list):
                inner = []
                push(inner, "item", it)
                kids.append((k, node(inner)))
            else:
                kids.append((k, from_json(it)))
    else:
        kids.append((k, from_json(v)))


def b64d(s):
    return base64.b64decode(s, validate=True).decode("utf-8")


def key_of(e):
    if e.tag == "field" and "name" in e.attrib:
        n = e.attrib["name"]
        return b64d(n) if e.attrib.get("name_encoding") == "base64" else n
    return e.tag


def from_xml(e):
    if e.attrib.get(NIL) == "true":
        return ("nil",)
    kids = list(e)
    if not kids:
        t = e.text or ""
        return text(b64d(t) if e.attrib.get("encoding") == "base64" else t)
    return node([(key_of(c), from_xml(c)) for c in kids])


def main():
    passed = failed = 0
    for n, line in enumerate(sys.stdin, 1):
        if not line.strip():
            continue
        case = json.loads(line)
        try:
            root = ET.fromstring(case["xml"].encode("utf-8"))
            # Numbers compared as the JSON text wrote them (the XML carries that text).
            want = from_json(json.loads(case["json"], parse_float=str, parse_int=str))
            assert root.tag == case["root"], f"root {root.tag!r}"
            got = from_xml(root)
            assert got == want, f"\n got: {got}\nwant: {want}"
            passed += 1
            print(f"ok case {n} <{root.tag}>")
        except Exception as e:  # report and go on
            failed += 1
            print(f"FAIL case {n}: {e}", file=sys.stderr)
    print(f"{passed} passed, {failed} failed")
    return 0 if failed == 0 and passed > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
