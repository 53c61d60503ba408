"""Run a results table: every row is one ``d2r bench revisitop`` run, given as config overrides.

    python -m benchmarks.run TABLE [--rows ROW ...] [--data DIR] [--runs DIR] [--force] [--render-only]
    python -m benchmarks.run --list

``TABLE`` names ``benchmarks/tables/TABLE.yaml``::

    title: one line
    description: what the table measures (kept above the generated table)
    protocol: revisitop
    data: ../shared/data/instance_bench_dev      # default of --data; gnd.pkl and the images under it
    config: dev_rootsift_asmk_star.yaml          # base run config in benchmarks/configs/ (every row starts here)
    set: {features.options.max_features: 1000}   # overrides of every row (optional)
    baseline: base                               # rows are compared with this one (paired bootstrap, optional)
    baseline_stage: initial                      # the baseline's stage compared against (default: final)
    stages: true                                 # a line per stage of each run (default: the final stage only)
    rows:
      base: {set: {rerank.num_to_rerank: 0}}
      usac_aqe: {set: {rerank.method: usac, qe.method: aqe}, note: the shipped default}

A row may name its own ``config``. Rows share one feature/codebook cache (``RUNS/TABLE/cache``) and are resumable:
a row whose run folder holds ``metrics.json`` made by the same command is not run again (``--force`` reruns).
Outputs: ``benchmarks/results/TABLE.md`` (generated; hand-written text under a ``## Notes`` heading is kept) and
``benchmarks/results/TABLE.json`` (header with commit, command, machine and date; per row its overrides, exact
command, resolved config and metrics, and its comparison with the baseline).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

import yaml

from benchmarks._record import REPO, header, write_json
from d2r.eval.compare import compare_runs
from d2r.query.pipeline import STAGES

TABLES = REPO / "benchmarks" / "tables"
CONFIGS = REPO / "benchmarks" / "configs"
RESULTS = REPO / "benchmarks" / "results"
TABLE_KEYS = {"title", "description", "protocol", "data", "config", "set", "baseline", "baseline_stage", "stages",
              "rows"}
ROW_KEYS = {"config", "set", "note"}  # config_path: resolved by load_table
NOTES = "## Notes"


class TableError(ValueError):
    """A table file that does not describe runs (one line naming the file and the problem)."""


def load_table(name: str, tables: Path = TABLES) -> dict:
    path = tables / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in tables.glob("*.yaml"))
        raise TableError(f"{path}: no such table (known: {', '.join(known)})")
    table = yaml.safe_load(path.read_text()) or {}
    if not isinstance(table, dict):
        raise TableError(f"{path}: not a mapping")
    unknown = set(table) - TABLE_KEYS
    if unknown:
        raise TableError(f"{path}: unknown key(s) {sorted(unknown)}; known: {sorted(TABLE_KEYS)}")
    if table.get("protocol", "revisitop") != "revisitop":
        raise TableError(f"{path}: protocol {table['protocol']!r} is not supported (revisitop)")
    rows = table.get("rows")
    if not isinstance(rows, dict) or not rows:
        raise TableError(f"{path}: rows must be a non-empty mapping of row name -> overrides")
    for row, spec in rows.items():
        spec = rows[row] = spec or {}
        if not isinstance(spec, dict) or set(spec) - ROW_KEYS - {"config_path"}:
            raise TableError(f"{path}: row {row!r}: expected a mapping with keys {sorted(ROW_KEYS)}")
        config = spec.get("config", table.get("config"))
        if config is None or _config_path(config, tables) is None:
            raise TableError(f"{path}: row {row!r}: config {config!r} found neither beside the table nor in "
                             f"{CONFIGS}")
        spec["config_path"] = str(_config_path(config, tables))
    if table.get("baseline") is not None and table["baseline"] not in rows:
        raise TableError(f"{path}: baseline {table['baseline']!r} is not a row")
    table["name"] = name
    return table


def _config_path(name: str, tables: Path) -> Path | None:
    """A run config beside the table file, else in ``benchmarks/configs/``."""
    for folder in (tables, CONFIGS):
        if (folder / name).is_file():
            return folder / name
    return None


def _value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (dict, list)):
        return json.dumps(v)
    return str(v)


def row_command(table: dict, row: str, data: Path, runs: Path) -> list[str]:
    """The exact ``d2r bench revisitop`` command of one row."""
    spec = table["rows"][row]
    overrides = {**(table.get("set") or {}), **(spec.get("set") or {})}
    cmd = [sys.executable, "-m", "d2r", "bench", "revisitop", "--gnd", str(data / "gnd.pkl"),
           "--images-root", str(data), "--cache", str(runs / "cache"),
           "--config", spec["config_path"], "--out", str(runs / row),
           "--quiet", "--no-report"]
    for key, value in overrides.items():
        cmd += ["--set", f"{key}={_value(value)}"]
    return cmd


def run_rows(table: dict, rows: list[str], data: Path, runs: Path, force: bool) -> None:
    for row in rows:
        cmd = row_command(table, row, data, runs)
        out = runs / row
        done = out / "row.json"
        if not force and (out / "metrics.json").is_file() and done.is_file() \
                and json.loads(done.read_text()).get("command") == cmd[1:]:
            print(f"{row}: done before, kept ({out})", flush=True)
            continue
        print(f"{row}: {shlex.join(['python', *cmd[1:]])}", flush=True)
        result = subprocess.run(cmd, cwd=REPO)
        if result.returncode != 0:
            raise SystemExit(f"{row}: d2r bench exited {result.returncode}")
        write_json(done, {"command": cmd[1:]})


def _portable(argv: list[str]) -> str:
    """A recorded command as a user would type it from the repository root."""
    return shlex.join(["python", *(a.replace(str(REPO) + "/", "") for a in argv)])


def _method(config: dict) -> str:
    index, regions = config["index"], config["regions"]
    kernel = {"asmk_star": "ASMK*", "asmk": "ASMK", "vlad": "VLAD"}.get(index["kernel"], index["kernel"])
    if regions["proposer"] == "none":
        return f"{kernel} (whole image)"
    kind = f"R-{kernel}" if index["mode"] == "aggregation" else "regional search"
    return f"{kind} {Path(str(regions['proposer'])).name}" + ("" if regions.get("reextract", True) else " (assigned)")


def collect(table: dict, rows: list[str], runs: Path) -> list[dict]:
    """Per row: its overrides, command, resolved config, metrics and comparison with the baseline."""
    out = []
    base = table.get("baseline")
    for row in rows:
        run = runs / row
        metrics_file = run / "metrics.json"
        if not metrics_file.is_file():
            out.append({"row": row, "missing": str(metrics_file)})
            continue
        m = json.loads(metrics_file.read_text())
        entry = {"row": row, "note": table["rows"][row].get("note"),
                 "overrides": {**(table.get("set") or {}), **(table["rows"][row].get("set") or {})},
                 "command": _portable(json.loads((run / "row.json").read_text())["command"])
                 if (run / "row.json").is_file() else None,
                 "config": m.get("config"), "method": _method(m["config"]) if "config" in m else None,
                 "k": m.get("index", {}).get("codebook", {}).get("k"),
                 "medium": m["medium"]["mAP"], "hard": m["hard"]["mAP"],
                 "stages": {s: {p: m["stages"][s][p]["mAP"] for p in ("medium", "hard")}
                            for s in STAGES if s in m.get("stages", {})},  # in the query path's order
                 "pairs_reused": m.get("notes", {}).get("pairs_reused", 0),
                 "seconds_per_query": m.get("timing", {}).get("seconds_per_query"),
                 "items": m.get("index", {}).get("counts", {}).get("items")}
        if base is not None and (runs / base / "metrics.json").is_file():
            def compared(stage=None):
                c = compare_runs(runs / base, run, stage_a=table.get("baseline_stage"), stage_b=stage)
                return {p: {k: c[p][k] for k in ("diff", "ci_low", "ci_high", "wins", "losses", "ties")}
                        for p in ("medium", "hard")}

            if table.get("stages") and entry["stages"]:
                entry["compare_stages"] = {s: compared(s) for s in entry["stages"]}
                entry["compare"] = entry["compare_stages"][list(entry["stages"])[-1]]  # the final stage's
            else:
                entry["compare"] = compared()
        out.append(entry)
    return out


def _f(v, fmt="{:.2f}") -> str:
    return "–" if v is None else fmt.format(v)


def render(table: dict, entries: list[dict], head: dict, data: Path) -> str:
    base = table.get("baseline")
    lines = [f"# {table.get('title', table['name'])}", ""]
    if table.get("description"):
        lines += [table["description"].strip(), ""]
    lines += [f"Generated by `python -m benchmarks.run {table['name']}` (rows: `benchmarks/tables/{table['name']}.yaml`) "
              f"at commit `{head['commit']}`{' (with uncommitted changes)' if head['dirty'] else ''}, "
              f"{head['date']}, on {head['machine']['cpu']} × {head['machine']['cores']} cores "
              f"(load {head['machine']['load_average']}, GPU: {head['machine']['gpu'] or 'none'}); data `{data}`. "
              "mAP in percent, " + ("every stage of each run (the "
              "search: initial; after verification: verified; after query expansion: expanded)" if table.get("stages")
              else "final stage of each run") + ". Exact commands, resolved configs and per-stage figures: "
              f"`benchmarks/results/{table['name']}.json`.", ""]
    cmp_head = f" | Δ Medium vs {base} [95% CI] | Δ Hard vs {base} [95% CI]" if base else ""
    lines.append(f"| row | method | K | overrides | Medium | Hard{cmp_head} | s/query |")
    lines.append("|---|---|---:|---|---:|---:|" + ("---:|---:|" if base else "") + "---:|")
    for e in entries:
        if "missing" in e:
            lines.append(f"| {e['row']} | not run | | | | |" + (" | |" if base else "") + " |")
            continue
        over = ", ".join(f"`{k}={_value(v)}`" for k, v in (table["rows"][e["row"]].get("set") or {}).items()) or "–"
        shown = [(e["row"], e["medium"], e["hard"], e.get("compare"), e["seconds_per_query"])]
        if table.get("stages") and e["stages"]:
            final = list(e["stages"])[-1]
            shown = [(f"{e['row']} ({s})", v["medium"], v["hard"], (e.get("compare_stages") or {}).get(s),
                      e["seconds_per_query"] if s == final else None) for s, v in e["stages"].items()]
        for name, medium, hard, c, spq in shown:
            cost = _f(spq, '{:.3f}') + (" *" if spq is not None and e.get("pairs_reused") else "")
            cmp = ""
            if base:
                cmp = " | ".join(f"{c[p]['diff']:+.2f} [{c[p]['ci_low']:+.2f}, {c[p]['ci_high']:+.2f}]" if c else "–"
                                 for p in ("medium", "hard")) + " | "
            lines.append(f"| {name} | {e['method']} | {_f(e['k'], '{}')} | {over} | {_f(medium)} | "
                         f"{_f(hard)} | {cmp}{cost} |")
    if any(e.get("pairs_reused") for e in entries):
        lines += ["", "\\* verification counts partly read from the bench's pair cache (verified by an earlier run "
                  "with the same matching options): s/query leaves those pairs' cost out."]
    return "\n".join(lines) + "\n"


def write_results(table: dict, entries: list[dict], head: dict, data: Path, results: Path = RESULTS) -> Path:
    md = results / f"{table['name']}.md"
    notes = ""
    if md.is_file():
        text = md.read_text()
        if NOTES in text:
            notes = text[text.index(NOTES):]
    body = render(table, entries, head, data)
    md.write_text(body + ("\n" + notes if notes else ""))
    write_json(results / f"{table['name']}.json", {"header": head, "table": table["name"], "data": str(data),
                                                   "rows": entries})
    return md


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("table", nargs="?", help="table name (benchmarks/tables/NAME.yaml)")
    p.add_argument("--rows", nargs="+", metavar="ROW", help="run only these rows (default: all)")
    p.add_argument("--data", type=Path, help="dataset folder (default: the table's data)")
    p.add_argument("--runs", type=Path, default=REPO / "runs", help="run folders go to RUNS/TABLE/ (default runs/)")
    p.add_argument("--force", action="store_true", help="rerun rows already done")
    p.add_argument("--render-only", action="store_true", help="only rewrite the results from finished runs")
    p.add_argument("--list", action="store_true", help="list tables and rows")
    p.add_argument("--tables", type=Path, default=TABLES, help=argparse.SUPPRESS)
    p.add_argument("--results", type=Path, default=RESULTS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    try:
        if args.list or args.table is None:
            for path in sorted(args.tables.glob("*.yaml")):
                t = load_table(path.stem, args.tables)
                print(f"{path.stem}: {t.get('title', '')}\n  " + " ".join(t["rows"]))
            return 0
        table = load_table(args.table, args.tables)
        rows = args.rows or list(table["rows"])
        bad = [r for r in rows if r not in table["rows"]]
        if bad:
            raise TableError(f"{args.table}: unknown row(s) {bad}; known: {list(table['rows'])}")
        data = (args.data or (REPO / table.get("data", "../shared/data/instance_bench_dev"))).resolve()
        if not (data / "gnd.pkl").is_file():
            raise TableError(f"{data}: no gnd.pkl here (pass --data DIR)")
        runs = (args.runs / table["name"]).resolve()
        if not args.render_only:
            base = table.get("baseline")
            run_rows(table, ([base] if base and base not in rows else []) + rows, data, runs, args.force)
        entries = collect(table, list(table["rows"]), runs)
        md = write_results(table, entries, header(), data, args.results)
        print(f"wrote {md} and {md.with_suffix('.json')}")
    except TableError as exc:
        print(f"benchmarks.run: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
