"""Command line for the scaling-law fitter: fit your own runs from any CSV.

    python -m analysis.scaling fit FILE.csv --form chinchilla --x N='Model Size' \\
        --x 'D=Training FLOP/(6*Model Size)' --y loss --exclude-highest 5 --bootstrap 200 --json
    python -m analysis.scaling compare FILE.csv --form memory_effective --form memory_additive \\
        --x N=anchor_params --x M=fetched_params --x Bk=bank_params --x D=tokens --y loss
    python -m analysis.scaling holdout FILE.csv --form chinchilla --x ... --y loss --by N
    python -m analysis.scaling forms

`fit` exits with status 1 when no start converged or the fit is not identified by the data (the
JSON then says "converged": false or "identified": false, with "reasons"; see
analysis.identifiability); `compare` exits with status 1 when no form can be ranked best.
--x ROLE=EXPR maps a variable of the form (see `forms`) to a column or an arithmetic expression
over columns; names may contain spaces (the longest matching column name wins) or be quoted
with backticks. Errors go to stderr with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from typing import Sequence

from .compare import compare_forms, holdout_largest
from .data import load_csv, parse_assignment
from .fitting import DEFAULT_DELTA, DEFAULT_MAXITER, fit
from .forms import FORMS, list_forms
from .identifiability import UnidentifiedFitWarning


def _x_mapping(items: Sequence[str] | None) -> dict[str, str]:
    mapping: dict[str, str] = {}
    for item in items or []:
        role, expr = parse_assignment(item)
        if role in mapping:
            raise ValueError(f"--x gives variable {role!r} twice ({mapping[role]!r} and {expr!r})")
        mapping[role] = expr
    if not mapping:
        raise ValueError("give the form's variables with --x ROLE=COLUMN (e.g. --x N=anchor_params --x D=tokens)")
    return mapping


def _finite(obj):
    """JSON has no inf/NaN: report them as null rather than emit invalid JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _print_json(obj) -> None:
    print(json.dumps(_finite(obj), indent=2, allow_nan=False, default=str))


def _fit_options(args) -> dict:
    return {"delta": args.delta, "exclude_highest": args.exclude_highest, "max_starts": args.max_starts,
            "seed": args.seed, "weights": args.weights, "maxiter": args.maxiter}


def _cmd_fit(args) -> int:
    df = load_csv(args.file)
    result = fit(df, args.form, _x_mapping(args.x), args.y, bootstrap=args.bootstrap, runs=args.runs,
                 ci=args.ci, **_fit_options(args))
    if args.plot:
        from .plots import plot_bootstrap, plot_fit
        plot_fit(result, args.plot)
        if result.bootstrap is not None:
            plot_bootstrap(result, f"{args.plot}_bootstrap")
    if args.json:
        _print_json(result.to_dict())
    else:
        info = result.to_dict()["fit"]
        print(f"{result.form.name}: {result.form.formula}")
        print(f"  {info['n_points']} points ({info['n_excluded']} excluded), {info['n_starts']} starts, "
              f"objective {result.objective:.6g}, converged={result.converged} ({result.message}), "
              f"{result.seconds:.1f} s")
        print(f"  identified={result.identified}" + ("" if result.identified else
                                                      " - not estimates, because:"))
        for reason in result.reasons:
            print(f"    {reason}")
        table = result.summary().drop(columns=["identified", "issue"])
        print(table.to_string(index=False, float_format=lambda v: f"{v:.6g}"))
    return 0 if result.converged and result.identified else 1


def _cmd_compare(args) -> int:
    df = load_csv(args.file)
    comparison = compare_forms(df, args.form, _x_mapping(args.x), args.y, likelihood=args.likelihood,
                               **_fit_options(args))
    if args.json:
        _print_json({"best": comparison.best, "likelihood": args.likelihood, "not_ranked": comparison.excluded,
                     "table": comparison.table.to_dict("records"),
                     "params": {name: f.params for name, f in comparison.fits.items()}})
    else:
        cols = ["form", "n_params", "objective", "converged", "identified", "comparable", "loglik", "aic", "aicc",
                "bic", "delta_aic", "delta_bic", "aic_weight"]
        print(comparison.table[cols].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
        print(f"best: {comparison.best}" if comparison.best else "best: none (no form is identified)")
        for name, why in comparison.excluded.items():
            print(f"  {name} not ranked: identified={comparison.fits[name].identified}; {why}")
    return 0 if comparison.best else 1


def _cmd_holdout(args) -> int:
    df = load_csv(args.file)
    result = holdout_largest(df, args.form, _x_mapping(args.x), args.y, by=args.by, n_scales=args.n_scales,
                             rtol=args.rtol, **_fit_options(args))
    if args.json:
        _print_json({**result.summary(), "params": result.fit.params, "converged": result.fit.converged,
                     "rows": result.table.reset_index(names="row").to_dict("records")})
    else:
        print(json.dumps(_finite(result.summary()), indent=2))
    return 0


def _cmd_forms(args) -> int:
    if args.json:
        _print_json(list_forms())
    else:
        for f in FORMS.values():
            print(f.describe())
    return 0


def _add_data_args(p: argparse.ArgumentParser, multi_form: bool = False) -> None:
    p.add_argument("file", help="CSV file with one row per run (or checkpoint)")
    if multi_form:
        p.add_argument("--form", action="append", required=True, metavar="FORM",
                       help=f"a form to compare; repeat for each (known: {', '.join(FORMS)})")
    else:
        p.add_argument("--form", default="chinchilla", metavar="FORM",
                       help=f"functional form (default chinchilla; known: {', '.join(FORMS)})")
    p.add_argument("--x", action="append", metavar="ROLE=EXPR",
                   help="variable of the form as a column or expression, e.g. N=anchor_params or "
                        "'D=Training FLOP/(6*Model Size)'; repeat for each variable")
    p.add_argument("--y", required=True, help="target column or expression (loss in nats; must be > 0)")
    p.add_argument("--exclude-highest", type=int, default=0, metavar="K",
                   help="leave out the K rows with the highest target (Besiroglu et al. use 5)")
    p.add_argument("--delta", type=float, default=DEFAULT_DELTA, help="Huber delta on log residuals (default 1e-3)")
    p.add_argument("--weights", default=None, metavar="COLUMN", help="column of per-row weights")
    p.add_argument("--max-starts", type=int, default=None, metavar="S",
                   help="randomly subsample the initial grid to S starts (default: chinchilla's full 4,500-point "
                        "grid; the memory forms' grids are subsampled to a few hundred)")
    p.add_argument("--maxiter", type=int, default=DEFAULT_MAXITER,
                   help=f"iteration cap per start (default {DEFAULT_MAXITER}); a fit that hits it is flagged")
    p.add_argument("--seed", type=int, default=0, help="seed for grid subsampling and bootstrap")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")


def build_parser() -> argparse.ArgumentParser:
    summary, _, details = __doc__.partition("\n\n")
    parser = argparse.ArgumentParser(prog="python -m analysis.scaling", description=summary, epilog=details,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("fit", help="fit one form; print parameters (and bootstrap CIs)")
    _add_data_args(p)
    p.add_argument("--bootstrap", type=int, default=0, metavar="B", help="run-level bootstrap resamples for CIs")
    p.add_argument("--runs", default=None, metavar="COLUMN",
                   help="run id column: rows sharing an id are resampled together (default: each row)")
    p.add_argument("--ci", type=float, default=0.95, help="confidence level of the bootstrap CIs (default 0.95)")
    p.add_argument("--plot", default=None, metavar="PATH", help="also write PATH.png/PATH.csv (fit and residuals)")
    p.set_defaults(func=_cmd_fit)

    p = sub.add_parser("compare", help="fit several forms on the same rows and rank them by AIC/BIC")
    _add_data_args(p, multi_form=True)
    p.add_argument("--likelihood", choices=("laplace", "gaussian"), default="laplace",
                   help="residual likelihood for AIC/BIC (laplace matches a small Huber delta)")
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser("holdout", help="fit without the largest scale(s) and report the extrapolation error")
    _add_data_args(p)
    p.add_argument("--by", default="N", help="role or column defining scale (default N)")
    p.add_argument("--n-scales", type=int, default=1, help="how many of the largest scales to hold out")
    p.add_argument("--rtol", type=float, default=0.05, help="values within this relative gap are one scale")
    p.set_defaults(func=_cmd_holdout)

    p = sub.add_parser("forms", help="list the functional forms and their variables")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=_cmd_forms)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from hiermem.cli import quiet_broken_pipe  # `... | head` ends quietly
    return quiet_broken_pipe(_main, argv)


def _main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with warnings.catch_warnings():  # the output itself reports identified=False and why
            warnings.simplefilter("ignore", UnidentifiedFitWarning)
            return args.func(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
