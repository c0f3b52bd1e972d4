"""Results of `python -m pdserve.bench.gpu`: one row per measurement with a pdserve, a floor
and a transformers column, speed ratios, the JSON (rewritten after every
measurement) and the printed / markdown table."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable

ROWS = {  # key: (number, metric, higher is better)
    "decode_b1": (1, "tokens/s", True),
    "decode_batch": (2, "tokens/s", True),
    "prefill": (3, "ms", False),
    "throughput": (4, "out tok/s", True),
    "pack_unpack": (5, "GB/s", True),
}


class Report:
    """Holds the results; rewrites the JSON after every measurement so a run cut short
    still leaves everything measured so far."""

    def __init__(self, result: dict, json_path: str | None, rows: dict | None = None) -> None:
        self.result, self.json_path = result, json_path
        self.rows = ROWS if rows is None else rows  # key: (number, metric, higher is better)

    def row(self, key: str) -> dict:
        number, metric, higher = self.rows[key]
        return self.result["rows"].setdefault(
            key, {"row": number, "metric": metric, "higher_is_better": higher}
        )

    def record(self, key: str, side: str, measure: Callable[[], dict]) -> None:
        """Run one measurement; a failure is recorded under `errors`, never fatal."""
        started = time.perf_counter()
        try:
            data = measure()
        except Exception as error:  # noqa: BLE001 - keep the rest of a long GPU run
            self.result["errors"][f"{key}/{side}"] = f"{type(error).__name__}: {error}"
            print(f"  {key} {side}: FAILED {type(error).__name__}: {error}", flush=True)
            self.write()
            return
        row = self.row(key)
        row[side] = data
        value = data.get("value", data.get("tokens_per_s", data.get("ms", data.get("output_tokens_per_s"))))
        row[f"{side}_value"] = value
        if side == "pdserve":
            row["floor"] = data.get("floor")
        self._ratios(row)
        note = ""
        if side == "pdserve" and row.get("vs_floor"):
            note = f" (floor {row['floor']:.4g}: {row['vs_floor']:.3g} of it)"
        elif side == "transformers" and row.get("vs_transformers"):
            note = f" (pdserve {row['vs_transformers']:.3g}x as fast)"
        print(
            f"  {key} {side}: {value:.4g} {row['metric']}{note} [{time.perf_counter() - started:.1f}s]",
            flush=True,
        )
        self.write()

    @staticmethod
    def _ratios(row: dict) -> None:
        def speed_ratio(ours: float | None, other: float | None) -> float | None:
            if not ours or not other:
                return None
            return ours / other if row["higher_is_better"] else other / ours

        row["vs_floor"] = speed_ratio(row.get("pdserve_value"), row.get("floor"))
        row["vs_transformers"] = speed_ratio(row.get("pdserve_value"), row.get("transformers_value"))

    def write(self) -> None:
        if not self.json_path:
            return
        partial = self.json_path + ".partial"
        with open(partial, "w") as file:
            json.dump(self.result, file, indent=1)
        os.replace(partial, self.json_path)

    def table(self, titles: dict[str, str], markdown: bool = False) -> str:
        header = ["#", "row", "metric", "pdserve", "floor", "vs floor", "transformers", "vs transformers"]

        def fmt(value: float | None, ratio: bool = False) -> str:
            return "-" if value is None else (f"{value:.3g}x" if ratio else f"{value:.4g}")

        lines = []
        for key, row in sorted(self.result["rows"].items(), key=lambda item: item[1]["row"]):
            lines.append(
                [
                    str(row["row"]),
                    titles[key],
                    row["metric"],
                    fmt(row.get("pdserve_value")),
                    fmt(row.get("floor")),
                    fmt(row.get("vs_floor"), True),
                    fmt(row.get("transformers_value")),
                    fmt(row.get("vs_transformers"), True),
                ]
            )
        if markdown:
            out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            return "\n".join(out + ["| " + " | ".join(line) + " |" for line in lines]) + "\n"
        widths = [max(len(cell) for cell in column) for column in zip(header, *lines, strict=True)]
        return "\n".join(
            "  ".join(
                cell.ljust(w) if i < 3 else cell.rjust(w)
                for i, (cell, w) in enumerate(zip(line, widths, strict=True))
            )
            for line in [header] + lines
        )


def parse_only(text: str | None, rows: dict | None = None) -> list[str]:
    rows = ROWS if rows is None else rows
    if not text:
        return list(rows)
    by_number = {str(number): key for key, (number, _, _) in rows.items()}
    chosen = []
    for token in (t.strip() for t in text.split(",") if t.strip()):
        key = by_number.get(token, token)
        if key not in rows:
            numbers = sorted(number for number, _, _ in rows.values())
            raise SystemExit(
                f"--only: unknown row {token!r}; give numbers {numbers[0]}-{numbers[-1]} "
                f"or names {', '.join(rows)}"
            )
        chosen.append(key)
    return chosen
