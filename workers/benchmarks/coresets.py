"""Coresets against the full run: Q-MUL's retain pass over a coreset of the retain set, and the
approximate reference (QAT from scratch on a coreset of the retain set), per size and selector.

    python -m workers.benchmarks.coresets --dataset digits --model digits-cnn --seeds 0 1 2 \\
        --original-epochs 15 --unlearn-epochs 5 --out bench-results
    python -m workers.benchmarks.coresets --preset cpu-cifar10-memorising --seeds 0 --out /work/bench-mem

It reuses bench.py's stages: the data, forget set, original and retrain reference of a seed come
from (or go to) the same <out>/cache/ as bench.py's, keyed alike, so a coreset run shares them
with a benchmark run; each Q-MUL variant and approximate reference adds its own stage record.

Rows: "qmul" (the full retain set), "qmul c=<fraction> <selector>" for each size and selector
(the time includes the selection), and with --approximate-reference "approx c=<fraction>
<selector>": a reference trained with the retain reference's recipe on the coreset only, whose
AG is its distance to the full reference (how far an interim audit against it can be off). Its
selectors score the retain set with the original model; no Cascaded Layer Correction there: the
only full-precision teacher at hand is the original's float view, which has seen the forget set.

Writes <out>/<name>/coresets.md (the table), coresets.json and coresets.png (AG against time).
"""

import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from tqdm import tqdm

from workers.engine.coresets import SELECTORS, select_coreset
from workers.engine.methods import method_config, unlearn
from workers.engine.metrics import METRIC_KEYS
from workers.engine.training import accuracy, train_model

from . import bench

SIZES = (0.05, 0.1, 0.2, 0.3)


def coreset_row(kind: str, fraction: float, selector: str) -> str:
    return f"{kind} c={fraction:g} {selector}"


def qmul_row(config: bench.BenchConfig, context: bench.SeedContext, cache: Path, device: str, base: dict,
             overrides: dict, progress: bool) -> dict:
    """One Q-MUL run (or its stored record), as bench.run_seed runs a method."""
    method_cfg = method_config("qmul", {**bench.method_overrides(config, "qmul", context.seed), **overrides})
    key = bench.stage_key("method-qmul", config=method_cfg, **base)
    record = bench.read_json(cache / "stages" / f"{key}.json")
    if record is None:
        with bench.Measure(device) as measured:
            result = unlearn("qmul", context.original, context.forget, context.retain, method_cfg,
                             device=device, progress=progress)
        bench.save_model(result.model, cache / "models" / f"{key}.pt")
        record = bench.evaluate_stage(cache, key, result.model, context, device,
                                      {"method": "qmul", "config": method_cfg, **measured.result,
                                       "history": result.history, "model": f"cache/models/{key}.pt"},
                                      config.mia_draws)
    return record


def approximate_reference_row(config: bench.BenchConfig, context: bench.SeedContext, cache: Path, device: str,
                              base: dict, fraction: float, selector: str, progress: bool) -> dict:
    """The retrain reference's recipe on a coreset of the retain set (selection included in the time)."""
    spec = config.spec(context.seed, config.retrain_epochs or config.original_epochs)
    key = bench.stage_key("approx-reference", fraction=fraction, selector=selector, spec=spec.to_dict(), **base)
    record = bench.read_json(cache / "stages" / f"{key}.json")
    if record is None:
        with bench.Measure(device) as measured:
            index = select_coreset(context.original, context.retain, fraction, selector, context.seed, device)
            model = train_model(spec.build(), context.retain.subset(index), spec.train, device,
                                      progress, desc=f"approx {fraction:g} {selector}")
        bench.save_model(model, cache / "models" / f"{key}.pt")
        record = bench.evaluate_stage(cache, key, model, context, device,
                                      {"fraction": fraction, "selector": selector, "samples": len(index),
                                       **measured.result, "model": f"cache/models/{key}.pt"}, config.mia_draws)
    return record


def bootstrap_rows(config: bench.BenchConfig, context: bench.SeedContext, cache: Path, device: str,
                   sizes, selectors, progress: bool) -> dict[str, dict]:
    """QuaRC's own use: QAT of the quantized model started from a float model's weights, on a coreset
    of the whole train split, with and without Cascaded Layer Correction against that float model,
    and on the whole split; the original (QAT from scratch on the whole split) is what they
    replace. The float model is trained once with the original's recipe; its time is not counted
    (a deployment that bootstraps has it already)."""
    spec = config.spec(context.seed, config.original_epochs)
    fp_spec = replace(spec, weight_bits=None, act_bits=None, first_last_bits=None)
    fp_key = bench.stage_key("fp-original", data=context.keys["data"], spec=fp_spec.to_dict())
    fp, _ = bench.trained_model(cache, fp_key, fp_spec, context.train, device, progress, "fp original",
                                lambda model: {})
    rows = {}
    variants = [(1.0, "random", False)] + [(f, s, clc) for f in sizes for s in selectors for clc in (False, True)]
    for fraction, selector, clc in variants:
        name = "bootstrap full" if fraction == 1.0 else coreset_row("bootstrap", fraction, selector) + (
            " +CLC" if clc else "")
        key = bench.stage_key("bootstrap", fp=fp_key, fraction=fraction, selector=selector, clc=clc,
                              spec=spec.to_dict())
        record = bench.read_json(cache / "stages" / f"{key}.json")
        if record is None:
            with bench.Measure(device) as measured:
                model = spec.build().to(device)
                # The float weights and BatchNorm statistics; the quantizers start from them.
                model.load_state_dict(fp.state_dict(), strict=False)
                index = (torch.arange(len(context.train)) if fraction == 1.0 else
                         select_coreset(model, context.train, fraction, selector, context.seed, device, float_model=fp))
                train_model(model, context.train.subset(index), spec.train, device, progress, desc=name,
                            teacher=fp if clc else None)
            record = {"key": key, **measured.result, "samples": len(index),
                      "test_accuracy": accuracy(model, context.test, device)}
            bench.write_json(cache / "stages" / f"{key}.json", record)
        rows[name] = record
    return rows


def ag_between(a: dict, b: dict) -> float:
    return sum(abs(a["metrics"][k] - b["metrics"][k]) for k in METRIC_KEYS) / len(METRIC_KEYS)


def run(config: bench.BenchConfig, out: Path, sizes, selectors, approximate: bool, bootstrap: bool = False,
        progress: bool = True, command: str = "") -> dict:
    device = config.resolved_device()
    if config.threads:
        torch.set_num_threads(config.threads)
    config.name = config.name or config.preset or bench.stage_key("custom", config=config)
    cache, run_dir = out / "cache", out / config.name
    started = time.perf_counter()
    qmul_rows = ["qmul"] + [coreset_row("qmul", f, s) for f in sizes for s in selectors]
    approx_rows = [coreset_row("approx", f, s) for f in sizes for s in selectors] if approximate else []
    per_seed, audit_error, bootstrap_seed = {}, {}, {}
    for seed in tqdm(config.seeds, desc="seeds", disable=not progress):
        context = bench.prepare_seed(config, seed, cache, device, progress)
        rows = bench.run_seed(replace_methods(config), context, cache, device, progress)  # retrain, original
        base = {"original": context.keys["original"], "retrain": context.keys["retrain"],
                "mia": {"draws": config.mia_draws, "class_balanced": True}}
        rows["qmul"] = qmul_row(config, context, cache, device, base, {}, progress)
        for fraction in sizes:
            for selector in selectors:
                rows[coreset_row("qmul", fraction, selector)] = qmul_row(
                    config, context, cache, device, base,
                    {"retain_coreset": fraction, "coreset_selector": selector}, progress)
                if approximate:
                    rows[coreset_row("approx", fraction, selector)] = approximate_reference_row(
                        config, context, cache, device, base, fraction, selector, progress)
        # How far an audit against each approximate reference puts full Q-MUL's AG from its true one.
        audit_error[seed] = {row: ag_between(rows["qmul"], rows[row]) - ag_between(rows["qmul"], rows["retrain"])
                             for row in approx_rows}
        per_seed[seed] = rows
        if bootstrap:
            bootstrap_seed[seed] = {"original": context.original_record,
                                    **bootstrap_rows(config, context, cache, device, sizes, selectors, progress)}
        del context
    names = ["retrain", "original"] + qmul_rows + approx_rows
    table = bench.aggregate({s: {r: per_seed[s][r] for r in names} for s in per_seed}, names)
    first = per_seed[config.seeds[0]]
    for row in qmul_rows:
        table[row]["retain_samples"] = first[row]["history"][0].get("retain_samples", "")
    wall = time.perf_counter() - started
    report = markdown(config, table, qmul_rows, approx_rows, audit_error, command, wall, device)
    if bootstrap:
        report += bootstrap_markdown(bootstrap_seed)
    plot(table, sizes, selectors, run_dir / "coresets.png",
         f"{config.name}: Q-MUL's retain pass over a coreset, seeds {config.seeds}")
    results = {"config": config, "device": device, "wall_time_s": wall, "command": command, "table": table,
               "audit_error": audit_error, "bootstrap": bootstrap_seed,
               "per_seed": {s: {r: {k: v for k, v in rec.items() if k not in ("history", "forget_scores")}
                                for r, rec in per_seed[s].items()} for s in per_seed}}
    bench.write_json(run_dir / "coresets.json", results)
    (run_dir / "coresets.md").write_text(report)
    return results


def replace_methods(config: bench.BenchConfig) -> bench.BenchConfig:
    """config with no method: bench.run_seed then scores only Retrain and the original."""
    return replace(config, methods=[])


def cell(pair: tuple[float, float]) -> str:
    return "" if pair[0] != pair[0] else f"{pair[0]:.2f} ± {pair[1]:.2f}"  # NaN: not measured (the original's evaluation)


def markdown(config, table, qmul_rows, approx_rows, audit_error, command, wall, device) -> str:
    full_time = table["qmul"]["time_s"][0]
    full_ag = table["qmul"]["AG_per_seed"][0]
    lines = [f"# Coresets: {config.name}", "", f"`{command}`", "",
             f"{config.dataset} {config.dataset_options}, {config.model} {config.quantizer} "
             f"W{config.weight_bits}A{config.act_bits}, {config.forget_label()}, seeds {config.seeds}, "
             f"device {device}, threads {config.threads}; wall {wall:.0f} s.", "",
             "AG/seed: AG against each seed's Retrain, mean ± std over seeds. Time: seconds of the run "
             "(selection included), mean ± std. ΔAG and time ratio against the full run's means.", "",
             "| row | retain samples | time (s) | time / full | AG/seed | ΔAG | FA | RA | TA | MIA |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in ["retrain", "original"] + qmul_rows:
        t = table[row]
        samples = ""
        if row.startswith("qmul"):
            samples = str(t.get("retain_samples", ""))
        ratio = f"{t['time_s'][0] / full_time:.2f}" if row.startswith("qmul") else ""
        delta = f"{t['AG_per_seed'][0] - full_ag:+.2f}" if row.startswith("qmul") else ""
        metrics = " | ".join(f"{table[row]['cells'][k][0]:.2f}" for k in METRIC_KEYS)
        lines.append(f"| {row} | {samples} | {cell(t['time_s'])} | {ratio} | {cell(t['AG_per_seed'])} | {delta} "
                     f"| {metrics} |")
    if approx_rows:
        ref_time = table["retrain"]["time_s"][0]
        lines += ["", "Approximate references: AG is the distance to the full reference (per seed, mean ± std); "
                  "audit error: full Q-MUL's AG measured against it minus its AG against the full reference.", "",
                  "| row | time (s) | time / full reference | AG to full reference | audit error on Q-MUL's AG |",
                  "|---|---|---|---|---|"]
        for row in approx_rows:
            t = table[row]
            errors = [audit_error[s][row] for s in audit_error]
            lines.append(f"| {row} | {cell(t['time_s'])} | {t['time_s'][0] / ref_time:.2f} | "
                         f"{cell(t['AG_per_seed'])} | {cell(bench.mean_std(errors))} |")
    return "\n".join(lines) + "\n"


def bootstrap_markdown(per_seed: dict) -> str:
    rows = list(next(iter(per_seed.values())))
    original_time = bench.mean_std([per_seed[s]["original"]["time_s"] for s in per_seed])[0]
    original_acc = bench.mean_std([per_seed[s]["original"]["test_accuracy"] for s in per_seed])[0]
    lines = ["", "Bootstrap QAT from a float model (mean ± std over seeds; \"original\": QAT from scratch on the "
             "whole train split; the float model's own training not counted):", "",
             "| row | samples | time (s) | time / original | test accuracy | Δ to original |", "|---|---|---|---|---|---|"]
    for row in rows:
        time_s = bench.mean_std([per_seed[s][row]["time_s"] for s in per_seed])
        acc = bench.mean_std([per_seed[s][row]["test_accuracy"] for s in per_seed])
        samples = per_seed[next(iter(per_seed))][row].get("samples", "")
        lines.append(f"| {row} | {samples} | {cell(time_s)} | {time_s[0] / original_time:.2f} | {cell(acc)} | "
                     f"{acc[0] - original_acc:+.2f} |")
    return "\n".join(lines) + "\n"


def plot(table: dict, sizes, selectors, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    full = table["qmul"]
    ax.errorbar(full["time_s"][0], full["AG_per_seed"][0], yerr=full["AG_per_seed"][1], fmt="k*", markersize=12,
                capsize=3, label="full retain set")
    for selector in selectors:
        cells = [table[coreset_row("qmul", f, selector)] for f in sizes]
        ax.errorbar([c["time_s"][0] for c in cells], [c["AG_per_seed"][0] for c in cells],
                    yerr=[[min(c["AG_per_seed"]) for c in cells], [c["AG_per_seed"][1] for c in cells]],
                    marker="o", capsize=3, label=selector)  # AG >= 0: the lower whisker stops at zero
        for fraction, c in zip(sizes, cells):
            ax.annotate(f"{fraction:g}", (c["time_s"][0], c["AG_per_seed"][0]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("Q-MUL wall time (s)")
    ax.set_ylabel("AG to Retrain (points, mean ± std over seeds)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = bench.build_parser()
    parser.prog = "python -m workers.benchmarks.coresets"
    parser.add_argument("--sizes", nargs="+", type=float, default=list(SIZES), help="coreset fractions")
    parser.add_argument("--selectors", nargs="+", choices=SELECTORS, default=list(SELECTORS))
    parser.add_argument("--approximate-reference", action="store_true",
                        help="also train the approximate reference on each coreset")
    parser.add_argument("--bootstrap", action="store_true",
                        help="also bootstrap QAT from a float model on each coreset, with and without CLC")
    args = parser.parse_args(argv)
    config = bench.config_from_args(args)
    command = "python -m workers.benchmarks.coresets " + " ".join(argv)
    run(config, Path(args.out), args.sizes, args.selectors, args.approximate_reference, args.bootstrap,
        progress=not args.no_progress, command=command)
    run_dir = Path(args.out) / config.name
    print((run_dir / "coresets.md").read_text())
    print(f"wrote {run_dir / 'coresets.md'}, {run_dir / 'coresets.json'}, {run_dir / 'coresets.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
