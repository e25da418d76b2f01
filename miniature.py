"""
The method in miniature: every method of the paper on the synthetic task, on a CPU, over seeds.

    python miniature.py --out out/miniature      # experiments/miniature.py: 3 seeds, ~15-20 min, 2 CPU cores
    python miniature.py --scale tiny --seeds 0   # the same at a smoke-test size (seconds)
    python miniature.py --config experiments/study.py   # "When does CPO help?" (README), its own settings

Per seed: the reference (MLE from scratch), its AN cache and DPO rejected answers; then from the reference,
all for the same steps and batch: MLE continued, CPO with each negative type with and without ranking, DPO
and PSS; then the weight-space ensembles of MLE continued with the best CPO variant. Every model is scored
on the same held-out prompts: by greedy decoding, the exact metrics of data.score_synthetic and MAUVE; by one
top-k 50 sample per prompt, the exact metrics again (sampled_*).

Layout under --out: seed<S>/<stage>/ (train.py's run folder; final/ the model, scores.json its held-out
scores, log.txt its output, metrics.jsonl its logged diagnostics), seed<S>/an/ (the AN cache),
seed<S>/dpo_rejected.jsonl, seed<S>/alpha/alpha_<a>/ (the ensembles, their scores in
seed<S>/alpha/scores_<run>@<a>.json); results.md (the scores, then what each contrastive run did to its
model), alpha.md and alpha.svg, logp_truth.svg and logp_negatives.svg (the logged mean log pi_theta against
the step), results.json (every run's scores, logged curve and changed share). A run with a final/ is not
trained again and a model with scores.json is not scored again, so a rerun after an interruption continues
where it stopped.

An experiment with exposure=True (experiments/h4_*.py) also measures exposure bias (exposure.py) on the same
prompts and greedy answers: per model in exposure.json beside its scores.json (the ensembles':
seed<S>/alpha/exposure_<run>@<a>.json); in results.md its table by answer position and the paired per-seed
comparison with MLE continued; exposure.svg and exposure_gap.svg. A model scored before the measure existed
is decoded again for it alone, so a rerun adds it to a finished experiment without training anything.
"""
import argparse
import contextlib
import functools
import json
import multiprocessing
import os
import runpy
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import replace

import numpy as np
import torch

import data
import decoding
import evaluate
import exposure
import hf
import mauve
import negatives
import tokenizer
import train
from charts import svg_chart
from common import log, write_atomic, write_jsonl_atomic

METRICS = ("exact_match", "correct_stop", "token_accuracy", "mauve", "sampled_exact_match")
SAMPLED = dict(decoding.GREEDY, temperature=1.0, top_k=50)  # the paper's decoding for generation: top-k 50


def miniature_settings(path, scale):
    """experiments/miniature.py -> (base config, {stage: overrides}, experiment settings), --scale applied."""
    base, stages = train.load_preset(path, experiment=True)
    ns = runpy.run_path(path)
    experiment = dict(ns["experiment"])
    if scale == "tiny":
        tiny = ns["tiny"]
        base = {**base, **tiny["config"]}
        stages = {name: {**o, **(tiny["ref"] if name == "ref" else tiny["continued"])}
                  for name, o in stages.items()}
        experiment.update(tiny["experiment"])
    return base, stages, experiment


# ------------------------------------------------------------------- one run: train or ensemble, then score
def miniature_examples(base, seed, n_eval, split="test"):
    """The held-out prompts every model of a seed is scored on: the first n_eval of the split (test; or val,
    for choosing settings without looking at the test prompts)."""
    return data.load_task(base["task"], split, tokenizer.byte_tokenizer(), base["max_len"], n=n_eval,
                          seed=seed)


def miniature_score(model_dir, ref_dir, examples, out_path, task="synthetic", seed=0, exposure_path=None):
    """Greedy decoding on the held-out prompts -> the exact metrics (data.score_synthetic) and MAUVE between
    the generated and the ground-truth continuations, featurized (prompt + continuation, the last token's
    final hidden state) by the seed's reference model: the cheap stand-in for gpt2-large's features. And
    the exact metrics of one top-k 50 sample per prompt (sampled_*: what greedy decoding may hide).
    exposure_path: also exposure.exposure_bias on the same greedy answers. out_path and exposure_path (beside
    the model, never inside it: interpolate copies a model folder's files) cache each result, so a model
    scored before the measure existed is only decoded again for it. -> (scores, measure or None)."""
    scores, measure = read_cached(out_path), read_cached(exposure_path)
    if scores is not None and (not exposure_path or measure is not None):
        return scores, measure
    net, tok = hf.load(model_dir)
    net.eval()
    n_new, truths = data.synthetic_max_new_tokens(task), [e.continuation_ids for e in examples]
    gens = decoding.greedy_continuations(net, tok, examples, n_new, batch_size=64)
    if exposure_path and measure is None:
        measure = exposure.exposure_bias(net, tok, examples, gens)
        write_atomic(exposure_path, json.dumps(measure))
    if scores is None:
        scores = data.score_synthetic(gens, truths, tok.eos_id)
        # the same draws for every model of a seed
        generator = negatives.make_generator(seed, "miniature-sampled")
        sampled = [g for s in range(0, len(examples), 64) for g in decoding.generate_batch(
            net, tok, [e.prompt_ids for e in examples[s:s + 64]], n_new, SAMPLED, generator)]
        sampled_scores = data.score_synthetic(sampled, truths, tok.eos_id)
        scores.update({f"sampled_{k}": v for k, v in sampled_scores.items()})
        texts = [e.prompt + decoding.new_text(tok, g) for e, g in zip(examples, gens)]
        texts += [e.prompt + e.response for e in examples]
        feats = evaluate.featurize(texts, ref_dir, batch_size=128)
        scores["mauve"] = mauve.compute_mauve(feats[:len(examples)], feats[len(examples):])
        write_atomic(out_path, json.dumps(scores))
    return scores, measure


def read_cached(path):
    """A cached JSON result, or None when there is none (or no path)."""
    if not path or not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def write_seed_inputs(final, seed_dir, seed, base, stages, experiment):
    """The seed's shared inputs of the AN and DPO runs, for their training examples: the AN caches sampled
    from the reference model `final` (seed<S>/an/ at temperature 1, and one folder per entry of
    experiment["an_temperatures"]), and data.synthetic_rejected's wrong answer per example."""
    n = next(o for k, o in stages.items() if k != "ref")["n_train"]
    spec = next((o["negatives"] for o in stages.values() if o.get("negatives", "").startswith("an:")), None)
    for name, temperature in {"an": 1.0, **experiment.get("an_temperatures", {})}.items():
        an_stages = [o for o in stages.values() if "an:" in o.get("negatives", "")]
        if spec and any(o.get("an_cache", "an") == name for o in an_stages):
            negatives.write_an_negatives(final, base["task"], os.path.join(seed_dir, name), split="train",
                                         spec=spec, seed=seed, limit=n, max_len=base["max_len"],
                                         temperature=temperature,
                                         max_new_tokens=data.synthetic_max_new_tokens(base["task"]),
                                         device="cpu")
    examples = data.load_task(base["task"], "train", tokenizer.load_tokenizer(final), base["max_len"], n=n,
                              seed=seed)
    write_jsonl_atomic(os.path.join(seed_dir, "dpo_rejected.jsonl"),
                       [{"id": e.id, "rejected": data.synthetic_rejected(e)} for e in examples])


def miniature_task(kind, seed, name, out, base, stages, experiment, threads):
    """One unit of work, run in a worker process with its output in <run>/log.txt:
    kind "ref": train the reference, then write the seed's AN cache and DPO rejected answers;
    kind "run": train one continued stage; kind "alpha": build one weight-space ensemble.
    Each then scores its model. Returns (seed, name, scores, seconds)."""
    torch.set_num_threads(threads)
    t0 = time.time()
    seed_dir = os.path.join(out, f"seed{seed}")
    ref_final = os.path.join(seed_dir, "ref", "final")
    run_dir = os.path.join(seed_dir, "alpha" if kind == "alpha" else name)
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, f"log{'_' + name if kind == 'alpha' else ''}.txt"), "a") as logf, \
            contextlib.redirect_stdout(logf), contextlib.redirect_stderr(logf):
        if kind == "alpha":
            best, alpha = name.split("@")
            mle_final = os.path.join(seed_dir, mle_baseline(best, experiment), "final")
            cpo_final = os.path.join(seed_dir, best, "final")
            final = evaluate.interpolate_folder(mle_final, cpo_final, float(alpha),
                                                os.path.join(run_dir, f"alpha_{float(alpha):g}"))
        else:
            cfg = train.Config(**{"resume": True, **base, **stages[name], "seed": seed, "out_dir": run_dir})
            if name != "ref":
                uses_an = "an:" in cfg.negatives and cfg.objective == "cpo"
                dpo = cfg.objective == "dpo"
                an_cache = os.path.join(seed_dir, cfg.an_cache or "an")  # the stage may name its cache
                cfg = replace(cfg, init_from=ref_final, an_cache=an_cache if uses_an else "",
                              dpo_rejected=os.path.join(seed_dir, "dpo_rejected.jsonl") if dpo else "")
            final = os.path.join(run_dir, "final")
            if not os.path.isdir(final):
                final = train.train(cfg)
            if name == "ref":
                write_seed_inputs(final, seed_dir, seed, base, stages, experiment)
        examples = miniature_examples(base, seed, experiment["n_eval"], experiment.get("split", "test"))
        suffix = f"_{name}" if kind == "alpha" else ""  # the ensembles share seed<S>/alpha/
        exposure_path = None
        if experiment.get("exposure"):
            exposure_path = os.path.join(run_dir, f"exposure{suffix}.json")
        scores, measure = miniature_score(final, ref_final, examples,
                                          os.path.join(run_dir, f"scores{suffix}.json"),
                                          base["task"], seed, exposure_path)
    result = {**scores, **run_diagnostics(run_dir if kind != "alpha" else "")}
    return seed, name, {**result, "exposure": measure} if measure else result, time.time() - t0


def mle_baseline(name, experiment):
    """The MLE continued run that a run is judged against, and that an ensemble "<cpo run>@<alpha>" mixes
    in: the one the experiment's baselines name for the (CPO) run, else "mle"."""
    return experiment.get("baselines", {}).get(name.split("@")[0], "mle")


def run_diagnostics(run_dir):
    """train.py's metrics.jsonl of a run: {"curve": [per logged step: loss, reward accuracy and margin, mean
    log pi_theta of truths and negatives], "changed_vs_ref": share of held-out greedy outputs changed}."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not run_dir or not os.path.isfile(path):
        return {}
    records = {}
    with open(path) as f:
        for r in map(json.loads, f):  # a resumed run logs some steps twice: keep the last
            records[(r["step"], "changed_vs_ref" in r)] = r
    out = {"curve": [r for (s, final), r in sorted(records.items()) if not final]}
    out.update(("changed_vs_ref", r["changed_vs_ref"]) for (s, final), r in records.items() if final)
    return out


def run_all(units, then, work, jobs):
    """work(*unit) for every unit, and for the units then(result) returns as each result comes in: `jobs`
    at a time in worker processes, or one by one in this process when jobs == 1 (easier to debug)."""
    if jobs == 1:
        units = list(units)
        while units:
            units += then(work(*units.pop(0)))
        return
    pool = ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"))
    try:
        pending = {pool.submit(work, *u) for u in units}
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for f in finished:
                pending |= {pool.submit(work, *u) for u in then(f.result())}
    finally:
        pool.shutdown(cancel_futures=True)


# ----------------------------------------------------------------------------- tables
def mean_spread(values):
    """(mean, sample standard deviation over seeds; 0 for one seed)."""
    v = np.asarray(values, float)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def verdict(values, baseline):
    """win / loss only when the difference of the means exceeds the larger of the two seed-to-seed standard
    deviations; anything smaller is a tie. With one seed there is no spread: every difference is '?'."""
    (m, s), (mb, sb) = mean_spread(values), mean_spread(baseline)
    if len(values) < 2 or len(baseline) < 2:
        return "?"
    if abs(m - mb) <= max(s, sb):
        return "tie"
    return "win" if m > mb else "loss"


def results_table(results, names, seeds, baselines=None):
    """Markdown: one row per method, each metric as mean ± std over seeds, and the verdict against its
    baseline (baselines: name -> name; default MLE continued) on exact match, MAUVE and sampled exact
    match."""
    baselines = baselines or {}
    lines = ["| method | " + " | ".join(METRICS) + " | vs | exact match | MAUVE | sampled exact match |",
             "|---|" + "---|" * (len(METRICS) + 4)]
    for name in names:
        base = baselines.get(name, "mle")
        vs = ["-"] * 4 if name == "ref" or name.startswith("mle") else [base] + [
            verdict([results[(s, name)][k] for s in seeds], [results[(s, base)][k] for s in seeds])
            for k in ("exact_match", "mauve", "sampled_exact_match")]
        lines.append(f"| {name} | " + " | ".join(spread_cells(results, name, seeds) + vs) + " |")
    return "\n".join(lines)


def diagnostics_table(results, names, seeds):
    """Markdown: what each CPO/DPO run did to its model, means over seeds: log pi_theta (summed over the
    answer) of the ground truths and of the negatives at step 1 and at the last step, the last step's
    reward accuracy and margin, and the share of held-out greedy outputs that differ from the reference's."""
    lines = ["| method | log π truth, step 1 → last | log π negatives, step 1 → last | reward acc | margin | "
             "greedy outputs changed |", "|---|---|---|---|---|---|"]
    for name in names:
        runs = [results[(s, name)] for s in seeds]
        if not all(r.get("curve") and "logp_truth" in r["curve"][0] for r in runs):
            continue
        # step 1: pi_ref itself
        first = {k: np.mean([r["curve"][0][k] for r in runs]) for k in runs[0]["curve"][0]}
        last = {k: np.mean([r["curve"][-1][k] for r in runs]) for k in runs[0]["curve"][-1]}
        changed = np.mean([r.get("changed_vs_ref", np.nan) for r in runs])
        lines.append(f"| {name} | {first['logp_truth']:.2f} → {last['logp_truth']:.2f} | "
                     f"{first['logp_negatives']:.2f} → {last['logp_negatives']:.2f} | "
                     f"{last['reward_accuracy']:.2f} | {last['reward_margin']:.2f} | {changed:.3f} |")
    return "\n".join(lines)


def alpha_table(results, best, alphas, seeds, mle="mle"):
    """Markdown: the alpha sweep of the best CPO variant, one row per alpha, then MLE continued (alpha 1)."""
    lines = ["| alpha (weight of MLE) | " + " | ".join(METRICS) + " |", "|---|" + "---|" * len(METRICS)]
    for label, name in [(f"{a:g}", f"{best}@{a:g}") for a in alphas] + [("1 (MLE continued)", mle)]:
        lines.append(f"| {label} | " + " | ".join(spread_cells(results, name, seeds)) + " |")
    return "\n".join(lines)


def curves_chart(path, results, names, seeds, key, ylabel):
    """An SVG of one logged diagnostic against the step, one line per contrastive run (mean over seeds)."""
    curves = {}
    for name in names:
        runs = [results[(s, name)].get("curve") for s in seeds]
        if all(runs) and key in runs[0][0]:
            curves[name] = [(points[0]["step"], float(np.mean([p[key] for p in points])))
                            for points in zip(*runs)]
    if curves:
        title = f"{ylabel}, mean over seeds {', '.join(map(str, seeds))}"
        write_atomic(path, svg_chart(curves, "step", ylabel, title))


def spread_cells(results, name, seeds):
    """One run name's metrics as 'mean ± std' over seeds, in METRICS order."""
    spreads = (mean_spread([results[(s, name)][k] for s in seeds]) for k in METRICS)
    return [f"{m:.3f} ± {sd:.3f}" for m, sd in spreads]


# ----------------------------------------------------------------------------- exposure bias
# the paired comparison's rows: (label, the value in one run's results, whether higher is better)
PAIRED = [(k, lambda r, k=k: r[k], True) for k in ("exact_match", "mauve", "sampled_exact_match")] + [
    ("exposure gap", lambda r: r["exposure"]["overall"]["gap"], False),
    ("FR token accuracy", lambda r: r["exposure"]["overall"]["fr"], True),
    ("TF token accuracy", lambda r: r["exposure"]["overall"]["tf"], True)]


def exposure_table(results, names, seeds):
    """Markdown: per run, teacher-forced (TF) and free-running (FR) token accuracy and their gap by position
    bucket and overall (every answer position pooled), mean ± std over seeds; '-' where some seed's answers
    never reach the bucket."""
    columns = list(exposure.BUCKETS) + ["overall"]
    lines = ["| run | | " + " | ".join(f"pos. {c}" for c in columns[:-1]) + " | overall |",
             "|---|---|" + "---|" * len(columns)]
    for name in names:
        measures = [results[(s, name)]["exposure"] for s in seeds]
        for key, label in (("tf", "TF"), ("fr", "FR"), ("gap", "gap")):
            parts = [[m["overall"] if c == "overall" else m["buckets"][c] for m in measures] for c in columns]
            cells = ["-" if None in p else "{:.3f} ± {:.3f}".format(*mean_spread([x[key] for x in p]))
                     for p in parts]
            lines.append(f"| {name} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_verdict(values, baseline, higher_is_better=True):
    """The pre-registered paired rule: the per-seed differences (same seed, same reference); win or loss
    when the size of their mean exceeds their standard deviation, else tie; '?' with one seed.
    -> (differences, mean, std, verdict)."""
    differences = [float(v - b) for v, b in zip(values, baseline)]
    m, sd = mean_spread(differences)
    if len(differences) < 2:
        return differences, m, sd, "?"
    return differences, m, sd, "tie" if abs(m) <= sd else "win" if (m > 0) == higher_is_better else "loss"


def paired_table(results, names, seeds, experiment):
    """Markdown: each run against its MLE continued baseline, per metric of PAIRED: the per-seed differences,
    their mean ± std, the seeds above / below / level with the baseline, the paired verdict and the unpaired
    one (verdict's rule). For the gap, lower is better: a win is a smaller gap."""
    lines = ["| run | vs | metric | per-seed differences | mean ± std | seeds above / below / level | "
             "paired | unpaired |", "|---|---|---|---|---|---|---|---|"]
    for name in names:
        base = mle_baseline(name, experiment)
        for label, value, higher in PAIRED:
            ours = [value(results[(s, name)]) for s in seeds]
            theirs = [value(results[(s, base)]) for s in seeds]
            differences, m, sd, paired = paired_verdict(ours, theirs, higher)
            sign = 1 if higher else -1  # verdict() calls the larger mean a win
            unpaired = verdict([sign * v for v in ours], [sign * v for v in theirs])
            sides = f"{sum(d > 0 for d in differences)} / {sum(d < 0 for d in differences)} / " \
                    f"{sum(d == 0 for d in differences)}"
            lines.append(f"| {name} | {base} | {label} | {', '.join(f'{d:+.3f}' for d in differences)} | "
                         f"{m:+.3f} ± {sd:.3f} | {sides} | {paired} | {unpaired} |")
    return "\n".join(lines)


def exposure_charts(out, results, runs, seeds):
    """exposure.svg: TF and FR against the answer position, exposure_gap.svg: their gap, for runs {label:
    name} (ref, MLE, CPO), means over seeds, up to the last position every seed's answers reach."""
    positions = {label: [results[(s, name)]["exposure"]["positions"] for s in seeds]
                 for label, name in runs.items()}
    reach = {label: min(len(p["n"]) for p in ps) for label, ps in positions.items()}

    def curve(label, key):
        return [(i, float(np.mean([p[key][i] for p in positions[label]]))) for i in range(reach[label])]

    seeds_text = f"mean over seeds {', '.join(map(str, seeds))}"
    accuracies = {f"{label} {key.upper()}": curve(label, key) for label in runs for key in ("tf", "fr")}
    write_atomic(os.path.join(out, "exposure.svg"),
                 svg_chart(accuracies, "position in the answer", "token accuracy",
                           f"teacher-forced (TF), free-running (FR), {seeds_text}"))
    gaps = {label: curve(label, "gap") for label in runs}
    write_atomic(os.path.join(out, "exposure_gap.svg"),
                 svg_chart(gaps, "position in the answer", "gap TF - FR",
                           f"exposure-bias gap by position, {seeds_text}"))


def seed_gaps_table(results, name, seeds):
    """Markdown: one run's gap by position bucket, seed by seed (E1 asks for the reference's on every
    seed)."""
    lines = ["| seed | " + " | ".join(f"pos. {c}" for c in exposure.BUCKETS) + " | overall |",
             "|---|" + "---|" * (len(exposure.BUCKETS) + 1)]
    for s in seeds:
        m = results[(s, name)]["exposure"]
        cells = ["-" if b is None else f"{b['gap']:.3f}" for b in [*m["buckets"].values(), m["overall"]]]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def exposure_report(out, results, names, seeds, experiment, best):
    """The exposure-bias section of results.md (its tables) and its two SVGs in `out`."""
    compared = [n for n in names if n != "ref" and not n.startswith("mle")]
    runs = {"ref": "ref", **({"MLE": mle_baseline(best, experiment), "CPO": best} if best else {})}
    exposure_charts(out, results, runs, seeds)
    charts = ", ".join(f"{label} = {name}" for label, name in runs.items())
    return ("Exposure bias (docs/exposure_bias.md): teacher-forced (TF) and free-running (FR) token accuracy "
            "by position in the answer (0 = its first token), mean ± std over seeds; overall: every (answer, "
            f"position) pair pooled.\n\n{exposure_table(results, names, seeds)}\n\n"
            f"The reference's gap, seed by seed:\n\n{seed_gaps_table(results, 'ref', seeds)}\n\n"
            "Paired per seed against MLE continued (win/loss: the size of the mean difference exceeds the "
            "std of the differences; unpaired: the difference of means exceeds the larger of the two stds; "
            "for the gap a win is a smaller gap):\n\n"
            f"{paired_table(results, compared, seeds, experiment)}\n\n"
            f"exposure.svg (TF and FR by position) and exposure_gap.svg (the gap): {charts}.")


# ----------------------------------------------------------------------------- the experiment
def miniature(args):
    """Train, score and tabulate; see experiments/miniature.py for the sizes and the module docstring for
    the layout."""
    base, stages, experiment = miniature_settings(args.config, args.scale)
    seeds = [int(s) for s in (args.seeds or experiment["seeds"]).split(",")]
    jobs = args.jobs or experiment["jobs"]
    threads = max(1, (os.cpu_count() or 1) // jobs)
    alphas = [float(a) for a in experiment["alphas"].split(",") if a]
    continued = [n for n in stages if n != "ref"]
    cpo_runs = [n for n in continued if stages[n].get("objective") == "cpo"]
    work = functools.partial(miniature_task, out=args.out, base=base, stages=stages, experiment=experiment,
                             threads=threads)
    total = len(seeds) * (1 + len(continued) + len(alphas))
    results, t0 = {}, time.time()
    log(f"miniature: seeds {seeds}, {len(continued)} continued runs each from the seed's reference, "
        f"{jobs} at a time x {threads} thread(s); logs in {args.out}/seed<S>/<run>/log.txt")

    def collect(result):
        """Record one finished unit; a reference's finish starts its seed's continued runs."""
        seed, name, scores, secs = result
        results[(seed, name)] = scores
        done = len(results)
        eta = (time.time() - t0) / done * (total - done)
        gap = f", exposure gap {scores['exposure']['overall']['gap']:.3f}" if "exposure" in scores else ""
        log(f"[{done}/{total}] seed {seed} {name}: exact match {scores['exact_match']:.3f}, correct stop "
            f"{scores['correct_stop']:.3f}, MAUVE {scores['mauve']:.3f}{gap} ({secs:.0f}s; elapsed "
            f"{(time.time() - t0) / 60:.1f} min, ETA at this pace {eta / 60:.1f} min)")
        return [("run", seed, n) for n in continued] if name == "ref" else []

    run_all([("ref", s, "ref") for s in seeds], collect, work, jobs)
    best = max(cpo_runs, key=lambda n: np.mean([results[(s, n)]["exact_match"] for s in seeds]), default=None)
    if alphas and best:
        log(f"miniature: best CPO variant by mean exact match: {best}; alpha sweep {alphas}")
        run_all([("alpha", s, f"{best}@{a:g}") for s in seeds for a in alphas], collect, work, jobs)

    cont = stages[continued[0]]
    header = (f"Synthetic task, {len(seeds)} seed(s) ({', '.join(map(str, seeds))}); reference: MLE "
              f"from scratch, {stages['ref']['steps']} steps of batch {stages['ref']['batch_size']}; every "
              f"other row continues from it for {cont['steps']} steps of batch {cont['batch_size']} "
              f"(lr {cont['lr']:g}) unless its settings say otherwise. Greedy decoding on "
              f"{experiment['n_eval']} held-out prompts ({experiment.get('split', 'test')} split); sampled: "
              f"one top-k 50 sample per prompt. Cells: mean ± standard deviation over seeds. win/loss: the "
              f"difference of means exceeds the larger of the two standard deviations; else tie.")
    table = results_table(results, ["ref"] + continued, seeds, experiment.get("baselines"))
    table += ("\n\nWhat the contrastive runs did to the model (means over seeds):\n\n"
              + diagnostics_table(results, continued, seeds))
    os.makedirs(args.out, exist_ok=True)
    if experiment.get("exposure"):
        ensembles = [f"{best}@{a:g}" for a in alphas] if best else []
        names = ["ref"] + continued + ensembles
        table += "\n\n" + exposure_report(args.out, results, names, seeds, experiment, best)
    write_atomic(os.path.join(args.out, "results.md"), header + "\n\n" + table + "\n")
    write_atomic(os.path.join(args.out, "results.json"),
                 json.dumps({f"{s}/{n}": r for (s, n), r in results.items()}, indent=1))
    for key, label in [("logp_truth", "log pi_theta of the ground truths"),
                       ("logp_negatives", "log pi_theta of the negatives")]:
        curves_chart(os.path.join(args.out, f"{key}.svg"), results, continued, seeds, key, label)
    print(header + "\n\n" + table, flush=True)
    alphas_md = ""
    if alphas and best:
        alphas_md = alpha_table(results, best, alphas, seeds, mle_baseline(best, experiment))
        alpha_header = (f"Weight-space ensemble alpha * MLE + (1 - alpha) * {best} (the best CPO variant by "
                        "mean exact match), per seed.")
        write_atomic(os.path.join(args.out, "alpha.md"), alpha_header + "\n\n" + alphas_md + "\n")
        sweep = [(a, *mean_spread([results[(s, f"{best}@{a:g}")]["exact_match"] for s in seeds]))
                 for a in alphas]
        write_atomic(os.path.join(args.out, "alpha.svg"),
                     svg_chart({f"{best}, mean ± std over seeds": sweep}, "alpha (weight of the MLE model)",
                               "exact match, held-out", f"alpha * MLE + (1 - alpha) * {best}"))
        print("\n" + alpha_header + "\n\n" + alphas_md, flush=True)
    log(f"miniature: done in {(time.time() - t0) / 60:.1f} min; {args.out}/results.md, {args.out}/alpha.md")
    return table, alphas_md


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    here = os.path.dirname(os.path.abspath(__file__))
    p.add_argument("--config", default=os.path.join(here, "experiments", "miniature.py"),
                   help="the experiment's preset (default: experiments/miniature.py)")
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default: the preset's, 0,1,2)")
    p.add_argument("--out", default="out/miniature", help="folder of every run, the tables and the logs "
                   "(default: out/miniature)")
    p.add_argument("--scale", default="full", choices=["full", "tiny"],
                   help="tiny: a smoke test of a few steps (default: full)")
    p.add_argument("--jobs", type=int, default=None, help="runs at a time (default: the preset's, 2)")
    return miniature(p.parse_args(argv))


if __name__ == "__main__":
    main()
