"""The `ipm` command as a user meets it, through its real entry point (`ipm.cli.main`): usage
errors and ipm's own errors as one line and an exit code, never a traceback; a memory's text
printed as stored; no home created by a command that only reads. No model is loaded here."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest


def run(capsys, monkeypatch, *args) -> tuple[int, str, str]:
    """Run `ipm ARGS` in process: (exit code, stdout, stderr)."""
    from ipm.cli import main

    monkeypatch.setattr(sys, "argv", ["ipm", *map(str, args)])
    monkeypatch.setenv("COLUMNS", "400")  # rich would wrap long lines at the test's terminal width
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("args,says", [
    (["log", "--limit", "abc"], "Invalid value for '--limit'"),
    (["log", "--limit", "0"], "greater than or equal to 1"),
    (["nosuchcommand"], "No such command"),
    (["list", "--bogus"], "No such option"),
    (["add"], "Missing argument"),
    (["serve", "--port", "99999"], "Invalid value for '--port'"),
])
def test_usage_errors_are_one_message_and_exit_2(capsys, monkeypatch, tmp_path, args, says):
    code, out, err = run(capsys, monkeypatch, *args, *(["--home", tmp_path] if args[0] in ("log", "list") else []))
    assert code == 2
    assert says in err and "Traceback" not in out + err


def test_no_arguments_prints_the_help(capsys, monkeypatch):
    code, out, err = run(capsys, monkeypatch)
    assert code in (0, 2) and "Commands" in out + err and "Traceback" not in out + err


MARKUP = "I wrote [/bold] and [red]red[/red] in my notes :dog: \\[x]"


def test_text_is_printed_as_stored_never_as_markup_or_emoji(capsys, monkeypatch, tmp_path):
    home = tmp_path / "h"
    code, out, _ = run(capsys, monkeypatch, "add", MARKUP, "--id", "note_markup_text", "--home", home)
    assert code == 0 and "note_markup_text" in out
    code, out, err = run(capsys, monkeypatch, "list", "--home", home)
    assert code == 0, err
    assert MARKUP in out
    run(capsys, monkeypatch, "update", "note_markup_text", "second [i]version[/i]", "--home", home)
    code, out, _ = run(capsys, monkeypatch, "show", "note_markup_text", "--history", "--home", home)
    assert code == 0 and MARKUP in out and "second [i]version[/i]" in out
    code, out, _ = run(capsys, monkeypatch, "show", "note_markup_text", "--json", "--home", home)
    assert json.loads(out)["text"] == "second [i]version[/i]"


def test_list_pages_oldest_first(capsys, monkeypatch, tmp_path):
    home = tmp_path / "h"
    for i in range(3):
        run(capsys, monkeypatch, "add", f"Note number {i}.", "--id", f"note_page_n{i}", "--home", home)
    code, out, _ = run(capsys, monkeypatch, "list", "-n", "1", "--offset", "1", "--json", "--home", home)
    assert code == 0 and [m["id"] for m in json.loads(out)] == ["note_page_n1"]
    code, _, err = run(capsys, monkeypatch, "list", "--offset", "-1", "--home", home)
    assert code == 2 and "--offset" in err


def test_a_listing_imports_as_it_is_into_another_namespace_or_home(capsys, monkeypatch, tmp_path):
    """`ipm list --json` is a backup: importing it rebuilds the memories byte for byte, with their
    IDs and questions; a text changed since (its sha256 no longer matches) is refused."""
    home = tmp_path / "h"
    texts = ["My dog's name is Max.", "Zoë's café\u2028opens at 7 — \U0001F600 [b]not markup[/b]\r\n"]
    run(capsys, monkeypatch, "add", texts[0], "--home", home, "-q", "What is my dog called?")
    run(capsys, monkeypatch, "add", texts[1], "--id", "note_cafe_zoe", "--home", home)
    code, listing, _ = run(capsys, monkeypatch, "list", "--json", "--home", home)
    backup = tmp_path / "backup.json"
    backup.write_text(listing, encoding="utf-8")
    for where in (["--user", "copy", "--home", home], ["--home", tmp_path / "other"]):
        code, _, err = run(capsys, monkeypatch, "import", backup, *where)
        assert code == 0, err
        code, out, _ = run(capsys, monkeypatch, "list", "--json", *where)
        assert sorted((m["id"], m["text"], m["questions"], m["sha256"]) for m in json.loads(out)) == \
            sorted((m["id"], m["text"], m["questions"], m["sha256"]) for m in json.loads(listing))
    tampered = json.loads(listing)
    tampered[1]["text"] = tampered[1]["text"].replace("7", "8")
    backup.write_text(json.dumps(tampered), encoding="utf-8")
    code, _, err = run(capsys, monkeypatch, "import", backup, "--user", "third", "--home", home)
    assert code == 1 and "index 1: its sha256 is not that of its text" in err
    code, out, _ = run(capsys, monkeypatch, "list", "--json", "--user", "third", "--home", home)
    assert json.loads(out) == []


def test_an_error_naming_user_input_prints_it_verbatim(capsys, monkeypatch, tmp_path):
    home = tmp_path / "h"
    run(capsys, monkeypatch, "add", "My dog's name is Max.", "--home", home)
    code, out, err = run(capsys, monkeypatch, "show", "[/x]", "--home", home)
    assert code == 1 and out == ""
    assert err.strip() == "error: no memory '[/x]' in namespace 'default' (see `ipm list`)"


@pytest.mark.parametrize("command", [["list"], ["status"], ["log"], ["show", "personal_pet_max"],
                                     ["forget", "personal_pet_max"], ["train"]])
def test_a_command_that_reads_does_not_create_a_home(capsys, monkeypatch, tmp_path, command):
    home = tmp_path / "typo"
    code, _, err = run(capsys, monkeypatch, *command, "--home", home)
    assert code == 1 and "Traceback" not in err
    assert err.startswith("error: no IPM store at") and len(err.strip().splitlines()) == 1
    assert not home.exists()


def test_an_import_file_that_cannot_be_read_creates_no_home(capsys, monkeypatch, tmp_path):
    home, bad = tmp_path / "new", tmp_path / "bad.json"
    bad.write_text('{"personal_pet_max": ')
    for path in (tmp_path / "missing.json", bad, tmp_path):
        code, _, err = run(capsys, monkeypatch, "import", path, "--home", home)
        assert code == 1 and err.startswith("error: ") and "Traceback" not in err
    assert not home.exists()


def test_refused_input_leaves_no_new_home_behind_and_an_existing_one_as_it_was(capsys, monkeypatch, tmp_path):
    home, bad = tmp_path / "a" / "b" / "new", tmp_path / "bad.jsonl"
    bad.write_text('{"text": "My dog is Max."}\n{"text": ""}\n')
    refused = [["import", bad], ["add", "My dog is Max.", "--id", "not an id"], ["add", ""],
               ["add", "My dog is Max.", "--user", "bad user"]]
    for command in refused:
        code, _, err = run(capsys, monkeypatch, *command, "--home", home)
        assert code == 1 and err.startswith("error: ") and "Traceback" not in err, (command, err)
        assert not (tmp_path / "a").exists(), command  # nor the directories made for it
    from ipm.engine import IPM

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:  # Ctrl-C before anything was stored: the same
        m.setattr(IPM, "import_records", interrupted)
        code, _, err = run(capsys, monkeypatch, "import", bad, "--home", home)
        assert code == 130 and not (tmp_path / "a").exists(), err
    (tmp_path / "kept").mkdir()  # a directory the user made stays, empty as it was
    code, _, _ = run(capsys, monkeypatch, "import", bad, "--home", tmp_path / "kept")
    assert code == 1 and list((tmp_path / "kept").iterdir()) == []
    assert run(capsys, monkeypatch, "add", "My dog is Max.", "--home", home)[0] == 0
    for command in refused:  # an existing home is kept, with what it holds
        assert run(capsys, monkeypatch, *command, "--home", home)[0] == 1
    code, out, _ = run(capsys, monkeypatch, "list", "--json", "--home", home)
    assert code == 0 and [m["text"] for m in json.loads(out)] == ["My dog is Max."]


def test_a_new_home_another_process_stored_into_meanwhile_is_kept(capsys, monkeypatch, tmp_path):
    """The refused command made the store, but memories arrived from elsewhere before it
    failed: they are not deleted with it."""
    import ipm
    from ipm.engine import IPM
    from ipm.errors import InvalidInput

    home = tmp_path / "new"

    def other_process_then_refuse(self, *args, **kwargs):
        other = ipm.open(home)
        other.store.add("default", "My cat is called Luna.")  # (IPM.add is this stand-in)
        other.store.close()
        raise InvalidInput("refused")

    monkeypatch.setattr(IPM, "add", other_process_then_refuse)
    code, _, err = run(capsys, monkeypatch, "add", "My dog is Max.", "--home", home)
    assert code == 1 and err.strip() == "error: refused"
    monkeypatch.undo()
    code, out, _ = run(capsys, monkeypatch, "list", "--json", "--home", home)
    assert code == 0 and [m["text"] for m in json.loads(out)] == ["My cat is called Luna."]


def test_an_ipm_warning_is_one_line_on_stderr(capsys, monkeypatch, tmp_path):
    """What the engine warns of (an index calibrated under other settings, ...) reaches a CLI
    user as one line, not Python's file:line report with a source line under it."""
    import warnings

    from ipm.engine import IPM
    from ipm.errors import IPMWarning

    home = tmp_path / "h"
    run(capsys, monkeypatch, "add", "My dog is Max.", "--home", home)
    listed = IPM.list

    def warn_then_list(self, *args, **kwargs):
        warnings.warn("namespace 'default': calibrated elsewise [b]x[/b]", IPMWarning, stacklevel=2)
        return listed(self, *args, **kwargs)

    monkeypatch.setattr(IPM, "list", warn_then_list)
    code, out, err = run(capsys, monkeypatch, "list", "--json", "--home", home)
    assert code == 0 and [m["text"] for m in json.loads(out)] == ["My dog is Max."]
    assert err == "warning: namespace 'default': calibrated elsewise [b]x[/b]\n"


def test_a_damaged_index_manifest_is_one_error_naming_the_version(capsys, monkeypatch, tmp_path):
    home = tmp_path / "h"
    run(capsys, monkeypatch, "add", "My dog's name is Max.", "--home", home)
    version = home / "indexes" / "default" / "v0001"
    version.mkdir(parents=True)
    (version.parent / "CURRENT").write_text("v0001")
    for broken in ('{"ids": {', "[]", '{"version": "v0001"}', b"\xff\xfe"):
        (version / "manifest.json").write_bytes(broken if isinstance(broken, bytes) else broken.encode())
        code, _, err = run(capsys, monkeypatch, "status", "--home", home)
        assert code == 1 and "Traceback" not in err, (broken, err)
        assert err.startswith(f"error: index version {version}") and len(err.strip().splitlines()) == 1
        # Listing needs no index: the memories, and the damage as a warning.
        code, out, err = run(capsys, monkeypatch, "list", "--home", home)
        assert code == 0 and "personal_pet_max" in out and "Traceback" not in err, (broken, err)
        assert err.startswith(f"warning: index version {version}") and len(err.strip().splitlines()) == 1
    (version.parent / "CURRENT").write_bytes(b"\xff")
    code, _, err = run(capsys, monkeypatch, "status", "--home", home)
    assert code == 1 and err.startswith(f"error: {version.parent / 'CURRENT'} cannot be read") and "Traceback" not in err
    for pointer, said in (("../../x", "names '../../x', which is not an index version"), ("v0001", "has no manifest")):
        (version.parent / "CURRENT").write_text(pointer)
        (version / "manifest.json").unlink(missing_ok=True)
        code, _, err = run(capsys, monkeypatch, "ask", "my dog?", "--home", home)
        assert code == 1 and said in err and len(err.strip().splitlines()) == 1, err  # not "no index yet"
    shutil.rmtree(version)  # what the message says to do
    code, out, err = run(capsys, monkeypatch, "status", "--home", home)
    assert code == 0 and "no index yet" in out, err


def test_a_log_limit_past_sqlites_integers_reads_the_whole_log(capsys, monkeypatch, tmp_path):
    home = tmp_path / "h"
    run(capsys, monkeypatch, "add", "My dog's name is Max.", "--home", home)
    code, out, err = run(capsys, monkeypatch, "log", "-n", 10**20, "--json", "--home", home)
    assert code == 0, err
    assert [e["action"] for e in json.loads(out)] == ["add"]


def test_a_home_that_is_a_file_or_a_database_that_is_not_ipms_is_one_error(capsys, monkeypatch, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    code, _, err = run(capsys, monkeypatch, "add", "My dog's name is Max.", "--home", afile)
    assert code == 1 and "is not a directory" in err and "Traceback" not in err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "ipm.db").write_bytes(b"this is not sqlite at all" * 10)
    code, _, err = run(capsys, monkeypatch, "list", "--home", bad)
    assert code == 1 and "cannot be opened as an IPM store" in err and "Traceback" not in err
    assert (bad / "ipm.db").read_bytes() == b"this is not sqlite at all" * 10


def test_status_prints_a_sentence_and_json(capsys, monkeypatch, tmp_path):
    home = tmp_path / "h"
    run(capsys, monkeypatch, "add", "My dog's name is Max.", "--home", home)
    code, out, _ = run(capsys, monkeypatch, "status", "--home", home)
    assert code == 0
    assert out.strip() == "namespace default: 1 memories, 0 indexed, 1 pending, 0 changed; no index yet (`ipm train`)"
    code, out, _ = run(capsys, monkeypatch, "status", "--json", "--home", home)
    assert json.loads(out)["pending"] == 1
    run(capsys, monkeypatch, "add", "I live in Oslo.", "--id", "place_home_oslo", "--user", "bob", "--home", home)
    code, out, _ = run(capsys, monkeypatch, "status", "--all", "--home", home)
    assert code == 0 and [line.split(":")[0] for line in out.strip().splitlines()] == ["namespace bob",
                                                                                     "namespace default"]
    code, out, _ = run(capsys, monkeypatch, "status", "--all", "--json", "--home", home)
    assert [(s["user"], s["memories"]) for s in json.loads(out)] == [("bob", 1), ("default", 1)]
    run(capsys, monkeypatch, "forget", "personal_pet_max", "--home", home)
    run(capsys, monkeypatch, "forget", "place_home_oslo", "--user", "bob", "--home", home)
    code, out, _ = run(capsys, monkeypatch, "status", "--all", "--home", home)
    assert code == 0 and out.strip() == "no namespace holds memories"


def test_ask_without_an_index_says_so_and_still_finds_untrained_memories(capsys, monkeypatch, tmp_path):
    home = tmp_path / "h"
    run(capsys, monkeypatch, "add", "My dog's name is Max.", "--id", "personal_pet_max", "--home", home)
    code, out, err = run(capsys, monkeypatch, "ask", "What is my dog's name?", "--json", "--home", home)
    assert code == 0
    assert "has no trained index yet" in err
    assert [h["id"] for h in json.loads(out)["hits"]] == ["personal_pet_max"]
    (tmp_path / "q.json").write_text('[{"question": "my dog?", "memory_id": "personal_pet_max"}]')
    code, out, err = run(capsys, monkeypatch, "eval", tmp_path / "q.json", "--json", "--home", home)
    assert code == 0 and "has no trained index yet" in err and json.loads(out)["n"] == 1  # its figures are word matches


RAW = "Tabs\there and there\t, a bell \x07, a lone \r return, and a line longer than any terminal is wide " * 3


def test_ask_and_history_print_the_text_byte_for_byte_whatever_the_terminal(capsys, monkeypatch, tmp_path):
    home = tmp_path / "h"
    run(capsys, monkeypatch, "add", RAW, "--id", "note_raw_text", "--home", home)
    run(capsys, monkeypatch, "update", "note_raw_text", RAW + "!", "--home", home)
    monkeypatch.setattr("ipm.cli.out.width", 40)  # rich wraps at this, and drops \r and \x07, and expands tabs
    code, out, err = run(capsys, monkeypatch, "ask", "tabs bell return terminal", "--home", home)
    assert code == 0, err
    assert out.endswith("\n  " + RAW + "!\n")
    code, out, err = run(capsys, monkeypatch, "show", "note_raw_text", "--history", "--home", home)
    assert code == 0 and "\n  " + RAW + "\n" in out and out.endswith("\n  " + RAW + "!\n"), out
    # On a terminal a stored escape sequence is shown, not obeyed; tabs and newlines stay.
    run(capsys, monkeypatch, "add", "Red \x1b[31malert\x1b[0m\tand\na bell \x07", "--id", "note_escape_text",
        "--home", home)
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    code, out, _ = run(capsys, monkeypatch, "show", "note_escape_text", "--home", home)
    assert out == "Red \\x1b[31malert\\x1b[0m\tand\na bell \\x07\n"
    monkeypatch.setattr("ipm.cli.out.width", 400)
    code, out, _ = run(capsys, monkeypatch, "list", "--home", home)  # and in the table, terminal or not
    assert code == 0 and "Red \\x1b[31malert" in out and "\x1b[31malert" not in out and "\x07" not in out
    run(capsys, monkeypatch, "add", "Swapped \u202e sdrow", "--id", "note_bidi_text", "--home", home)
    code, out, _ = run(capsys, monkeypatch, "list", "--home", home)  # a stored override reorders nothing
    assert code == 0 and "Swapped \\u202e sdrow" in out and "\u202e" not in out


def test_lines_are_not_broken_at_the_console_width(capsys, monkeypatch, tmp_path):
    """A script reading `ipm add` or `ipm train` through a pipe gets each line whole (rich
    breaks lines at 80 columns when stdout is not a terminal)."""
    home = tmp_path / "h"
    long_id = "note_" + "g" * 60 + "_long"
    monkeypatch.setattr("ipm.cli.out.width", 40)
    code, out, err = run(capsys, monkeypatch, "add", "A memory with a long ID.", "--id", long_id, "--home", home)
    assert code == 0 and out == f"added {long_id}\n", out


def test_an_error_before_any_work_is_one_line_with_nothing_above_it(capsys, monkeypatch, tmp_path):
    home = tmp_path / "h"
    run(capsys, monkeypatch, "add", "My dog's name is Max.", "--id", "personal_pet_max", "--home", home)
    for args in (["train", "--base-model", tmp_path / "nowhere"], ["train", "-u", "nobody"],
                 ["ask", "   "], ["ask", "my dog?", "-k", "0"], ["eval", tmp_path / "q.json", "--baselines", "bm42"]):
        (tmp_path / "q.json").write_text('[{"question": "my dog?", "memory_id": "personal_pet_max"}]')
        code, out, err = run(capsys, monkeypatch, *args, "--home", home)
        assert code == 1 and out == "" and err.count("\n") == 1 and err.startswith("error: "), (args, err)


@pytest.mark.parametrize("raised,code,says", [(KeyboardInterrupt, 130, "interrupted"), ("exit", 3, ""),
                                              ("usage", 2, "No such option")])
def test_the_runner_turns_interrupts_exits_and_usage_errors_into_exit_codes(capsys, monkeypatch, raised, code, says):
    import typer

    from ipm.cli import run

    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)

    @app.command()
    def command(flag: bool = False):
        if raised == "exit":
            raise typer.Exit(3)
        if raised is KeyboardInterrupt:
            raise KeyboardInterrupt

    monkeypatch.setattr(sys, "argv", ["prog", "--bogus"] if raised == "usage" else ["prog"])
    with pytest.raises(SystemExit) as e:
        run(app)
    err = capsys.readouterr().err
    assert e.value.code == code and says in err and "Traceback" not in err


def test_the_runner_turns_a_file_system_error_into_one_line_and_exit_1(capsys, monkeypatch):
    import typer

    from ipm.cli import run

    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)

    @app.command()
    def command(flag: bool = False):
        Path("/nonexistent-dir-for-ipm-test/ipm.db").read_bytes()  # what an unreadable home raises, as any user

    monkeypatch.setattr(sys, "argv", ["prog"])
    with pytest.raises(SystemExit) as e:
        run(app)
    err = capsys.readouterr().err
    assert e.value.code == 1 and "Traceback" not in err
    assert err.strip() == "error: No such file or directory: /nonexistent-dir-for-ipm-test/ipm.db"


def test_a_full_disk_is_said_to_be_one_not_a_damaged_store(capsys, monkeypatch, tmp_path):
    """SQLite's "database or disk is full" when the store opens, or on a write after: one line
    that points at the disk (not "move the store away"), exit 1."""
    import sqlite3

    import typer

    from ipm.cli import run
    from ipm.errors import HomeError
    from ipm.store import Store

    def full(*args, **kwargs):
        e = sqlite3.OperationalError("database or disk is full")
        e.sqlite_errorname = "SQLITE_FULL"
        raise e

    def locked(*args, **kwargs):
        e = sqlite3.OperationalError("database is locked")
        e.sqlite_errorname = "SQLITE_BUSY"
        raise e

    def read_only(*args, **kwargs):
        e = sqlite3.OperationalError("attempt to write a readonly database")
        e.sqlite_errorname = "SQLITE_READONLY"
        raise e

    from ipm import store as store_module
    cantopen = sqlite3.OperationalError("unable to open database file")
    cantopen.sqlite_errorname = "SQLITE_CANTOPEN"
    with monkeypatch.context() as m:  # a read-only mount (root can write anything else)
        m.setattr(store_module.os, "statvfs", lambda p: type("S", (), {"f_flag": store_module.os.ST_RDONLY})())
        assert "is on a read-only file system" in store_module.store_error_message(cantopen, tmp_path / "ipm.db")
        assert "is it full?" in store_module.store_error_message(cantopen, "the store")  # a label: not told
    assert "is it full?" in store_module.store_error_message(cantopen, tmp_path / "ipm.db")
    for fails, says in ((full, "cannot be read or written .*is it full.*likely intact"),
                        (locked, "is locked by another process writing to it .*try again"),
                        (read_only, "cannot be written .*give this user write permission on the home")):
        with monkeypatch.context() as m:
            m.setattr(Store, "_conn", lambda self: type("Conn", (), {"executescript": fails, "close": lambda _: None})())
            with pytest.raises(HomeError, match=says):
                Store(tmp_path / "ipm.db")
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)

    @app.command()
    def command(flag: bool = False):
        full()

    monkeypatch.setattr(sys, "argv", ["prog"])
    with pytest.raises(SystemExit) as e:
        run(app)
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.count("\n") == 1
    assert err.startswith("error: the store cannot be read or written (database or disk is full): check the disk")


def test_json_output_prints_a_diverged_loss_as_null(capsys):
    from ipm.cli import _print_json

    _print_json({"loss_last": float("nan"), "losses": [1.0, float("inf")]})
    assert json.loads(capsys.readouterr().out) == {"loss_last": None, "losses": [1.0, None]}  # strict JSON


def test_an_id_that_is_not_utf8_is_not_found_and_nothing_changes(capsys, monkeypatch, tmp_path):
    home = tmp_path / "h"
    run(capsys, monkeypatch, "add", "My dog's name is Max.", "--home", home)
    bad = "caf\udce9"  # the byte 0xe9 as a shell passes it in argv (surrogateescape)
    for command in (["show", bad], ["forget", bad], ["update", bad, "new text"]):
        code, _, err = run(capsys, monkeypatch, *command, "--home", home)
        assert code == 1 and err.startswith("error: no memory") and "Traceback" not in err, (command, err)
    code, out, _ = run(capsys, monkeypatch, "list", "--json", "--home", home)
    assert [m["id"] for m in json.loads(out)] == ["personal_pet_max"]


def test_eval_refuses_a_max_k_below_the_recall_it_scores_before_asking(capsys, monkeypatch, tmp_path):
    home = tmp_path / "h"
    run(capsys, monkeypatch, "add", "My dog's name is Max.", "--home", home)
    (home / "ipm.toml").write_text("max_k = 5\n")
    questions = tmp_path / "q.json"
    questions.write_text(json.dumps([{"question": "What is my dog called?", "memory_id": "personal_pet_max"}]))
    code, _, err = run(capsys, monkeypatch, "eval", questions, "--home", home)
    assert code == 1 and "needs max_k of at least 10 (it is 5" in err and "Traceback" not in err


def test_the_server_programs_print_usage_errors_without_a_traceback(capsys, monkeypatch):
    from ipm.cli_server import run_alone, serve

    monkeypatch.setattr(sys, "argv", ["ipm-server", "--bogus"])
    with pytest.raises(SystemExit) as e:
        run_alone(serve)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "No such option" in err and "Traceback" not in err


def test_the_readme_lists_every_config_option_with_its_default():
    """The README's table of options is the user's reference: a field added, renamed or given
    another default without it fails here."""
    import dataclasses
    import re

    from ipm.config import Config

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    start = readme.index("| option | default | what it sets |")
    rows = [line for line in readme[start:readme.index("\n\n", start)].splitlines()[2:]]
    documented = {}
    for row in rows:
        names_cell, defaults_cell = row.split("|")[1:3]
        names = re.findall(r"`(\w+)`", names_cell)
        defaults = [d.strip() for d in defaults_cell.split(",")] if len(names) > 1 else [defaults_cell.strip()]
        assert len(defaults) == len(names), row
        documented.update(zip(names, defaults))
    fields = {f.name: getattr(Config(), f.name) for f in dataclasses.fields(Config)}
    assert set(documented) == set(fields)
    for name, value in fields.items():
        cell = re.sub(r" \(off\)$", "", documented[name]).strip("`")
        if isinstance(value, bool):
            assert cell == str(value).lower(), name
        elif isinstance(value, (int, float)):
            assert float(cell) == value, name
        elif isinstance(value, str) or value is None:
            assert cell == ("None" if value is None else f'"{value}"'), name
        elif value == []:
            assert cell == "[]", name
        # the other lists are described in words (every projection; all but two kinds)


def test_a_seed_past_64_bits_is_refused_before_training(capsys, monkeypatch, tmp_path):
    home = tmp_path / "h"
    run(capsys, monkeypatch, "add", "My dog's name is Max.", "--home", home)
    code, _, err = run(capsys, monkeypatch, "train", "--seed", 10**20, "--home", home)
    assert code == 1 and err.strip() == "error: config option seed must be below 2**64"
    assert not (home / "indexes").exists()
