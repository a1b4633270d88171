#!/usr/bin/env python3
"""Parses CSV from stdin with Python's csv module (RFC 4180 dialect "excel") and prints the
rows as one JSON array, for tests/formats.rs."""
import csv
import io
import json
import sys

rows = list(csv.reader(io.StringIO(sys.stdin.read(), newline="")))
print(json.dumps(rows))
