"""The one table writer, the CSV and JSON writers, and settings as JSON."""

from __future__ import annotations

import csv
import json

from retrieval_attn import RetrievalConfig
from retrieval_attn.evaluation.decode_bench import BenchSettings
from retrieval_attn.evaluation.report import format_columns, settings_dict, write_csv, write_json


def test_format_columns_with_and_without_header():
    rows = [["roar", 0.5], ["flat", 12]]
    assert format_columns(["backend", "R"], rows).splitlines() == [
        "backend    R", "-------  ---", "roar     0.5", "flat      12",
    ]
    assert format_columns(None, [("prompt tokens", 2217), ("index", "auto -> flat")]).splitlines() == [
        "prompt tokens          2217", "index          auto -> flat",
    ]


def test_writers_and_settings_round_trip(tmp_path):
    settings = BenchSettings(shape="tiny", retrieval=RetrievalConfig(index="roar", index_params={"ef": 200}))
    path = write_json(tmp_path / "out" / "settings.json", settings_dict(settings))
    data = json.loads(path.read_text())
    assert data["shape"] == "tiny" and data["contexts"] == list(settings.contexts)
    assert data["retrieval"]["index_params"] == {"ef": 200} and data["retrieval"]["gpu_memory_gib"] is None
    path = write_csv(tmp_path / "rows.csv", [{"a": 1, "b": 2}, {"a": 3, "c": 4}], columns=["a", "b"])
    with open(path) as f:
        assert list(csv.DictReader(f)) == [{"a": "1", "b": "2"}, {"a": "3", "b": ""}]
