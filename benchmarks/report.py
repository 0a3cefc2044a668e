"""The benchmark's metrics, collected per implementation, and the one table that prints them.

Nothing here knows a scenario or a metric by name: a row is a metric, whatever its name, unit and
better direction; a cell is the median of an implementation's values, with their range and notes;
a ratio column divides another implementation's median by ours.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from benchmarks.protocol import BETTER

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

    from benchmarks.protocol import Record

NOT_APPLICABLE = "n/a"


@dataclass
class Metric:
    """One row of the table: a measured quantity, with the values of each implementation.

    ``missing`` says why an implementation has no values (``n/a``, ``error: ...``); ``at_least``
    holds the bound of a measurement that was cut off there (a capped failure scenario), which a
    ratio can still use.
    """

    name: str
    unit: str
    better: str
    scenario: str = ""
    values: dict[str, list[float]] = field(default_factory=dict)
    notes: dict[str, list[str]] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)
    at_least: dict[str, float] = field(default_factory=dict)

    def median(self, impl: str) -> float | None:
        """Median of an implementation's values, if it has any."""
        values = self.values.get(impl)
        return statistics.median(values) if values else None

    def add(self, impl: str, values: Iterable[float], notes: Iterable[str] = ()) -> None:
        """Append measurements of ``impl`` (from one more process, say)."""
        self.values.setdefault(impl, []).extend(values)
        self.notes.setdefault(impl, []).extend(notes)


def collect(
    metrics: dict[str, Metric], impl: str, records: Iterable[Record], scenario: str = ""
) -> None:
    """Add metric records (as scenario processes report them) of ``impl`` to ``metrics``, by name.

    Raises:
        ValueError: a record's unit or direction contradicts what another one said of its metric.
    """
    for record in records:
        name, unit, better = record["name"], record["unit"], record["better"]
        if better not in BETTER:
            msg = f"metric {name!r} of {impl}: better must be one of {BETTER}, not {better!r}"
            raise ValueError(msg)
        known = metrics.setdefault(name, Metric(name, unit, better, scenario))
        if (known.unit, known.better) != (unit, better):
            msg = (
                f"metric {name!r} of {impl} is in {unit} ({better} is better), but was in "
                f"{known.unit} ({known.better} is better) before"
            )
            raise ValueError(msg)
        known.add(impl, record["values"], record.get("notes", []))


def ratio(name: str, numerator: Metric, denominator: Metric, better: str) -> Metric:
    """A metric of its own: per implementation, the median of ``numerator`` over ``denominator``."""
    derived = Metric(name, "x", better, numerator.scenario)
    for impl in numerator.values:
        top, bottom = numerator.median(impl), denominator.median(impl)
        if top is not None and bottom:
            derived.add(impl, [top / bottom])
    return derived


# --- formatting ---------------------------------------------------------------------------------


def fmt_ratio_value(value: float) -> str:
    """A ratio with two decimals, or none from 100 on."""
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.2f}"


def scaled(value: float, unit: str) -> tuple[str, str]:
    """Number and unit to show: seconds below one in ms, large numbers in thousands (``k``)."""
    if unit == "s" and abs(value) < 1:
        return f"{value * 1e3:.3g}", "ms"
    if unit == "x":
        return fmt_ratio_value(value), unit
    if unit == "MiB":
        return f"{value:.0f}", unit
    if abs(value) >= 1e4:
        return f"{value / 1e3:.3g}k", unit
    if value.is_integer():
        return f"{value:.0f}", unit
    return f"{value:.3g}", unit


def joined(number: str, unit: str) -> str:
    """``1.5x``, ``12 ms``: a ratio's ``x`` sticks to its number."""
    return f"{number}{unit}" if unit == "x" else f"{number} {unit}".rstrip()


def fmt_values(values: list[float], unit: str) -> str:
    """Median (min-max) of some values; the unit is said once where both ends share it."""
    median = joined(*scaled(statistics.median(values), unit))
    if len(values) == 1:
        return median
    (low, low_unit), (high, high_unit) = scaled(min(values), unit), scaled(max(values), unit)
    low_text = low if low_unit == high_unit else joined(low, low_unit)
    return f"{median} ({low_text}-{joined(high, high_unit)})"


def distinct(items: Iterable[str]) -> list[str]:
    """``items`` without repeats, in order."""
    return list(dict.fromkeys(items))


def cell(metric: Metric, impl: str) -> str:
    """Text of one implementation's cell: its values, or why there are none; then its notes."""
    values = metric.values.get(impl)
    text = fmt_values(values, metric.unit) if values else metric.missing.get(impl, NOT_APPLICABLE)
    notes = distinct(metric.notes.get(impl, []))
    return f"{text} [{'/'.join(notes)}]" if notes else text


def ratio_cell(metric: Metric, impl: str, base: str) -> str:
    """Median of ``impl`` over that of ``base``; ``> r`` where ``impl`` was cut off; else empty."""
    bottom = metric.median(base)
    if not bottom:
        return ""
    top = metric.median(impl)
    if top is not None:
        return fmt_ratio_value(top / bottom)
    if impl in metric.at_least:
        return f"> {fmt_ratio_value(metric.at_least[impl] / bottom)}"
    return ""


def label(metric: Metric) -> str:
    """First column: the metric's name, unit and better direction."""
    if not metric.unit:
        return metric.name
    return f"{metric.name} [{metric.unit}, {metric.better} is better]"


def shown(metric: Metric, impls: Iterable[str]) -> bool:
    """Whether a row says anything: some implementation has values, or a reason other than n/a."""
    return any(
        metric.values.get(k) or metric.missing.get(k, NOT_APPLICABLE) != NOT_APPLICABLE
        for k in impls
    )


def table(metrics: Iterable[Metric], titles: Mapping[str, str], base: str) -> list[list[str]]:
    """Header and rows of the table: one row per metric that says anything.

    Columns: the metric, one per implementation (``titles``, in order), then, where ``base`` is
    among them, one ratio over ``base`` per other implementation.
    """
    impls = list(titles)
    others = [k for k in impls if k != base] if base in impls else []
    header = ["metric", *titles.values(), *(f"{titles[k]}/{titles[base]}" for k in others)]
    rows = [header]
    for metric in metrics:
        if shown(metric, impls):
            row = [label(metric), *(cell(metric, k) for k in impls)]
            rows.append(row + [ratio_cell(metric, k, base) for k in others])
    return rows


def render(rows: list[list[str]]) -> str:
    """Rows as an aligned text table, a rule below the header."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)
