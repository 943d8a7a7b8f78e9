"""`dpo-dist validate`: check a recipe's data, or one data file, before any model is loaded.

Every bad row is one line `FILE:LINE: field: reason`, every warning one line
`FILE:LINE: field: warning: reason`, and each source ends with a summary line. Token-length checks
(prompts and rows that training would truncate) need only the tokenizer. Exit status: 0 when every
source is usable and clean, 1 when a source has a bad row or cannot be used (or, with --strict, has a
warning); a recipe or argument error raises ConfigError (exit 2 from the command line).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Callable

from dpo_dist.data.formats import (FORMATS, WARNING_KINDS, BadRow, DataError, RowStream, RowWarning,
                                   count_warnings, describe_warning_counts)
from dpo_dist.config.preflight import HUB_NAME, hub_unreachable
from dpo_dist.config.schema import ConfigError

KINDS = tuple(FORMATS)
_REASON_MAX = 300  # characters of an exception message shown in a one-line notice


@dataclass
class LengthLimits:
    """What token-length checks need: the tokenizer, the chat renderer and the stage's lengths."""
    tokenizer: object
    renderer: object
    max_length: int
    max_prompt_length: int | None = None


@dataclass
class SourceCheck:
    source: str
    kind: str
    rows: int = 0
    fmt: str = ""
    bad: list[BadRow] = field(default_factory=list)
    warnings: list[RowWarning] = field(default_factory=list)
    problem: str | None = None  # the source as a whole cannot be used
    notes: list[str] = field(default_factory=list)  # checks that could not run

    def failed(self, strict: bool = False) -> bool:
        return bool(self.bad or self.problem or (strict and self.warnings))

    def summary(self) -> str:
        text = (f"{self.source}: {_plural(self.rows, 'usable row')}, {_plural(len(self.bad), 'bad row')}, "
                f"{_plural(len(self.warnings), 'warning')}")
        if self.warnings:
            text += f" ({describe_warning_counts(count_warnings(self.warnings))})"
        if self.problem:
            text += "; not usable for training"
        return text


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _one_line(text: str) -> str:
    """Messages may quote data or file names: keep each report entry on one line."""
    return text.replace("\r", "\\r").replace("\n", "\\n")


def _short(err: BaseException) -> str:
    text = " ".join(str(err).split()) or "(no message)"
    text = text if len(text) <= _REASON_MAX else text[:_REASON_MAX] + "..."
    return f"{type(err).__name__}: {text}"


def _why_no_rows(source: str, bad: int) -> str:
    if bad:
        return f"all {_plural(bad, 'row')} are bad" if bad > 1 else "its only row is bad"
    if os.path.isfile(source) and os.path.getsize(source) == 0:
        return "the file is empty"
    if os.path.isfile(source):
        return "the file holds only blank lines"
    return "the source holds no rows"


_LENGTH_BATCH = 1000  # rows per token-length check, so a big source is never held whole


def check_data(source: str, kind: str, fmt: str = "auto", split: str = "train",
               limits: LengthLimits | None = None, on_bad_row: str = "skip") -> SourceCheck:
    """Read every row of ``source`` as ``kind`` data (streamed, by the reader training uses); collect bad rows,
    warnings and file-level problems. With ``on_bad_row`` error (a recipe's), an SFT row with no assistant token
    within max_length is a bad row, as training refuses it; otherwise a warning (training leaves it out)."""
    check = SourceCheck(source, kind)
    length_warnings: list[RowWarning] = []
    try:
        stream = RowStream(source, kind, fmt, "skip", split)
        batch: list[dict] = []
        for row in stream:
            if limits is None:
                continue
            batch.append(row)
            if len(batch) == _LENGTH_BATCH:
                limits = _length_warnings(batch, kind, limits, check.notes, length_warnings)
                batch = []
        if batch and limits is not None:
            _length_warnings(batch, kind, limits, check.notes, length_warnings)
    except DataError as err:
        check.problem = str(err)
        return check
    loaded = stream.result()
    check.rows, check.fmt = loaded.n_rows, loaded.fmt
    check.bad, check.warnings = list(loaded.skipped), list(loaded.warnings)
    for w in length_warnings:
        if on_bad_row == "error" and w.kind == "no_supervised_tokens":
            check.bad.append(BadRow(w.loc, w.field, w.reason.replace("training leaves the row out",
                                                                     "training refuses it (on_bad_row: error)")))
        else:
            check.warnings.append(w)
    if not check.rows:
        check.problem = f"{source}: no usable rows ({_why_no_rows(source, len(loaded.skipped))})"
    return check


def _length_warnings(rows: list[dict], kind: str, limits: LengthLimits, notes: list[str],
                     out: list[RowWarning]) -> LengthLimits | None:
    """Append the token-length warnings of ``rows`` to ``out``; returns None when the checks must stop."""
    from dpo_dist.data.render import TemplateError
    from dpo_dist.data.tokenize import token_length_warnings

    args = (kind, limits.tokenizer, limits.renderer, limits.max_length, limits.max_prompt_length)
    try:
        out += token_length_warnings(rows, *args)
    except TemplateError:  # a template problem is the same for every row: say it once, at the first row it hits
        for row in rows:
            try:
                out += token_length_warnings([row], *args)
            except TemplateError as err:
                notes.append(f"warning: token-length checks skipped at {row['loc']}: {_short(err)}")
                break
        return None
    return limits


def _capped(lines: list[str], max_lines: int | None, what: str) -> list[str]:
    if max_lines is None or len(lines) <= max_lines:
        return lines
    return lines[:max_lines] + [f"... and {len(lines) - max_lines} more {what}"]


def report_lines(check: SourceCheck, max_lines: int | None = None) -> list[str]:
    """The report for one source: bad rows, warnings by kind (each capped), problem, summary."""
    lines = list(check.notes)
    lines += _capped([str(b) for b in check.bad], max_lines, "bad rows")
    for kind in count_warnings(check.warnings):
        of_kind = [str(w) for w in check.warnings if w.kind == kind]
        lines += _capped(of_kind, max_lines, WARNING_KINDS.get(kind, (kind, kind))[1])
    if check.problem:
        lines.append(check.problem)
    lines.append(check.summary())
    return [_one_line(line) for line in lines]


def _local_tokenizer(cfg):
    """``cfg`` pointing at a local copy of its tokenizer: itself for a directory, the hub cache's snapshot for a
    cached hub name; None for a hub name that is not cached."""
    from dataclasses import replace

    name = cfg.tokenizer or cfg.name_or_path
    if os.path.isdir(name):
        return cfg
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, "tokenizer_config.json", revision=cfg.revision)
    except Exception:  # not a valid repo name
        return None
    if not isinstance(cached, str):
        return None
    return replace(cfg, name_or_path=os.path.dirname(cached), tokenizer=None, revision=None)


def _load_limits(tokenizer_cfg, template: str | None, out: Callable[[str], None]):
    """(tokenizer, renderer); None after printing why token-length checks are skipped (the tokenizer cannot be
    loaded). A chat template that training would refuse raises TemplateError: the same verdict as training."""
    from dpo_dist.data.render import Renderer
    from dpo_dist.models.loading import load_tokenizer
    from dpo_dist.training.prepare import template_lines

    name = tokenizer_cfg.tokenizer or tokenizer_cfg.name_or_path
    if HUB_NAME.fullmatch(name) and not os.path.exists(name):
        offline = hub_unreachable()
        if offline is not None:
            local = _local_tokenizer(tokenizer_cfg)
            if local is None:
                out(_one_line(f"warning: token-length checks skipped: {name!r} is not a local directory nor in the "
                              f"Hugging Face cache, and {offline} (offline)"))
                return None
            tokenizer_cfg = local
    # The hub logs every connection retry; the one warning line below says what happened.
    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)
    try:
        tokenizer = load_tokenizer(tokenizer_cfg)
    except Exception as err:  # missing path, broken files...: the data checks still run
        out(_one_line(f"warning: token-length checks skipped: cannot load the tokenizer {name!r}: {_short(err)}"))
        return None
    finally:
        hub_log.setLevel(level)
    renderer = Renderer(tokenizer, template)
    for line in template_lines(renderer):
        out(_one_line(line))
    return tokenizer, renderer


def _check_profile(path: str, overrides: list[str], profile_arg: str, out: Callable[[str], None]) -> str | None:
    """What training under ``profile_arg`` would refuse before loading weights (global batch split, method,
    precision), as one error line, or None; the profile's precision changes are printed."""
    from dpo_dist.distributed.backends import precision_notes
    from dpo_dist.launch.command import preflight
    from dpo_dist.config.profiles import load_profile
    from dpo_dist.config.recipe import load_recipe

    profile = load_profile(profile_arg)
    try:
        preflight(path, profile, list(overrides), profile.num_nodes, sources=False)
    except ConfigError as err:
        return f"error: profile {profile.name}: {err}"
    for line in precision_notes(load_recipe(path, list(overrides)), profile):
        out(_one_line(line))
    out(f"profile {profile.name}: the recipe fits it (global batch, methods, precision)")
    return None


def validate_recipe(path: str, overrides: list[str] = (), max_lines: int | None = None, strict: bool = False,
                    out: Callable[[str], None] = print, profile: str | None = None) -> int:
    """Check every stage's data.train and data.eval (and, with ``profile``, what training under it would refuse).
    Returns the exit status (0 or 1)."""
    from dpo_dist.config.preflight import check_recipe
    from dpo_dist.config.recipe import load_recipe
    from dpo_dist.data.render import TemplateError

    recipe = load_recipe(path, list(overrides))  # ConfigError propagates: exit 2
    check_recipe(recipe)  # model and data files, as every command checks them; then the data row by row below
    failed = False
    if profile is not None:
        problem = _check_profile(path, overrides, profile, out)
        if problem:
            out(_one_line(problem))
            failed = True
    try:
        loaded = _load_limits(recipe.model, recipe.model.template, out)
    except TemplateError as err:  # training stops here too, before any row
        out(_one_line(f"error: {err}"))
        loaded, failed = None, True
    for stage in recipe.stages:
        for which, source in (("train", stage.data.train), ("eval", stage.data.eval)):
            if not source:
                continue
            out(_one_line(f"== stage {stage.name} ({stage.stage}) data.{which}: {source}"))
            limits = LengthLimits(*loaded, stage.max_length, stage.max_prompt_length) if loaded else None
            check = check_data(source, stage.data_kind, stage.data.format, stage.data.split, limits,
                               on_bad_row=stage.data.on_bad_row)
            for line in report_lines(check, max_lines):
                out(line)
            failed |= check.failed(strict)
    return 1 if failed else 0


def validate_file(source: str, kind: str, fmt: str = "auto", split: str = "train", tokenizer: str | None = None,
                  template: str | None = None, max_length: int | None = None, max_prompt_length: int | None = None,
                  max_lines: int | None = None, strict: bool = False, out: Callable[[str], None] = print) -> int:
    """Check one file (or pretrain directory). Token-length checks run only with ``tokenizer``."""
    if kind not in KINDS:
        raise ConfigError(f"--format: {kind!r} is not one of {', '.join(KINDS)}")
    if fmt not in FORMATS[kind]:
        raise ConfigError(f"--data-format: {fmt!r} is not a {kind} format ({', '.join(FORMATS[kind])})")
    if tokenizer is None and (template, max_length, max_prompt_length) != (None, None, None):
        raise ConfigError("--template, --max-length and --max-prompt-length need --tokenizer")
    if max_prompt_length is not None and kind not in ("dpo", "kto"):
        raise ConfigError(f"--max-prompt-length: only applies to dpo and kto data, this is {kind}")
    max_length = 2048 if max_length is None else max_length  # the recipe's default
    if max_length <= 1:
        raise ConfigError(f"--max-length: must be > 1, got {max_length}")
    if max_prompt_length is not None and not 0 < max_prompt_length < max_length:
        raise ConfigError(f"--max-prompt-length: must be between 1 and max_length-1 ({max_length - 1}), "
                          f"got {max_prompt_length}")
    limits = None
    if tokenizer is not None:
        from dpo_dist.data.render import TemplateError
        from dpo_dist.config.recipe import ModelConfig

        try:
            loaded = _load_limits(ModelConfig(name_or_path=tokenizer), template, out)
        except TemplateError as err:  # training refuses it too, before any row
            out(_one_line(f"error: {err}"))
            loaded = None
            check = check_data(source, kind, fmt, split, None)
            for line in report_lines(check, max_lines):
                out(line)
            return 1
        limits = LengthLimits(*loaded, max_length, max_prompt_length) if loaded else None
    check = check_data(source, kind, fmt, split, limits)
    for line in report_lines(check, max_lines):
        out(line)
    return 1 if check.failed(strict) else 0


def run(args) -> int:
    """The `dpo-dist validate` command, from parsed arguments."""
    if args.max_lines is not None and args.max_lines < 0:
        raise ConfigError(f"--max-lines: must be >= 0, got {args.max_lines}")
    if args.data is not None:
        if args.recipe is not None or args.overrides:
            raise ConfigError("give either a RECIPE (with key=value overrides) or --data FILE, not both")
        if args.profile is not None:
            raise ConfigError("--profile: only with a RECIPE (a profile applies to a recipe's stages)")
        if args.kind is None:
            raise ConfigError("--data needs --format sft|dpo|pretrain (the kind of data)")
        return validate_file(args.data, args.kind, args.data_format, args.split, args.tokenizer, args.template,
                             args.max_length, args.max_prompt_length, args.max_lines, args.strict)
    if args.recipe is None:
        raise ConfigError("give a RECIPE, or --data FILE --format sft|dpo|pretrain")
    given = [opt for opt, value in (("--format", args.kind), ("--tokenizer", args.tokenizer),
                                    ("--template", args.template), ("--max-length", args.max_length),
                                    ("--max-prompt-length", args.max_prompt_length)) if value is not None]
    if given or args.data_format != "auto" or args.split != "train":
        raise ConfigError(f"{', '.join(given) or '--data-format/--split'}: only with --data; a recipe sets "
                          "these per stage (override them with key=value)")
    return validate_recipe(args.recipe, args.overrides, args.max_lines, args.strict, profile=args.profile)


def add_parser(sub) -> None:
    p = sub.add_parser("validate", help="check a recipe's data (or one data file) without loading a model: "
                       "every bad row as FILE:LINE: field: reason")
    p.add_argument("recipe", nargs="?", help="recipe to check (every stage's data.train and data.eval)")
    p.add_argument("overrides", nargs="*", help="key=value overrides")
    p.add_argument("--data", metavar="FILE", help="check this file (or pretrain directory) instead of a recipe")
    p.add_argument("--format", dest="kind", choices=list(KINDS), help="with --data: the kind of data")
    p.add_argument("--data-format", default="auto", help="with --data: firefly, openai, sharegpt, alpaca, pair, "
                   "ultrafeedback, unpaired, text or auto (default)")
    p.add_argument("--split", default="train", help="with --data: split of a Hugging Face dataset (default train)")
    p.add_argument("--tokenizer", metavar="PATH", help="with --data: tokenizer for token-length checks")
    p.add_argument("--template", help="with --tokenizer: chat template name (default: the tokenizer's own)")
    p.add_argument("--max-length", type=int, help="with --tokenizer: max_length (default 2048)")
    p.add_argument("--max-prompt-length", type=int, help="with --tokenizer, dpo: max_prompt_length "
                   "(default max_length/2)")
    p.add_argument("--max-lines", type=int, metavar="N", help="show at most N lines per kind of problem")
    p.add_argument("--strict", action="store_true", help="also fail (exit 1) on warnings")
    p.add_argument("--profile", help="with a RECIPE: also run the checks training under this launch profile makes "
                   "before loading weights (global batch split, methods, precision)")
    p.set_defaults(func=run)
