#!/usr/bin/env python3
"""Plant known bugs one at a time in a scratch copy of the repository and report which the tests catch.

Each mutant is (name, file, original snippet, mutated snippet, test files, description). The script
copies the working tree (tracked and untracked-but-not-ignored files, `git ls-files -co
--exclude-standard`) into a temporary directory, checks that every original snippet occurs exactly once
in its file (otherwise it stops with a one-line error naming the mutant: the code moved and the mutant
must be updated), runs the mutants' test files once unmutated (a baseline that must pass), then for
each mutant writes the mutated file, runs its test files with this repository's virtualenv
(`python -m pytest -x -q`, one thread) and restores the file. A mutant is *caught* when the tests fail.

    .venv/bin/python tools/mutants.py                    # all mutants (~8 min on 2 cores)
    .venv/bin/python tools/mutants.py --list             # names and descriptions
    .venv/bin/python tools/mutants.py --only cosine-inverted,ppl-mean-nll
    .venv/bin/python tools/mutants.py --only huber --no-baseline   # substring match, skip the baseline

Output: one line per mutant, a table, "caught N of M", and a final JSON line
({"caught": N, "total": M, "survived": [...], "results": [...]}). Exit status 0 when every mutant is
caught, 1 when some survived, 2 on a stale snippet or a failing baseline. Not part of CI.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Mutant:
    name: str
    file: str
    original: str
    mutated: str
    tests: tuple[str, ...]
    description: str


EVAL = ("tests/test_modes.py", "tests/test_evaluate.py")
TRAIN = ("tests/test_stepper.py", "tests/test_train.py")

MUTANTS = [
    # ---- evaluation modes and metrics
    Mutant("wrong-path-is-routed", "hiermem/modes.py",
           "            return MemoryChoice(paths=wrong)\n",
           "            return MemoryChoice(paths=routed)\n", EVAL,
           "wrong-path silently uses the routed path"),
    Mutant("oracle-path-is-routed", "hiermem/modes.py",
           "            oracle = routed if rows.oracle is None else np.asarray(rows.oracle)[:, :depth]\n",
           "            oracle = routed\n", EVAL,
           "oracle-path silently uses the routed path (mode)"),
    Mutant("probe-oracle-is-routed", "hiermem/evaluate.py",
           "            oracle[i] = majority_path(fact_paths[probe.fact_id])\n",
           "            pass\n", ("tests/test_evaluate.py",),
           "the probes' oracle paths are their routed paths (evaluate._oracle_paths)"),
    Mutant("drop-level-always-1", "hiermem/modes.py",
           "            blocked[:, level - 1] = True\n",
           "            blocked[:, 0] = True\n", EVAL,
           "drop-level<l> always drops level 1"),
    Mutant("mc-least-likely", "hiermem/evaluate.py",
           "sc[0] > sc[1:cfg.mc_candidates].max()",
           "sc[0] > sc[1:cfg.mc_candidates].min()", ("tests/test_evaluate.py",),
           "multiple choice: the true answer only has to beat the least likely candidate"),
    Mutant("rank-beats-one", "hiermem/evaluate.py",
           "sc[0] > sc[1:].max()",
           "sc[0] > sc[1:].min()", ("tests/test_evaluate.py",),
           "ranking: the true answer only has to beat the least likely candidate"),
    Mutant("ppl-mean-nll", "hiermem/evaluate.py",
           '"ppl": float(np.exp(mean))',
           '"ppl": mean', ("tests/test_evaluate.py",),
           "perplexity reported as the mean NLL"),
    Mutant("summary-ppl-unweighted", "hiermem/evaluate.py",
           'row["ppl"] = float(np.exp((ppl["nll"] * ppl["tokens"]).sum() / ppl["tokens"].sum()))',
           'row["ppl"] = float(np.exp(ppl["nll"].mean()))', ("tests/test_evaluate.py",),
           "summary perplexity pools sources without token weights"),
    # ---- generic memory and bank training
    Mutant("generic-prob-1/k", "hiermem/train.py",
           "return 1.0 / (self.memory.branching + 1) if self.generic_prob is None else self.generic_prob",
           "return 1.0 / self.memory.branching if self.generic_prob is None else self.generic_prob",
           ("tests/test_train.py",), "default generic probability 1/k instead of 1/(k+1)"),
    Mutant("generic-prob-0", "hiermem/train.py",
           "return 1.0 / (self.memory.branching + 1) if self.generic_prob is None else self.generic_prob",
           "return 0.0 if self.generic_prob is None else self.generic_prob",
           ("tests/test_train.py",), "default generic probability 0 instead of 1/(k+1)"),
    Mutant("loop-generic-prob-0", "hiermem/train.py",
           "use_generic = _generic_mask(cfg.seed, step, tokens.shape[0], generic_prob)",
           "use_generic = _generic_mask(cfg.seed, step, tokens.shape[0], 0.0)",
           ("tests/test_train.py",), "the loop never draws the generic block (summary still says 1/(k+1))"),
    Mutant("generic-not-optimized", "hiermem/stepper.py",
           "            if generic:\n                groups.append(",
           "            if False:\n                groups.append(", TRAIN,
           "the generic block is never given to an optimizer"),
    Mutant("bank-step-noop-stepper", "hiermem/stepper.py",
           "        rows = self.bank_opt.step(active) if active is not None else 0\n",
           "        rows = 0\n", TRAIN,
           "the training step never applies the bank update"),
    Mutant("bank-step-noop-optim", "hiermem/optim.py",
           "        if params:\n            adamw(",
           "        if False:\n            adamw(", TRAIN,
           "SparseBankAdamW.step updates nothing (checked with test_train/test_stepper only)"),
    # ---- schedule and loss
    Mutant("cosine-inverted", "hiermem/stepper.py",
           "(1 + math.cos(math.pi * progress))",
           "(1 - math.cos(math.pi * progress))", TRAIN,
           "inverted cosine: the LR rises from final to peak"),
    Mutant("warmup-off-by-one", "hiermem/stepper.py",
           "return peak * (step + 1) / warmup_steps",
           "return peak * step / warmup_steps", TRAIN,
           "warmup starts at 0 and ends one step early"),
    Mutant("loss-ignores-mask", "hiermem/stepper.py",
           "    mask = torch.ones_like(targets, dtype=torch.bool) if segment_ids is None else loss_mask(segment_ids)\n",
           "    mask = torch.ones_like(targets, dtype=torch.bool)\n", TRAIN,
           "the loss ignores the document/padding mask"),
    Mutant("loss-mean-over-all", "hiermem/stepper.py",
           "    return losses.sum() / mask.sum().clamp(min=1)\n",
           "    return losses.mean()\n", TRAIN,
           "the masked loss averaged over all positions (masked ones as zeros)"),
    Mutant("loop-drops-segments", "hiermem/train.py",
           "        out = stepper.step(tokens, segments, ",
           "        out = stepper.step(tokens, None, ", ("tests/test_train.py",),
           "the training loop passes no segment ids (no document mask in attention or loss)"),
    Mutant("loss-mask-counts-padding", "hiermem/masks.py",
           "    return (seg[:, :-1] == seg[:, 1:]) & (seg[:, :-1] >= 0)\n",
           "    return seg[:, :-1] == seg[:, 1:]\n", ("tests/test_packing.py", "tests/test_stepper.py"),
           "padding-to-padding targets count in the loss"),
    Mutant("attention-ignores-documents", "hiermem/masks.py",
           "    return (same & causal) | eye\n",
           "    return causal | eye\n", ("tests/test_model.py", "tests/test_packing.py"),
           "attention crosses document boundaries (control: was already caught)"),
    # ---- accounting
    Mutant("runtime-params-no-embedding", "hiermem/accounting.py",
           "        return self.anchor_params + self.fetched_params\n",
           "        return self.anchor_non_embedding_params + self.fetched_params\n", ("tests/test_accounting.py",),
           "runtime_params off by the embedding parameters"),
    Mutant("attention-flops-halved", "hiermem/accounting.py",
           "attention_score_flops_per_token=n_layers * 4 * seq_len * a,",
           "attention_score_flops_per_token=n_layers * 2 * seq_len * a,", ("tests/test_accounting.py",),
           "attention-score FLOPs halved"),
    # ---- Huber fitting
    Mutant("huber-is-squared", "analysis/fitting.py",
           "    grad = np.clip(residual, -delta, delta)\n",
           "    grad = residual\n", ("tests/test_analysis_fit.py",),
           "the Huber loss replaced by a squared loss"),
    Mutant("huber-delta-doubled", "analysis/fitting.py",
           "    grad = np.clip(residual, -delta, delta)\n",
           "    grad = np.clip(residual, -2 * delta, 2 * delta)\n", ("tests/test_analysis_fit.py",),
           "the Huber threshold is 2 delta"),
    # ---- numpy/BLAS routing path (used when the compiled kernel is absent or disabled)
    Mutant("numpy-route-score-sign", "hiermem/routing.py",
           "    s += cn\n    return s\n",
           "    s -= cn\n    return s\n", ("tests/test_retriever.py", "tests/test_native.py"),
           "numpy routing scores subtract the centroid norms"),
    Mutant("numpy-route-no-scatter", "hiermem/routing.py",
           "        out[order] = scores.argmin(axis=1)\n",
           "        out[:] = scores.argmin(axis=1)\n", ("tests/test_retriever.py", "tests/test_native.py"),
           "numpy routing forgets to scatter grouped choices back to row order"),
]


def repo_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                         capture_output=True).stdout.decode()
    return [f for f in out.split("\0") if f and (REPO / f).is_file()]


def copy_repo(dest: Path) -> None:
    for rel in repo_files():
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, target)


def check_snippets(root: Path, mutants: list[Mutant]) -> None:
    for m in mutants:
        path = root / m.file
        if not path.is_file():
            sys.exit(f"mutant {m.name!r}: file {m.file} does not exist; update tools/mutants.py")
        found = path.read_text().count(m.original)
        if found != 1:
            sys.exit(f"mutant {m.name!r}: original snippet {'not found' if found == 0 else f'found {found} times'} "
                     f"in {m.file}; update tools/mutants.py")
        for test in m.tests:
            if not (root / test.split("::")[0]).is_file():
                sys.exit(f"mutant {m.name!r}: test file {test} does not exist; update tools/mutants.py")


def run_tests(root: Path, python: str, tests: tuple[str, ...], timeout: float) -> tuple[str, float, str]:
    """('passed' | 'failed' | 'error' | 'timeout', seconds, last output line)."""
    env = {**os.environ, "PYTHONPATH": str(root), "HIERMEM_TEST_THREADS": "1", "OMP_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("CI", None)  # skips stay skips here: a skipped test just does not catch anything
    env.pop("HIERMEM_CI", None)
    tic = time.perf_counter()
    try:
        done = subprocess.run([python, "-m", "pytest", "-x", "-q", "-rfE", "-p", "no:cacheprovider", *tests],
                              cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", time.perf_counter() - tic, f"timed out after {timeout:.0f} s"
    seconds = time.perf_counter() - tic
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    failed = [line for line in lines if line.startswith(("FAILED", "ERROR"))]
    last = failed[0] if failed else (lines[-1] if lines else "")
    if done.returncode not in (0, 1) and not failed:
        last = " | ".join(lines[-5:])
    status = {0: "passed", 1: "failed"}.get(done.returncode, "error")
    return status, seconds, last


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help="comma list of mutant names (or substrings of names)")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--no-baseline", action="store_true", help="skip the unmutated baseline run")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per test run (a timeout counts as caught)")
    parser.add_argument("--python", default=str(REPO / ".venv" / "bin" / "python"), help="interpreter with pytest")
    parser.add_argument("--keep", action="store_true", help="keep the scratch copy")
    args = parser.parse_args(argv)

    mutants = MUTANTS
    if args.only:
        keys = [k.strip() for k in args.only.split(",") if k.strip()]
        mutants = [m for m in MUTANTS if any(k == m.name or k in m.name for k in keys)]
        if not mutants:
            sys.exit(f"--only {args.only!r} matches no mutant; see --list")
    if args.list:
        for m in mutants:
            print(f"{m.name:30s} {m.file:22s} {m.description}")
        return 0

    scratch = Path(tempfile.mkdtemp(prefix="hiermem-mutants-"))
    try:
        copy_repo(scratch)
        check_snippets(scratch, mutants)
        probe = subprocess.run([args.python, "-c", "import hiermem, sys; sys.stdout.write(hiermem.__file__)"],
                               cwd=scratch, env={**os.environ, "PYTHONPATH": str(scratch)}, capture_output=True,
                               text=True)
        if not probe.stdout.startswith(str(scratch)):
            sys.exit(f"the scratch copy's hiermem is not the one imported ({probe.stdout or probe.stderr.strip()})")
        print(f"scratch copy: {scratch} ({len(repo_files())} files)", flush=True)
        if not args.no_baseline:
            files = tuple(sorted({t for m in mutants for t in m.tests}))
            status, seconds, last = run_tests(scratch, args.python, files, args.timeout * 2)
            print(f"baseline ({len(files)} test files): {status} in {seconds:.0f} s: {last}", flush=True)
            if status != "passed":
                sys.exit("the baseline (no mutant) does not pass; fix the tests first or use --no-baseline")

        results = []
        for i, m in enumerate(mutants, 1):
            path = scratch / m.file
            original = path.read_text()
            path.write_text(original.replace(m.original, m.mutated, 1))
            try:
                status, seconds, last = run_tests(scratch, args.python, m.tests, args.timeout)
            finally:
                path.write_text(original)
            caught = status != "passed"
            results.append({"name": m.name, "file": m.file, "caught": caught, "status": status,
                            "seconds": round(seconds, 1), "tests": list(m.tests), "description": m.description,
                            "last_line": last})
            print(f"[{i}/{len(mutants)}] {m.name}: {'CAUGHT' if caught else 'SURVIVED'} ({status}, {seconds:.0f} s)",
                  flush=True)
    finally:
        if args.keep:
            print(f"kept {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)

    width = max(len(r["name"]) for r in results)
    print()
    print(f"{'mutant':{width}s}  {'result':8s}  {'secs':>5s}  description")
    for r in results:
        print(f"{r['name']:{width}s}  {'caught' if r['caught'] else 'SURVIVED':8s}  {r['seconds']:5.0f}  {r['description']}")
    caught = sum(r["caught"] for r in results)
    survived = [r["name"] for r in results if not r["caught"]]
    print(f"\ncaught {caught} of {len(results)}" + (f"; survived: {', '.join(survived)}" if survived else ""))
    print(json.dumps({"caught": caught, "total": len(results), "survived": survived, "results": results}))
    return 0 if not survived else 1


if __name__ == "__main__":
    sys.exit(main())
