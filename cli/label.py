"""`lora-rlhf label`: rank candidate responses in the browser (or a terminal) -> a Rankings JSONL."""

from __future__ import annotations

import contextlib
import getpass
import json
import signal
from pathlib import Path
from typing import Annotated

import typer

from lora_rlhf.errors import DataError
from lora_rlhf_cli._common import echo_err, handle_errors


@handle_errors
def command(
    candidates: Annotated[Path | None, typer.Argument(
        help="Candidates JSONL ({id, prompt, responses} per line, e.g. from `lora-rlhf compare`).")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Rankings JSONL to append to (created if "
                                             "missing; reopening it resumes).")] = None,
    labeler: Annotated[str | None, typer.Option(help="Your name, stored on every line. Web: asked on the page "
                                                "when not given; terminal: defaults to the login name.")] = None,
    host: Annotated[str, typer.Option(help="Address to serve on. Another address than 127.0.0.1 exposes the "
                                      "page (no authentication) to that network.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to serve on; 0 picks a free one.")] = 0,
    terminal: Annotated[bool, typer.Option("--terminal", help="Rank in this terminal instead of a browser.")] = False,
    stats: Annotated[Path | None, typer.Option("--stats", help="Report per-labeler counts and agreement of this "
                                               "rankings file, then exit.", metavar="RANKINGS.jsonl")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="With --stats: print JSON.")] = False,
) -> None:
    """Rank the responses of each prompt, best first (ties allowed); every judgement is appended at once."""
    from lora_rlhf.labeling.judgement import check_labeler
    from lora_rlhf.labeling.session import LabelSession
    from lora_rlhf.labeling.stats import compute_stats, format_stats

    if stats is not None:
        report = compute_stats(stats)
        typer.echo(json.dumps(report, indent=2) if as_json else format_stats(report))
        return
    if candidates is None or out is None:
        raise DataError("label needs a candidates file and --out",
                        fix="lora-rlhf label candidates.jsonl --out rankings.jsonl   (or: label --stats rankings.jsonl)")
    if labeler is not None or terminal:
        labeler = check_labeler(labeler or getpass.getuser())
    session = LabelSession.open(candidates, out)  # validates both files before anything is written
    with _stop_on_signals():
        if terminal:
            _terminal(session, labeler)
        else:
            _serve(session, labeler, host, port)


@contextlib.contextmanager
def _stop_on_signals():
    """Turn SIGINT and SIGTERM into KeyboardInterrupt while labelling, whatever the parent set.

    A process started from a background job (`make test &`, nohup, some CI runners) inherits SIGINT as ignored,
    so Python would never raise KeyboardInterrupt, and SIGTERM would kill it without the closing message. Every
    submission is appended under a lock as it arrives, so stopping between requests loses nothing.
    """
    def stop(signum, frame):
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _terminal(session, labeler: str) -> None:
    from lora_rlhf.labeling.terminal import run_terminal

    try:
        counts = run_terminal(session, labeler)
    except KeyboardInterrupt:
        counts = None
    done = session.progress(labeler)
    ran = f"{counts['labeled']} ranked, {counts['skipped']} skipped now; " if counts else ""
    typer.echo(f"\n{ran}{done['done']} of {done['total']} done for {labeler} in {session.store.path}")


def _serve(session, labeler: str | None, host: str, port: int) -> None:
    from lora_rlhf.labeling.server import LabelServer

    try:
        server = LabelServer(session, host, port, default_labeler=labeler)
    except OSError as e:
        raise DataError(f"cannot serve on {host}:{port}: {e.strerror}",
                        fix="choose another --port (0 picks a free one) or --host") from None
    if server.allowed_hosts() is None:
        echo_err(f"Warning: serving on {host}: anyone who can reach it can read the candidates and label.")
    typer.echo(f"Labelling page: {server.url}")
    typer.echo(f"Writing to {session.store.path}. Press Ctrl-C to stop (every submission is already saved).")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    typer.echo(f"\nStopped; {server.session.store.lines_written} judgement(s) written this run.")


if __name__ == "__main__":  # `python -m lora_rlhf_cli.label ...`: the same command without importing the other commands
    typer.run(command)
