"""Tests for fedtune.report.html.write_report on the hand-made run in conftest.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import fedtune.report.html as report_html
from fedtune.errors import FedtuneError
from fedtune.metrics import failure_line
from fedtune.report import write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
IMAGES = ("client_eval_loss.png", "global_loss.png", "bytes.png")


def test_write_report(run_dir: Path) -> None:
    page = write_report(run_dir)

    assert page == run_dir / "report" / "index.html"
    for name in IMAGES:
        assert (run_dir / "report" / name).read_bytes()[:8] == PNG_MAGIC
    text = page.read_text(encoding="utf-8")
    # before / after / change per client, from conftest's hand-made records
    assert '<td>client 0</td><td class="num">2.5000</td><td class="num">1.5000</td>' in text
    assert '<td class="num">-1.0000</td>' in text
    assert '<td>client 1</td><td class="num">3.0000</td><td class="num">2.2500</td>' in text
    assert '<td>client 2</td><td class="num">4.0000</td><td class="num">4.0000</td>' in text
    # totals: 20 + 2000 + 2000 up, 200 + 2000 + 2000 down
    assert "4,020 (3.9 KiB)" in text
    assert "4,200 (4.1 KiB)" in text
    # the config is shown escaped, images by relative path
    assert "name = &quot;tiny &lt;test&gt; &amp; co&quot;" in text
    for name in IMAGES:
        assert f'src="{name}"' in text
    assert str(run_dir) in text


def test_rewrite_replaces_and_leaves_no_staging(run_dir: Path) -> None:
    write_report(run_dir)
    (run_dir / "report" / "stale.txt").write_text("old", encoding="utf-8")

    write_report(run_dir)

    assert sorted(p.name for p in (run_dir / "report").iterdir()) == sorted([*IMAGES, "index.html"])
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.toml", "metrics.jsonl", "report"]


def test_failure_keeps_previous_report(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = write_report(run_dir).read_text(encoding="utf-8")

    def broken(*_: object) -> Path:
        raise RuntimeError("disk full")

    monkeypatch.setattr(report_html, "_PLOTS", (("x.png", broken, "x"),))
    with pytest.raises(RuntimeError, match="disk full"):
        write_report(run_dir)

    assert (run_dir / "report" / "index.html").read_text(encoding="utf-8") == before
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.toml", "metrics.jsonl", "report"]


def test_missing_config(run_dir: Path) -> None:
    (run_dir / "config.toml").unlink()
    with pytest.raises(FedtuneError, match=r"config\.toml: not found"):
        write_report(run_dir)


def test_bad_metrics_line(run_dir: Path) -> None:
    with (run_dir / "metrics.jsonl").open("a", encoding="utf-8") as f:
        f.write("{oops\n")
    with pytest.raises(FedtuneError, match=r"metrics\.jsonl:12: not valid JSON"):
        write_report(run_dir)
    assert not (run_dir / "report").exists()


def test_failures_are_tabled_when_there_are_any(run_dir: Path) -> None:
    assert "Client failures" not in write_report(run_dir).read_text(encoding="utf-8")
    with (run_dir / "metrics.jsonl").open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(failure_line(1, "train", 1002, 2, "error reply 8 (<died>)")) + "\n")
        fh.write(json.dumps(failure_line(0, "discovery", 1003, None, "no reply")) + "\n")
    text = write_report(run_dir).read_text(encoding="utf-8")
    assert "<h2>Client failures (2)</h2>" in text
    assert '<td class="num">2</td><td class="num">1002</td><td>error reply 8 (&lt;died&gt;)</td>' in text
    assert (
        '<td class="num"></td><td class="num">1003</td><td>no reply</td>' in text
    )  # discovery: no partition
