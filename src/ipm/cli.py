"""`ipm` command line: a thin layer over `ipm.IPM`. Errors become one line and exit code 1."""

from __future__ import annotations

import json
import os
import sqlite3
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from . import engine
from .config import Config, Paths
from .errors import IndexDamaged, IPMError, IPMWarning, NotFound, environment_error_message

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="IPM: Indexed Parametric Memory. Store memories verbatim, train a LoRA index, recall exactly.")
# A memory's text is printed as it is stored: no rich markup ("[b]") and no emoji codes (":dog:")
# soft_wrap: a line longer than the terminal (an ID, a path) is not broken in two, nor cut at 80
# columns when stdout is a pipe that a script reads
out = Console(emoji=False, soft_wrap=True)
err = Console(stderr=True, soft_wrap=True, emoji=False)

Home = typer.Option(None, "--home", help="Home directory (default: $IPM_HOME or ./.ipm).", show_default=False)
User = typer.Option(engine.DEFAULT_USER, "--user", "-u", help="Namespace (one per user).")
ConfigFile = typer.Option(None, "--config", help="TOML file with Config options.", show_default=False)
Json = typer.Option(False, "--json", help="Print JSON for scripts.")


def _open(home: Optional[Path], config_file: Optional[Path] = None, create: bool = False, **overrides) -> engine.IPM:
    """The engine on `home`. Only commands that add memories create a home: a mistyped --home
    is an error, not an empty store."""
    paths = Paths.at(home)
    if not create and not paths.db.is_file():
        raise NotFound(f"no IPM store at {paths.db}: `ipm add` or `ipm import` creates one "
                       "(--home or $IPM_HOME to use another)")
    if config_file is not None:
        cfg = Config.from_file(config_file)
    elif paths.config_file.is_file():
        cfg = Config.from_file(paths.config_file)
    else:
        cfg = Config()
    cfg = cfg.updated(**{k: v for k, v in overrides.items() if v is not None})
    return engine.open(paths.home, cfg)


Decoding = typer.Option(None, "--decoding", help="hybrid (adapter fused with BM25 and dense candidates) or pure "
                                                  "(adapter over every ID); default from the config.")
Quantize = typer.Option(None, "--quantize", help="int8: the model's linear maps in int8 (x86 CPU; faster asks), none: "
                                                 "the model's dtype, or auto: int8 where the CPU multiplies int8 "
                                                 "itself (VNNI/AMX); default from the config (auto).")
Rerank = typer.Option(None, "--rerank", help="Weight of the base model's likelihood of the question given each of the "
                                             "best hybrid candidates' texts (0 = off; warns unless the index was "
                                             "calibrated with it); default from the config.")


@contextmanager
def _creating(home: Optional[Path]):
    """The engine on `home` for a command that adds memories, creating the home if needed. If
    the command fails (a bad record, a taken ID) or is interrupted before it stored anything, a
    store this command created is removed again, with any directories it made: nothing is left
    behind, not an empty home."""
    paths = Paths.at(home)
    files = [Path(f"{paths.db}{suffix}") for suffix in ("", "-wal", "-shm", "-journal")]
    new = not os.path.lexists(paths.db)  # (a dangling symlink is the user's: kept)
    made = [f for f in files if not os.path.lexists(f)]
    missing = [d for d in (paths.db.parent, *paths.db.parent.parents) if not d.exists()]
    mem = _open(home, create=True)
    try:
        yield mem
    except (IPMError, KeyboardInterrupt):  # refused or interrupted: nothing stored, unless it came after the commit
        if new and not mem.namespaces():  # (or another process stored memories meanwhile)
            mem.store.close()
            for f in made:
                f.unlink(missing_ok=True)
            for d in missing:  # innermost first; only if nothing else was put there meanwhile
                try:
                    d.rmdir()
                except OSError:
                    break
        raise


def _print_json(data) -> None:
    sys.stdout.write(json.dumps(engine.json_safe(data), ensure_ascii=False, indent=2) + "\n")


class _Bars(Progress):
    """Progress bars on stderr that appear with the first bar: an error raised before any work
    starts (a bad option, a missing model) stays one line, with no empty display above it."""

    def __enter__(self):
        return self

    def stop(self) -> None:
        if self.live.is_started:  # (rich ends even a display never shown with a blank line)
            super().stop()

    def add_task(self, *args, **kwargs):
        if not self.live.is_started:
            self.start()
        return super().add_task(*args, **kwargs)


def _progress() -> Progress:
    return _Bars(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                 TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                 console=err, transient=False)


# Bidirectional formatting characters: shown raw, they reorder what follows them on the screen
# (a table's next columns, the rest of a line), as in "Trojan Source".
BIDI_CONTROLS = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def _escaped(text: str) -> str:
    """`text` with its control characters but tab and newline, and its bidirectional controls,
    written out ("\\x1b", "\\u202e"): shown on a terminal, a stored escape sequence cannot act on
    it, nor a stored override reorder what is printed after it."""
    import unicodedata

    return "".join(repr(ch)[1:-1] if ch not in "\t\n" and unicodedata.category(ch) == "Cc"
                   else f"\\u{ord(ch):04x}" if ch in BIDI_CONTROLS else ch for ch in text)


def _print_text(text: str, indent: str = "") -> None:
    """A memory's text as it is stored: past rich, which would wrap it to the terminal's width,
    turn tabs into spaces and drop control characters; escaped on a terminal (_escaped)."""
    sys.stdout.write(indent + (_escaped(text) if sys.stdout.isatty() else text) + "\n")


def _warn_if_untrained(mem: engine.IPM, user: str) -> None:
    if mem.status(user)["index_version"] is None:
        err.print(f"warning: namespace {user!r} has no trained index yet: only memories sharing the question's words "
                  "can be found (`ipm train` builds the index)", markup=False, highlight=False)


@app.command()
def add(text: str = typer.Argument(..., help="The memory, stored byte-exact."),
        id: Optional[str] = typer.Option(None, "--id", help="Semantic ID (domain_topic_entity); minted if omitted."),
        question: List[str] = typer.Option([], "--question", "-q", help="A question this memory answers (repeatable)."),
        user: str = User, home: Optional[Path] = Home, json_out: bool = Json):
    """Add one memory."""
    with _creating(home) as mem:
        m = mem.add(text, id=id, questions=question, user=user)
    if json_out:
        _print_json(m.to_dict())
    else:
        out.print(f"added [bold]{m.id}[/bold]")


@app.command("import")
def import_(file: Path = typer.Argument(..., help="memories.json {id: text}, JSON/JSONL {id?, text, questions?}, "
                                                  "or [{question, memory_id}] training questions."),
            user: str = User, home: Optional[Path] = Home, json_out: bool = Json):
    """Import memories or training questions from a file (all or nothing)."""
    data, kind = engine.read_records(file)  # a file that cannot be read creates no home
    with _creating(home) as mem:
        r = mem.import_records(data, user=user, source=str(file), kind=kind)
    if json_out:
        _print_json(r.to_dict())
    else:
        out.print(f"imported {r.memories} memories and {r.questions} questions into namespace {user!r}")


@app.command()
def update(id: str, text: str, user: str = User, home: Optional[Path] = Home, json_out: bool = Json):
    """Replace a memory's text; the old version is kept in its history."""
    m = _open(home).update(id, text, user=user)
    if json_out:
        _print_json(m.to_dict())
    else:
        out.print(f"updated [bold]{m.id}[/bold] to version {m.version}")


@app.command()
def train(user: str = User, home: Optional[Path] = Home, config: Optional[Path] = ConfigFile,
          base_model: Optional[str] = typer.Option(None, "--base-model", help="Local HF model dir or .gguf (default: embedded SmolLM2-135M-Instruct)."),
          epochs: Optional[int] = typer.Option(None, "--epochs"),
          lora_r: Optional[int] = typer.Option(None, "--lora-r"),
          lora_layers: Optional[int] = typer.Option(None, "--lora-layers", help="Train LoRA in the top N layers (0 = all)."),
          base_layers: Optional[int] = typer.Option(None, "--base-layers",
                                                    help="Keep N decoder layers of the base model: the top --lora-layers "
                                                         "and the lowest others (0 = all)."),
          questions_per_memory: Optional[int] = typer.Option(None, "--questions-per-memory"),
          question_source: Optional[str] = typer.Option(None, "--question-source", help="builtin, llm or both."),
          question_kinds: Optional[str] = typer.Option(None, "--question-kinds",
                                                       help="Built-in question kinds, comma-separated: "
                                                            "templates, wh, keywords, spans, id, related, aliases (default: all but related and aliases)."),
          seed: Optional[int] = typer.Option(None, "--seed"),
          also_calibrate: List[str] = typer.Option([], "--also-calibrate",
                                                   help="Also calibrate this decoding's abstention threshold (pure or "
                                                        "hybrid), so `ipm ask --decoding` can switch to it (repeatable)."),
          full: bool = typer.Option(False, "--full", help="Retrain from scratch instead of folding new or changed "
                                                         "memories into the current index."),
          json_out: bool = Json):
    """Train a new index version and make it current: incrementally (new and changed memories,
    plus replayed questions of the others) when an index exists, else on every memory."""
    mem = _open(home, config, base_model=base_model, epochs=epochs, lora_r=lora_r, lora_layers=lora_layers,
                base_layers=base_layers, questions_per_memory=questions_per_memory, question_source=question_source, seed=seed,
                also_calibrate=also_calibrate or None,
                question_kinds=None if question_kinds is None else [k.strip() for k in question_kinds.split(",") if k.strip()])
    with _progress() as bar:
        tasks = {}

        def progress(phase, done, total, loss):
            if phase not in tasks:
                label = {"questions": "writing questions", "embed": "embedding questions", "train": "training",
                         "calibrate": "calibrating"}[phase]
                tasks[phase] = bar.add_task(label, total=total, info="")
            bar.update(tasks[phase], completed=done, info=f"loss {loss:.3f}" if loss is not None else "")

        manifest = mem.train(user=user, progress=progress, full=full)
    if json_out:
        _print_json({k: manifest[k] for k in ("namespace", "version", "base_model", "threshold", "metrics")}
                    | {"memories": len(manifest["ids"]), "up_to_date": bool(manifest.get("up_to_date"))})
    elif manifest.get("up_to_date"):
        out.print(f"index {manifest['version']} is up to date: no new or changed memories (--full retrains anyway)")
    else:
        m = manifest["metrics"]
        how = f"incrementally ({m['incremental']['new_memories']} new or changed) " if m.get("incremental") else ""
        out.print(f"trained index {manifest['version']} {how}on {len(manifest['ids'])} memories: "
                  f"{m['examples']} questions x {m['epochs']} epochs in {m['total_seconds']:.0f}s "
                  f"(final loss {m['loss_last']:.3f}, abstain below {manifest['threshold']:.3f})")
        if m.get("full_because"):
            out.print(f"retrained from scratch, not incrementally: {m['full_because']}")


@app.command()
def ask(questions: List[str] = typer.Argument(..., metavar="QUESTION...", help="One or more questions."),
        k: int = typer.Option(1, "-k", "--k", help="How many hits."),
        decoding: Optional[str] = Decoding, quantize: Optional[str] = Quantize, rerank: Optional[float] = Rerank,
        user: str = User, home: Optional[Path] = Home, json_out: bool = Json):
    """Recall the memory that answers a question (or say there is none). Several questions are
    answered in one batch; --json then prints a list."""
    mem = _open(home, decoding=decoding, quantize=quantize, rerank_likelihood=rerank)
    answers = mem.ask_many(questions, k=k, user=user)  # a bad question or -k: the error alone
    _warn_if_untrained(mem, user)
    if json_out:
        _print_json(answers[0].to_dict() if len(answers) == 1 else [a.to_dict() for a in answers])
        return
    for a in answers:
        if len(answers) > 1:
            out.print(f"[cyan]{escape(_escaped(a.question))}[/cyan]", highlight=False)
        if a.abstained and not a.hits:
            out.print("[yellow]no memory[/yellow] answers that")
            continue
        for h in a.hits:
            tag = " [dim](pending: not trained yet)[/dim]" if h.pending else ""
            out.print(f"[bold]{h.id}[/bold] [dim]{h.score:.3f}[/dim]{tag}")
            _print_text(h.text, "  ")


@app.command()
def show(id: str, history: bool = typer.Option(False, "--history", help="Show earlier versions too."),
         user: str = User, home: Optional[Path] = Home, json_out: bool = Json):
    """Show a memory verbatim."""
    mem = _open(home)
    m = mem.get(id, user=user)
    versions = mem.history(id, user=user) if history else None
    if json_out:
        _print_json(m.to_dict() | ({"history": versions} if history else {}))
        return
    if versions:
        for v in versions:
            out.print(f"[dim]v{v['version']} {v['created_at']}[/dim]")
            _print_text(v["text"], "  ")
        return
    _print_text(m.text)


@app.command("list")
def list_(user: str = User, home: Optional[Path] = Home, json_out: bool = Json,
          limit: Optional[int] = typer.Option(None, "--limit", "-n", min=1, help="At most N memories."),
          offset: int = typer.Option(0, "--offset", min=0, help="Skip the first N (oldest first).")):
    """List memories, oldest first."""
    mem = _open(home)
    memories = mem.list(user=user, limit=limit, offset=offset)
    if json_out:
        _print_json([m.to_dict() for m in memories])
        return
    table = Table("id", "text", "updated")
    for m in memories:
        text = _escaped(m.text)  # a table is for reading: `show` or --json give the text as stored
        table.add_row(m.id, Text(text if len(text) < 80 else text[:77] + "..."), m.updated_at[:19])
    out.print(table)
    try:
        status = mem.status(user)
    except IndexDamaged as e:  # the memories are in the store, whatever the state of the index
        err.print(f"[yellow]warning:[/yellow] {escape(str(e))}", highlight=False)
        return
    out.print(f"{status['memories']} memories, {status['indexed']} indexed, {status['pending']} pending, "
              f"{status['changed']} changed (index {status['index_version'] or 'none'})")


@app.command()
def forget(id: str, user: str = User, home: Optional[Path] = Home, json_out: bool = Json):
    """Erase a memory now: it can never be recalled again, and its text is purged."""
    _open(home).forget(id, user=user)
    if json_out:
        _print_json({"forgotten": id})
    else:
        out.print(f"forgot {id}")


@app.command()
def log(user: str = User, limit: int = typer.Option(50, "--limit", "-n", min=1, help="The last N events."),
        home: Optional[Path] = Home,
        json_out: bool = Json):
    """Show the event log (add, update, import, forget, train, ask)."""
    events = _open(home).log(user=user, limit=limit)
    if json_out:
        _print_json([e.to_dict() for e in events])
        return
    for e in events:
        ids = ", ".join(e.ids[:5]) + (f" (+{len(e.ids) - 5})" if len(e.ids) > 5 else "")
        out.print(f"[dim]{e.seq:>5} {e.ts[:19]}[/dim] [bold]{e.action:<9}[/bold] {ids}", highlight=False)


@app.command("eval")
def eval_(questions_file: Path = typer.Argument(..., help="[{question, memory_id}] held-out questions; "
                                                           "memory_id null = out of scope, a list = any of them."),
          baselines: str = typer.Option("", "--baselines", help="Comma-separated: bm25,dense."),
          decoding: Optional[str] = Decoding, quantize: Optional[str] = Quantize, rerank: Optional[float] = Rerank,
          user: str = User, home: Optional[Path] = Home, json_out: bool = Json):
    """Score recall on held-out questions (an abstention is a miss; the ranking behind it apart)."""
    from .evaluate import evaluate, load_questions

    mem = _open(home, decoding=decoding, quantize=quantize, rerank_likelihood=rerank)
    qs = load_questions(questions_file)
    names = [b.strip() for b in baselines.split(",") if b.strip()]
    with _progress() as bar:
        tasks = []

        def progress(done, total):  # the bar appears once the questions are checked and asking starts
            if not tasks:
                tasks.append(bar.add_task("evaluating", total=total, info=""))
            bar.update(tasks[0], completed=done)

        report = evaluate(mem, qs, user=user, baselines=names, progress=progress)
    _warn_if_untrained(mem, user)  # its figures are of word matches, not of an index
    if json_out:
        _print_json(report)
        return
    table = Table("system", "recall@1", "recall@5", "recall@10", "MRR", "abstained", "invalid IDs", title=f"{report['n']} held-out questions")
    for name in ["ipm"] + names:
        r = report[name]
        table.add_row(name, *(f"{r[c]:.3f}" if c in r else "-" for c in ("recall@1", "recall@5", "recall@10", "mrr")),
                      f"{r['abstained']:.3f}" if "abstained" in r else "-",
                      f"{r['invalid_id_rate']:.3f}" if "invalid_id_rate" in r else "-")
    out.print(table)
    r = report["ipm"]
    ranked = r["ranking"]
    if ranked["n"]:
        out.print(f"ipm ({mem.config.decoding} decoding): an abstention counts as a miss; its best guesses, also "
                  f"when it abstains, rank the right memory first for {ranked['recall@1']:.3f} (recall@5 "
                  f"{ranked['recall@5']:.3f}, @10 {ranked['recall@10']:.3f}, MRR {ranked['mrr']:.3f}); wrong answers "
                  f"{r['wrong_answer_rate']:.3f}, latency p50 {r['latency_ms_p50']:.0f} ms, p95 {r['latency_ms_p95']:.0f} ms")
    if "out_of_scope" in r:
        out.print(f"out-of-scope questions refused: {r['out_of_scope']['refused']:.3f} of {r['out_of_scope']['n']}")


@app.command()
def status(user: str = User, home: Optional[Path] = Home, json_out: bool = Json,
           every: bool = typer.Option(False, "--all", help="Every namespace that holds memories, one each.")):
    """How many memories, how many indexed, which index version."""
    mem = _open(home)
    statuses = [mem.status(u) for u in mem.namespaces()] if every else [mem.status(user)]
    if json_out:
        _print_json(statuses if every else statuses[0])
        return
    if not statuses:
        out.print("no namespace holds memories")
    for s in statuses:
        out.print(f"namespace {s['user']}: {s['memories']} memories, {s['indexed']} indexed, {s['pending']} pending, "
                  f"{s['changed']} changed; "
                  + (f"index {s['index_version']} on {s['base_model']}" if s["index_version"] else
                     "no index yet (`ipm train`)"), markup=False, highlight=False)


from .cli_server import mcp, serve  # noqa: E402

app.command()(serve)
app.command()(mcp)


def _show_warning(message, category, filename, lineno, file=None, line=None, _default=warnings.showwarning):
    """An IPMWarning as one line on stderr ("warning: ..."); any other as Python shows it."""
    if issubclass(category, IPMWarning):
        err.print(f"[yellow]warning:[/yellow] {escape(str(message))}", highlight=False)
    else:
        _default(message, category, filename, lineno, file, line)


def run(typer_app: typer.Typer) -> None:
    """Run a typer app the CLI's way: an IPMError is one line on stderr and exit code 1, a usage
    error click's message and exit code 2, Ctrl-C exit code 130; never a traceback for these.
    An IPMWarning is one line on stderr. SIGTERM (`kill`, a service stopping) is taken as Ctrl-C,
    so that what a command was doing is undone as for Ctrl-C (an import into a new home leaves
    none behind, a training its temporary version), not cut off mid-way; `ipm serve` installs
    its own handling."""
    import signal

    def terminated(signum, frame):
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, terminated)
    except ValueError:  # not the main thread: leave the signal alone
        previous = None
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            code = typer_app(standalone_mode=False)
    except IPMError as e:
        err.print(f"[red]error:[/red] {escape(str(e))}", highlight=False)
        sys.exit(1)
    except KeyboardInterrupt:
        code = 130
    except (OSError, sqlite3.OperationalError) as e:  # the disk's or another process's doing: the user's to act on
        said = environment_error_message(e)
        if said is None:
            raise
        err.print(f"[red]error:[/red] {escape(said)}", highlight=False)
        sys.exit(1)
    except Exception as e:
        # Usage errors, by their interface: typer 0.2x raises its own copy of click's classes
        # (typer._click), older typers click's own.
        if callable(getattr(e, "show", None)) and isinstance(getattr(e, "exit_code", None), int):
            e.show()
            sys.exit(e.exit_code)
        if type(e).__name__ == "Exit":  # typer.Exit / click's Exit
            code = getattr(e, "exit_code", 0)
        elif type(e).__name__ == "Abort":
            code = 1
        else:
            raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    # Outside standalone mode, click returns (not raises) the code of an Exit, and typer turns
    # Ctrl-C into Exit(130).
    if isinstance(code, int) and code:
        if code == 130:
            err.print("[red]interrupted[/red]")
        sys.exit(code)


def main() -> None:
    run(app)
