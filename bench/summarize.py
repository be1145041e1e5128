"""Render bench/results/*.json into the tables in bench/README.md (between the RESULTS markers): the
benchmarks' summaries, and the `tune study --versus` variants against the study they were compared with.

    python bench/summarize.py            # rewrite the tables in place
    python bench/summarize.py --print    # print it instead
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from tune.card import interval

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
README = HERE / "README.md"
BEGIN, END = "<!-- RESULTS:BEGIN -->", "<!-- RESULTS:END -->"
ORDER = ("train-pipeline", "hpo-throughput", "serve-load", "model-latency")


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _met(value: bool | None) -> str:
    return {True: "yes", False: "**no**", None: "n/a"}[value]


def _machine(result: dict[str, Any]) -> str:
    m = result.get("machine", {})
    device = m.get("gpu") or f"CPU ({m.get('cpu_count')} cores)"
    return f"{device}; {m.get('date', '?')[:16]}"


def _load(result: dict[str, Any]) -> str:
    load = result.get("load", {})
    if not load:
        return "?"
    return f"{load['loadavg_1m_min']}-{load['loadavg_1m_max']} (mean {load['loadavg_1m_mean']}) on {load['cpu_count']}"


def table(results: list[dict[str, Any]], others: list[str] | None = None) -> str:
    lines = [
        "| benchmark | figure | target | measured | met? | machine / device | load avg (1 min) | what limits it |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for result in results:
        for r in result.get("summary", []):
            if not isinstance(r, dict) or "metric" not in r:
                continue
            lines.append("| " + " | ".join(_cell(c) for c in (
                f"{result['benchmark']} ({result['_file']})", r["metric"], r["target"], r["measured"],
                _met(r["met"]), _machine(result), _load(result), r["limits"])) + " |")
    if len(lines) == 2:
        lines.append("| (no results yet: run the scripts) | | | | | | | |")
    if others:
        lines += ["", "Other result files here (another format, not in this table): " + ", ".join(others) + "."]
    return "\n".join(lines)


def _start(init: str) -> str:
    """Where a progressive study's folds started, without the machine's path (a study records it resolved):
    ``<study>'s fold models`` for a CV's ``<study>/cv/folds/fold{fold}``."""
    parts = Path(init).parts
    return f"{parts[-4]}'s fold models" if len(parts) >= 4 and parts[-3:-1] == ("cv", "folds") else Path(init).name


def _variant(config: dict[str, Any]) -> str:
    if "ensemble_of" in config:  # tune study --ensemble-of: each study's fold models, ensembled per fold
        return "ensemble: " + " + ".join(f"{Path(c['study']).name} ({_variant(c)})" for c in config["ensemble_of"])
    context = f", 2.5D k={config['context']} ({config['context_sequences']})" if config.get("context") else ""
    start = f", from {_start(config['init'])}" if config.get("init") else ""
    return f"{config['arch']} {config['filters']}, {config['image_size']} px, {config['epochs']} epochs{context}{start}"


def variants_table(folder: Path = RESULTS) -> str:
    """Each study record with a ``versus`` (tune study --versus) beside the record it was compared with."""
    studies = {p.name: json.loads(p.read_text()) for p in sorted(folder.glob("*study*.json"))}
    variants = {name: s for name, s in studies.items() if isinstance(s, dict) and s.get("versus")}
    if not variants:
        return ""
    lines = ["Study variants (`tune study --versus`), each against the study it names, on the same folds: dsc_volume "
             "per patient over the out-of-fold predictions of the CV pool, after the choices each study made on "
             "those same predictions (so not a split untouched by choices); 95% intervals by bootstrap over "
             "patients. A variant that does not win leaves the test split unread.", "",
             "| record | model | CV dsc_volume | against | difference (variant - other) | patients better / worse "
             "| verdict | test read |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, study in variants.items():
        versus = study["versus"]
        lines.append("| " + " | ".join(_cell(c) for c in (
            name, _variant(study["config"]), interval(study["cv"]["per_patient"]["volume"]),
            Path(versus["record"]).name, interval(versus, "+"), f"{versus['a_better']} / {versus['b_better']} of "
            f"{versus['patients']}", {"a": "variant wins", "b": "variant loses"}.get(versus["verdict"], "undecided"),
            "yes" if "test" in study else "no")) + " |")
    for other in sorted({Path(s["versus"]["record"]).name for s in variants.values()} & set(studies)):
        study = studies[other]
        lines.append("| " + " | ".join(_cell(c) for c in (
            other, _variant(study["config"]), interval(study["cv"]["per_patient"]["volume"]), "", "", "", "",
            "yes" if "test" in study else "no")) + " |")
    return "\n".join(lines)


def load_results(folder: Path = RESULTS) -> tuple[list[dict[str, Any]], list[str]]:
    """(results with a ``summary`` list, names of the other JSON files)."""
    out, others = [], []
    for path in sorted(folder.glob("*.json")):
        try:
            result = json.loads(path.read_text())
        except json.JSONDecodeError:
            others.append(path.name)
            continue
        if not isinstance(result, dict) or not isinstance(result.get("summary"), list):
            others.append(path.name)
            continue
        result["_file"] = path.name
        out.append(result)
    rank = {name: i for i, name in enumerate(ORDER)}
    return sorted(out, key=lambda r: (rank.get(r.get("benchmark"), len(ORDER)), r["_file"])), others


def tables(folder: Path = RESULTS) -> str:
    """The benchmarks' table, then the study variants' where there are any."""
    return "\n\n".join(t for t in (table(*load_results(folder)), variants_table(folder)) if t)


def render(readme: Path = README, folder: Path = RESULTS) -> str:
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        raise ValueError(f"{readme}: markers {BEGIN} / {END} missing")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{tables(folder)}\n{END}{tail}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--print", action="store_true", help="print the table instead of rewriting README.md")
    args = p.parse_args()
    if args.print:
        print(tables())
        return
    README.write_text(render())
    print(f"wrote {README}")


if __name__ == "__main__":
    main()
